"""TensorRT path for the gate2deploy custom ops (import-guarded; needs TensorRT >= 10.6 and an
NVIDIA GPU, neither of which this project's machines have).

* `prepare_for_tensorrt(model)`: TensorRT's ONNX parser turns an unknown node into a plugin
  named after its op_type, with version = attribute `plugin_version` (default "1") and
  namespace = attribute `plugin_namespace` (default ""). This adds
  `plugin_namespace="gate2deploy"`, `plugin_version="1"` to every gate2deploy node so the
  parser finds the plugins registered below. Pure ONNX; works (and is tested) anywhere.
* `register_plugins()`: registers CGConv, PGConv, FBSConv as TensorRT "quickly deployable"
  Python plugins (`tensorrt.plugin`): shape functions from the ONNX Conv output-size formula,
  implementations that call the Triton kernels of runtimes/triton_kernels.py on the plugin's
  CUDA tensors (a JIT plugin: the engine needs this Python process to run; an AOT plugin
  embedding the compiled Triton kernels is future work).
* `build_engine(onnx_path, engine_path)`: parse + build + write the serialized engine
  atomically.

Where TensorRT or a GPU is missing every entry point that needs them raises a one-line
`UserError` (the reason comes from `gate2deploy.runtimes.tensorrt_available`). These paths
have never run on a GPU here: only the clean failure and `prepare_for_tensorrt` are tested.
"""
from __future__ import annotations

import os

import onnx
from onnx import helper

from gate2deploy.errors import UserError
from gate2deploy.ops import PLUGIN_NAMESPACE, PLUGIN_VERSION

from . import tensorrt_available

NAMESPACE = PLUGIN_NAMESPACE  # the op catalog's (gate2deploy/ops.py)
OPS = ("CGConv", "PGConv", "FBSConv")
_registered = False


