"""What executes gate2deploy's custom ops: reference implementations, the native ONNX Runtime
CPU library, Triton GPU kernels, TensorRT plugins, and latency back ends.

Nothing here imports TensorRT or a GPU stack at import time.
"""
from __future__ import annotations

import importlib.util

from gate2deploy.errors import TargetUnavailableError

MIN_TENSORRT = "10.6"  # tensorrt.plugin, the Python "quickly deployable plugins"


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
