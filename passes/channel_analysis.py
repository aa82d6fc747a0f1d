"""Channel-dependency analysis: which channels are coupled, and which are provably constant.

An analysis, not a pass: it reads a shape-inferred graph and changes nothing.

Channel identities. Every channel-carrying tensor gets a `ChannelMap`: the axis that holds
channels and, per position on that axis, an integer channel id. Ops that create channels
(Conv, Gemm, MatMul, graph inputs) draw fresh ids; ops that carry channels through
(activations, BN, pooling, masks) reuse their input's ids; shape ops (Flatten, Concat, Split,
Transpose, Gather) re-index them; elementwise ops with several channel inputs (residual Add,
squeeze-excitation Mul) union their ids. After the walk, a union-find class of ids is one
*coupled channel group*: its channels can only be removed together, everywhere at once.

Channel values. Alongside the ids, each map records per channel whether the value is a known
spatially uniform constant (`known`, `value`): a masked channel is the constant 0; a Conv
output row with all-zero weights is its bias; constants flow through elementwise ops
(evaluated exactly by the ONNX reference implementation), BN and pooling. A conv reading a
constant channel through zero padding makes a non-uniform output, so that is Live.

Consume sites are where channels of a group are mixed into other channels (the data input of
a dense or grouped Conv, Gemm or MatMul). A group can be removed iff it is not pinned (graph inputs and
outputs, ops whose channel semantics are not declared here) and its channels are known at
every consume site: their contribution there is then a constant the fold moves into a bias.

The per-op behaviour is declared in `RULES` (op type -> rule); ops not listed pin their
channels, so an unknown op can make the fold do less but never do something wrong.

Never crash: whatever the analysis cannot reason about - an op without a rule (a custom op,
an autograd.Function exported under its own name), an op whose output shape shape inference
could not give, a rule failing on an unforeseen form - pins the channels of its inputs and
outputs (nothing folds across it) and is listed in `ChannelAnalysis.opaque` with the reason;
the fold copies the list into its result and `export` into its report. A tensor left without
a map (the output of such an op with an unknown shape) carries no channel identities: ops
reading it next to mapped tensors pin those, and a Conv reading only it creates fresh ones.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import helper
from onnx.reference import ReferenceEvaluator

from .ir import const_value, shape_of


@dataclass
class ChannelMap:
    axis: int  # channel axis in the tensor (negative axes are normalised away)
    ids: np.ndarray  # int64 channel id per position on `axis`
    known: np.ndarray  # bool: value is a known, spatially uniform constant
    value: np.ndarray  # float64: that constant where known

    def take(self, index) -> ChannelMap:
        return ChannelMap(self.axis, self.ids[index], self.known[index], self.value[index])

    def on_axis(self, axis: int) -> ChannelMap:
        return ChannelMap(axis, self.ids, self.known, self.value)

    @property
    def size(self) -> int:
        return len(self.ids)


@dataclass
class ParamBinding:
    """Constant input `index` of `node` is indexed by `tensor`'s channels along `axis`."""

    node: gs.Node
    index: int
    axis: int
    tensor: str


@dataclass
class ConsumeSite:
    """`node` mixes the channels of its input `index` (dense Conv, Gemm, MatMul)."""

    node: gs.Node
    index: int
    tensor: str


class UnionFind:
    def __init__(self):
        self.parent: list[int] = []

    def fresh(self, n: int) -> np.ndarray:
        start = len(self.parent)
        self.parent.extend(range(start, start + n))
        return np.arange(start, start + n, dtype=np.int64)

    def find(self, a: int) -> int:
        root = a
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[a] != root:
            self.parent[a], a = root, self.parent[a]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)
            self._table = None

    _table: np.ndarray | None = None  # root of every id, valid until the next union

    def roots(self, ids: np.ndarray) -> np.ndarray:
        # One vectorised pointer-jumping pass over all ids, then lookups: the fold asks for
        # the roots of every tensor (hundreds of thousands of channels on a ResNet-50).
        if self._table is None or len(self._table) != len(self.parent):
            table = np.asarray(self.parent, dtype=np.int64)
            while not np.array_equal(table[table], table):
                table = table[table]
            self._table = table
        return self._table[np.asarray(ids, dtype=np.int64)]


@dataclass
class OpaqueOp:
    """A node the analysis could not reason about; its channels are pinned."""

    node: str
    op: str  # op type, with its domain when not the standard one
    reason: str


