"""Pass: lower the dynamic-gating custom ops to standard ONNX ops (the `--target onnx` path).

Expects: a graph possibly containing `gate2deploy::CGConv`, `PGConv` and `FBSConv` nodes
(runtimes/OPS.md); their weights may be constants or computed tensors. Also
`SparseInputConv` (only `--target ort` emits it, for an FBS layer's consumer; lowered when
gate2deploy.kernel_choice finds the plain Conv faster, e.g. at FBS density 1) and `StreamConv`
(only `--target ort` emits it, passes/stream_weight_convs.py).

Guarantees: no node of those ops remains (SparseInputConv and StreamConv become exactly what
they are: Conv, then Add of R and Relu when they have them); each gated op is replaced by a decomposition into
standard ONNX ops (opset 17: Conv, Greater, Where, Abs, Sign, ReduceMax, Div, Min, Round,
Floor, Mul, Sub, Add, Cast, ReduceMean, Gemm, Relu, TopK, Slice, Gather, Unsqueeze, Pad,
Identity) that stock ONNX
Runtime runs with no plugin, computing the same function as runtimes/reference.py with the
same float32 operations in the same order (so outputs agree up to the convolution's own
summation order, and gates flip only at ties). The output tensor of each op keeps its name.
The decomposition computes every path (it is exact, not fast: speed needs `--target ort`);
CG's base path is a physically smaller conv where its constant mask has structure (one
channel subset for all outputs, or block-diagonal), the full-size masked conv otherwise; with
one channel subset, the full path is base + the complement conv (one dense conv's MACs in all).
CG/PG's optional epilogue (post_scale, post_shift, activation, clip_max, quantize_*: only
`--target ort` emits it) becomes Mul, Add, Relu, Min and the quantizer's chain after the
lowered op.
With `expose_gates=True` each op's boolean gate becomes an extra graph output named
`<node name>/gate` ([N, O, Ho, Wo] for CG and PG, [N, O] for FBS), which
`gate2deploy.gate_stats.onnx_gate_statistics` reads; the deployed model never has them.
Other nodes are untouched.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from gate2deploy.ops import DOMAIN, FBS_ACTIVATIONS, FBS_POOLS, GATED_OPS

from .fuse_gated_epilogue import EPILOGUE_INPUTS_AT, activation_name, split_gated_epilogue
from .ir import const_value

LOWERED_OPS = (*GATED_OPS, "SparseInputConv", "StreamConv", "QuantizeActivation")


@dataclass
class LoweringResult:
    lowered: list[tuple[str, str]] = field(default_factory=list)  # (node name, op)
    gate_outputs: dict[str, str] = field(default_factory=dict)    # node name -> gate tensor name


class _Builder:
    """Appends standard nodes named under one prefix (the custom node's name)."""

    def __init__(self, graph: gs.Graph, prefix: str):
        self.graph, self.prefix, self.count = graph, prefix, 0

    def _name(self, what: str) -> str:
        self.count += 1
        return f"{self.prefix}/{what}_{self.count}"

    def const(self, what: str, value) -> gs.Constant:
        return gs.Constant(self._name(what), np.ascontiguousarray(value))

    def op(self, op_type: str, inputs, attrs=None, dtype=np.float32, out: gs.Variable | None = None,
           out_name: str | None = None) -> gs.Variable:
        if out is None:
            out = gs.Variable(out_name or self._name(f"{op_type}_out"), dtype=dtype)
        self.graph.nodes.append(gs.Node(op_type, self._name(op_type), attrs=attrs or {},
                                        inputs=list(inputs), outputs=[out]))
        return out

    def per_channel(self, what: str, tensor) -> gs.Tensor:
        """A per-output-channel vector [O] as [1, O, 1, 1] (folded if constant)."""
        value = const_value(tensor)
        if value is not None:
            return self.const(what, np.asarray(value, dtype=np.float32).reshape(1, -1, 1, 1))
        return self.op("Reshape", [tensor, self.const("shape", np.array([1, -1, 1, 1], np.int64))])

    def conv(self, x, w, attrs, group: int = 1) -> gs.Variable:
        return self.op("Conv", [x, w], {"strides": attrs["strides"], "pads": attrs["pads"],
                                        "dilations": attrs["dilations"], "group": group})


def _conv_attrs(node: gs.Node) -> dict[str, list[int]]:
    return {"strides": list(node.attrs.get("strides", [1, 1])),
            "pads": list(node.attrs.get("pads", [0, 0, 0, 0])),
            "dilations": list(node.attrs.get("dilations", [1, 1]))}


def _base_structure(mask: np.ndarray) -> tuple[str, object]:
    """How a constant base mask [O, C] can be computed without its zeros: ("columns", S) when
    every output reads the same input channels S; ("blocks", g) when it is block-diagonal with
    g equal blocks (CG's use_group variant); ("dense", None) otherwise."""
    rows = mask != 0
    if (rows == rows[:1]).all():
        return "columns", np.flatnonzero(rows[0])
    o, c = rows.shape
    width = int(rows[0].sum())  # input channels per block, if block-diagonal
    g = c // width if width and c % width == 0 else 0
    if g > 1 and o % g == 0 and np.array_equal(
            rows, np.kron(np.eye(g, dtype=bool), np.ones((o // g, width), dtype=bool))):
        return "blocks", g
    return "dense", None


def _base_path(b: _Builder, x, w, base_mask, attrs) -> gs.Variable:
    """Yp = conv(x, W * base_mask), as a physically smaller conv where the mask has structure
    (the dropped terms are exact zeros: the same sum, one conv of 1/p the MACs instead of a
    full-size conv); as the full-size masked conv otherwise."""
    w_val, m_val = const_value(w), const_value(base_mask)
    if w_val is None or m_val is None:
        mask4 = b.op("Unsqueeze", [base_mask, b.const("axes", np.array([2, 3], np.int64))])
        return b.conv(x, b.op("Mul", [w, mask4]), attrs)
    kind, detail = _base_structure(m_val)
    if kind == "columns" and 0 < len(detail) < m_val.shape[1]:
        return b.conv(_channels(b, x, detail), b.const("W_base", w_val[:, detail].astype(np.float32)), attrs)
    if kind == "blocks":
        o, c = m_val.shape
        blocks = [w_val[i * (o // detail):(i + 1) * (o // detail), i * (c // detail):(i + 1) * (c // detail)]
                  for i in range(detail)]
        return b.conv(x, b.const("W_base", np.concatenate(blocks).astype(np.float32)), attrs, group=detail)
    return b.conv(x, b.const("W_base", (w_val * m_val[:, :, None, None]).astype(np.float32)), attrs)


def _channels(b: _Builder, x, chans: np.ndarray) -> gs.Variable:
    """x[:, chans] (a Slice for a contiguous range, a Gather otherwise)."""
    if np.array_equal(chans, np.arange(chans[0], chans[-1] + 1)):
        return b.op("Slice", [x, b.const("starts", np.array([chans[0]], np.int64)),
                              b.const("ends", np.array([chans[-1] + 1], np.int64)),
                              b.const("axes", np.array([1], np.int64))])
    return b.op("Gather", [x, b.const("channels", chans.astype(np.int64))], {"axis": 1})


def _full_path(b: _Builder, x, w, base_mask, attrs, y_partial) -> gs.Variable:
    """conv(x, W) for the gated outputs. Where every output's base path reads one channel
    subset S, it is Yp + conv(x[:, ~S], W[:, ~S]): the complement conv does the remaining
    (p-1)/p of the MACs, so the decomposition costs one dense conv in all instead of 1 + 1/p
    (the same terms, summed as the native kernels sum them: base part first)."""
    w_val, m_val = const_value(w), const_value(base_mask)
    if w_val is not None and m_val is not None:
        kind, chans = _base_structure(m_val)
        if kind == "columns" and 0 < len(chans) < m_val.shape[1]:
            rest = np.setdiff1d(np.arange(m_val.shape[1]), chans)
            y_rest = b.conv(_channels(b, x, rest), b.const("W_rest", w_val[:, rest].astype(np.float32)), attrs)
            return b.op("Add", [y_partial, y_rest])
    return b.conv(x, w, attrs)


def _lower_cg(b: _Builder, node: gs.Node, y: gs.Variable) -> gs.Variable:
    x, w, base_mask, threshold = node.inputs[:4]
    attrs = _conv_attrs(node)
    y_partial = _base_path(b, x, w, base_mask, attrs)
    y_full = _full_path(b, x, w, base_mask, attrs, y_partial)
    gate = b.op("Greater", [y_partial, b.per_channel("threshold", threshold)], dtype=np.bool_,
                out_name=f"{node.name}/gate")
    b.op("Where", [gate, y_full, y_partial], out=y)
    return gate


def _lower_pg(b: _Builder, node: gs.Node, y: gs.Variable) -> gs.Variable:
    x, w, threshold = node.inputs[:3]
    attrs = _conv_attrs(node)
    bits, pred_bits = int(node.attrs["abits"]), int(node.attrs["pred_bits"])
    static_scale = float(node.attrs.get("static_scale", 0.0))
    group = int(node.attrs.get("group", 1))
    f32 = np.float32
    levels = b.const("levels", f32(2.0 ** bits - 1.0))
    lsb_unit = b.const("lsb_unit", f32(2.0 ** (bits - pred_bits)))
    sign = b.op("Sign", [x])
    mag = b.op("Abs", [x])
    if static_scale > 0:
        scale = b.const("static_scale", f32(static_scale))
    else:  # the seed's dynamic scale: max|X| over the whole tensor, batch included
        scale = b.op("Add", [b.op("ReduceMax", [mag], {"keepdims": 0}), b.const("eps", f32(1e-7))])
    ratio = b.op("Min", [b.op("Div", [mag, scale]), b.const("one", f32(1.0))])
    q = b.op("Round", [b.op("Mul", [ratio, levels])])  # ONNX Round: half to even
    q_hb = b.op("Mul", [b.op("Floor", [b.op("Div", [q, lsb_unit])]), lsb_unit])
    q_lb = b.op("Sub", [q, q_hb])

    def dequantize(qv):  # (q / (2^B-1)) * s * sign, the reference's order
        return b.op("Mul", [b.op("Mul", [b.op("Div", [qv, levels]), scale]), sign])

    out_msb = b.conv(dequantize(q_hb), w, attrs, group)
    gate = b.op("Greater", [out_msb, b.per_channel("threshold", threshold)], dtype=np.bool_,
                out_name=f"{node.name}/gate")
    out_lsb = b.conv(dequantize(q_lb), w, attrs, group)
    gated_lsb = b.op("Mul", [b.op("Cast", [gate], {"to": 1}), out_lsb])
    b.op("Add", [out_msb, gated_lsb], out=y)
    return gate


def _string_attr(node: gs.Node, name: str, default: str) -> str:
    value = node.attrs.get(name, default)
    return value.decode() if isinstance(value, bytes) else value


def _lower_fbs(b: _Builder, node: gs.Node, y: gs.Variable, expose_gates: bool) -> gs.Variable | None:
    x, w, fc_w, fc_b, bn_scale, bn_shift, beta = node.inputs
    attrs = _conv_attrs(node)
    density, pool = float(node.attrs["density"]), _string_attr(node, "pool", "avg")
    activation = _string_attr(node, "activation", "Relu")
    pool_pads = [int(p) for p in node.attrs.get("pool_pads", [0, 0, 0, 0])]
    threshold = node.attrs.get("threshold")
    if activation not in FBS_ACTIVATIONS:
        raise ValueError(f"FBSConv {node.name}: activation must be 'Relu' or 'Identity', not {activation!r}")
    if len(pool_pads) != 4 or min(pool_pads) < 0:
        raise ValueError(f"FBSConv {node.name}: pool_pads must be 4 ints >= 0, not {pool_pads}")
    w_shape = w.shape if w.shape is not None else const_value(w).shape
    channels = int(w_shape[0])
    if pool not in FBS_POOLS:
        raise ValueError(f"FBSConv {node.name}: pool must be one of {FBS_POOLS}, not {pool!r}")

    def act(v):
        return b.op("Relu", [v]) if activation == "Relu" else v

    # The saliency pools X zero-padded by pool_pads (OPS.md), as the reference: Pad, then
    # the reduction over the padded tensor.
    source = x
    if any(pool_pads):
        top, left, bottom, right = pool_pads
        source = b.op("Pad", [x, b.const("pool_pads", np.array([0, 0, top, left, 0, 0, bottom, right], np.int64))])
    if pool == "l1":
        source = b.op("Abs", [source])
    elif pool == "l2":
        source = b.op("Mul", [source, source])
    reduce = "ReduceMax" if pool == "max" else "ReduceMean"
    pooled = b.op(reduce, [source], {"axes": [2, 3], "keepdims": 0})
    saliency = act(b.op("Gemm", [pooled, fc_w, fc_b], {"transB": 1}))
    k = math.ceil(channels * density)
    axes23 = b.const("axes", np.array([2, 3], np.int64))
    g4 = b.op("Unsqueeze", [saliency, axes23])
    conv = b.conv(x, w, attrs)
    normalized = b.op("Add", [b.op("Mul", [b.per_channel("bn_scale", bn_scale), conv]),
                              b.per_channel("bn_shift", bn_shift)])
    beta4 = b.per_channel("beta", beta)
    gate = None
    if threshold is None and k >= channels:  # every channel active: act = 1, and 1 * v == v exactly
        pre = b.op("Add", [b.op("Mul", [g4, normalized]), beta4])
        if expose_gates:
            gate = b.op("GreaterOrEqual", [saliency, saliency], dtype=np.bool_, out_name=f"{node.name}/gate")
    else:
        if threshold is not None:  # Mayo's local / global threshold
            cut = b.const("threshold", np.array(threshold, np.float32))
        else:
            top = b.op("TopK", [saliency, b.const("k", np.array([k + 1], np.int64))],
                       {"axis": 1, "largest": 1, "sorted": 1})
            # TopK has two outputs (values, indices): give it the indices output too.
            indices = gs.Variable(b._name("TopK_indices"), dtype=np.int64)
            b.graph.nodes[-1].outputs.append(indices)
            cut = b.op("Slice", [top, b.const("start", np.array([k], np.int64)),
                                 b.const("end", np.array([k + 1], np.int64)),
                                 b.const("axis", np.array([1], np.int64))])
        gate = b.op("Greater", [saliency, cut], dtype=np.bool_, out_name=f"{node.name}/gate")
        act4 = b.op("Unsqueeze", [b.op("Cast", [gate], {"to": 1}), axes23])
        pre = b.op("Add", [b.op("Mul", [b.op("Mul", [act4, g4]), normalized]),
                           b.op("Mul", [act4, beta4])])
    b.op("Relu" if activation == "Relu" else "Identity", [pre], out=y)
    return gate


def _lower_plain_conv(b: _Builder, node: gs.Node, y: gs.Variable) -> None:
    """SparseInputConv (OPS.md: act(Conv(X, W, B) + R)) and StreamConv (act(Conv(X, W, B)))
    as the ops they stand for: a plain Conv (reading the zero input channels SparseInputConv
    skips), the Add of R, the Relu; the same function. No gate."""
    x, w, bias = node.inputs[:3]
    r = node.inputs[3] if len(node.inputs) > 3 else None
    relu = activation_name(node.attrs.get("activation")) == "Relu"
    attrs = {**_conv_attrs(node), "group": int(node.attrs.get("group", 1))}
    v = b.op("Conv", [x, w, bias], attrs, out=y if r is None and not relu else None)
    if r is not None:
        v = b.op("Add", [v, r], out=y if not relu else None)
    if relu:
        b.op("Relu", [v], out=y)


def _lower_quantize_activation(b: _Builder, node: gs.Node, y: gs.Variable) -> None:
    """QuantizeActivation (OPS.md) as the chain of standard ops it was fused from
    (passes/fuse_activation_quantizer.py), the same float32 operations in the same order."""
    x = node.inputs[0]
    levels = b.const("levels", np.array(node.attrs["levels"], np.float32))
    sign = b.op("Sign", [x])
    mag = b.op("Abs", [x])
    if float(node.attrs.get("scale", 0.0)) > 0:
        s = b.const("scale", np.array(node.attrs["scale"], np.float32))
    else:
        s = b.op("Add", [b.op("ReduceMax", [mag], {"keepdims": 0}),
                         b.const("eps", np.array(node.attrs.get("eps", 1e-7), np.float32))])
    c = b.op("Clip", [b.op("Div", [mag, s]), b.const("zero", np.array(0, np.float32)),
                      b.const("one", np.array(1, np.float32))])
    q = b.op("Div", [b.op("Round", [b.op("Mul", [c, levels])]), levels])
    b.op("Mul", [b.op("Mul", [q, s]), sign], out=y)


def lower_portable(graph: gs.Graph, result: LoweringResult | None = None,
                   expose_gates: bool = False, only: set[str] | None = None) -> gs.Graph:
    """Lowers every gated op, or with `only` just the nodes of those names (the layers for
    which gate2deploy.kernel_choice measured the standard ops faster than the native kernel)."""
    result = result if result is not None else LoweringResult()

    def targets() -> list[gs.Node]:
        return [n for n in graph.nodes if n.domain == DOMAIN and n.op in LOWERED_OPS
                and (only is None or n.name in only)]
    for index, node in enumerate(targets()):
        node.name = node.name or f"{node.op}_{index}"
    # A fused epilogue becomes its nodes again first: its QuantizeActivation (if any) is then
    # lowered with the rest, or with `only` stays native, as the unfused export has it.
    for node in targets():
        if node.op in EPILOGUE_INPUTS_AT:
            split_gated_epilogue(graph, node)
    for node in targets():
        y = node.outputs[0]
        node.outputs.clear()  # detach first so that the new nodes can write `y`
        b = _Builder(graph, node.name)
        if node.op == "CGConv":
            gate = _lower_cg(b, node, y)
        elif node.op == "PGConv":
            gate = _lower_pg(b, node, y)
        elif node.op == "FBSConv":
            gate = _lower_fbs(b, node, y, expose_gates)
        elif node.op == "QuantizeActivation":
            gate = _lower_quantize_activation(b, node, y)
        else:
            gate = _lower_plain_conv(b, node, y)
        node.inputs.clear()
        result.lowered.append((node.name, node.op))
        if expose_gates and gate is not None:
            gate.shape = None
            graph.outputs.append(gate)
            result.gate_outputs[node.name] = gate.name
    return graph.cleanup().toposort()
