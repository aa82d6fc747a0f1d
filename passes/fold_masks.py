"""Pass: fold static channel masks (and channels already dead in the weights) into
physically smaller layers.

Expects: a toposorted, shape-inferred graph (static shapes) after `cleanup`, possibly with
`gate2deploy::ChannelMask` nodes.

Guarantees, for every input: the folded graph computes exactly what the masked graph
computes, up to float rounding. A coupled channel group (see `channel_analysis`) is removed
iff it is not pinned and its channels are known constants at every place they are mixed into
other channels; then every producer's rows, per-channel parameter and consumer's columns of
the group are sliced away, and a non-zero constant's contribution is added to the consumer's
bias (or, where zero padding makes it vary over space, added as an exact constant map). A
layer whose every input channel is removed becomes its constant output. ChannelMask nodes
disappear once their zero channels are gone. Masked channels that cannot be removed are
collected in `FoldResult.unfoldable` by node and reason (and the ops the analysis could not
reason about, whose channels are kept, in `FoldResult.pinned_ops`); with policy "error" they raise
`UnfoldableError`, with "keep" their masks stay in the graph as an exact `Mul`.
With no masks and no dead channels the graph is unchanged.

Padding: some removable channels may be kept physically instead (a grouped Conv needs the
same number of kept channels in every group; `choose_padding`, e.g. `choose_widths`, asks
for faster widths). A padding channel's mask entry becomes 1 and its value is never read:
its constant goes into each consumer's bias and the consumer's weights for it are zeroed,
so the result stays exact; removable channels are only removed or padded, never reported.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs
import torch
import torch.nn.functional as F

from gate2deploy.errors import UnfoldableError

from .channel_analysis import ChannelAnalysis, OpaqueOp, ParamBinding, analyze
from .ir import bypass, const_value, new_const, shape_of


@dataclass
class Unfoldable:
    node: str
    source: str
    channels: int
    reason: str


@dataclass
class FoldResult:
    removed_channels: int = 0  # coupled channels removed (one per channel of a coupled group)
    constant_folds: list[str] = field(default_factory=list)  # consumers that absorbed constants
    removed_layers: list[str] = field(default_factory=list)  # layers replaced by constants
    unfoldable: list[Unfoldable] = field(default_factory=list)
    # Ops the channel analysis could not reason about: their channels were kept (pinned).
    pinned_ops: list[OpaqueOp] = field(default_factory=list)


def fold_static_masks(graph: gs.Graph, policy: str = "error", result: FoldResult | None = None,
                      choose_padding=None) -> gs.Graph:
    """`choose_padding(analysis, removable_roots) -> roots` (optional, e.g.
    `choose_widths.choose_padding`) names removable channels to keep as padding."""
    if policy not in ("error", "keep"):
        raise ValueError(f"policy must be 'error' or 'keep', not {policy!r}")
    result = result if result is not None else FoldResult()
    ana = analyze(graph)
    result.pinned_ops.extend(ana.opaque)
    removable, why_kept = _decide(ana)
    _check_masks(ana, removable, why_kept, policy, result)
    if removable:
        # Channels kept only to pad a layer to a faster physical width: removable channels
        # left in place, their mask lifted, and their reads neutralised at every consume site.
        padding = set(choose_padding(ana, removable)) & removable if choose_padding else set()
        padding |= _equalise_groups(ana, removable, padding)
        removable = removable - padding
        removable_ids, padding_ids = np.array(sorted(removable), np.int64), np.array(sorted(padding), np.int64)
        keep = {name: ~np.isin(ana.roots_of(name), removable_ids) for name in ana.maps}
        neutral = {name: np.isin(ana.roots_of(name), padding_ids) for name in ana.maps} if padding else None
        if neutral is not None:
            _lift_masks(ana, neutral)
        _fold_constants_into_consumers(ana, keep, result, neutral)
        if neutral is not None:
            _neutralise_padding(ana, neutral)
        _slice_grouped_inputs(ana, keep)
        _slice_parameters(ana, keep)
        _fix_shape_attributes(ana, keep)
        _replace_emptied_layers(ana, keep, result)
        result.removed_channels = len(removable)
    _retire_masks(graph, policy)
    return graph.cleanup().toposort()


def _decide(ana: ChannelAnalysis) -> tuple[set[int], dict[int, str]]:
    why_kept: dict[int, str] = dict(ana.pinned_roots())
    for site in ana.consume_sites:
        cmap = ana.maps[site.tensor]
        roots = ana.roots_of(site.tensor)
        for root in set(roots[~cmap.known].tolist()):
            why_kept.setdefault(root, f"live at the input of {site.node.name}")
    all_roots = set()
    for name in ana.maps:
        all_roots.update(ana.roots_of(name).tolist())
    # Only groups that some consume site or mask actually sees as known are worth removing.
    candidates = set()
    for site in ana.consume_sites:
        cmap = ana.maps[site.tensor]
        candidates.update(ana.roots_of(site.tensor)[cmap.known].tolist())
    return {r for r in candidates if r not in why_kept}, why_kept


def _check_masks(ana, removable, why_kept, policy, result: FoldResult) -> None:
    for node in ana.graph.nodes:
        if node.op != "ChannelMask" or node.inputs[0].name not in ana.maps:
            continue
        mask = const_value(node.inputs[1])
        if mask is None:
            raise UnfoldableError(f"mask {node.attrs.get('source') or node.name} is computed in the graph, "
                                  "not a constant: export it in eval mode with a fixed mask")
        mask = mask.reshape(-1)
        roots = ana.roots_of(node.inputs[0].name)
        stuck = [(int(r)) for r, m in zip(roots, mask) if m == 0 and r not in removable]
        if not stuck:
            continue
        source = node.attrs.get("source", "") or node.name
        reason = why_kept.get(stuck[0], "not mixed into any layer")
        if reason.startswith("live at"):
            reason = f"masks disagree inside a coupled channel group: masked here but {reason}"
        result.unfoldable.append(Unfoldable(node.name, source, len(stuck), reason))
    if result.unfoldable and policy == "error":
        u = result.unfoldable[0]
        more = f" (and {len(result.unfoldable) - 1} more masks)" if len(result.unfoldable) > 1 else ""
        raise UnfoldableError(
            f"cannot fold mask {u.source}: {u.channels} masked channels cannot be removed: "
            f"{u.reason}{more}; pass --keep-unfoldable to keep such masks as an exact Mul")


def _fold_constants_into_consumers(ana: ChannelAnalysis, keep, result: FoldResult, neutral=None) -> None:
    for site in ana.consume_sites:
        cmap = ana.maps[site.tensor]
        gone = ~keep[site.tensor] if neutral is None else ~keep[site.tensor] | neutral[site.tensor]
        dropped = gone & cmap.known & (cmap.value != 0)
        if not dropped.any():
            continue
        node = site.node
        if node.op == "Conv":
            contribution = _conv_contribution(node, cmap, dropped)
        elif node.op == "Gemm":
            contribution = _gemm_contribution(node, cmap, dropped)
        else:  # MatMul
            contribution = np.where(dropped, cmap.value, 0.0) @ const_value(node.inputs[1]).astype(np.float64)
        _add_to_output(ana, node, contribution.astype(np.float32))
        result.constant_folds.append(node.name)


def _conv_contribution(node: gs.Node, cmap, dropped) -> np.ndarray:
    """What the dropped constant channels add to the conv's output: a [1, O, *spatial] map."""
    ishape = shape_of(node.inputs[0])
    weight = torch.from_numpy(const_value(node.inputs[1]).astype(np.float64))
    x = torch.zeros((1, *ishape[1:]), dtype=torch.float64)
    values = torch.from_numpy(np.where(dropped, cmap.value, 0.0))
    x += values.view(1, -1, *([1] * (len(ishape) - 2)))
    nd = len(ishape) - 2
    if node.attrs.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
        raise UnfoldableError(f"Conv {node.name}: auto_pad={node.attrs['auto_pad']} is not supported by the fold")
    pads = list(node.attrs.get("pads", [0] * 2 * nd))
    torch_pad = []
    for i in reversed(range(nd)):
        torch_pad += [pads[i], pads[i + nd]]
    x = F.pad(x, torch_pad)
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[nd]
    y = conv(x, weight, stride=list(node.attrs.get("strides", [1] * nd)),
             dilation=list(node.attrs.get("dilations", [1] * nd)), groups=int(node.attrs.get("group", 1)))
    return y.numpy()