@dataclass
class ChannelAnalysis:
    graph: gs.Graph
    maps: dict[str, ChannelMap] = field(default_factory=dict)
    uf: UnionFind = field(default_factory=UnionFind)
    pinned_ids: dict[int, str] = field(default_factory=dict)  # id -> reason (before union)
    bindings: list[ParamBinding] = field(default_factory=list)
    consume_sites: list[ConsumeSite] = field(default_factory=list)
    # Gather nodes on the channel axis: (node, input tensor name) - indices are re-numbered.
    channel_gathers: list[tuple[gs.Node, str]] = field(default_factory=list)
    # Slice nodes cutting the channel axis: (node, input tensor name, start, end) with the
    # normalised bounds; the fold rewrites them (the kept channels of [start, end) stay a range).
    channel_slices: list[tuple[gs.Node, str, int, int]] = field(default_factory=list)
    # Grouped (not depthwise) Convs: their group-local input columns are sliced by the fold,
    # which keeps the same number of input and of output channels in every group.
    grouped_convs: list[gs.Node] = field(default_factory=list)
    opaque: list[OpaqueOp] = field(default_factory=list)

    # -- results -----------------------------------------------------------------------
    def pinned_roots(self) -> dict[int, str]:
        out: dict[int, str] = {}
        for i, reason in self.pinned_ids.items():
            out.setdefault(self.uf.find(i), reason)
        return out

    def roots_of(self, tensor: str) -> np.ndarray:
        return self.uf.roots(self.maps[tensor].ids)

    def groups(self) -> dict[int, list[str]]:
        """Coupled channel groups: root id -> names of the tensors carrying it."""
        out: dict[int, list[str]] = {}
        for name, cmap in self.maps.items():
            for root in set(self.uf.roots(cmap.ids).tolist()):
                out.setdefault(root, []).append(name)
        return out

    # -- helpers used by the rules ---------------------------------------------------
    def pin(self, cmap: ChannelMap | None, reason: str) -> None:
        if cmap is not None:
            for i in cmap.ids.tolist():
                self.pinned_ids.setdefault(i, reason)

    def fresh_map(self, tensor, axis: int = 1) -> ChannelMap | None:
        shape = shape_of(tensor)
        if shape is None or len(shape) < 2:
            return None
        axis = axis % len(shape)
        n = shape[axis]
        return ChannelMap(axis, self.uf.fresh(n), np.zeros(n, bool), np.zeros(n))

    def union_maps(self, a: ChannelMap, b: ChannelMap) -> None:
        for x, y in zip(a.ids.tolist(), b.ids.tolist()):
            self.uf.union(x, y)


Rule = Callable[[ChannelAnalysis, gs.Node], None]
RULES: dict[str, Rule] = {}


def rule(*ops: str):
    def register(fn: Rule) -> Rule:
        for op in ops:
            RULES[op] = fn
        return fn
    return register


def analyze(graph: gs.Graph) -> ChannelAnalysis:
    """Run the analysis over a toposorted, shape-inferred graph."""
    ana = ChannelAnalysis(graph)
    for tensor in graph.inputs:
        cmap = ana.fresh_map(tensor)
        if cmap is not None:
            ana.maps[tensor.name] = cmap
            ana.pin(cmap, f"graph input {tensor.name}")
    for node in graph.nodes:
        mapped_inputs = [t for t in node.inputs if t.name in ana.maps]
        if not mapped_inputs and node.op not in ("Conv", "Gemm", "MatMul"):
            continue  # constant or shape sub-computation: no channels involved
        unknown = [t.name for t in node.outputs if (t.outputs or t in graph.outputs) and shape_of(t) is None]
        if unknown and not mapped_inputs:
            continue  # downstream of an opaque op: no channel identities to carry
        handler = RULES.get(node.op) if (node.domain or "") in ("", "ai.onnx") else None
        if node.domain == "gate2deploy" and node.op == "ChannelMask":
            handler = _channel_mask
        if node.domain == "gate2deploy" and node.op == "FBSConv":
            handler = _fbs_conv
        if unknown:
            _opaque(ana, node, f"shape inference gives no static shape for {unknown[0]}")
        elif handler is None and node.domain == "gate2deploy":
            # Gated layers (CG/PG/FBS) choose their computation per input: deliberately kept.
            _pin_node(ana, node, f"gated layer {node.op} {node.name}")
        elif handler is None:
            _opaque(ana, node, "no channel rule for this op")
        else:
            _apply(ana, node, handler)
    for tensor in graph.outputs:
        ana.pin(ana.maps.get(tensor.name), f"graph output {tensor.name}")
    return ana


_RECORDS = ("bindings", "consume_sites", "channel_gathers", "channel_slices", "grouped_convs")


