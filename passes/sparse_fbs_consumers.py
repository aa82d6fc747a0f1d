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
the same X and W, B (a zero constant when the Conv had no bias), strides, pads and dilations;
the function computed is unchanged (OPS.md: SparseInputConv is exactly Conv, plus what it
fuses). Every other node is untouched. Returns the rewritten nodes' names.

Pattern (what is rewritten, declared as data):
    Conv(X = FBSConv(...), W = constant 4-D float32, B = constant or absent)
    with group 1, no auto_pad, 2-D kernel.
A Conv reached through other ops (pooling, residual Add) is left as it is: there the zero
channels are not guaranteed.

Fused epilogue (the ResNet block's `relu(bn2(conv2(h)) + shortcut)`, BN already folded into
the conv by the exporter): when the conv's output feeds only an `Add` with another tensor of
the same static shape, the Add becomes input R; when that Add's output in turn feeds only a
`Relu`, it becomes `activation="Relu"`. The node then writes the last fused op's output
tensor; the fused nodes are removed. Graph outputs are never fused away (they must exist).
Why: ONNX Runtime fuses Conv + Add + Relu for its own convs, not for a custom op; unfused they
are two more full passes over the tensor per block.
"""
from __future__ import annotations

import onnx_graphsurgeon as gs

from gate2deploy.ops import DOMAIN

from .ir import STANDARD_DOMAINS, constant_conv_weights, conv_as_custom_op, remove_fused, sole_consumer

PATTERN = {
    "op": "Conv",
    "input_producer": (DOMAIN, "FBSConv"),
    "attrs": {"group": 1, "auto_pad": ("NOTSET", b"NOTSET")},
}


def _matches(node: gs.Node) -> bool:
    if node.op != PATTERN["op"] or node.domain not in STANDARD_DOMAINS:
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
    return constant_conv_weights(node) is not None


def _fuse_epilogue(graph: gs.Graph, node: gs.Node) -> None:
    """Fold a following residual Add (and then Relu) into the SparseInputConv `node`."""
    y = node.outputs[0]
    add = sole_consumer(graph, y, "Add")
    if add is None or len(add.inputs) != 2:
        return
    residual = add.inputs[1] if add.inputs[0] is y else add.inputs[0]
    if residual is y or residual.shape is None or y.shape is None or \
            tuple(residual.shape) != tuple(y.shape) or not all(isinstance(d, int) for d in y.shape):
        return
    last = add
    relu = sole_consumer(graph, add.outputs[0], "Relu")
    if relu is not None:
        node.attrs["activation"] = "Relu"
        last = relu
    node.inputs.append(residual)
    node.outputs = [last.outputs[0]]
    remove_fused(graph, (add, relu) if relu is not None else (add,))


def sparse_fbs_consumers(graph: gs.Graph) -> list[str]:
    rewritten = []
    for node in [n for n in graph.nodes if _matches(n)]:
        conv_as_custom_op(node, "SparseInputConv", ("strides", "pads", "dilations"))
        _fuse_epilogue(graph, node)
        rewritten.append(node.name)
    return rewritten