def _gemm_contribution(node: gs.Node, cmap, dropped) -> np.ndarray:
    weight = const_value(node.inputs[1]).astype(np.float64)
    wmat = weight.T if node.attrs.get("transB", 0) else weight
    return float(node.attrs.get("alpha", 1.0)) * (np.where(dropped, cmap.value, 0.0) @ wmat)


def _add_to_output(ana: ChannelAnalysis, node: gs.Node, contribution: np.ndarray) -> None:
    """Add a constant to a layer's output: into the bias when uniform, else as an Add."""
    out = node.outputs[0]
    c_out = contribution.shape[1] if node.op == "Conv" else contribution.shape[-1]
    flat = contribution.reshape(c_out, -1) if node.op == "Conv" else contribution.reshape(1, -1)
    uniform = node.op != "Conv" or np.all(flat == flat[:, :1])
    if uniform and node.op in ("Conv", "Gemm"):
        per_channel = flat[:, 0] if node.op == "Conv" else flat[0]
        has_bias = len(node.inputs) > 2 and node.inputs[2].name
        if node.op == "Gemm":
            beta = float(node.attrs.get("beta", 1.0)) if has_bias else 1.0
            old = np.broadcast_to(const_value(node.inputs[2]) * beta, per_channel.shape) if has_bias else 0.0
            node.attrs["beta"] = 1.0
        else:
            old = const_value(node.inputs[2]) if has_bias else 0.0
        bias = new_const(f"{node.name}_bias_folded", (old + per_channel).astype(np.float32))
        if has_bias:
            node.inputs[2] = bias
        else:
            node.inputs.append(bias)
        # the bias is now an output parameter of this layer
        ana.bindings.append(ParamBinding(node, 2, 0, out.name))
        return
    # Non-uniform (zero padding) or MatMul: an explicit Add of the exact constant.
    shape = [1, c_out, *contribution.shape[2:]] if node.op == "Conv" else [c_out]
    const = new_const(f"{node.name}_const_contribution", contribution.reshape(shape))
    pre = gs.Variable(f"{out.name}_before_const", dtype=out.dtype, shape=out.shape)
    node.outputs[0] = pre
    add = gs.Node("Add", f"{node.name}_add_const", inputs=[pre, const], outputs=[out])
    ana.graph.nodes.append(add)
    ana.maps[pre.name] = ana.maps[out.name]
    ana.bindings.append(ParamBinding(add, 1, 1 if node.op == "Conv" else 0, out.name))