def _apply(ana: ChannelAnalysis, node: gs.Node, handler: Rule) -> None:
    """Run a rule; if it fails, undo what it recorded and treat the node as opaque (unions
    it made stay, which only couples more channels; pinning covers them)."""
    lengths = {name: len(getattr(ana, name)) for name in _RECORDS}
    try:
        handler(ana, node)
    except Exception as exc:  # noqa: BLE001 - never crash: an unforeseen form pins instead
        for name, n in lengths.items():
            del getattr(ana, name)[n:]
        _opaque(ana, node, f"the {node.op} rule failed on it ({type(exc).__name__}: {exc})")


def _opaque(ana: ChannelAnalysis, node: gs.Node, reason: str) -> None:
    op = node.op if (node.domain or "") in ("", "ai.onnx") else f"{node.domain}::{node.op}"
    ana.opaque.append(OpaqueOp(node.name, op, reason))
    _pin_node(ana, node, f"{op} node {node.name}: {reason}")


def _pin_node(ana: ChannelAnalysis, node: gs.Node, reason: str) -> None:
    for t in node.inputs:
        ana.pin(ana.maps.get(t.name), reason)
    for t in node.outputs:
        cmap = ana.fresh_map(t)
        if cmap is not None:
            ana.maps[t.name] = cmap
            ana.pin(cmap, reason)
        else:  # no static shape: no channel identities (drops what a failed rule stored)
            ana.maps.pop(t.name, None)


def _in_map(ana, node, index=0) -> ChannelMap | None:
    if index >= len(node.inputs):
        return None
    return ana.maps.get(node.inputs[index].name)


# ---------------------------------------------------------------------------------------
# Value propagation through elementwise ops: evaluate the node itself on a probe tensor
# holding each channel's constant, so every elementwise op ONNX defines is exact for free.
# ---------------------------------------------------------------------------------------
def _evaluate_elementwise(node: gs.Node, probes: dict[int, np.ndarray], out_rank: int) -> np.ndarray:
    inputs, feeds = [], {}
    for i, t in enumerate(node.inputs):
        name = f"in{i}"
        if t.name == "":
            inputs.append("")
            continue
        if i in probes:
            feeds[name] = probes[i]
        else:
            value = const_value(t)
            if value is None:
                raise ValueError("non-constant input")
            feeds[name] = value
        inputs.append(name)
    attrs = {k: v for k, v in node.attrs.items() if not isinstance(v, (gs.Tensor, gs.Graph))}
    onnx_node = helper.make_node(node.op, inputs, ["out"], **attrs)
    return np.asarray(ReferenceEvaluator(onnx_node).run(None, feeds)[0])


def _probe(cmap: ChannelMap, rank: int, dtype=np.float32) -> np.ndarray:
    shape = [1] * rank
    shape[cmap.axis] = cmap.size
    return np.where(cmap.known, cmap.value, 0.0).astype(dtype).reshape(shape)


# ---------------------------------------------------------------------------------------
# Rules
# ---------------------------------------------------------------------------------------
UNARY_ELEMENTWISE = (
    "Relu", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Clip", "Elu", "Selu",
    "Celu", "Softplus", "Softsign", "Gelu", "Erf", "Exp", "Neg", "Abs", "Sqrt", "Reciprocal",
    "Log", "Mish", "Floor", "Ceil", "Round", "Sign", "Sin", "Cos", "ThresholdedRelu",
    "BatchNormalization", "Cast",
)


@rule(*UNARY_ELEMENTWISE)
def _unary(ana: ChannelAnalysis, node: gs.Node) -> None:
    cmap = _in_map(ana, node)
    if cmap is None:
        _pin_node(ana, node, f"{node.op} node {node.name} reads channels not on its first input")
        return
    out = ChannelMap(cmap.axis, cmap.ids, cmap.known.copy(), cmap.value.copy())
    if node.op == "BatchNormalization":
        if len(node.outputs) > 1 and any(o.outputs for o in node.outputs[1:]):
            _pin_node(ana, node, f"training-mode BatchNormalization {node.name}")
            return
        for i in range(1, 5):
            ana.bindings.append(ParamBinding(node, i, 0, node.inputs[0].name))
    if out.known.any():
        rank = len(shape_of(node.inputs[0]) or [0, 0])
        try:
            result = _evaluate_elementwise(node, {0: _probe(cmap, rank)}, rank).reshape(-1)
            out.value = np.where(out.known, result.astype(np.float64), 0.0)
        except Exception:  # noqa: BLE001 - an op the evaluator cannot run: give up on values
            out.known[:] = False
    ana.maps[node.outputs[0].name] = out


@rule("Identity", "Dropout")
def _identity(ana: ChannelAnalysis, node: gs.Node) -> None:
    cmap = _in_map(ana, node)
    if cmap is None:
        _pin_node(ana, node, f"{node.op} {node.name} reads channels not on its first input")
        return
    ana.maps[node.outputs[0].name] = cmap


