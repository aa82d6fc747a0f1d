"""Loaders: turn what the user has on disk into an `nn.Module` with weights.

Three kinds of checkpoint (chosen by content, not by file name):
- a `torch.export` program (.pt2 archive): loaded with `torch.export.load`;
- a state_dict checkpoint, possibly wrapped (`state_dict`, `model_state_dict`, `net`,
  `model`), possibly with `module.` prefixes from DataParallel/DDP: needs `--model`
  (`package.module:callable` or `path/to/file.py:callable`) to build the architecture;
- a whole pickled module (`torch.save(model)`, as sensAI saves its group models): only with
  `trust_pickle=True` (CLI `--trust-pickle`), because unpickling runs arbitrary code.

Everything else is refused with a one-line `UserError`.

Decisions (issue 12):
- The safe loader (`weights_only=True`) also accepts numpy arrays, numpy scalars and their
  dtypes (numeric, bool, string; not object arrays) through an allow-list of numpy's
  reconstructors (`_numpy_safe_globals`): seed checkpoints keep search histories in them
  (Joslim). That is not `--trust-pickle`: nothing on the list runs code from the file.
- A refusal names what needs trust: the classes/functions the pickle refers to, the user's
  own first. A file that is neither torch.save's zip nor a pickle is "not a PyTorch
  checkpoint", never "needs trust".
- The state dict's `_metadata` (module versions) travels with it through unwrapping and
  prefix stripping: modules read it in `_load_from_state_dict`.
- `--model file.py` imports the file as its repository runs it (`import_root`,
  `package_of`); `--model-path DIR` adds folders for other layouts and for the classes of a
  trusted pickle. Modules imported from those folders are forgotten after the build.
"""
from __future__ import annotations

import ast
import contextlib
import importlib
import io
import importlib.util
import json
import logging
import pickle
import re
import sys
import warnings
import zipfile
import zlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .errors import UserError, first_line
from .fileio import pickle_protocol

WRAPPER_KEYS = ("state_dict", "model_state_dict", "net", "model")


@dataclass
class Checkpoint:
    """What was found in the file: a state dict (tensors by key) and/or a module."""

    path: Path
    state_dict: dict[str, torch.Tensor] | None = None
    module: nn.Module | None = None
    meta: dict = field(default_factory=dict)  # non-tensor entries of the wrapping dict