def _lift_masks(ana: ChannelAnalysis, neutral) -> None:
    """Padding channels stay physically: their mask entries become 1 (their value, whatever
    it is, is never read: see `_neutralise_padding`), so no mask survives because of them."""
    for node in ana.graph.nodes:
        if node.op == "ChannelMask" and node.inputs[0].name in neutral and neutral[node.inputs[0].name].any():
            mask = const_value(node.inputs[1]).copy()
            mask.reshape(-1)[neutral[node.inputs[0].name]] = 1
            node.inputs[1] = new_const(f"{node.name}_mask_padded", mask)


def _neutralise_padding(ana: ChannelAnalysis, neutral) -> None:
    """Zero the weights that read padding channels at every consume site. Their known
    constant was already moved into the bias, so the layer computes what it computed before;
    a padding channel reaches other channels only through consume sites (a group with any
    other way out is pinned, hence not removable, hence never padding)."""
    for site in ana.consume_sites:
        columns = neutral[site.tensor]
        if not columns.any():
            continue
        weight = const_value(site.node.inputs[1]).copy()
        if site.node in ana.grouped_convs:  # rows of group g read that group's columns
            groups = int(site.node.attrs["group"])
            grouped = weight.reshape(groups, weight.shape[0] // groups, *weight.shape[1:])
            for g, local in enumerate(columns.reshape(groups, -1)):
                grouped[g][:, local] = 0
        else:
            binding = next(b for b in ana.bindings
                           if b.node is site.node and b.index == 1 and b.tensor == site.tensor)
            index = [slice(None)] * weight.ndim
            index[binding.axis] = columns
            weight[tuple(index)] = 0
        site.node.inputs[1] = new_const(f"{site.node.name}_weight_padded", weight)
        if site.node.op == "FBSConv":  # the saliency reads the input through fc_W too
            fc_w = const_value(site.node.inputs[2]).copy()
            fc_w[:, columns] = 0
            site.node.inputs[2] = new_const(f"{site.node.name}_fc_weight_padded", fc_w)


def _equalise_groups(ana: ChannelAnalysis, removable: set[int], padding: set[int]) -> set[int]:
    """Padding that gives every grouped Conv the same number of kept input channels and of
    kept output channels in each group (what a Conv with `group` G can express): groups
    with fewer kept channels keep some removable ones as padding. Iterated to a fixed point,
    since a root may sit in several grouped Convs."""
    extra: set[int] = set()
    changed = True
    while changed:
        changed = False
        for node in ana.grouped_convs:
            groups = int(node.attrs["group"])
            for tensor in (node.inputs[0].name, node.outputs[0].name):
                roots = ana.roots_of(tensor).reshape(groups, -1)
                gone = np.isin(roots, list(removable - padding - extra))
                target = int((~gone).sum(axis=1).max())
                for g in range(groups):
                    for root in roots[g][gone[g]][:target - int((~gone[g]).sum())].tolist():
                        extra.add(root)
                        changed = True
    return extra


def _slice_grouped_inputs(ana: ChannelAnalysis, keep) -> None:
    """Grouped Conv weights [O, C/G, k...]: rows of group g keep the columns of group g's
    kept input channels (equal in number in every group, see `_equalise_groups`). Rows are
    sliced afterwards by their ParamBinding like any Conv's."""
    for node in ana.grouped_convs:
        kept = keep[node.inputs[0].name]
        if kept.all() or not kept.any():
            continue  # untouched, or an emptied layer replaced by its constant
        groups = int(node.attrs["group"])
        local = kept.reshape(groups, -1)
        counts = local.sum(axis=1)
        if not np.all(counts == counts[0]):
            raise AssertionError(f"grouped Conv {node.name}: unequal kept inputs per group {counts.tolist()}")
        weight = const_value(node.inputs[1])
        rows = weight.shape[0] // groups
        sliced = np.concatenate([weight[g * rows:(g + 1) * rows][:, local[g]] for g in range(groups)])
        node.inputs[1] = new_const(f"{node.name}_grouped_in_folded", sliced)


def _slice_parameters(ana: ChannelAnalysis, keep) -> None:
    by_input = defaultdict(list)
    for b in ana.bindings:
        by_input[(id(b.node), b.index)].append(b)
    for bindings in by_input.values():
        node, index = bindings[0].node, bindings[0].index
        if index >= len(node.inputs):
            continue
        value = const_value(node.inputs[index])
        if value is None:
            continue
        changed = False
        for axis in sorted({b.axis for b in bindings}):
            b = next(b for b in bindings if b.axis == axis)
            k = keep[b.tensor]
            if value.shape[axis] != len(k):
                raise AssertionError(f"binding {node.name}[{index}] axis {axis}: {value.shape} vs {len(k)}")
            if not k.all():
                value = np.take(value, np.flatnonzero(k), axis=axis)
                changed = True
        if changed:
            node.inputs[index] = new_const(f"{node.name}_in{index}_folded", value)


def _fix_shape_attributes(ana: ChannelAnalysis, keep) -> None:
    for node in ana.graph.nodes:
        if node.op == "Conv" and int(node.attrs.get("group", 1)) > 1:
            cmap_in = ana.maps.get(node.inputs[0].name)
            if cmap_in is not None and node.inputs[0].name in keep:
                weight = const_value(node.inputs[1])
                if int(node.attrs["group"]) == len(keep[node.inputs[0].name]):  # depthwise
                    node.attrs["group"] = int(weight.shape[0])
        elif node.op == "Split" and len(node.inputs) > 1 and node.inputs[1].name:
            cmap = ana.maps.get(node.inputs[0].name)
            axis = int(node.attrs.get("axis", 0)) % len(shape_of(node.inputs[0]))
            if cmap is not None and cmap.axis == axis:
                sizes = [int(keep[o.name].sum()) for o in node.outputs]
                node.inputs[1] = new_const(f"{node.name}_split_folded", np.array(sizes, np.int64))
        elif node.op == "Reshape":
            out = node.outputs[0].name
            target = const_value(node.inputs[1])
            if out in ana.maps and target is not None and not keep[out].all():
                axis = ana.maps[out].axis
                target = target.copy()
                if target[axis] > 0:
                    target[axis] = int(keep[out].sum())
                    node.inputs[1] = new_const(f"{node.name}_shape_folded", target)
    for node, src, start, end in ana.channel_slices:
        # The kept channels of [start, end) are consecutive once the input is renumbered.
        before = np.concatenate([[0], np.cumsum(keep[src])])
        axes = const_value(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3].name else None
        rank = len(shape_of(node.inputs[0]))
        axes = list(range(len(const_value(node.inputs[1])))) if axes is None else [int(a) % rank for a in axes.reshape(-1)]
        k = axes.index(ana.maps[src].axis)
        for index, bound in ((1, start), (2, end)):
            values = const_value(node.inputs[index]).reshape(-1).copy()
            values[k] = before[bound]
            node.inputs[index] = new_const(f"{node.name}_in{index}_folded", values)
    for node, src in ana.channel_gathers:
        out = node.outputs[0].name
        indices = const_value(node.inputs[1]).astype(np.int64)
        renumber = np.cumsum(keep[src]) - 1
        new = renumber[indices[keep[out]] % len(keep[src])]
        node.inputs[1] = new_const(f"{node.name}_indices_folded", new.astype(np.int64))


def _replace_emptied_layers(ana: ChannelAnalysis, keep, result: FoldResult) -> None:
    """A consumer whose every input channel was removed computes a constant: its bias plus
    the folded contribution. Replace it by that constant, expanded to its output shape."""
    for site in ana.consume_sites:
        if keep[site.tensor].any():
            continue
        node = site.node
        out = node.outputs[0]
        oshape = shape_of(out)
        if node.op == "Conv":
            c_out = const_value(node.inputs[1]).shape[0]
            bias = const_value(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2].name else np.zeros(c_out)
            value = np.broadcast_to(bias.reshape(1, -1, *([1] * (len(oshape) - 2))), (1, c_out, *oshape[2:]))
        else:
            wmat = const_value(node.inputs[1])
            c_out = wmat.shape[0] if node.attrs.get("transB", 0) else wmat.shape[1]
            bias = const_value(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2].name else np.zeros(c_out)
            value = np.broadcast_to(bias * float(node.attrs.get("beta", 1.0)), (1, c_out))
        target = np.array([oshape[0], c_out, *oshape[2:]], np.int64)
        node.op, node.domain, node.attrs = "Expand", "", {}
        node.inputs.clear()
        node.inputs.extend([new_const(f"{node.name}_constant_output", value.astype(np.float32).copy()),
                            new_const(f"{node.name}_constant_shape", target)])
        result.removed_layers.append(node.name)
    # Concat inputs that lost every channel are dropped from the Concat.
    for node in ana.graph.nodes:
        if node.op == "Concat":
            kept = [t for t in node.inputs if t.name not in keep or keep[t.name].any()]
            if len(kept) != len(node.inputs):
                node.inputs.clear()
                node.inputs.extend(kept)


def _retire_masks(graph: gs.Graph, policy: str) -> None:
    for node in [n for n in graph.nodes if n.op == "ChannelMask"]:
        mask = const_value(node.inputs[1])
        if mask is None:
            continue
        if mask.size == 0 or np.all(mask == 1):
            bypass(graph, node)
        elif policy == "keep":
            rank = len(shape_of(node.inputs[0]) or [0, 0])
            node.op, node.domain, node.attrs = "Mul", "", {}
            node.inputs[1] = new_const(f"{node.name}_mask", mask.reshape(-1, *([1] * (rank - 2))).astype(np.float32))