def _channel_mask(ana: ChannelAnalysis, node: gs.Node) -> None:
    cmap = _in_map(ana, node)
    mask = const_value(node.inputs[1])
    if cmap is None or mask is None or mask.size != cmap.size:
        _pin_node(ana, node, f"ChannelMask {node.name} with a non-constant or misfit mask")
        return
    mask = mask.reshape(-1).astype(np.float64)
    ana.bindings.append(ParamBinding(node, 1, 0, node.inputs[0].name))
    zero = mask == 0
    known = cmap.known | zero
    value = np.where(zero, 0.0, cmap.value * mask)
    ana.maps[node.outputs[0].name] = ChannelMap(cmap.axis, cmap.ids, known, value)


@rule("MaxPool", "GlobalAveragePool", "GlobalMaxPool", "AveragePool", "LpPool", "Resize", "Upsample")
def _spatial(ana: ChannelAnalysis, node: gs.Node) -> None:
    cmap = _in_map(ana, node)
    if cmap is None or cmap.axis != 1:
        _pin_node(ana, node, f"{node.op} {node.name} not over NC... layout")
        return
    known = cmap.known.copy()
    pads = node.attrs.get("pads", [])
    if node.op == "AveragePool" and any(pads) and node.attrs.get("count_include_pad", 0):
        known &= cmap.value == 0  # zero padding averages a constant down at the borders
    if node.op == "LpPool":
        known &= cmap.value == 0
    ana.maps[node.outputs[0].name] = ChannelMap(1, cmap.ids, known, np.where(known, cmap.value, 0.0))
    for extra in node.outputs[1:]:  # MaxPool indices
        if extra.outputs:
            _pin_node(ana, node, f"MaxPool {node.name} with an indices output")


@rule("Pad")
def _pad(ana: ChannelAnalysis, node: gs.Node) -> None:
    cmap = _in_map(ana, node)
    pads = const_value(node.inputs[1]) if len(node.inputs) > 1 else None
    rank = len(shape_of(node.inputs[0]) or [])
    mode = node.attrs.get("mode", "constant")
    if cmap is None or pads is None or rank == 0 or (len(node.inputs) > 3 and node.inputs[3].name):
        _pin_node(ana, node, f"Pad {node.name} with dynamic pads or axes")
        return
    pads = pads.reshape(-1)
    if pads[cmap.axis] or pads[cmap.axis + rank]:
        _pin_node(ana, node, f"Pad {node.name} pads the channel axis")
        return
    fill = 0.0
    if len(node.inputs) > 2 and node.inputs[2].name:
        v = const_value(node.inputs[2])
        fill = float(v.reshape(-1)[0]) if v is not None else np.nan
    known = cmap.known & ((mode != "constant") | (cmap.value == fill))
    ana.maps[node.outputs[0].name] = ChannelMap(cmap.axis, cmap.ids, known, np.where(known, cmap.value, 0.0))


