"""Mayo's YAML configuration, resolved as Mayo resolves it (seed 000, deep-fry/mayo).

Facts from Mayo's code (mayo/parse.py `ConfigBase.yaml_update`, `_DotDict`, mayo/cli.py,
mayo/net/graph.py `_replace_module_kwargs`); the code here is our own:
- `_import: path` (or a list) is read first, relative to the folder of the YAML that names
  it, then the YAML itself is merged on top; several YAMLs given in sequence are merged in
  that order, then `key.path=value` overrides (the value parsed as YAML).
- Merging is recursive for mappings, replacement otherwise; a key with dots is a path
  (`model.layers: {...}` in models/override/cifarnet.yaml), `\\.` escapes a dot.
- `$(a.b)` is looked up from the root of the merged config (`$(.b)` from the enclosing
  mapping) when the value is read, so later files and overrides win; a string that is only
  the placeholder takes the value itself (a mapping, a number), otherwise it is substituted
  as text.
- `^(name)` inside a `type: module` layer is the module's keyword argument `name` (its
  `kwargs` default, or the value given where the module is used), replaced before `$()`.
- `!arith` evaluates arithmetic after substitution. `!exec` / `!eval` run Python code from
  the YAML: refused (gate2deploy does not run code from a model description).

Relative `--mayo-model` paths are found from the current folder, else from the Mayo root
(`--mayo-root`, default: the nearest folder above the YAML that holds `models/`), as Mayo
is run from its root (`./my datasets/cifar10.yaml models/gate/resnet18.yaml ...`).
"""
from __future__ import annotations

import ast
import math
import operator
import re
from pathlib import Path

import yaml

from ..errors import UserError

_PLACEHOLDER = re.compile(r"\$\((\.?[_a-zA-Z][_a-zA-Z0-9.\s]*)\)")
_KWARG = re.compile(r"\^\(([_a-zA-Z][_a-zA-Z0-9.]*)\)")


class Arith:
    """A `!arith` expression, evaluated after its placeholders are substituted."""

    def __init__(self, text: str):
        self.text = text

    def __repr__(self):
        return f"!arith {self.text!r}"


class Unresolved:
    """A `$(key)` whose key no YAML defines (e.g. `dataset.task.num_classes` without a dataset
    YAML): kept as a value so that only its use is an error, and the one use we can answer
    from the checkpoint (a classifier's `num_outputs`) is answered there."""

    def __init__(self, key: str):
        self.key = key

    def __repr__(self):
        return f"$({self.key})"


class _Loader(yaml.SafeLoader):
    pass


def _code_tag(loader, node):
    raise UserError(f"Mayo YAML tag {node.tag} runs Python code from the description; gate2deploy refuses it "
                    f"(line {node.start_mark.line + 1} of {node.start_mark.name})")


_Loader.add_constructor("!arith", lambda loader, node: Arith(loader.construct_scalar(node)))
_Loader.add_constructor("!exec", _code_tag)
_Loader.add_constructor("!eval", _code_tag)


def _split_path(key: str) -> list[str]:
    parts: list[str] = []
    for piece in str(key).split("."):
        if parts and parts[-1].endswith("\\"):
            parts[-1] = parts[-1][:-1] + "." + piece
        else:
            parts.append(piece)
    return parts


def _expand(value):
    """Dotted keys of every mapping become nested paths (Mayo's _DotDict normalisation)."""
    if isinstance(value, dict):
        out: dict = {}
        for k, v in value.items():
            _set_path(out, _split_path(k) if isinstance(k, str) else [k], _expand(v))
        return out
    if isinstance(value, list):
        return [_expand(v) for v in value]
    return value


def _set_path(tree: dict, path: list, value) -> None:
    *head, last = path
    for part in head:
        nxt = tree.get(part)
        if not isinstance(nxt, dict):
            nxt = tree[part] = {}
        tree = nxt
    merge(tree, {last: value})


def merge(into: dict, new: dict) -> None:
    for k, v in new.items():
        if isinstance(into.get(k), dict) and isinstance(v, dict):
            merge(into[k], v)
        else:
            into[k] = v


def find_root(yaml_path: Path) -> Path | None:
    for folder in yaml_path.resolve().parents:
        if (folder / "models").is_dir():
            return folder
    return None


def locate(path: str, root: Path | None, what: str) -> Path:
    p = Path(path)
    if p.is_file():
        return p
    if not p.is_absolute() and root is not None and (root / p).is_file():
        return root / p
    where = f" (nor under the Mayo root {root})" if root is not None and not p.is_absolute() else ""
    raise UserError(f"{what} {path} does not exist{where}")


