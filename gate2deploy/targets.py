"""Targets: one object per deployment target, owning what differs between them.

- `onnx`: portable ONNX (standard ops only; gated layers lowered, passes/lower_portable.py),
  run by a stock ONNX Runtime;
- `ort`: ONNX with gate2deploy's custom ops, run by ONNX Runtime with the native library
  (runtimes/native);
- `trt`: ONNX with the gated ops as TensorRT plugin nodes, built into an engine where
  TensorRT and a GPU exist.

Each target names its pass pipeline (pipeline.PIPELINES), checks that it can be used here
(`check_available`, raising TargetUnavailableError, exit 3), writes its output, and opens a
session for verification and profiling. `export`, `info` and `profile` take the same names;
`profile`'s earlier names (`ort-cpu`, `tensorrt`) are aliases (`get_target`), and LUTs
written under them still load (profiling/lut.py normalises with `canonical_name`).
"""
from __future__ import annotations

import os
from pathlib import Path

import onnx

from .errors import OptionError, TargetUnavailableError
from .fileio import atomic_path

ALIASES = {"ort-cpu": "ort", "tensorrt": "trt"}


class Target:
    name = ""
    description = ""

    @property
    def pipeline(self) -> str:
        return self.name  # the key of pipeline.PIPELINES

    def check_available(self) -> None:
        """Raise TargetUnavailableError when this machine cannot build / run the target."""

    def prepare(self, model: onnx.ModelProto) -> onnx.ModelProto:
        """The compiled model as this target writes it (what verification then runs)."""
        return model

    def write(self, model: onnx.ModelProto, path: str | os.PathLike) -> Path:
        """Write the compiled model atomically (temporary file, then rename)."""
        with atomic_path(path) as tmp:
            onnx.save(model, str(tmp))
        return Path(path)

    def session(self, model: onnx.ModelProto, threads: int = 2):
        """An ONNX Runtime CPU session for the model (custom ops registered when it has any)."""
        from .runtimes.ort import open_session
        return open_session(model, threads=threads)


class OnnxTarget(Target):
    name = "onnx"
    description = "portable ONNX, standard ops only"


class OrtTarget(Target):
    name = "ort"
    description = "ONNX Runtime CPU with gate2deploy's native custom ops"


class TrtTarget(Target):
    """The compiled model is the TensorRT-ready ONNX (gated ops as plugin nodes, verified on
    ONNX Runtime CPU with the native ops); `write` saves that. Building the engine needs the
    optimisation profile and precision: `gate2deploy export --target trt` writes
    model.trt.onnx + model.trt.json and builds the engine where TensorRT and a GPU exist
    (cli/export.py, cli/build_engine.py), else exits 3 with the command for a GPU host."""

    name = "trt"
    description = "TensorRT engine with gate2deploy's plugins"

    def check_available(self) -> None:
        from .runtimes import tensorrt_available  # import-guarded, never imports TensorRT eagerly
        problem = tensorrt_available()
        if problem:
            raise TargetUnavailableError(f"--target trt: {problem}")

    def prepare(self, model: onnx.ModelProto) -> onnx.ModelProto:
        from .runtimes.tensorrt_plugins import prepare_for_tensorrt
        return prepare_for_tensorrt(model)


TARGETS: dict[str, Target] = {t.name: t for t in (OnnxTarget(), OrtTarget(), TrtTarget())}


def canonical_name(name: str) -> str:
    return ALIASES.get(name, name)


def get_target(name: str) -> Target:
    target = TARGETS.get(canonical_name(name))
    if target is None:
        raise OptionError(f"unknown target {name!r}; choose one of {', '.join(TARGETS)}")
    return target
