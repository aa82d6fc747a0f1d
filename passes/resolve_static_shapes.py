"""Pass: replace shape computations over static shapes by constants.

Why: the TorchScript exporter records `x.chunk(2, dim=1)` (ShuffleNetV2's split) and
similar code as Shape -> Gather -> Div -> Slice, whose bounds are computed at run time. With
the batch and image size fixed at capture, those bounds are constants; once they are, the
channel analysis sees an ordinary channel Slice it can fold, and shape inference can give
every downstream tensor a static shape.

Expects: a graph whose graph inputs have static shapes (what `capture` produces).
Guarantees: the same function; every node whose inputs are all constants, or that is a
`Shape` of a statically shaped tensor, is replaced by its constant value (evaluated by
onnx-graphsurgeon's constant folding on ONNX Runtime); custom-domain nodes are never
evaluated; shapes are re-inferred when anything changed. A graph without such computations
is returned unchanged.
"""
from __future__ import annotations

import onnx_graphsurgeon as gs

from . import ir


def _has_shape_computation(graph: gs.Graph) -> bool:
    return any(n.op in ("Shape", "Size") for n in graph.nodes)


def resolve_static_shapes(graph: gs.Graph) -> gs.Graph:
    if not _has_shape_computation(graph):
        return graph
    # fold_constants evaluates only standard-domain subgraphs; a custom op it cannot run
    # is skipped (error_ok), never guessed.
    graph.fold_constants(fold_shapes=True, error_ok=True, flatten_subgraphs=False,
                         partitioning="basic", size_threshold=1 << 16,
                         should_exclude_node=lambda n: (n.domain or "") not in ("", "ai.onnx"))
    graph.cleanup().toposort()
    return ir.import_graph(ir.export_model(graph))  # fresh static shapes downstream