@rule("Add", "Sub", "Mul", "Div", "Max", "Min", "Pow", "PRelu", "Sum", "Mean", "Where")
def _broadcast_elementwise(ana: ChannelAnalysis, node: gs.Node) -> None:
    out_shape = shape_of(node.outputs[0])
    if out_shape is None:
        _pin_node(ana, node, f"{node.op} {node.name} with unknown output shape")
        return
    rank = len(out_shape)
    full: list[tuple[int, ChannelMap]] = []  # inputs whose channels span the output's
    axis = None
    for i, t in enumerate(node.inputs):
        cmap = ana.maps.get(t.name)
        shape = shape_of(t)
        if cmap is None:
            continue
        out_axis = cmap.axis + rank - len(shape)
        if shape[cmap.axis] == 1 and out_shape[out_axis] != 1:
            continue  # broadcast across channels: carries no channel identity
        if axis is not None and out_axis != axis:
            _pin_node(ana, node, f"{node.op} {node.name} mixes channel axes")
            return
        axis = out_axis
        full.append((i, cmap))
    if not full:
        _pin_node(ana, node, f"{node.op} {node.name} without channel input")
        return
    size = full[0][1].size
    const_zero_channels = np.zeros(size, bool)  # channels a per-channel constant zeroes
    # Every other input either broadcasts over the channel axis or is a per-channel constant.
    for i, t in enumerate(node.inputs):
        if t.name in ana.maps or t.name == "":
            continue
        shape = shape_of(t)
        if shape is None:
            _pin_node(ana, node, f"{node.op} {node.name} input {t.name} of unknown shape")
            return
        local = axis - (rank - len(shape))
        if local >= 0 and shape[local] == size and size != 1:
            if const_value(t) is None:
                _pin_node(ana, node, f"{node.op} {node.name} reads a computed per-channel tensor {t.name}")
                return
            ana.bindings.append(ParamBinding(node, i, local, node.inputs[full[0][0]].name))
            channel_major = np.moveaxis(const_value(t), local, 0).reshape(size, -1)
            const_zero_channels |= ~channel_major.any(axis=1)
    first = full[0][1]
    for _, other in full[1:]:
        ana.union_maps(first, other)
    known = np.logical_and.reduce([m.known for _, m in full])
    if node.op == "Mul":  # 0 * anything is 0: a mask written as a Mul by a constant, too
        known |= const_zero_channels
        for _, m in full:
            known |= m.known & (m.value == 0)
    value = np.zeros(size)
    if known.any():
        probes = {i: _probe(m, rank) for i, m in full}
        # Inputs that broadcast over channels but are computed make values unknowable.
        computed = [i for i, t in enumerate(node.inputs)
                    if t.name and i not in probes and const_value(t) is None]
        if computed:  # only "0 * anything" survives an unknown factor
            zero = np.zeros(size, bool)
            if node.op == "Mul":
                zero = const_zero_channels.copy()
                for _, m in full:
                    zero |= m.known & (m.value == 0)
            known, value = zero, np.zeros(size)
        else:
            try:
                result = _evaluate_elementwise(node, probes, rank)
                result = np.broadcast_to(result, [1] * (rank - result.ndim) + list(result.shape))
                result = np.moveaxis(result, axis, 0).reshape(result.shape[axis], -1)
                known &= np.all(result == result[:, :1], axis=1)  # spatially varying: live
                value = np.where(known, result[:, 0].astype(np.float64), 0.0)
            except Exception:  # noqa: BLE001
                known = np.zeros(size, bool)
    ana.maps[node.outputs[0].name] = ChannelMap(axis, first.ids, known, value)


