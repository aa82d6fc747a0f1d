"""Capture a PyTorch model (with its gates) as an ONNX graph.

Why the TorchScript exporter (`dynamo=False`) and not the dynamo one: on these machines it
captures torchvision ResNet-50 in about 1.6 s (the compile-time budget is 5 s), it folds
eval-mode BatchNorm into the preceding Conv, it names nodes after the module path
(`/layer1/layer1.0/conv1/Conv`), which reports and the profiler reuse, and custom-domain
nodes come from a plain `autograd.Function.symbolic`. With torch 2.14 the dynamo exporter's
custom-translation path failed inside onnxscript's inliner on the same model. The exporter
is used only here: swapping it means changing this module alone.

Contract: `capture(model, example)` returns a shape-inferred `onnx.ModelProto`, opset 17,
IR version 10 (what onnxruntime 1.31 accepts), one input `input` and one output `output`
(batch dimension fixed to the example's), gate2deploy schemas registered.
"""
from __future__ import annotations

import io
import warnings

import onnx
import torch

from . import ops
from .errors import UserError

OPSET = 17
IR_VERSION = ops.IR_VERSION


def capture(model: torch.nn.Module, example: torch.Tensor) -> onnx.ModelProto:
    ops.register_all()
    model.eval()
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(
                model, (example,), buf, dynamo=False, opset_version=OPSET,
                input_names=["input"], output_names=["output"],
                do_constant_folding=True,
            )
        except RuntimeError as exc:  # shape errors inside the model's forward
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UserError(
                f"the model does not run on an input of shape {tuple(example.shape)}: {first}"
            ) from None
    proto = onnx.load_from_string(buf.getvalue())
    return finalize(proto)


finalize = ops.finalize


def module_path(node_name: str) -> str:
    """The PyTorch module path of a captured node: the TorchScript exporter names nodes
    after their scopes, e.g. `/layer1/layer1.0/downsample/downsample.0/Conv` for
    `layer1.0.downsample.0` (a child of a container is named `container.child`)."""
    parts: list[str] = []
    for scope in node_name.strip("/").split("/")[:-1]:
        if parts and scope.startswith(parts[-1] + "."):
            parts[-1] = scope
        else:
            parts.append(scope)
    return ".".join(parts)
