"""Pass: channel shuffle written as Reshape -> Transpose -> Reshape becomes one Gather.

Why: ShuffleNet's shuffle `x.view(N, g, C/g, H, W).transpose(1, 2).reshape(N, C, H, W)` moves
channels through a 5-D tensor whose axes mix group and channel, which the channel analysis
cannot follow (it pins such reshapes). The same permutation as a `Gather(axis=1)` with
constant indices is a channel re-indexing the analysis tracks and the fold renumbers.

Declared as a pattern (`SHUFFLE_PATTERN`): a Reshape of a [N, C, *S] tensor to
[N, g, C/g, *S], a Transpose swapping axes 1 and 2 (others fixed), a Reshape back to
[N, C, *S]; the intermediate tensors have no other consumers.

Expects: a shape-inferred graph with static shapes. Guarantees: the same function, exactly
(a Gather copies values); every match is replaced by `Gather(x, indices, axis=1)` with
`indices[o] = (o % g) * (C/g) + o // g`; nothing else changes.
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from .ir import const_value, new_const, shape_of

SHUFFLE_PATTERN = ("Reshape", "Transpose", "Reshape")


def _single_consumer(tensor) -> gs.Node | None:
    return tensor.outputs[0] if len(tensor.outputs) == 1 else None


def _match(first: gs.Node):
    """The shuffle's (transpose, last reshape, groups) if `first` starts one, else None."""
    x = first.inputs[0]
    ishape, mid = shape_of(x), shape_of(first.outputs[0])
    transpose = _single_consumer(first.outputs[0])
    if ishape is None or mid is None or transpose is None or transpose.op != SHUFFLE_PATTERN[1]:
        return None
    last = _single_consumer(transpose.outputs[0])
    if last is None or last.op != SHUFFLE_PATTERN[2]:
        return None
    rank = len(ishape)
    if rank < 2 or len(mid) != rank + 1 or shape_of(last.outputs[0]) != ishape:
        return None
    groups, per_group = mid[1], mid[2]
    if mid[0] != ishape[0] or groups * per_group != ishape[1] or tuple(mid[3:]) != tuple(ishape[2:]):
        return None
    perm = list(transpose.attrs.get("perm", []))
    if perm != [0, 2, 1, *range(3, rank + 1)]:
        return None
    return transpose, last, groups


def canonicalize_channel_shuffle(graph: gs.Graph) -> gs.Graph:
    for first in [n for n in graph.nodes if n.op == SHUFFLE_PATTERN[0]]:
        if not first.outputs or (first.domain or "") not in ("", "ai.onnx") or const_value(first.inputs[1]) is None:
            continue  # (no outputs: the last Reshape of a shuffle replaced just before)
        found = _match(first)
        if found is None:
            continue
        transpose, last, groups = found
        channels = shape_of(first.inputs[0])[1]
        # out[:, o] = in[:, (o % g) * (C / g) + o // g]: the transpose of a [g, C/g] grid.
        indices = np.arange(channels).reshape(groups, channels // groups).T.reshape(-1)
        out = last.outputs[0]
        gather = gs.Node("Gather", f"{last.name}_channel_shuffle", {"axis": 1},
                         inputs=[first.inputs[0], new_const(f"{last.name}_shuffle_indices", indices.astype(np.int64))],
                         outputs=[out])
        last.outputs.clear()
        graph.nodes.append(gather)
    return graph.cleanup().toposort()
