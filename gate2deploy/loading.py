"""Loaders: turn what the user has on disk into an `nn.Module` with weights.

Three kinds of checkpoint (chosen by content, not by file name):
- a `torch.export` program (.pt2 archive): loaded with `torch.export.load`;
- a state_dict checkpoint, possibly wrapped (`state_dict`, `model_state_dict`, `net`,
  `model`), possibly with `module.` prefixes from DataParallel/DDP: needs `--model`
  (`package.module:callable` or `path/to/file.py:callable`) to build the architecture;
- a whole pickled module (`torch.save(model)`, as sensAI saves its group models): only with
  `trust_pickle=True` (CLI `--trust-pickle`), because unpickling runs arbitrary code.

Everything else is refused with a one-line `UserError`.
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import pickle
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .errors import UserError

WRAPPER_KEYS = ("state_dict", "model_state_dict", "net", "model")


@dataclass
class Checkpoint:
    """What was found in the file: a state dict (tensors by key) and/or a module."""

    path: Path
    state_dict: dict[str, torch.Tensor] | None = None
    module: nn.Module | None = None
    meta: dict = field(default_factory=dict)  # non-tensor entries of the wrapping dict


def load_checkpoint(path: str | Path, trust_pickle: bool = False) -> Checkpoint:
    path = Path(path)
    if not path.exists():
        raise UserError(f"checkpoint {path} does not exist")
    if not path.is_file():
        raise UserError(f"checkpoint {path} is not a file")
    if _is_exported_program(path):
        try:
            program = torch.export.load(str(path))
        except Exception as exc:  # noqa: BLE001 - any failure means "not loadable"
            raise UserError(f"{path} is not a loadable torch.export program: {_one_line(exc)}") from None
        return Checkpoint(path, module=ExportedProgramModule(program.module()), meta={"format": "torch.export"})
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=not trust_pickle)
    except pickle.UnpicklingError as exc:
        if not trust_pickle and "weights_only" in str(exc):
            raise UserError(
                f"{path} contains pickled Python objects (e.g. a whole module), which run code "
                "when loaded; refusing by default. If you trust the file, pass --trust-pickle"
            ) from None
        raise UserError(f"{path} is not a PyTorch checkpoint: {_one_line(exc)}") from None
    except Exception as exc:  # noqa: BLE001 - torch.load fails in many ways on foreign bytes
        raise UserError(f"{path} is not a readable PyTorch checkpoint (truncated or another format): {_one_line(exc)}") from None
    return _interpret(path, obj)


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
    tensors = {k: v for k, v in inner.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise UserError(f"{path} has no tensors (keys: {', '.join(list(obj)[:6])})")
    return Checkpoint(path, state_dict=strip_prefix(tensors, "module."), meta=meta)


def strip_prefix(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Strip `prefix` from keys if every key carries it (DataParallel/DDP checkpoints)."""
    if sd and all(k.startswith(prefix) for k in sd):
        return {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def build_model(spec: str, kwargs_json: str | None = None) -> nn.Module:
    """Build an architecture from `module.path:callable` or `file.py:callable`."""
    if ":" not in spec:
        raise UserError(f"--model {spec!r} must look like package.module:callable or file.py:callable")
    target, _, attr = spec.rpartition(":")
    kwargs = {}
    if kwargs_json:
        try:
            kwargs = json.loads(kwargs_json)
        except json.JSONDecodeError as exc:
            raise UserError(f"--model-kwargs is not valid JSON: {exc}") from None
    if target.endswith(".py"):
        file = Path(target)
        if not file.is_file():
            raise UserError(f"--model file {file} does not exist")
        mod_name = f"gate2deploy_user_{file.stem}"
        module_spec = importlib.util.spec_from_file_location(mod_name, file)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[mod_name] = module
        try:
            module_spec.loader.exec_module(module)
        except Exception as exc:  # noqa: BLE001
            raise UserError(f"--model file {file} fails to import: {_one_line(exc)}") from None
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as exc:
            raise UserError(f"--model module {target!r} cannot be imported: {_one_line(exc)}") from None
    fn = getattr(module, attr, None)
    if fn is None or not callable(fn):
        raise UserError(f"--model: {target} has no callable {attr!r}")
    try:
        model = fn(**kwargs)
    except Exception as exc:  # noqa: BLE001
        raise UserError(f"--model {spec} failed to build: {_one_line(exc)}") from None
    if not isinstance(model, nn.Module):
        raise UserError(f"--model {spec} returned a {type(model).__name__}, not an nn.Module")
    return model


def load_weights(model: nn.Module, sd: dict[str, torch.Tensor], what: str) -> None:
    """load_state_dict with a one-line summary of what does not fit."""
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
    model.load_state_dict(sd, strict=True)


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
    except zipfile.BadZipFile:
        return False


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