@rule("Conv")
def _conv(ana: ChannelAnalysis, node: gs.Node) -> None:
    x, w = node.inputs[0], node.inputs[1]
    cmap, weight = ana.maps.get(x.name), const_value(w)
    out = node.outputs[0]
    bias = const_value(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2].name else None
    if weight is None or (len(node.inputs) > 2 and node.inputs[2].name and bias is None):
        _pin_node(ana, node, f"Conv {node.name} with non-constant weights")
        return
    groups = int(node.attrs.get("group", 1))
    c_in = weight.shape[1] * groups
    c_out = weight.shape[0]
    b = bias if bias is not None else np.zeros(c_out)
    rows_zero = ~weight.reshape(c_out, -1).any(axis=1)
    if cmap is not None and cmap.axis != 1:
        _pin_node(ana, node, f"Conv {node.name} reads channels from axis {cmap.axis}")
        return
    if groups == 1:
        outmap = ana.fresh_map(out)
        if cmap is not None:
            ana.consume_sites.append(ConsumeSite(node, 0, x.name))
            ana.bindings.append(ParamBinding(node, 1, 1, x.name))
            # A row whose live inputs all carry zero weight reads only known-zero channels.
            zero_in = cmap.known & (cmap.value == 0)
            uses_live = (weight[:, ~zero_in].reshape(c_out, -1) != 0).any(axis=1)
            rows_zero = rows_zero | ~uses_live
    elif cmap is not None and groups == c_in == c_out:
        # Depthwise: output channel c is input channel c (same group of channels).
        zero_in = cmap.known & (cmap.value == 0)
        outmap = ChannelMap(1, cmap.ids, np.zeros(c_out, bool), np.zeros(c_out))
        rows_zero = rows_zero | zero_in
    elif cmap is not None and c_out % groups == 0:
        # Grouped: output rows of group g read input channels of group g only. The input
        # side is a consume site whose weight columns are group-local (not a ParamBinding):
        # the fold slices them itself and keeps equal counts per group (`grouped_convs`).
        outmap = ana.fresh_map(out)
        ana.consume_sites.append(ConsumeSite(node, 0, x.name))
        ana.grouped_convs.append(node)
        zero_in = (cmap.known & (cmap.value == 0)).reshape(groups, 1, c_in // groups)
        reads = (weight.reshape(groups, c_out // groups, c_in // groups, -1) != 0).any(axis=-1)
        uses_live = (reads & ~zero_in).any(axis=-1).reshape(c_out)
        rows_zero = rows_zero | ~uses_live
    else:
        _pin_node(ana, node, f"grouped Conv {node.name} (group={groups})")
        return
    ana.bindings.append(ParamBinding(node, 1, 0, out.name))
    if bias is not None:
        ana.bindings.append(ParamBinding(node, 2, 0, out.name))
    outmap.known = rows_zero
    outmap.value = np.where(rows_zero, b.astype(np.float64), 0.0)
    ana.maps[out.name] = outmap


def _fbs_conv(ana: ChannelAnalysis, node: gs.Node) -> None:
    """FBSConv(X, W, fc_W, ...) reads X like a dense Conv (W's and fc_W's axis 1 follow X's
    channels), so an input channel known to be exactly zero can go: it adds 0 to the conv and
    to every saliency pool (avg, max, l1, l2 of a zero channel, zero-padded, is 0), and its
    fc_W column then multiplies 0. A known NON-zero constant channel would change the pooled
    saliency (not a bias the fold can move), so those stay. The output channels are chosen per
    input by the gate: pinned. (Mayo's gated + network-slimmed models, importers/mayo.py.)"""
    x = node.inputs[0]
    cmap = ana.maps.get(x.name)
    weight, fc_w = const_value(node.inputs[1]), const_value(node.inputs[2])
    if cmap is None or cmap.axis != 1 or weight is None or fc_w is None or int(node.attrs.get("group", 1)) != 1:
        _pin_node(ana, node, f"gated layer {node.op} {node.name}")
        return
    nonzero = cmap.known & (cmap.value != 0)
    if nonzero.any():
        ana.pin(ChannelMap(1, cmap.ids[nonzero], nonzero[nonzero], cmap.value[nonzero]),
                f"constant non-zero channel at the input of gated layer {node.op} {node.name}")
    ana.consume_sites.append(ConsumeSite(node, 0, x.name))
    ana.bindings.append(ParamBinding(node, 1, 1, x.name))
    ana.bindings.append(ParamBinding(node, 2, 1, x.name))
    for t in node.outputs:
        outmap = ana.fresh_map(t)
        if outmap is not None:
            ana.maps[t.name] = outmap
            ana.pin(outmap, f"gated layer {node.op} {node.name}")


@rule("Gemm")
def _gemm(ana: ChannelAnalysis, node: gs.Node) -> None:
    a, w = node.inputs[0], node.inputs[1]
    cmap, weight = ana.maps.get(a.name), const_value(w)
    if weight is None or node.attrs.get("transA", 0) or (cmap is not None and cmap.axis != 1):
        _pin_node(ana, node, f"Gemm {node.name} with a layout the fold does not handle")
        return
    trans_b = int(node.attrs.get("transB", 0))
    alpha, beta = float(node.attrs.get("alpha", 1.0)), float(node.attrs.get("beta", 1.0))
    wmat = (weight.T if trans_b else weight) * alpha  # [in, out]
    c = const_value(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2].name else None
    out = node.outputs[0]
    outmap = ana.fresh_map(out)
    bias = np.broadcast_to(c * beta, (wmat.shape[1],)) if c is not None and c.size in (1, wmat.shape[1]) else None
    if cmap is not None:
        ana.consume_sites.append(ConsumeSite(node, 0, a.name))
        ana.bindings.append(ParamBinding(node, 1, 0 if trans_b == 0 else 1, a.name))
        # Known inputs contribute known amounts: an output is known if all its live inputs
        # carry zero weight.
        uses_live = (wmat[~cmap.known] != 0).any(axis=0)
        known = ~uses_live
        value = np.where(cmap.known, cmap.value, 0.0) @ wmat + (bias if bias is not None else 0.0)
        outmap.known, outmap.value = known, np.where(known, value, 0.0)
    ana.bindings.append(ParamBinding(node, 1, 1 if trans_b == 0 else 0, out.name))
    if c is not None and c.ndim >= 1 and c.shape[-1] == wmat.shape[1] and wmat.shape[1] != 1:
        ana.bindings.append(ParamBinding(node, 2, c.ndim - 1, out.name))
    ana.maps[out.name] = outmap


@rule("MatMul")
def _matmul(ana: ChannelAnalysis, node: gs.Node) -> None:
    a, w = node.inputs[0], node.inputs[1]
    cmap, weight = ana.maps.get(a.name), const_value(w)
    a_shape = shape_of(a)
    if weight is None or weight.ndim != 2 or a_shape is None or (cmap is not None and cmap.axis != len(a_shape) - 1):
        _pin_node(ana, node, f"MatMul {node.name} with a layout the fold does not handle")
        return
    out = node.outputs[0]
    outmap = ana.fresh_map(out, axis=-1)
    if cmap is not None:
        ana.consume_sites.append(ConsumeSite(node, 0, a.name))
        ana.bindings.append(ParamBinding(node, 1, 0, a.name))
        uses_live = (weight[~cmap.known] != 0).any(axis=0)
        outmap.known = ~uses_live
        outmap.value = np.where(outmap.known, np.where(cmap.known, cmap.value, 0.0) @ weight, 0.0)
    ana.bindings.append(ParamBinding(node, 1, 1, out.name))
    ana.maps[out.name] = outmap


@rule("Flatten", "Reshape", "Squeeze", "Unsqueeze")
def _reshape(ana: ChannelAnalysis, node: gs.Node) -> None:
    """Reshapes that keep channels intact: flatten C x S into C*S features (channel-major),
    or add/drop unit dims around the channel axis."""
    cmap = _in_map(ana, node)
    ishape, oshape = shape_of(node.inputs[0]), shape_of(node.outputs[0])
    if cmap is None or ishape is None or oshape is None:
        _pin_node(ana, node, f"{node.op} {node.name} with unknown shapes")
        return
    lead = int(np.prod(ishape[:cmap.axis]))
    inner = int(np.prod(ishape[cmap.axis + 1:]))
    # find the output axis where the leading dims end
    acc, out_axis = 1, 0
    while out_axis < len(oshape) and acc < lead:
        acc *= oshape[out_axis]
        out_axis += 1
    while out_axis < len(oshape) - 1 and oshape[out_axis] == 1 and cmap.size != 1:
        out_axis += 1
    if acc != lead or out_axis >= len(oshape):
        _pin_node(ana, node, f"{node.op} {node.name} splits the batch/channel boundary")
        return
    n_out = oshape[out_axis]
    if n_out == cmap.size and int(np.prod(oshape[out_axis + 1:])) == inner:
        ana.maps[node.outputs[0].name] = cmap.on_axis(out_axis)
    elif n_out == cmap.size * inner and int(np.prod(oshape[out_axis + 1:])) == 1:
        index = np.repeat(np.arange(cmap.size), inner)  # channel-major flatten
        ana.maps[node.outputs[0].name] = cmap.take(index).on_axis(out_axis)
    else:
        _pin_node(ana, node, f"{node.op} {node.name} reorders channels")


@rule("Transpose")
def _transpose(ana: ChannelAnalysis, node: gs.Node) -> None:
    cmap = _in_map(ana, node)
    perm = list(node.attrs.get("perm", []))
    if cmap is None or not perm:
        _pin_node(ana, node, f"Transpose {node.name} without perm")
        return
    ana.maps[node.outputs[0].name] = cmap.on_axis(perm.index(cmap.axis))


@rule("Concat")
def _concat(ana: ChannelAnalysis, node: gs.Node) -> None:
    out_shape = shape_of(node.outputs[0])
    maps = [ana.maps.get(t.name) for t in node.inputs]
    if out_shape is None or any(m is None for m in maps):
        _pin_node(ana, node, f"Concat {node.name} of non-channel inputs")
        return
    axis = int(node.attrs["axis"]) % len(out_shape)
    if all(m.axis == axis for m in maps):
        ana.maps[node.outputs[0].name] = ChannelMap(
            axis, np.concatenate([m.ids for m in maps]), np.concatenate([m.known for m in maps]),
            np.concatenate([m.value for m in maps]))
    elif len({m.axis for m in maps}) == 1:
        for m in maps[1:]:
            ana.union_maps(maps[0], m)
        known = np.logical_and.reduce([m.known for m in maps])
        same = np.logical_and.reduce([m.value == maps[0].value for m in maps])
        known &= same
        ana.maps[node.outputs[0].name] = ChannelMap(maps[0].axis, maps[0].ids, known,
                                                    np.where(known, maps[0].value, 0.0))
    else:
        _pin_node(ana, node, f"Concat {node.name} mixes channel axes")


@rule("Split")
def _split(ana: ChannelAnalysis, node: gs.Node) -> None:
    cmap = _in_map(ana, node)
    if cmap is None:
        _pin_node(ana, node, f"Split {node.name}")
        return
    rank = len(shape_of(node.inputs[0]))
    axis = int(node.attrs.get("axis", 0)) % rank
    if axis != cmap.axis:
        for t in node.outputs:
            ana.maps[t.name] = cmap
        return
    start = 0
    for t in node.outputs:
        shape = shape_of(t)
        if shape is None:
            _pin_node(ana, node, f"Split {node.name} with unknown output shapes")
            return
        ana.maps[t.name] = cmap.take(slice(start, start + shape[axis]))
        start += shape[axis]


@rule("Gather")
def _gather(ana: ChannelAnalysis, node: gs.Node) -> None:
    """Gather along the channel axis with constant indices: a channel permutation or
    selection (the canonical form of channel shuffle). Indices are renumbered by the fold."""
    cmap = _in_map(ana, node)
    indices = const_value(node.inputs[1])
    rank = len(shape_of(node.inputs[0]) or [])
    if cmap is None or indices is None or indices.ndim != 1 or rank == 0:
        _pin_node(ana, node, f"Gather {node.name}")
        return
    axis = int(node.attrs.get("axis", 0)) % rank
    if axis != cmap.axis:
        _pin_node(ana, node, f"Gather {node.name} off the channel axis")
        return
    ana.channel_gathers.append((node, node.inputs[0].name))
    ana.maps[node.outputs[0].name] = cmap.take(indices.astype(np.int64) % cmap.size)


@rule("Slice")
def _slice(ana: ChannelAnalysis, node: gs.Node) -> None:
    """Slice with constant bounds (e.g. ShuffleNetV2's `chunk` once shapes are resolved).
    Crops off the channel axis keep channels and their uniform values; a step-1 cut of the
    channel axis selects a range of channels, re-cut by the fold."""
    cmap = _in_map(ana, node)
    shape = shape_of(node.inputs[0])
    present = [i < len(node.inputs) and bool(node.inputs[i].name) for i in range(5)]
    starts, ends, axes, steps = (const_value(node.inputs[i]) if present[i] else None for i in range(1, 5))
    dynamic = any(present[i] and v is None for i, v in zip(range(1, 5), (starts, ends, axes, steps)))
    if cmap is None or shape is None or dynamic or starts is None or ends is None:
        _pin_node(ana, node, f"Slice {node.name} with dynamic bounds")
        return
    rank = len(shape)
    axes = list(range(len(starts))) if axes is None else [int(a) % rank for a in axes.reshape(-1)]
    steps = [1] * len(axes) if steps is None else [int(v) for v in steps.reshape(-1)]
    out = cmap
    if cmap.axis in axes:
        k = axes.index(cmap.axis)
        if steps[k] != 1:
            _pin_node(ana, node, f"Slice {node.name} cuts channels with step {steps[k]}")
            return
        start, end, _ = slice(int(starts.reshape(-1)[k]), int(ends.reshape(-1)[k])).indices(cmap.size)
        end = max(start, end)
        ana.channel_slices.append((node, node.inputs[0].name, start, end))
        out = cmap.take(slice(start, end))
    ana.maps[node.outputs[0].name] = out


@rule("LayerNormalization")
def _layer_norm(ana: ChannelAnalysis, node: gs.Node) -> None:
    """LayerNorm over the channel axis (ConvNeXt) mixes its channels through the mean and
    variance, and its scale must match the normalised shape: its input and output channels
    are pinned (removing masked channels would change the statistics). The output map stays
    on the input's channel axis so that channels created downstream (e.g. a channels-last
    MatMul) are still found on the right axis."""
    cmap = _in_map(ana, node)
    shape = shape_of(node.inputs[0])
    if cmap is None or shape is None:
        _pin_node(ana, node, f"LayerNormalization {node.name}")
        return
    first_normalised = int(node.attrs.get("axis", -1)) % len(shape)
    if cmap.axis < first_normalised:  # normalises within each channel: carries channels
        ana.maps[node.outputs[0].name] = ChannelMap(cmap.axis, cmap.ids, np.zeros(cmap.size, bool),
                                                    np.zeros(cmap.size))
        return
    reason = f"LayerNormalization {node.name} normalises over channels"
    ana.pin(cmap, reason)
    out = ana.fresh_map(node.outputs[0], axis=cmap.axis)
    ana.pin(out, reason)
    ana.maps[node.outputs[0].name] = out


@rule("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceL2", "ReduceL1")
def _reduce(ana: ChannelAnalysis, node: gs.Node) -> None:
    cmap = _in_map(ana, node)
    rank = len(shape_of(node.inputs[0]) or [])
    axes = node.attrs.get("axes")
    if axes is None and len(node.inputs) > 1:
        v = const_value(node.inputs[1])
        axes = None if v is None else v.tolist()
    if cmap is None or axes is None or rank == 0:
        _pin_node(ana, node, f"{node.op} {node.name} over all axes")
        return
    axes = [a % rank for a in axes]
    if cmap.axis in axes:
        _pin_node(ana, node, f"{node.op} {node.name} reduces over channels")
        return
    keep = int(node.attrs.get("keepdims", 1))
    axis = cmap.axis if keep else cmap.axis - sum(a < cmap.axis for a in axes)
    known = cmap.known if node.op != "ReduceSum" else cmap.known & (cmap.value == 0)
    ana.maps[node.outputs[0].name] = ChannelMap(axis, cmap.ids, known, np.where(known, cmap.value, 0.0))


@rule("Shape", "Size")
def _shape(ana: ChannelAnalysis, node: gs.Node) -> None:
    """Shape tensors carry no channels; their consumers compute at run time."""
