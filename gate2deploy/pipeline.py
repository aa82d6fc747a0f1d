"""Passes and the pass manager: one protocol, one manager, the pipelines of every target.

A pass is an object with a `name`, the names of the passes it `requires` to have run
before it (its preconditions: e.g. the fold needs static shapes), and
`__call__(graph, ctx) -> graph` over an onnx-graphsurgeon graph. `ctx` (PassContext) carries
the options and collects each pass's results for the report. Each pass's contract is the
docstring of its module in passes/; this file only adapts them to the protocol (`GraphPass`)
and declares which run, in which order, per target (`PIPELINES`, read by targets.py).

`PassManager` (after torch.fx's PassManager: a list of callables run in order, with checks
between them) runs a pipeline: it checks every pass's preconditions before any runs, times
each pass (`ctx.timings`, in the report), names the failing pass in the error, and with
`debug_dir` (`--debug-passes DIR`) writes the graph after every pass and re-checks it
(onnx.checker and strict shape inference), so a pass that breaks the graph is caught where
it does.

Every pipeline runs at the captured (static) batch. With `ctx.batch_axis` the batch dimension
is relaxed afterwards (passes/dynamic_batch.py, on the ModelProto: it needs onnx's shape
inference with a symbolic batch between its rewrites); where that cannot be done exactly the
model keeps its static batch and `ctx.batch_note` says why.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import onnx
import onnx_graphsurgeon as gs

from gate2deploy.passes import ir
from gate2deploy.passes.canonicalize_channel_shuffle import canonicalize_channel_shuffle
from gate2deploy.passes.choose_widths import choose_padding
from gate2deploy.passes.cleanup import cleanup
from gate2deploy.passes.dynamic_batch import BatchAxisError, relax_batch
from gate2deploy.passes.fold_masks import FoldResult, fold_static_masks
from gate2deploy.passes.fuse_activation_quantizer import fuse_activation_quantizer
from gate2deploy.passes.fuse_gated_epilogue import fuse_gated_epilogue
from gate2deploy.passes.lower_portable import LoweringResult, lower_portable
from gate2deploy.passes.resolve_static_shapes import resolve_static_shapes
from gate2deploy.passes.sparse_fbs_consumers import sparse_fbs_consumers
from gate2deploy.passes.stream_weight_convs import stream_weight_convs

from .errors import UserError


@dataclass
class PassContext:
    unfoldable_policy: str = "error"  # "error" | "keep"
    fold: FoldResult = field(default_factory=FoldResult)
    choose_widths: bool = False  # pad folded layers to fast physical widths (passes/choose_widths.py)
    # a choose_padding-like callable that overrides choose_widths (gate2deploy/measure_widths.py)
    width_chooser: Callable | None = None
    widths: dict | None = None  # what physical widths were asked and used (the report's physical_widths)
    lowering: LoweringResult = field(default_factory=LoweringResult)  # CG/PG/FBS -> standard ops
    sparse_input_convs: list[str] = field(default_factory=list)  # Conv after FBS -> SparseInputConv
    fused_epilogues: list[str] = field(default_factory=list)  # CG/PG nodes that took BN (+ Relu)
    fused_quantizers: list[str] = field(default_factory=list)  # quantizer chains -> QuantizeActivation
    stream_convs: bool = False  # Convs whose weights dwarf their output -> StreamConv (--stream-convs)
    streamed_convs: list[str] = field(default_factory=list)  # the Convs rewritten so
    timings: dict[str, float] = field(default_factory=dict)  # pass name -> seconds
    debug_dir: str | None = None  # --debug-passes: dump and re-check the graph after each pass
    batch_axis: bool = False  # relax the batch dimension at the end (passes/dynamic_batch.py)
    batch_note: str | None = None  # why the batch stayed static although batch_axis was asked


@dataclass(frozen=True)
class GraphPass:
    """A pass: `run(graph, ctx) -> graph`, run only after the passes it requires."""

    name: str
    run: Callable[[gs.Graph, PassContext], gs.Graph]
    requires: tuple[str, ...] = ()

    def __call__(self, graph: gs.Graph, ctx: PassContext) -> gs.Graph:
        return self.run(graph, ctx)


class PassFailure(RuntimeError):
    """A pass raised something other than a user error, or left an invalid graph: a bug in
    gate2deploy, reported with the pass's name (and the traceback)."""


def _collect(into: str, fn: Callable[[gs.Graph], list]) -> Callable[[gs.Graph, PassContext], gs.Graph]:
    """Adapt a pass that returns what it did (a list) to the protocol: the list goes to ctx."""
    def run(graph: gs.Graph, ctx: PassContext) -> gs.Graph:
        getattr(ctx, into).extend(fn(graph))
        return graph
    return run


CLEANUP = GraphPass("cleanup", lambda g, ctx: cleanup(g))
RESOLVE_STATIC_SHAPES = GraphPass("resolve_static_shapes", lambda g, ctx: resolve_static_shapes(g), ("cleanup",))
CANONICALIZE_CHANNEL_SHUFFLE = GraphPass("canonicalize_channel_shuffle",
                                         lambda g, ctx: canonicalize_channel_shuffle(g), ("resolve_static_shapes",))
FOLD_STATIC_MASKS = GraphPass(
    "fold_static_masks",
    lambda g, ctx: fold_static_masks(g, ctx.unfoldable_policy, ctx.fold,
                                     ctx.width_chooser or (choose_padding if ctx.choose_widths else None)),
    ("resolve_static_shapes", "canonicalize_channel_shuffle"))
