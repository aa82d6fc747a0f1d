"""Pass: a BatchNormalization (and then a Relu) after a CGConv or PGConv becomes the gated
op's optional epilogue (the `--target ort` path).

Why: in the seed's ResNet-20 every gated conv is followed by its block's BatchNorm and ReLU.
ONNX Runtime folds those into its own convolutions, but not into a custom op: unfused they are
two more nodes and two more passes over the tensor per gated layer (measured on the PG
ResNet-20 with ONNX Runtime's profiler: BatchNormalization and the extra Relu were about 8%
of the network's time, as much as the gated convs saved).

Expects: a graph after the fold pipeline; may contain `gate2deploy::CGConv` / `PGConv`.

Guarantees: for every match of the pattern below, the BatchNormalization is folded into the
gated node's inputs post_scale, post_shift and the Relu (if present) into its attribute
activation="Relu" (OPS.md); the node then writes the last fused node's output tensor and the
fused nodes are removed. The function computed is unchanged up to float32 rounding: the
folded affine is ONNX Runtime's own BatchNormalization arithmetic (Y = X * s + b with
s = scale / sqrt(var + eps), b = B - mean * s). The gates are decided before the epilogue,
so no gate changes. Every other node is untouched. Returns the fused gated nodes' names.

Pattern (declared as data):
    BatchNormalization(X = CGConv(...) | PGConv(...) without an epilogue,
                       scale, B, mean, var: constant float32 [O]), inference mode, one output,
    its X read by nothing else and not a graph output; then optionally Relu of its output,
    likewise its only reader.
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from gate2deploy.ops import DOMAIN

from .ir import const_value, remove_fused, sole_consumer

# Where CGConv / PGConv's optional epilogue inputs (post_scale, post_shift) start (OPS.md):
# the op's input count without an epilogue. Read also by the portable lowering and gated_verify.
EPILOGUE_INPUTS_AT = {"CGConv": 4, "PGConv": 3}
PATTERN = {
    "producers": {(DOMAIN, op): at for op, at in EPILOGUE_INPUTS_AT.items()},
    "op": "BatchNormalization",
    "then": "Relu",
}


def activation_name(value) -> str:
    """The `activation` attribute as a str ("" when absent); ONNX string attributes may arrive
    as bytes."""
    return value.decode() if isinstance(value, bytes) else (value or "")


def _folded_batchnorm(bn: gs.Node, channels: int) -> tuple[np.ndarray, np.ndarray] | None:
    """(post_scale, post_shift) of an inference-mode BatchNormalization with constant
    parameters of `channels` values, else None."""
    if bn.attrs.get("training_mode", 0) or len(bn.outputs) != 1 or len(bn.inputs) != 5:
        return None
    params = [const_value(t) for t in bn.inputs[1:]]
    if any(p is None or p.dtype != np.float32 or p.shape != (channels,) for p in params):
        return None
    scale, bias, mean, var = params
    eps = np.float32(bn.attrs.get("epsilon", 1e-5))
    inv_std = np.float32(1) / np.sqrt(var + eps)
    post_scale = (inv_std * scale).astype(np.float32)
    post_shift = (bias - mean * post_scale).astype(np.float32)
    return post_scale, post_shift


def _channels(node: gs.Node) -> int | None:
    w = node.inputs[1]
    shape = w.shape if w.shape is not None else getattr(const_value(w), "shape", None)
    return int(shape[0]) if shape is not None and isinstance(shape[0], int) else None


def fuse_gated_epilogue(graph: gs.Graph) -> list[str]:
    fused = []
    for node in list(graph.nodes):
        plain_inputs = PATTERN["producers"].get((node.domain, node.op))
        if plain_inputs is None or len(node.inputs) != plain_inputs or node.attrs.get("activation"):
            continue
        bn = sole_consumer(graph, node.outputs[0], PATTERN["op"])
        channels = _channels(node)
        if bn is None or channels is None:
            continue
        folded = _folded_batchnorm(bn, channels)
        if folded is None:
            continue
        removed = [bn]
        relu = sole_consumer(graph, bn.outputs[0], PATTERN["then"])
        if relu is not None:
            node.attrs["activation"] = "Relu"
            removed.append(relu)
        node.inputs.extend([gs.Constant(f"{node.name}/post_scale", folded[0]),
                            gs.Constant(f"{node.name}/post_shift", folded[1])])
        node.outputs = [removed[-1].outputs[0]]
        remove_fused(graph, removed)
        fused.append(node.name)
    return fused
