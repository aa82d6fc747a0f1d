"""Pipelines: which passes run, in which order, for each target. Declared here only.

A pipeline is a list of (name, pass) pairs; each pass is `fn(graph, ctx) -> graph` where `ctx`
carries options and collects per-pass results for the report.

Every pipeline runs at the captured (static) batch. With `ctx.batch_axis` the batch dimension
is relaxed afterwards (passes/dynamic_batch.py); where that cannot be done exactly the model
keeps its static batch and `ctx.batch_note` says why.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import onnx
import onnx_graphsurgeon as gs

from gate2deploy.passes import ir
from gate2deploy.passes.canonicalize_channel_shuffle import canonicalize_channel_shuffle
from gate2deploy.passes.choose_widths import choose_padding
from gate2deploy.passes.cleanup import cleanup
from gate2deploy.passes.dynamic_batch import BatchAxisError, relax_batch
from gate2deploy.passes.fold_masks import FoldResult, fold_static_masks
from gate2deploy.passes.fuse_gated_epilogue import fuse_gated_epilogue
from gate2deploy.passes.lower_portable import LoweringResult, lower_portable
from gate2deploy.passes.resolve_static_shapes import resolve_static_shapes
from gate2deploy.passes.sparse_fbs_consumers import sparse_fbs_consumers


@dataclass
class PassContext:
    unfoldable_policy: str = "error"  # "error" | "keep"
    fold: FoldResult = field(default_factory=FoldResult)
    choose_widths: bool = False  # pad folded layers to fast physical widths (passes/choose_widths.py)
    lowering: LoweringResult = field(default_factory=LoweringResult)  # CG/PG/FBS -> standard ops
    sparse_input_convs: list[str] = field(default_factory=list)  # Conv after FBS -> SparseInputConv
    fused_epilogues: list[str] = field(default_factory=list)  # CG/PG nodes that took BN (+ Relu)
    batch_axis: bool = False  # relax the batch dimension at the end (passes/dynamic_batch.py)
    batch_note: str | None = None  # why the batch stayed static although batch_axis was asked


Pass = Callable[[gs.Graph, PassContext], gs.Graph]

FOLD_PIPELINE: list[tuple[str, Pass]] = [
    ("cleanup", lambda g, ctx: cleanup(g)),
    ("resolve_static_shapes", lambda g, ctx: resolve_static_shapes(g)),
    ("canonicalize_channel_shuffle", lambda g, ctx: canonicalize_channel_shuffle(g)),
    ("fold_static_masks", lambda g, ctx: fold_static_masks(
        g, ctx.unfoldable_policy, ctx.fold, choose_padding if ctx.choose_widths else None)),
]


def _sparse_fbs_consumers(graph: gs.Graph, ctx: PassContext) -> gs.Graph:
    ctx.sparse_input_convs.extend(sparse_fbs_consumers(graph))
    return graph


def _fuse_gated_epilogue(graph: gs.Graph, ctx: PassContext) -> gs.Graph:
    ctx.fused_epilogues.extend(fuse_gated_epilogue(graph))
    return graph


PIPELINES: dict[str, list[tuple[str, Pass]]] = {
    # Portable: every gate2deploy op becomes standard ONNX ops (stock onnxruntime, no plugin).
    "onnx": FOLD_PIPELINE + [("lower_portable", lambda g, ctx: lower_portable(g, ctx.lowering))],
    # ONNX Runtime with the gate2deploy custom-op library: CGConv/PGConv/FBSConv nodes stay,
    # plain convs reading an FBS output skip its zero channels, and the BatchNorm + Relu after
    # a CG/PG node join it as its epilogue (CPU-only features of the native kernels).
    "ort": FOLD_PIPELINE + [("sparse_fbs_consumers", _sparse_fbs_consumers),
                            ("fuse_gated_epilogue", _fuse_gated_epilogue)],
    # TensorRT with the gate2deploy plugins: CGConv/PGConv/FBSConv nodes stay.
    "trt": list(FOLD_PIPELINE),
}


def run_pipeline(model: onnx.ModelProto, target: str, ctx: PassContext) -> onnx.ModelProto:
    graph = ir.import_graph(model)
    for _name, fn in PIPELINES[target]:
        graph = fn(graph, ctx)
    compiled = ir.export_model(graph)
    if ctx.batch_axis:
        compiled = _dynamic_batch(compiled, ctx)
    return compiled


def _dynamic_batch(model: onnx.ModelProto, ctx: PassContext) -> onnx.ModelProto:
    """Last step of every pipeline when asked: on a ModelProto, as it needs onnx's shape
    inference with a symbolic batch between its rewrites."""
    try:
        return relax_batch(model)
    except BatchAxisError as exc:
        ctx.batch_note = str(exc)
        return model
