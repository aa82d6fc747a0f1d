"""Small helpers over onnx-graphsurgeon graphs shared by the passes."""
from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from gate2deploy import ops


def import_graph(model: onnx.ModelProto) -> gs.Graph:
    return gs.import_onnx(model)


def export_model(graph: gs.Graph) -> onnx.ModelProto:
    """Back to ONNX with fresh shape inference (shapes change when channels are removed)."""
    graph.cleanup().toposort()
    for tensor in graph.tensors().values():
        if isinstance(tensor, gs.Variable) and tensor not in graph.inputs and tensor not in graph.outputs:
            tensor.shape = None
    model = gs.export_onnx(graph, do_type_check=False)
    return ops.finalize(model)


def const_value(tensor) -> np.ndarray | None:
    """The value of a constant tensor (initializer or Constant-node output), else None."""
    if isinstance(tensor, gs.Constant):
        return tensor.values
    if len(tensor.inputs) == 1 and tensor.inputs[0].op == "Constant":
        attr = tensor.inputs[0].attrs.get("value")
        if isinstance(attr, gs.Constant):
            return attr.values
        if attr is not None:
            return np.asarray(attr)
    return None


def shape_of(tensor) -> tuple[int, ...] | None:
    """Static shape, or None when unknown or symbolic."""
    shape = getattr(tensor, "shape", None)
    if shape is None or any(not isinstance(d, (int, np.integer)) for d in shape):
        return None
    return tuple(int(d) for d in shape)


# The standard ONNX domain under each spelling a graph may carry.
STANDARD_DOMAINS = ("", "ai.onnx", None)


def sole_consumer(graph: gs.Graph, tensor: gs.Tensor, op: str, domain: str = "") -> gs.Node | None:
    """The only node reading `tensor`, if it is `op` of `domain` (the standard domain by
    default, under any of its spellings) and `tensor` is not a graph output (so fusing that
    node into the producer changes nothing else)."""
    if tensor in graph.outputs or len(tensor.outputs) != 1:
        return None
    node = tensor.outputs[0]
    domains = STANDARD_DOMAINS if domain in STANDARD_DOMAINS else (domain,)
    return node if node.op == op and node.domain in domains else None


def remove_fused(graph: gs.Graph, nodes) -> None:
    """Detach and remove nodes a fusion has taken over (their output tensors are now written
    by the fused node)."""
    for node in nodes:
        node.inputs.clear()
        node.outputs.clear()
        graph.nodes.remove(node)


def new_const(name: str, values: np.ndarray) -> gs.Constant:
    return gs.Constant(name, np.ascontiguousarray(values))


def bypass(graph: gs.Graph, node: gs.Node) -> None:
    """Remove a single-input single-output node, rewiring its consumers to its input."""
    src, dst = node.inputs[0], node.outputs[0]
    if dst in graph.outputs:
        # Keep the graph output's name: make the producer of src write dst instead.
        producer = src.inputs[0] if src.inputs else None
        if producer is not None and len(src.outputs) == 1:
            idx = producer.outputs.index(src)
            producer.outputs[idx] = dst
            node.outputs.clear()
            node.inputs.clear()
            return
        node.op, node.attrs, node.domain = "Identity", {}, ""
        del node.inputs[1:]
        return
    for consumer in list(dst.outputs):
        for i, t in enumerate(consumer.inputs):
            if t is dst:
                consumer.inputs[i] = src
    node.outputs.clear()
    node.inputs.clear()


def conv_bias(node: gs.Node) -> gs.Tensor | None:
    """A Conv node's bias input, or None when it has none (absent or an empty name)."""
    if len(node.inputs) > 2 and node.inputs[2] is not None and node.inputs[2].name:
        return node.inputs[2]
    return None


def constant_conv_weights(node: gs.Node) -> np.ndarray | None:
    """W of a Conv node whose weights are a constant 4-D float32 tensor and whose bias is a
    float32 constant or absent (what the passes that rewrite a Conv into a gate2deploy op
    with X, W, B take), else None."""
    w = const_value(node.inputs[1])
    if w is None or w.ndim != 4 or w.dtype != np.float32:
        return None
    bias = conv_bias(node)
    if bias is not None:
        b = const_value(bias)
        if b is None or b.dtype != np.float32:
            return None
    return w


def conv_as_custom_op(node: gs.Node, op: str, attrs: tuple[str, ...]) -> None:
    """Rewrite a Conv node (constant_conv_weights) in place as gate2deploy::`op`(X, W, B)
    with B a zero constant where the Conv had no bias, keeping the named attributes."""
    bias = conv_bias(node)
    if bias is None:
        w = const_value(node.inputs[1])
        bias = gs.Constant(f"{node.name}/zero_bias", np.zeros(w.shape[0], np.float32))
    kept = {k: node.attrs[k] for k in attrs if k in node.attrs}
    node.op, node.domain = op, ops.DOMAIN
    node.inputs = [node.inputs[0], node.inputs[1], bias]
    node.attrs = kept