def prepare_for_tensorrt(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` whose gate2deploy nodes carry the plugin namespace/version attributes."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for node in out.graph.node:
        if node.domain != NAMESPACE:
            continue
        if node.op_type not in OPS:
            raise UserError(f"node {node.name or node.op_type}: {NAMESPACE}::{node.op_type} has no "
                            "TensorRT plugin")
        names = {a.name for a in node.attribute}
        if "plugin_namespace" not in names:
            node.attribute.append(helper.make_attribute("plugin_namespace", NAMESPACE))
        if "plugin_version" not in names:
            node.attribute.append(helper.make_attribute("plugin_version", PLUGIN_VERSION))
    return out


def _require_tensorrt():
    problem = tensorrt_available()
    if problem:
        raise UserError(f"TensorRT path unavailable: {problem}")
    import tensorrt as trt  # noqa: PLC0415 - guarded import

    try:
        import tensorrt.plugin  # noqa: F401,PLC0415 - TensorRT >= 10.6
    except ImportError:
        raise UserError(f"TensorRT {trt.__version__} has no tensorrt.plugin (need >= 10.6)") from None
    return trt


def _out_dim(size, k, stride, pad_a, pad_b, dil):
    """ONNX Conv output size on TensorRT shape expressions (or ints)."""
    return (size + (pad_a + pad_b) - ((k - 1) * dil + 1)) // stride + 1


def register_plugins() -> None:
    """Register the three plugins with TensorRT (idempotent)."""
    global _registered
    _require_tensorrt()
    if _registered:
        return
    from typing import Tuple  # noqa: PLC0415

    import numpy as np  # noqa: PLC0415
    import numpy.typing as npt  # noqa: PLC0415
    import tensorrt.plugin as trtp  # noqa: PLC0415
    import torch  # noqa: PLC0415

    from . import triton_kernels as tk  # noqa: PLC0415

    def conv_desc(x, w, strides, pads, dilations):
        y = x.like()
        y.shape_expr[1] = w.shape_expr[0]
        y.shape_expr[2] = _out_dim(x.shape_expr[2], int(w.shape_expr[2]), int(strides[0]),
                                   int(pads[0]), int(pads[2]), int(dilations[0]))
        y.shape_expr[3] = _out_dim(x.shape_expr[3], int(w.shape_expr[3]), int(strides[1]),
                                   int(pads[1]), int(pads[3]), int(dilations[1]))
        return y

    def geometry(strides, pads, dilations):
        return (tuple(int(v) for v in strides), tuple(int(v) for v in pads),
                tuple(int(v) for v in dilations))

    def cuda(t):
        return torch.as_tensor(t, device="cuda")

    @trtp.register(f"{NAMESPACE}::CGConv")
    def _cg_desc(x: trtp.TensorDesc, w: trtp.TensorDesc, base_mask: trtp.TensorDesc,
                 threshold: trtp.TensorDesc, strides: npt.NDArray[np.int64],
                 pads: npt.NDArray[np.int64], dilations: npt.NDArray[np.int64]) -> trtp.TensorDesc:
        return conv_desc(x, w, strides, pads, dilations)

    @trtp.impl(f"{NAMESPACE}::CGConv")
    def _cg_impl(x: trtp.Tensor, w: trtp.Tensor, base_mask: trtp.Tensor, threshold: trtp.Tensor,
                 strides: npt.NDArray[np.int64], pads: npt.NDArray[np.int64],
                 dilations: npt.NDArray[np.int64],
                 outputs: Tuple[trtp.Tensor], stream: int) -> None:
        y = tk.cg_conv(cuda(x), cuda(w), cuda(base_mask), cuda(threshold),
                       *geometry(strides, pads, dilations))
        cuda(outputs[0]).copy_(y)

    @trtp.register(f"{NAMESPACE}::PGConv")
    def _pg_desc(x: trtp.TensorDesc, w: trtp.TensorDesc, threshold: trtp.TensorDesc, abits: int,
                 pred_bits: int, static_scale: float, strides: npt.NDArray[np.int64],
                 pads: npt.NDArray[np.int64], dilations: npt.NDArray[np.int64],
                 group: int) -> trtp.TensorDesc:
        return conv_desc(x, w, strides, pads, dilations)

    @trtp.impl(f"{NAMESPACE}::PGConv")
    def _pg_impl(x: trtp.Tensor, w: trtp.Tensor, threshold: trtp.Tensor, abits: int,
                 pred_bits: int, static_scale: float, strides: npt.NDArray[np.int64],
                 pads: npt.NDArray[np.int64], dilations: npt.NDArray[np.int64], group: int,
                 outputs: Tuple[trtp.Tensor], stream: int) -> None:
        y = tk.pg_conv(cuda(x), cuda(w), cuda(threshold), abits, pred_bits, static_scale,
                       *geometry(strides, pads, dilations), group)
        cuda(outputs[0]).copy_(y)

    @trtp.register(f"{NAMESPACE}::FBSConv")
    def _fbs_desc(x: trtp.TensorDesc, w: trtp.TensorDesc, fc_w: trtp.TensorDesc,
                  fc_b: trtp.TensorDesc, bn_scale: trtp.TensorDesc, bn_shift: trtp.TensorDesc,
                  beta: trtp.TensorDesc, density: float, pool: str,
                  strides: npt.NDArray[np.int64], pads: npt.NDArray[np.int64],
                  dilations: npt.NDArray[np.int64]) -> trtp.TensorDesc:
        return conv_desc(x, w, strides, pads, dilations)

    @trtp.impl(f"{NAMESPACE}::FBSConv")
    def _fbs_impl(x: trtp.Tensor, w: trtp.Tensor, fc_w: trtp.Tensor, fc_b: trtp.Tensor,
                  bn_scale: trtp.Tensor, bn_shift: trtp.Tensor, beta: trtp.Tensor, density: float,
                  pool: str, strides: npt.NDArray[np.int64], pads: npt.NDArray[np.int64],
                  dilations: npt.NDArray[np.int64],
                  outputs: Tuple[trtp.Tensor], stream: int) -> None:
        y = tk.fbs_conv(cuda(x), cuda(w), cuda(fc_w), cuda(fc_b), cuda(bn_scale), cuda(bn_shift),
                        cuda(beta), density, pool, *geometry(strides, pads, dilations))
        cuda(outputs[0]).copy_(y)

    _registered = True


def build_engine(onnx_path: str | os.PathLike, engine_path: str | os.PathLike,
                 workspace_mib: int = 1024) -> None:
    """Parse `onnx_path` (gate2deploy nodes as plugins) and write a serialized engine."""
    trt = _require_tensorrt()
    from gate2deploy.fileio import atomic_path, check_writable  # noqa: PLC0415

    check_writable(engine_path)
    register_plugins()
    model = prepare_for_tensorrt(onnx.load(str(onnx_path)))
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(model.SerializeToString()):
        first = parser.get_error(0) if parser.num_errors else "unknown error"
        raise UserError(f"TensorRT cannot parse {onnx_path}: {first}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mib << 20)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise UserError(f"TensorRT could not build an engine for {onnx_path}")
    with atomic_path(engine_path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(serialized)
