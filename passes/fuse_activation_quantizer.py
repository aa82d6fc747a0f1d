"""Pass: the seed's sign-magnitude activation quantizer, exported as a chain of standard ops,
becomes one `gate2deploy::QuantizeActivation` node (the `--target ort` path).

Why: a quantized non-gated conv (dnn-gating's QuantizedConv2d, gate2deploy.gated; in the PG
ResNet-20 every block's conv2 and option-B shortcut) quantizes its input with
quantize_sign_magnitude, which torch.onnx exports as eleven elementwise and reduction nodes,
each a full pass over the activation. Measured (ONNX Runtime profile of the PG ResNet-20,
batch 1, 1 thread, Intel Xeon): those chains were about half of the network's time (0.8 of
1.6 ms), more than all its convolutions. The native kernel does it in two passes.

Expects: a graph after the fold pipeline.

Guarantees: every match of the pattern below is replaced by one QuantizeActivation node
reading the chain's input X and writing the chain's output tensor, with `levels` and `eps`
(dynamic scale) or `scale` (a constant scale: the seed's calibrated static scale) taken from
the chain's constants; the function is unchanged bit for bit (the kernel performs the
chain's float32 operations in its order; OPS.md). The chain's intermediate tensors must have
no other readers and not be graph outputs. Every other node is untouched. Returns the new
nodes' names.

Pattern (the chain quantize_sign_magnitude exports; _match below walks it back from y):
    sign = Sign(X); mag = Abs(X)
    s    = Add(ReduceMax(mag) over every axis, eps)   |   a constant scalar scale
    y    = Mul(Mul(Div(Round(Mul(Clip(Div(mag, s), 0, 1), L)), L), s), sign)
with eps, L constant scalars (L the same in both places).
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from gate2deploy.ops import DOMAIN

from .ir import STANDARD_DOMAINS, const_value

def _producer(t: gs.Tensor, op: str) -> gs.Node | None:
    if not isinstance(t, gs.Variable) or len(t.inputs) != 1:
        return None
    node = t.inputs[0]
    return node if node.op == op and node.domain in STANDARD_DOMAINS else None


def _scalar(t) -> float | None:
    v = const_value(t)
    return float(v.reshape(())) if v is not None and v.size == 1 and v.dtype == np.float32 else None


def _match(graph: gs.Graph, final: gs.Node) -> dict | None:
    """The chain ending in `final` (a Mul), or None."""
    if len(final.inputs) != 2:
        return None
    for m1_t, sign_t in (final.inputs, final.inputs[::-1]):
        sign, m1 = _producer(sign_t, "Sign"), _producer(m1_t, "Mul")
        if sign is None or m1 is None:
            continue
        x = sign.inputs[0]
        q = _producer(m1.inputs[0], "Div")
        s_t = m1.inputs[1]
        if q is None:
            continue
        r = _producer(q.inputs[0], "Round")
        levels = _scalar(q.inputs[1])
        m = _producer(r.inputs[0], "Mul") if r is not None else None
        if m is None or levels is None:
            continue
        clip = _producer(m.inputs[0], "Clip")
        if clip is None or _scalar(m.inputs[1]) != levels or len(clip.inputs) != 3 or \
                _scalar(clip.inputs[1]) != 0.0 or _scalar(clip.inputs[2]) != 1.0:
            continue
        d = _producer(clip.inputs[0], "Div")
        if d is None or not _same_scale(d.inputs[1], s_t):
            continue
        mag = _producer(d.inputs[0], "Abs")
        if mag is None or mag.inputs[0] is not x:
            continue
        chain = [final, m1, q, r, m, clip, d, mag, sign]
        attrs = {"levels": levels}
        static = _scalar(s_t)
        if static is not None:
            if not static > 0:
                continue
            attrs["scale"] = static
        else:
            add = _producer(s_t, "Add")
            if add is None:
                continue
            for mx_t, eps_t in (add.inputs, add.inputs[::-1]):
                mx, eps = _producer(mx_t, "ReduceMax"), _scalar(eps_t)
                if mx is not None and eps is not None and mx.inputs[0] is mag.outputs[0] and \
                        _reduces_everything(mx) and eps >= 0:
                    attrs["eps"] = eps
                    chain += [add, mx]
                    break
            else:
                continue
        if not _private(graph, chain, final):
            continue
        return {"x": x, "nodes": chain, "attrs": attrs}
    return None


def _same_scale(a, b) -> bool:
    """The chain divides and multiplies by the same s: one tensor, or two equal constants (a
    static scale is exported as a constant at each use)."""
    if a is b:
        return True
    va, vb = _scalar(a), _scalar(b)
    return va is not None and vb is not None and np.float32(va) == np.float32(vb)


def _reduces_everything(node: gs.Node) -> bool:
    """ReduceMax over every axis (no axes given; opset 18 takes them as an input)."""
    if node.attrs.get("axes") is not None or (len(node.inputs) > 1 and node.inputs[1].name):
        return False
    return not node.attrs.get("noop_with_empty_axes", 0)


def _private(graph: gs.Graph, nodes: list[gs.Node], final: gs.Node) -> bool:
    """Every tensor the chain computes, but its output, is read inside the chain only."""
    inside = {id(n) for n in nodes}
    for n in nodes:
        if n is final:
            continue
        for t in n.outputs:
            if t in graph.outputs or any(id(reader) not in inside for reader in t.outputs):
                return False
    return True


def fuse_activation_quantizer(graph: gs.Graph) -> list[str]:
    fused, taken = [], set()
    for node in [n for n in graph.nodes if n.op == "Mul"]:
        found = None if id(node) in taken else _match(graph, node)
        if found is None:
            continue
        y = node.outputs[0]
        name = f"{node.name or y.name}/QuantizeActivation"
        for n in found["nodes"]:
            n.inputs.clear()
            n.outputs.clear()
        taken.update(id(n) for n in found["nodes"])
        graph.nodes.append(gs.Node("QuantizeActivation", name, found["attrs"], inputs=[found["x"]],
                                   outputs=[y], domain=DOMAIN))
        fused.append(name)
    if fused:
        graph.nodes = [n for n in graph.nodes if id(n) not in taken]  # by identity, once
        graph.cleanup().toposort()
    return fused


def expand_quantizers(graph: gs.Graph) -> gs.Graph:
    """The inverse of this pass: every quantizer of the graph as the seed's standard-op chain
    again, those fused into a CG/PG node's epilogue (passes/fuse_gated_epilogue.py) split out
    first. For comparisons with the export before these fusions (tests, the benchmarks)."""
    from .fuse_gated_epilogue import split_gated_epilogues
    from .lower_portable import lower_portable

    split_gated_epilogues(graph, output_steps_only=True)
    names = {n.name for n in graph.nodes if n.op == "QuantizeActivation"}
    return lower_portable(graph, only=names)
