"""Build the physically pruned ONNX model of a channel configuration, to measure it.

The captured graph has BatchNorm folded into each Conv, so a `gate2deploy::ChannelMask` on a
producing layer's output is exactly Gator's gate after the BatchNorm. A mask keeping the first
`channels[i]` channels goes on every producer of edge i; the compiler's own fold pass then
removes the masked channels. The result is what `gate2deploy export` would produce for a
checkpoint with those gates: the ground truth the predictor is checked against.
"""
from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .. import ops
from ..passes import ir
from ..passes.cleanup import cleanup
from ..passes.fold_masks import fold_static_masks
from .edges import ModelTable


def pruned_model(proto: onnx.ModelProto, table: ModelTable, channels: list[int]) -> onnx.ModelProto:
    graph = cleanup(ir.import_graph(proto))
    nodes = {n.name: n for n in graph.nodes}
    for edge, keep in zip(table.edges, channels):
        if keep >= edge.channels:
            continue
        mask = np.zeros(edge.channels, np.float32)
        mask[:keep] = 1.0
        for producer in edge.producers:
            node = nodes[producer]
            out = node.outputs[0]
            masked = gs.Variable(f"{out.name}_premask", dtype=out.dtype, shape=out.shape)
            node.outputs[0] = masked
            graph.nodes.append(gs.Node("ChannelMask", f"{producer}_profile_mask",
                                       attrs={"source": f"profile edge {edge.index}"},
                                       inputs=[masked, gs.Constant(f"{producer}_profile_mask_value", mask)],
                                       outputs=[out], domain=ops.DOMAIN))
    graph.toposort()
    graph = fold_static_masks(graph, policy="error")
    return ir.export_model(graph)