LOWER_PORTABLE = GraphPass("lower_portable", lambda g, ctx: lower_portable(g, ctx.lowering), ("fold_static_masks",))
SPARSE_FBS_CONSUMERS = GraphPass("sparse_fbs_consumers", _collect("sparse_input_convs", sparse_fbs_consumers),
                                 ("fold_static_masks",))
FUSE_ACTIVATION_QUANTIZER = GraphPass("fuse_activation_quantizer",
                                      _collect("fused_quantizers", fuse_activation_quantizer), ("fold_static_masks",))
# After the quantizer fusion: a quantizer after a gated conv joins its epilogue as one node.
FUSE_GATED_EPILOGUE = GraphPass("fuse_gated_epilogue", _collect("fused_epilogues", fuse_gated_epilogue),
                                ("fold_static_masks", "fuse_activation_quantizer"))


def _stream_weight_convs(graph: gs.Graph, ctx: PassContext) -> gs.Graph:
    if ctx.stream_convs:  # --stream-convs on / auto (gate2deploy/api.py)
        ctx.streamed_convs.extend(stream_weight_convs(graph))
    return graph


# After the FBS consumers: a Conv reading an FBS output skips its zero channels instead.
STREAM_WEIGHT_CONVS = GraphPass("stream_weight_convs", _stream_weight_convs,
                                ("resolve_static_shapes", "fold_static_masks", "sparse_fbs_consumers"))

FOLD_PIPELINE = [CLEANUP, RESOLVE_STATIC_SHAPES, CANONICALIZE_CHANNEL_SHUFFLE, FOLD_STATIC_MASKS]

PIPELINES: dict[str, list[GraphPass]] = {
    # Portable: every gate2deploy op becomes standard ONNX ops (stock onnxruntime, no plugin).
    "onnx": FOLD_PIPELINE + [LOWER_PORTABLE],
    # ONNX Runtime with the gate2deploy custom-op library: CGConv/PGConv/FBSConv nodes stay,
    # plain convs reading an FBS output skip its zero channels, the seed's activation
    # quantizer chains become single QuantizeActivation nodes, the BatchNorm, Relu, clamp
    # and quantizer after a CG/PG node join it as its epilogue, and (with ctx.stream_convs)
    # convs whose weights dwarf their output read them once per call (CPU-only features of
    # the native kernels).
    "ort": FOLD_PIPELINE + [SPARSE_FBS_CONSUMERS, FUSE_ACTIVATION_QUANTIZER, FUSE_GATED_EPILOGUE,
                            STREAM_WEIGHT_CONVS],
    # TensorRT with the gate2deploy plugins: CGConv/PGConv/FBSConv nodes stay.
    "trt": list(FOLD_PIPELINE),
}
# What the static fold leaves, every gated op as it is: `info`'s "effective" model (a
# lowering would rename the gated layers and count each of its paths as a layer of its own).
FOLD_ONLY = "fold"
PIPELINES[FOLD_ONLY] = list(FOLD_PIPELINE)


class PassManager:
    def __init__(self, passes: list[GraphPass]):
        done: set[str] = set()
        for p in passes:  # preconditions are checked before anything runs
            missing = [r for r in p.requires if r not in done]
            if missing:
                raise PassFailure(f"pass {p.name} requires {', '.join(missing)} to run before it")
            done.add(p.name)
        self.passes = passes

    def run(self, model: onnx.ModelProto, ctx: PassContext) -> onnx.ModelProto:
        graph = ir.import_graph(model)
        for index, p in enumerate(self.passes):
            start = time.perf_counter()
            try:
                graph = p(graph, ctx)
            except UserError:
                raise  # the user's input (e.g. a mask the fold cannot honour): already one line
            except Exception as exc:  # noqa: BLE001 - a bug: name the pass, keep the traceback
                raise PassFailure(f"pass {p.name} failed: {type(exc).__name__}: {exc}") from exc
            ctx.timings[p.name] = round(ctx.timings.get(p.name, 0.0) + time.perf_counter() - start, 4)
            if ctx.debug_dir:
                self._dump_and_check(graph, p.name, index, Path(ctx.debug_dir))
        return ir.export_model(graph)

    @staticmethod
    def _dump_and_check(graph: gs.Graph, name: str, index: int, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        try:
            model = ir.export_model(graph.copy())  # strict shape inference runs here
            onnx.checker.check_model(model)
        except Exception as exc:  # noqa: BLE001
            raise PassFailure(f"graph invalid after pass {name}: {type(exc).__name__}: "
                              f"{(str(exc).strip().splitlines() or [''])[0]}") from exc
        onnx.save(model, str(folder / f"{index:02d}_{name}.onnx"))


def with_static_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """The captured model with every shape resolved and nothing folded: what the dense
    MACs are counted on (ONNX shape inference alone stops at ops such as a strided-slice
    shortcut, and the layers after it would not be counted)."""
    return PassManager([CLEANUP, RESOLVE_STATIC_SHAPES]).run(model, PassContext())


def run_pipeline(model: onnx.ModelProto, target: str, ctx: PassContext) -> onnx.ModelProto:
    compiled = PassManager(PIPELINES[target]).run(model, ctx)
    if ctx.batch_axis:
        compiled = _dynamic_batch(compiled, ctx)
    return compiled


def _dynamic_batch(model: onnx.ModelProto, ctx: PassContext) -> onnx.ModelProto:
    """The last step of every pipeline when asked (module docstring)."""
    start = time.perf_counter()
    try:
        return relax_batch(model)
    except BatchAxisError as exc:
        ctx.batch_note = str(exc)
        return model
    finally:
        ctx.timings["dynamic_batch"] = round(time.perf_counter() - start, 4)
