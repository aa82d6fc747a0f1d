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

import contextlib
import io
import os
import sys
import warnings

import onnx
import torch

from . import ops
from .errors import UserError

OPSET = 17
IR_VERSION = ops.IR_VERSION


PROTOBUF_LIMIT = 2**31  # bytes: one serialized ONNX protobuf cannot be larger


def capture(model: torch.nn.Module, example: torch.Tensor) -> onnx.ModelProto:
    ops.register_all()
    model.eval()
    _check_fits_one_protobuf(model)
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad(), _quiet_native_stderr(), _unfused_attention():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(
                model, (example,), buf, dynamo=False, opset_version=OPSET,
                input_names=["input"], output_names=["output"],
                do_constant_folding=True,
            )
        except torch.onnx.errors.UnsupportedOperatorError as exc:
            raise UserError(f"the ONNX exporter cannot capture the model: {_first_line(exc)}") from None
        except RuntimeError as exc:  # shape errors inside the model's forward
            raise UserError(
                f"the model does not run on an input of shape {tuple(example.shape)}: {_first_line(exc)}"
            ) from None
    proto = onnx.load_from_string(buf.getvalue())
    _refuse_foreign_ops(proto)
    return finalize(proto)


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


@contextlib.contextmanager
def _unfused_attention():
    """nn.MultiheadAttention (torchvision's ViT encoder) in eval mode without grad takes a
    fused kernel, `aten::_native_multi_head_attention`, that the TorchScript exporter has no
    translation for; with the fast path off, the same attention is traced as the standard
    ops it is made of."""
    enabled = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(enabled)


@contextlib.contextmanager
def _quiet_native_stderr():
    """The exporter's C++ side writes warnings straight to file descriptor 2 (e.g. "shape
    inference of custom::X is missing"), past Python's warning filters; errors come back as
    exceptions, so its stderr is dropped to keep the CLI's one-line error contract."""
    try:
        saved = os.dup(2)
    except OSError:  # no usable fd 2: nothing to quiet
        yield
        return
    try:
        with open(os.devnull, "wb") as devnull:
            sys.stderr.flush()
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _check_fits_one_protobuf(model: torch.nn.Module) -> None:
    """Weights over 2 GiB (torchvision's vit_h_14 and regnet_y_128gf) do not fit one ONNX
    protobuf, and every pass here works on in-memory protobufs; the exporter would fail with
    a message about file paths. Refuse by size, before the (long) export."""
    size = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    if size >= PROTOBUF_LIMIT:
        raise UserError(f"the model's weights take {size / 2**30:.2f} GiB; an ONNX model in one file holds "
                        "less than 2 GiB, and gate2deploy does not write ONNX external data")


def _refuse_foreign_ops(proto: onnx.ModelProto) -> None:
    """An op outside the standard and gate2deploy domains (an `autograd.Function` with its own
    `symbolic`, e.g. a PACT clip exported as `custom::PactClip`) runs on no target, so the
    export could be neither verified nor deployed: refuse it by name. Without `symbolic` the
    exporter traces the Function's forward into standard ops, which is what is wanted."""
    for node in proto.graph.node:
        if node.domain not in ("", "ai.onnx", ops.DOMAIN):
            raise UserError(
                f"the model exports op {node.domain}::{node.op_type} (node {node.name}), which no "
                "gate2deploy target runs: remove its autograd.Function's `symbolic` so that its forward "
                "is traced into standard ops")


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
