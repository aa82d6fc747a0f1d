"""Pass: plain convolutions that read an FBS layer's output become
`gate2deploy::SparseInputConv` (the `--target ort` path).

Why: an FBSConv's inactive output channels are exact zeros (per sample), so the next layer
only needs the active ones (semantics §5: "a real kernel skips both"). When that next layer is
itself an FBSConv, its kernel already skips zero input channels. When it is a plain conv
(in the FBS ResNet-18, conv2 of each block, which is added to the shortcut and so is not
gated), ONNX Runtime's Conv would multiply every zero channel. SparseInputConv computes
exactly the same Conv but reads only each sample's non-zero input channels.

Expects: a graph after the fold pipeline; may contain `gate2deploy::FBSConv` nodes.

Guarantees: every node matching the pattern below is replaced by a SparseInputConv node with
the same X and W, B (a zero constant when the Conv had no bias), strides, pads and dilations,
and the same output tensor; the function computed is unchanged (OPS.md: SparseInputConv is
exactly Conv). Every other node is untouched. Returns the rewritten nodes' names.

Pattern (what is rewritten, declared as data):
    Conv(X = FBSConv(...), W = constant 4-D float32, B = constant or absent)
    with group 1, no auto_pad, 2-D kernel.
A Conv reached through other ops (pooling, residual Add) is left as it is: there the zero
channels are not guaranteed.
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from .ir import const_value

DOMAIN = "gate2deploy"
PATTERN = {
    "op": "Conv",
    "input_producer": (DOMAIN, "FBSConv"),
    "attrs": {"group": 1, "auto_pad": ("NOTSET", b"NOTSET")},
}


def _matches(node: gs.Node) -> bool:
    if node.op != PATTERN["op"] or node.domain not in ("", "ai.onnx", None):
        return False
    x = node.inputs[0]
    if len(x.inputs) != 1:
        return False
    producer = x.inputs[0]
    if (producer.domain, producer.op) != PATTERN["input_producer"]:
        return False
    if node.attrs.get("group", 1) != PATTERN["attrs"]["group"]:
        return False
    if node.attrs.get("auto_pad", "NOTSET") not in PATTERN["attrs"]["auto_pad"]:
        return False
    w = const_value(node.inputs[1])
    if w is None or w.ndim != 4 or w.dtype != np.float32:
        return False
    if len(node.inputs) > 2 and node.inputs[2] is not None and node.inputs[2].name:
        b = const_value(node.inputs[2])
        if b is None or b.dtype != np.float32:
            return False
    return True


def sparse_fbs_consumers(graph: gs.Graph) -> list[str]:
    rewritten = []
    for node in [n for n in graph.nodes if _matches(n)]:
        w = const_value(node.inputs[1])
        has_bias = len(node.inputs) > 2 and node.inputs[2] is not None and node.inputs[2].name
        bias = node.inputs[2] if has_bias else gs.Constant(
            f"{node.name}/zero_bias", np.zeros(w.shape[0], np.float32))
        attrs = {k: node.attrs[k] for k in ("strides", "pads", "dilations") if k in node.attrs}
        node.op, node.domain = "SparseInputConv", DOMAIN
        node.inputs = [node.inputs[0], node.inputs[1], bias]
        node.attrs = attrs
        rewritten.append(node.name)
    return rewritten