def load_checkpoint(path: str | Path, trust_pickle: bool = False,
                    model_paths: Sequence[str | Path] = ()) -> Checkpoint:
    """`model_paths`: folders to import pickled classes from (only with `trust_pickle`)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"checkpoint {path} does not exist")
    if not path.is_file():
        raise UserError(f"checkpoint {path} is not a file")
    if _is_exported_program(path):
        try:
            reason = _exported_program_pickles(path)
        except (zipfile.BadZipFile, zlib.error, UnicodeDecodeError, ValueError, OSError, EOFError) as exc:
            raise UserError(f"{path} is not a loadable torch.export program: a damaged archive "
                            f"({first_line(exc)})") from None
        if reason and not trust_pickle:
            raise UserError(f"{path}: a torch.export archive whose {reason}; loading it runs code from the file: "
                            "pass --trust-pickle if you trust it")
        try:
            # torch logs a failed deserialization with its traceback (then tries the old format):
            # the refusal below is the one line the user gets
            with _quiet_logger("torch.export"), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                program = torch.export.load(str(path))
        except Exception as exc:  # noqa: BLE001 - any failure means "not loadable"
            raise UserError(f"{path} is not a loadable torch.export program: {first_line(exc)}") from None
        return Checkpoint(path, module=ExportedProgramModule(program.module()), meta={"format": "torch.export"})
    _check_torch_save_format(path)
    if trust_pickle:
        obj = _load_trusted(path, model_paths)
    else:
        try:
            # torch warns (two lines on stderr) about pickle protocols above 2; the outcome is
            # reported below in one line
            with torch.serialization.safe_globals(_numpy_safe_globals()), warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Detected pickle protocol")
                obj = torch.load(str(path), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            raise UserError(_needs_trust_message(path, exc)) from None
        except Exception as exc:  # noqa: BLE001 - torch.load fails in many ways on foreign bytes
            raise UserError(f"{path} is not a readable PyTorch checkpoint (truncated or damaged): "
                            f"{first_line(exc)}") from None
    return _interpret(path, obj)


def _check_torch_save_format(path: Path) -> None:
    """torch.save writes a zip archive holding `<name>/data.pkl` (the legacy format: a raw
    pickle stream, which starts with the PROTO opcode). Anything else - JSON, text, random
    bytes - is not a checkpoint, and must not be diagnosed as a pickle that needs trust."""
    with open(path, "rb") as f:
        head = f.read(4)
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
            if any(n.endswith("constants.pkl") or "/code/" in n for n in names):
                raise UserError(f"{path} is a TorchScript archive (torch.jit.save), which gate2deploy does not "
                                "read: save a torch.export program (.pt2) or the state_dict")
            if any(n.endswith("data.pkl") for n in names):
                return
        except (zipfile.BadZipFile, UnicodeDecodeError, ValueError, OSError, EOFError):
            # a damaged central directory (bit flips: undecodable names, bad offsets)
            raise UserError(f"{path} is not a readable PyTorch checkpoint: a damaged zip archive") from None
        raise UserError(f"{path} is not a PyTorch checkpoint: a zip archive without torch.save's data.pkl")
    if head[:2] == b"PK":
        raise UserError(f"{path} is not a readable PyTorch checkpoint: a truncated or damaged zip archive")
    if head[:1] == b"\x80" and len(head) > 1 and 2 <= head[1] <= 5:
        return  # a pickle stream: torch.save's legacy format
    looks = "JSON" if head.lstrip()[:1] in (b"{", b"[") else "text" if head.isascii() else "unknown bytes"
    raise UserError(f"{path} is not a PyTorch checkpoint (neither torch.save's zip archive nor a pickle; "
                    f"it looks like {looks})")


def _numpy_safe_globals() -> list:
    """The numpy objects a checkpoint's extra entries hold (Joslim saves its search history
    as numpy arrays and scalars): the array and scalar reconstructors, `ndarray` and the
    numeric/bool/string dtypes. None of them runs code from the file: they rebuild a buffer
    of plain values. Object arrays are not allowed (their items are arbitrary objects).
    numpy 1.x wrote the reconstructors as `numpy.core.multiarray.*` (numpy 2 moved them to
    `numpy._core`), so both names map to the same functions."""
    import numpy as np

    multiarray = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray
    allowed: list = [np.ndarray, np.dtype]
    for fn in (multiarray._reconstruct, multiarray.scalar):
        allowed += [fn, (fn, f"numpy.core.multiarray.{fn.__name__}"), (fn, f"numpy._core.multiarray.{fn.__name__}")]
    for code in "?bhilqBHILQefdgFDGUS":
        allowed.append(type(np.dtype(code)))
    return allowed


def _needs_trust_message(path: Path, exc: BaseException) -> str:
    """Name what in the file needs trust: the object the safe loader refused (from torch's
    message) and the other globals the pickle names that are not allowed."""
    found = re.search(r"GLOBAL ([\w.]+)", str(exc)) or re.search(r"got <class '([\w.]+)'>", str(exc))
    names = [found.group(1)] if found else []
    try:
        allowed = {_global_name(g) for g in _numpy_safe_globals()}
        names += [n for n in torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
                  if n not in allowed and n not in names]
    except Exception:  # noqa: BLE001 - legacy format: torch's message is all there is
        pass
    if not names:  # nothing in the file needs trust: the pickle itself is broken, or newer
        protocol = pickle_protocol(path)
        if protocol is not None and protocol > 2:
            return (f"{path} was saved with pickle protocol {protocol}, which torch's safe loader "
                    "(weights_only) cannot read: save it again with torch.save's default protocol, or pass "
                    "--trust-pickle if you trust the file")
        return f"{path} is not a readable PyTorch checkpoint (truncated or damaged): {first_line(exc)}"
    # The user's own classes first: they are what needs trust (and what must be importable).
    names = sorted(names, key=lambda n: n.startswith(("torch.", "collections.", "builtins.")))
    shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    # Only torch's own names tell a whole module apart: importing the user's classes to look
    # at them would run their code.
    what = "a whole module" if any(n.startswith("torch.nn.modules.") for n in names) else "Python objects"
    return (f"{path} pickles {what} (class/function {shown}), which runs code from the file when "
            "loaded: pass --trust-pickle if you trust it")


def _global_name(entry) -> str:
    if isinstance(entry, tuple):
        return entry[1]
    return f"{entry.__module__}.{entry.__qualname__}"


def _load_trusted(path: Path, model_paths: Sequence[str | Path]):
    """Unpickle with code execution allowed; the classes the file names are imported from
    `model_paths` first (sensAI pickles `models.cifar.vgg.VGG`, importable only from the
    seed repository's root)."""
    with _on_sys_path([Path(p) for p in model_paths]):
        try:
            return torch.load(str(path), map_location="cpu", weights_only=False)
        except ModuleNotFoundError as exc:
            missing = exc.name or first_line(exc)
            raise UserError(f"{path} pickles classes from module {missing!r}, which cannot be imported: "
                            f"{_where_hint(missing, [path.parent, Path.cwd()])}") from None
        except ImportError as exc:  # the module is there but fails to import
            raise UserError(f"{path} pickles classes whose module fails to import ({first_line(exc)}): "
                            "pass --model-path DIR with the code the file was saved with") from None
        except AttributeError as exc:  # the module exists but lacks the pickled class
            raise UserError(f"{path} pickles a class its module does not define ({first_line(exc)}): "
                            "pass --model-path DIR with the code the file was saved with") from None
        except Exception as exc:  # noqa: BLE001 - damaged files, or the pickled code itself failing
            raise UserError(f"{path} could not be unpickled: {first_line(exc)}") from None


def _where_hint(missing: str, starts: Sequence[Path]) -> str:
    """Hint for a module that cannot be imported: the nearest folder above `starts` that
    holds it, if any, else the flag to pass."""
    top = missing.split(".")[0]
    for start in starts:
        for folder in (start.resolve(), *start.resolve().parents):
            if _holds_module(folder, top):
                return f"pass --model-path {folder} (it holds {top}/), or run from that folder"
    return (f"pass --model-path DIR (the folder that holds {top}/, e.g. the repository root), "
            "or run from the repository root")


def _holds_module(folder: Path, name: str) -> bool:
    return (folder / name).is_dir() or (folder / f"{name}.py").is_file()


def _module_location(module) -> str:
    """Where a module was imported from: its file, or a namespace package's first folder."""
    return getattr(module, "__file__", None) or next(iter(getattr(module, "__path__", None) or []), "")


@contextlib.contextmanager
def _on_sys_path(folders: Sequence[Path]):
    """Put `folders` first on sys.path (in order) for the duration, and afterwards forget
    the modules imported from them: the next build (another repository with its own `utils`
    or `models`, in the same process) imports its own. Objects already built keep theirs."""
    added = [str(f.resolve()) for f in folders]
    before = set(sys.modules)
    sys.path[:0] = added
    try:
        yield
    finally:
        for entry in added:
            if entry in sys.path:
                sys.path.remove(entry)
        for name in set(sys.modules) - before:
            where = _module_location(sys.modules[name])
            if where and any(Path(where).resolve().is_relative_to(a) for a in added):
                del sys.modules[name]


def _interpret(path: Path, obj) -> Checkpoint:
    if isinstance(obj, nn.Module):
        return Checkpoint(path, module=obj, meta={"format": "pickled module"})
    if not isinstance(obj, dict):
        raise UserError(f"{path} holds a {type(obj).__name__}, not a state dict or a module")
    meta = {k: v for k, v in obj.items() if not isinstance(v, (dict, torch.Tensor, nn.Module))}
    inner = obj
    for key in WRAPPER_KEYS:
        if key in obj and isinstance(obj[key], (dict, nn.Module)):
            inner = obj[key]
            meta.update({k: v for k, v in obj.items() if k != key and not isinstance(v, torch.Tensor)})
            break
    if isinstance(inner, nn.Module):
        return Checkpoint(path, module=inner, meta=meta)
    tensors = _with_metadata({k: v for k, v in inner.items() if isinstance(v, torch.Tensor)},
                             getattr(inner, "_metadata", None))
    if not tensors:
        raise UserError(f"{path} has no tensors (keys: {', '.join(list(obj)[:6])})")
    return Checkpoint(path, state_dict=strip_prefix(tensors, "module."), meta=meta)


def _with_metadata(sd: dict, metadata) -> OrderedDict:
    """A state dict carrying `_metadata` (module path -> {"version": ...}), which
    `nn.Module.state_dict` attaches and some modules read in `_load_from_state_dict`
    (torchvision's MNASNet refuses to load without its version)."""
    out = OrderedDict(sd)
    if metadata is not None:
        out._metadata = metadata  # type: ignore[attr-defined]
    return out


def strip_prefix(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Strip `prefix` from keys if every key carries it (DataParallel/DDP checkpoints). The
    metadata's module paths lose it too (`module.features` -> `features`; the wrapper's own
    entry `module` becomes the root's)."""
    if not (sd and all(k.startswith(prefix) for k in sd)):
        return sd
    metadata = getattr(sd, "_metadata", None)
    if metadata is not None:
        stem = prefix.rstrip(".")
        metadata = OrderedDict((k[len(prefix):] if k.startswith(prefix) else "", v)
                               for k, v in metadata.items() if k == stem or k.startswith(prefix))
    return _with_metadata({k[len(prefix):]: v for k, v in sd.items()}, metadata)


def build_model(spec: str, kwargs_json: str | None = None, model_paths: Sequence[str | Path] = ()) -> nn.Module:
    """Build an architecture from `module.path:callable` or `file.py:callable`.

    `model_paths` (CLI `--model-path`, repeatable) go first on sys.path. A `file.py` is
    imported as its repository would run it: seed model files import their siblings
    (`import utils.pg_utils`, `from models.vgg import VGG`), so the nearest folder above the
    file that holds the packages it imports (`import_root`) goes on sys.path too."""
    if ":" not in spec:
        raise UserError(f"--model {spec!r} must look like package.module:callable or file.py:callable")
    target, _, attr = spec.rpartition(":")
    kwargs = {}
    if kwargs_json:
        try:
            kwargs = json.loads(kwargs_json)
        except json.JSONDecodeError as exc:
            raise UserError(f"--model-kwargs is not valid JSON: {exc}") from None
    folders = [Path(p) for p in model_paths]
    for folder in folders:
        if not folder.is_dir():
            raise UserError(f"--model-path {folder} is not a folder")
    if target.endswith(".py"):
        file = Path(target)
        if not file.is_file():
            raise UserError(f"--model file {file} does not exist")
        root = import_root(file)
        folders += [root] if root is not None else []
        package_root, dotted = package_of(file)
        # A file inside a package (Joslim's model/slim_resnet.py: `from .dyn_model import`) is
        # imported as `model.slim_resnet` from above the package, as its repository does;
        # a loose file as `python file.py` would run it, its own folder on the path.
        folders.append(package_root if dotted else file.parent)
    # Kept on sys.path while the builder runs too: builders may import lazily.
    with _on_sys_path(folders):
        module = _import_file(file, folders, dotted) if target.endswith(".py") else _import_module(target)
        fn = getattr(module, attr, None)
        if fn is None or not callable(fn):
            raise UserError(f"--model: {target} has no callable {attr!r}")
        try:
            model = fn(**kwargs)
        except KeyError as exc:  # seed builders read their options as kwargs['wbits']
            raise UserError(f"--model {spec} failed to build: it reads option {exc} that was not given: "
                            "pass it in --model-kwargs") from None
        except Exception as exc:  # noqa: BLE001
            raise UserError(f"--model {spec} failed to build: {type(exc).__name__}: {first_line(exc)}") from None
    if not isinstance(model, nn.Module):
        raise UserError(f"--model {spec} returned a {type(model).__name__}, not an nn.Module")
    return model


def _import_module(target: str):
    try:
        return importlib.import_module(target)
    except ImportError as exc:
        raise UserError(f"--model module {target!r} cannot be imported: {first_line(exc)}") from None


def _import_file(file: Path, folders: list[Path], dotted: str | None):
    names = top_level_imports(file) + ([dotted.split(".")[0]] if dotted else [])
    _forget_shadowed(names, folders)
    try:
        if dotted:
            return importlib.import_module(dotted)
        mod_name = f"gate2deploy_user_{file.stem}"
        module_spec = importlib.util.spec_from_file_location(mod_name, file)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[mod_name] = module  # dataclasses look their module up there
        module_spec.loader.exec_module(module)
        return module
    except ModuleNotFoundError as exc:
        missing = exc.name or first_line(exc)
        raise UserError(f"--model file {file} imports module {missing!r}, which cannot be found: "
                        f"{_where_hint(missing, [file.parent])}") from None
    except Exception as exc:  # noqa: BLE001
        raise UserError(f"--model file {file} fails to import: {first_line(exc)}") from None


def package_of(file: Path) -> tuple[Path, str | None]:
    """(folder above the outermost package holding `file`, dotted module name), or
    (file's folder, None) when its folder is not a package (no `__init__.py`)."""
    folder, parts = file.resolve().parent, [file.stem]
    while (folder / "__init__.py").is_file() and folder.name.isidentifier():
        parts.insert(0, folder.name)
        folder = folder.parent
    return (folder, ".".join(parts)) if len(parts) > 1 else (file.resolve().parent, None)


def top_level_imports(file: Path) -> list[str]:
    """First components of the absolute imports at the top level of `file` (including those
    inside top-level `try`/`if` blocks), in order of appearance; stdlib modules left out."""
    try:
        tree = ast.parse(file.read_text(), str(file))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return []  # the import itself will report it
    names: list[str] = []

    def visit(body):
        for node in body:
            if isinstance(node, ast.Import):
                names.extend(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.append(node.module.split(".")[0])
            elif isinstance(node, (ast.Try, ast.If)):
                for part in (node.body, getattr(node, "orelse", []), getattr(node, "finalbody", []),
                             *[h.body for h in getattr(node, "handlers", [])]):
                    visit(part)
    visit(tree.body)
    seen = dict.fromkeys(n for n in names if n not in sys.stdlib_module_names)
    return list(seen)


def import_root(file: Path) -> Path | None:
    """The nearest folder at or above `file`'s own from which its top-level imports resolve:
    it holds at least one of the modules/packages the file imports, and every other one is
    there too or installed. None when no folder holds any (a self-contained file)."""
    names = top_level_imports(file)
    for folder in (file.resolve().parent, *file.resolve().parent.parents):
        local = [n for n in names if _holds_module(folder, n)]
        if local and all(n in local or _installed(n) for n in names):
            return folder
    return None


def _installed(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _forget_shadowed(names: list[str], folders: list[Path]) -> None:
    """A package of the same name imported earlier from elsewhere (a sibling seed's `utils`,
    a test tree's `models`) would be reused by `import` from sys.modules; the user's
    repository shadows it, as it would when run from its root."""
    for name in names:
        loaded = sys.modules.get(name)
        folder = next((f for f in folders if _holds_module(f, name)), None)
        if loaded is None or folder is None or name == __name__.split(".")[0]:
            continue
        where = _module_location(loaded)
        installed = any(part in ("site-packages", "dist-packages") for part in Path(where).parts)
        if where and not installed and not Path(where).resolve().is_relative_to(folder.resolve()):
            for key in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
                del sys.modules[key]


def load_weights(model: nn.Module, sd: dict[str, torch.Tensor], what: str) -> list[str]:
    """load_state_dict with a one-line summary of what does not fit. Returns notes on the
    exact dtype conversions made (for the report; `weight_dtype_conversions`)."""
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    wrong = [f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}"
             for k in own if k in sd and sd[k].shape != own[k].shape]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
    if wrong:
        problems.append(f"{len(wrong)} of another shape (e.g. {'; '.join(wrong[:2])})")
    if problems:
        raise UserError(f"{what} does not fit the model: keys {'; '.join(problems)}")
    notes = weight_dtype_conversions(own, sd, what)
    try:
        model.load_state_dict(sd, strict=True)
    except Exception as exc:  # noqa: BLE001 - a module's own _load_from_state_dict refusing
        raise UserError(f"{what} does not load into the model: {first_line(exc)}") from None
    return notes


def weight_dtype_conversions(own: dict, sd: dict, what: str) -> list[str]:
    """The dtype policy for checkpoint tensors loaded into the model's tensors
    (load_state_dict would cast silently: issue 17 item 7):
    - complex: refused by name (the cast drops the imaginary part);
    - a float stored narrower than the model's (float16/bfloat16 into float32): every such
      value is exactly a float32, so the conversion is exact; noted in the report;
    - float64 into float32: accepted only when every value rounds to itself (exact),
      otherwise refused by name: never a silent approximation;
    - integers or bool into a float tensor: refused by name (quantized weights without their
      scale would be read as raw codes); a model whose own tensor is integer (a quantized
      layer's codes, BatchNorm's num_batches_tracked) takes integers as they are."""
    converted: dict[tuple, int] = {}
    for key, target in own.items():
        src = sd.get(key)
        if not isinstance(src, torch.Tensor) or src.dtype == target.dtype:
            continue
        if src.is_complex():
            raise UserError(f"{what}: {key} holds complex values ({src.dtype}); gate2deploy compiles real-valued "
                            "models and will not drop the imaginary part")
        if not target.is_floating_point():
            if src.is_floating_point():
                raise UserError(f"{what}: {key} holds {src.dtype} values where the model keeps {target.dtype}")
            continue  # integer into integer (num_batches_tracked and the like)
        if not src.is_floating_point():
            raise UserError(f"{what}: {key} holds integer values ({src.dtype}) for a {target.dtype} tensor: "
                            "a quantized checkpoint? gate2deploy reads float weights (dequantize them first) "
                            "or a model whose layer stores its integer codes itself")
        if torch.finfo(src.dtype).bits > torch.finfo(target.dtype).bits or (
                src.dtype == torch.bfloat16 and target.dtype == torch.float16) or (
                src.dtype == torch.float16 and target.dtype == torch.bfloat16):
            rounded = src.to(target.dtype).to(src.dtype)
            same = (rounded == src) | (torch.isnan(rounded) & torch.isnan(src))
            if not bool(same.all()):
                raise UserError(f"{what}: {key} holds {src.dtype} values that {target.dtype} cannot represent "
                                f"exactly; convert the checkpoint to {target.dtype} yourself if that rounding "
                                "is acceptable")
        converted[(src.dtype, target.dtype)] = converted.get((src.dtype, target.dtype), 0) + 1
    return [f"{n} tensors stored as {str(a).replace('torch.', '')} converted exactly to {str(b).replace('torch.', '')}"
            for (a, b), n in converted.items()]


class ExportedProgramModule(nn.Module):
    """A torch.export program as a module. Its train/eval mode was fixed when it was
    exported and it refuses `.train()`/`.eval()`, which the ONNX exporter calls: here
    switching modes is a no-op."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def train(self, mode: bool = True):
        return self

    def forward(self, *args):
        return self.inner(*args)


def _is_exported_program(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    try:
        with zipfile.ZipFile(path) as z:
            return any(n.endswith("serialized_exported_program.json") or "/models/" in n and n.endswith(".json")
                       for n in z.namelist())
    except (zipfile.BadZipFile, UnicodeDecodeError, ValueError, OSError, EOFError):
        return False  # damaged: _check_torch_save_format names it


def _exported_program_pickles(path: Path) -> str | None:
    """What in a .pt2 archive torch.export.load would unpickle with weights_only=False (torch
    2.14, torch/export/pt2_archive/_package.py and _export/serde/serialize.py): weights or
    constants saved with `use_pickle`, script / opaque object constants, and sample inputs the
    safe loader refuses (torch retries them unsafely). None: nothing but tensors and JSON."""
    with zipfile.ZipFile(path) as z:
        for name in z.namelist():
            if name.endswith(("data/weights/model_weights_config.json", "data/constants/model_constants_config.json")):
                try:
                    config = json.loads(z.read(name)).get("config", {})
                except (ValueError, AttributeError):
                    return f"{name} is not valid JSON"
                for fqn, meta in (config.items() if isinstance(config, dict) else []):
                    meta = meta if isinstance(meta, dict) else {}
                    if meta.get("use_pickle"):
                        return f"entry {fqn!r} is stored as a pickle"
                    if "constants" in name and not str(meta.get("path_name", "tensor_")).startswith("tensor_"):
                        return f"constant {fqn!r} is a pickled object ({meta.get('path_name')})"
            elif ("/data/sample_inputs/" in name and not name.endswith("/")) or name.rsplit("/", 1)[-1] in (
                    "serialized_state_dict.pt", "serialized_constants.pt", "serialized_example_inputs.pt"):
                # (the last three: torch 2.7's format, which torch.export.load falls back to)
                try:
                    torch.load(io.BytesIO(z.read(name)), weights_only=True)
                except Exception:  # noqa: BLE001 - anything the safe loader refuses
                    return f"sample inputs {name} are a pickle the safe loader refuses"
    return None


@contextlib.contextmanager
def _quiet_logger(name: str):
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