def _read(path: Path, chain: tuple[Path, ...]) -> dict:
    if path.resolve() in chain:
        raise UserError(f"Mayo YAML {path} imports itself through {' -> '.join(str(c) for c in chain)}")
    try:
        with open(path) as f:
            data = yaml.load(f, Loader=_Loader)  # noqa: S506 - SafeLoader subclass
    except OSError as exc:
        raise UserError(f"Mayo YAML {path} cannot be read: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        first = str(exc).strip().splitlines()[0]
        raise UserError(f"Mayo YAML {path} is not valid YAML: {first}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"Mayo YAML {path} holds a {type(data).__name__}, not a mapping")
    imports = data.pop("_import", None)
    config: dict = {}
    for imp in [imports] if isinstance(imports, str) else list(imports or []):
        target = Path(imp) if Path(imp).is_absolute() else path.parent / imp
        if not target.is_file():
            raise UserError(f"Mayo YAML {path}: _import {imp} does not exist ({target})")
        merge(config, _read(target, chain + (path.resolve(),)))
    merge(config, _expand(data))
    return config


def load(yamls: list[str], overrides: list[str], root: str | None) -> tuple[dict, Path | None, list[Path]]:
    """The merged raw configuration of `yamls` (in order) and `overrides` (`key=value`), the
    Mayo root used, and the YAML files read."""
    if not yamls:
        raise UserError("--mayo-model needs at least one Mayo YAML")
    root_path = Path(root) if root else None
    if root_path is not None and not root_path.is_dir():
        raise UserError(f"--mayo-root {root} is not a folder")
    files = []
    for y in yamls:
        files.append(locate(y, root_path, "Mayo YAML"))
        root_path = root_path or find_root(files[-1])
    config: dict = {}
    for f in files:
        merge(config, _read(f, ()))
    for o in overrides:
        key, sep, text = o.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--mayo-set {o!r} is not KEY=VALUE (e.g. _gate.density=0.5)")
        try:
            value = yaml.load(text, Loader=_Loader)  # noqa: S506
        except yaml.YAMLError:
            raise UserError(f"--mayo-set {o!r}: the value is not valid YAML") from None
        _set_path(config, _split_path(key.strip()), _expand(value))
    return config, root_path, files


# ---- evaluation -------------------------------------------------------------------------

def lookup(root: dict, key: str):
    node = root
    for part in _split_path(key):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return Unresolved(key)
    return node


def resolve(value, root: dict, parent: dict | None = None, depth: int = 0):
    """`value` with every `$()` placeholder and `!arith` evaluated (recursively)."""
    if depth > 64:
        raise UserError("Mayo YAML placeholders refer to each other in a cycle")
    if isinstance(value, dict):
        return {k: resolve(v, root, value, depth) for k, v in value.items()}
    if isinstance(value, list):
        return [resolve(v, root, parent, depth) for v in value]
    if isinstance(value, Arith):
        text = resolve(value.text, root, parent, depth)
        if isinstance(text, Unresolved):
            return text
        return _arith(str(text))
    if isinstance(value, str):
        return _substitute(value, root, parent, depth)
    return value


def _substitute(text: str, root, parent, depth):
    while True:
        keys = _PLACEHOLDER.findall(text)
        if not keys:
            return text
        for k in keys:
            holder = f"$({k})"
            clean = re.sub(r"\s", "", k)
            if clean.startswith("."):
                v = lookup(parent or {}, clean[1:])
            else:
                v = lookup(root, clean)
            v = resolve(v, root, parent, depth + 1)
            if not text.replace(holder, "").strip():
                return v
            if isinstance(v, Unresolved):
                return v
            if isinstance(v, (dict, list)):
                raise UserError(f"Mayo YAML: {text!r} puts the mapping {holder} inside a string")
            text = text.replace(holder, str(v))


def replace_kwargs(value, kwargs: dict):
    """`^(name)` of a module's layers and graph replaced by its keyword arguments; inner
    modules replace their own (after theirs are replaced by ours)."""
    if isinstance(value, dict):
        if value.get("type") == "module":
            inner = {k: replace_kwargs(v, kwargs) for k, v in value.items() if k in (value.get("kwargs") or {})}
            return {**value, **inner}  # its own layers are replaced when the module is built
        return {k: replace_kwargs(v, kwargs) for k, v in value.items()}
    if isinstance(value, list):
        return [replace_kwargs(v, kwargs) for v in value]
    if isinstance(value, Arith):
        return Arith(replace_kwargs(value.text, kwargs))
    if isinstance(value, str):
        while True:
            names = _KWARG.findall(value)
            if not names:
                return value
            for n in names:
                if n not in kwargs:
                    raise UserError(f"Mayo YAML: ^({n}) is not a keyword argument of its module")
                if value == f"^({n})":
                    return kwargs[n]
                value = value.replace(f"^({n})", str(kwargs[n]))
    return value


_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Pow: operator.pow, ast.BitXor: operator.xor, ast.Mod: operator.mod}


def _arith(text: str):
    """Mayo's `!arith` (mayo/parse.py ArithTag): arithmetic, comparisons, `a if c else b`,
    lists; calls only to `math` functions (Mayo imports any callable by name)."""
    def ev(n):
        if isinstance(n, ast.Constant):
            return n.value
        if isinstance(n, ast.Name):
            return n.id
        if isinstance(n, ast.List):
            return [ev(e) for e in n.elts]
        if isinstance(n, ast.UnaryOp) and isinstance(n.op, ast.USub):
            return -ev(n.operand)
        if isinstance(n, ast.BinOp) and type(n.op) in _BINOPS:
            return _BINOPS[type(n.op)](ev(n.left), ev(n.right))
        if isinstance(n, ast.Compare) and len(n.ops) == 1 and type(n.ops[0]) in (ast.Eq, ast.NotEq):
            eq = ev(n.left) == ev(n.comparators[0])
            return eq if isinstance(n.ops[0], ast.Eq) else not eq
        if isinstance(n, ast.IfExp):
            return ev(n.body) if ev(n.test) else ev(n.orelse)
        if isinstance(n, ast.BoolOp) and isinstance(n.op, ast.And):
            return all(ev(v) for v in n.values)
        if (isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and isinstance(n.func.value, ast.Name)
                and n.func.value.id == "math" and hasattr(math, n.func.attr)):
            return getattr(math, n.func.attr)(*[ev(a) for a in n.args])
        raise UserError(f"Mayo YAML !arith {text!r}: {type(n).__name__} is not supported")
    try:
        return ev(ast.parse(text, mode="eval").body)
    except SyntaxError:
        raise UserError(f"Mayo YAML !arith {text!r} is not an expression") from None
