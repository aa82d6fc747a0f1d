"""What executes gate2deploy's custom ops: reference implementations, the native ONNX Runtime
CPU library, Triton GPU kernels, TensorRT plugins, and latency back ends.

Nothing here imports TensorRT or a GPU stack at import time.
"""
from __future__ import annotations

import importlib.util

from gate2deploy.errors import TargetUnavailableError

MIN_TENSORRT = "10.6"  # tensorrt.plugin, the Python "quickly deployable plugins"
MIN_TENSORRT_AOT = "10.9"  # tensorrt.plugin.aot_impl: plugins whose compiled kernel is in the engine
# the gated ops' TensorRT plugins (tensorrt_plugins.build_engine, `--plugins`): the kernels compiled into the
# engine (tensorrt_aot.py), Python plugins calling them, or aot where the TensorRT has it
PLUGIN_KINDS = ("auto", "aot", "jit")


class TensorRTUnavailable(TargetUnavailableError):
    """TensorRT or a GPU is missing (not bad input): exit code 3, distinct from 2, so a
    script can tell "run this elsewhere" from "fix your input"."""


def tensorrt_available() -> str | None:
    """None if TensorRT and a GPU can be used, else a one-line reason."""
    if importlib.util.find_spec("tensorrt") is None:
        return "TensorRT is not installed (pip package 'tensorrt' with NVIDIA's libraries)"
    try:
        import tensorrt  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - bindings without libnvinfer fail in many ways
        return f"TensorRT does not load: {(str(exc).splitlines() or ['unknown error'])[0]}"
    try:
        import torch
        if not torch.cuda.is_available():
            return "no CUDA GPU is visible"
    except Exception:  # noqa: BLE001
        return "no CUDA GPU is visible"
    return None
