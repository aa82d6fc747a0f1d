"""`--physical-widths measured`: each folded layer's physical width chosen by timing
candidate widths on the target, exact semantics kept.

What is timed. The fold (passes/fold_masks.py) asks a width chooser which removable channels
to keep as padding (never-read zero channels: exact by construction, passes/choose_widths.py).
`measured` walks the channel-creating tensors in graph order, as `fast` does, and for each
one that the masks narrow (kept < full width) times candidate widths: the kept count rounded
up to 4, 8 and the NCHWc block (capped at the full width; `fast`'s choice is always among
them). Widths that are not multiples of 4 are not candidates: they take the tensor out of
ONNX Runtime's blocked (NCHWc) chain, which adds layout reorders on both sides in the whole
graph, but a small timed model has those reorders at its boundaries for every candidate
and cannot see that cost (measured: MobileNetV2 with such widths picked by the small models
ran 2.5x slower whole than with fast's). The timed model is the layer's neighbourhood at that width:
its producing Conv (the real kernel, strides, pads, dilations, input width and spatial size)
and every Conv reading the tensor's channels: directly, or through ops that keep its shape
(BatchNorm, activations, a residual Add, a squeeze-excitation Mul) and through max/average
pooling (copied into the timed model); a dense reader at its own output width as `fast`
would make it, a depthwise reader at the candidate width. A candidate width changes the producer's output and
the readers' input, which is where MLAS's blocked/unblocked choice and its layout reorders
fall. Tensors produced by another op (Gemm, MatMul), by a grouped conv, or read by a grouped
(not depthwise) conv keep `fast`'s rule; so do grouped convs' per-group widths (MLAS runs
them blocked only with whole blocks per group, measured, see choose_widths.py).

Timing: ONNX Runtime CPU sessions (the threads of the benchmark, 2, spinning on), all
candidates of one tensor in alternating blocks (gate2deploy/benchmark.py), the median of the
undisturbed runs (profiling/measure.py's rule: within a band of the fastest run); the
fastest wins, `fast`'s choice on a tie within `TIE` (noise must not buy padding changes).
Timings are cached per CPU model, ONNX Runtime version and thread count in
`$GATE2DEPLOY_CACHE` (default ~/.cache/gate2deploy)/widths/<cpu>.json, keyed by the layer
neighbourhood's shapes and attributes (not by the weights: kernel time does not depend on
them), so a second compile of the same shapes times nothing.

The whole-model guard (the issue's rule: judged by latency, never by MACs): a per-layer
choice ignores the layers' interplay (reorders between neighbours choosing differently), so
the folded model with the measured widths, the one with `fast`'s and the unpadded one
(`exact`) are timed whole (same method) and the fastest is kept (`fast`'s unless another
beats it by more than TIE in every round); identical graphs are not timed. The whole-model
timings are cached too (keyed by the candidates' bytes), so a second compile of the same
model times nothing and picks the same.

Targets: `ort` and `onnx` are timed with ONNX Runtime CPU on this machine (the `onnx`
target's portable graph is run by a stock ONNX Runtime, targets.py). `trt` is not timed
(its kernels are TensorRT's on a GPU, this chooser times ONNX Runtime CPU only): it falls
back to `fast`, and the report's `physical_widths.note` says so.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from .passes.channel_analysis import ChannelAnalysis
from .passes.choose_widths import BLOCK, MIN_MULTIPLE, _pad, _round_up, choose_padding
from .passes.ir import shape_of

TIMED_TARGETS = ("ort", "onnx")
TIE = 0.05  # a candidate must beat fast's choice by more than 5% to replace it (noise)
GUARD_ROUNDS = 2  # whole-model timings the measured widths must all win
THREADS = 2
LAYER_RUNS = 30  # timed runs per candidate (alternating blocks of 10)
MODEL_RUNS = 60  # timed runs per whole model in the guard
CARRY_OPS = {"BatchNormalization", "Relu", "Clip", "LeakyRelu", "HardSigmoid", "HardSwish", "Sigmoid",
             "Tanh", "Elu", "Selu", "Gelu", "Softplus", "Mish", "Identity", "ChannelMask", "Dropout"}


def cpu_name() -> str:
    from .profiling.measure import machine_info
    return machine_info()["cpu"] or platform.machine() or "unknown CPU"


class TimingCache:
    """Median milliseconds by key, one JSON file per CPU model, ORT version and thread count."""

    def __init__(self, path: str | os.PathLike | None = None):
        if path is None:
            import onnxruntime as ort
            root = Path(os.environ.get("GATE2DEPLOY_CACHE") or Path.home() / ".cache" / "gate2deploy")
            slug = re.sub(r"[^A-Za-z0-9]+", "-", cpu_name()).strip("-")
            path = root / "widths" / f"{slug}-ort{ort.__version__}-t{THREADS}.json"
        self.path = Path(path)
        try:
            self.entries: dict[str, float | list[float]] = json.loads(self.path.read_text())
        except (OSError, ValueError):
            self.entries = {}

    def get(self, key: str) -> float | list[float] | None:
        return self.entries.get(key)

    def put(self, key: str, ms: float | list[float]) -> None:
        self.entries[key] = ms

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.entries, indent=0, sort_keys=True))
        os.replace(tmp, self.path)  # concurrent compiles: the last writer wins, nothing torn


Timer = Callable[[dict[str, onnx.ModelProto], tuple[int, ...], int], dict[str, float]]


def ort_timer(models: dict[str, onnx.ModelProto], input_shape: tuple[int, ...], runs: int) -> dict[str, float]:
    """Median ms per model of its undisturbed runs (profiling/measure.py's `summarize`: a
    shared machine's interference only ever adds time) on ONNX Runtime CPU, timed in
    alternating blocks in one run."""
    from .benchmark import time_sessions
    from .profiling.measure import summarize
    from .verify import make_session

    sessions = {name: make_session(m, threads=THREADS) for name, m in models.items()}
    x = np.random.default_rng(0).standard_normal(input_shape).astype(np.float32)
    feeds = {name: [{s.get_inputs()[0].name: x}] for name, s in sessions.items()}
    times = time_sessions(sessions, feeds, runs, settle_s=0.02)
    return {name: summarize(t)[0] for name, t in times.items()}


@dataclass
class LayerChoice:
    tensor: str
    full: int
    kept: int
    fast: int
    chosen: int
    ms: dict[int, float]  # candidate width -> median ms of its neighbourhood


@dataclass
class WidthReport:
    asked: str = "measured"
    used: str = "measured"  # "measured" | "fast" (guard or fallback) | "exact" (guard)
    note: str | None = None
    layers: list[LayerChoice] = field(default_factory=list)
    whole_model_ms: dict[str, list[float]] = field(default_factory=dict)  # per guard round
    cache: str | None = None
    timed: int = 0  # timings made in this compile
    cached: int = 0  # timings read from the cache

    def as_dict(self) -> dict:
        out = {"asked": self.asked, "used": self.used, "note": self.note, "cache": self.cache,
               "timed": self.timed, "cached": self.cached, "whole_model_ms": self.whole_model_ms,
               "layers": [{"tensor": c.tensor, "full": c.full, "kept": c.kept, "fast": c.fast, "chosen": c.chosen,
                           "ms": {str(w): round(t, 4) for w, t in c.ms.items()}} for c in self.layers]}
        return {k: v for k, v in out.items() if v is not None}


# -- the per-layer chooser -------------------------------------------------------------------

def _attrs(node, names) -> dict:
    return {k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in node.attrs.items() if k in names}


def _conv_attrs(node) -> dict:
    return _attrs(node, ("strides", "pads", "dilations", "auto_pad"))


def _dense_or_depthwise(conv) -> bool:
    group, weight = int(conv.attrs.get("group", 1)), shape_of(conv.inputs[1])
    return weight is not None and (group == 1 or (weight[1] == 1 and group == weight[0]))


POOL_OPS = ("MaxPool", "AveragePool")
JOIN_OPS = ("Add", "Mul", "Sub")  # residual sums, squeeze-excitation scaling: same channels out


def _readers(tensor) -> list[tuple]:
    """(Conv, pooling nodes on the way) for each Conv reading `tensor`'s channels: directly,
    or through ops that keep the channels (BatchNorm, activations, masks), residual Adds and
    squeeze-excitation Muls whose output has the tensor's shape, and spatial pooling."""
    found, seen = [], set()
    frontier = [(node, (), shape_of(tensor)) for node in tensor.outputs]
    while frontier:
        node, pools, shape = frontier.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        out = shape_of(node.outputs[0]) if node.outputs else None
        if node.op == "Conv":
            found.append((node, pools))
        elif node.op in POOL_OPS and out is not None and len(pools) < 2:
            frontier.extend((n, (*pools, node), out) for n in node.outputs[0].outputs)
        elif (node.op in CARRY_OPS or node.op in JOIN_OPS) and out is not None and out == shape:
            frontier.extend((n, pools, out) for n in node.outputs[0].outputs)
    return found


class _Planner:
    """The padding being built (shared state of the walk, as in choose_padding)."""

    def __init__(self, ana: ChannelAnalysis, removable: set[int], block: int):
        self.ana, self.block = ana, block
        self.removable = np.array(sorted(removable), dtype=np.int64)
        self.padding: set[int] = set()

    def gone(self, tensor: str) -> tuple[np.ndarray, np.ndarray]:
        roots = self.ana.roots_of(tensor)
        pad = np.array(sorted(self.padding), np.int64)
        return roots, np.isin(roots, self.removable) & ~np.isin(roots, pad)

    def width(self, tensor: str) -> int:
        """Physical width of `tensor` so far (kept + padding already chosen)."""
        if tensor not in self.ana.maps:
            return shape_of(self.ana.graph.tensors()[tensor])[1]
        return int((~self.gone(tensor)[1]).sum())

    def fast_width(self, tensor: str) -> int:
        kept = self.width(tensor)
        return _round_up(kept, len(self.ana.roots_of(tensor)), self.block) if kept else kept


def _candidates(kept: int, full: int, block: int) -> list[int]:
    """Widths that keep the tensor in ONNX Runtime's NCHWc chain (multiples of 4, module
    docstring), from the kept count up to fast's whole block."""
    return sorted({min(full, -(-kept // m) * m) for m in (MIN_MULTIPLE, 8, block)})


def _neighbourhood(producer, readers, c_in: int, width: int, reader_out: list[int]):
    """The producer Conv at `width` output channels (+ Relu) and its readers (pooling on the
    way, then the reader Conv), random weights; returns the model, its cache key (shapes and
    attributes only) and its input shape."""
    x_shape = list(shape_of(producer.inputs[0]))
    x_shape[1] = c_in
    kernel = list(shape_of(producer.inputs[1]))[2:]
    rng = np.random.default_rng(0)
    inits, nodes, outputs = [], [], []

    def conv(name, src, c_out, cin_per_group, k, attrs, group=1):
        w = helper.make_tensor(f"{name}_w", TensorProto.FLOAT, [c_out, cin_per_group, *k],
                               rng.standard_normal(c_out * cin_per_group * int(np.prod(k))).astype(np.float32))
        b = helper.make_tensor(f"{name}_b", TensorProto.FLOAT, [c_out], np.zeros(c_out, np.float32))
        inits.extend([w, b])
        nodes.append(helper.make_node("Conv", [src, f"{name}_w", f"{name}_b"], [name], group=group, **attrs))

    p_attrs = _conv_attrs(producer)
    conv("p", "x", width, c_in, kernel, p_attrs)
    nodes.append(helper.make_node("Relu", ["p"], ["t"]))
    key = {"x": x_shape, "k": kernel, "a": p_attrs, "w": width, "r": []}
    for i, ((reader, pools), out) in enumerate(zip(readers, reader_out)):
        src, pool_keys = "t", []
        for j, pool in enumerate(pools):
            attrs = _attrs(pool, ("kernel_shape", "strides", "pads", "dilations", "ceil_mode", "auto_pad",
                                  "count_include_pad"))
            nodes.append(helper.make_node(pool.op, [src], [f"r{i}_pool{j}"], **attrs))
            src = f"r{i}_pool{j}"
            pool_keys.append([pool.op, attrs])
        rk = list(shape_of(reader.inputs[1]))[2:]
        r_attrs = _conv_attrs(reader)
        depthwise = int(reader.attrs.get("group", 1)) > 1
        c_out = width if depthwise else out
        conv(f"r{i}", src, c_out, 1 if depthwise else width, rk, r_attrs, group=width if depthwise else 1)
        outputs.append(helper.make_tensor_value_info(f"r{i}", TensorProto.FLOAT, None))
        key["r"].append({"pool": pool_keys, "k": rk, "a": r_attrs, "dw": depthwise, "o": c_out})
    if not readers:
        outputs.append(helper.make_tensor_value_info("t", TensorProto.FLOAT, None))
    graph = helper.make_graph(nodes, "width_candidate",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)], outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model, json.dumps(key, sort_keys=True), tuple(x_shape)


def measured_chooser(timer: Timer, cache: TimingCache, report: WidthReport, block: int = BLOCK):
    """A `choose_padding(analysis, removable) -> padding roots` that times candidate widths."""

    def choose(ana: ChannelAnalysis, removable: set[int]) -> set[int]:
        plan = _Planner(ana, removable, block)
        decided: set[int] = set()
        for node in ana.graph.nodes:
            if node.op not in ("Conv", "Gemm", "MatMul") or not node.outputs or node.outputs[0].name not in ana.maps:
                continue
            name = node.outputs[0].name
            roots, gone = plan.gone(name)
            kept, full = int((~gone).sum()), len(roots)
            if not kept or kept == full or decided.issuperset(roots.tolist()):
                continue  # nothing to choose, or chosen already (a depthwise conv's output, a stream)
            decided.update(roots.tolist())
            fast = _round_up(kept, full, block)
            chosen = fast
            readers = _readers(node.outputs[0]) if node.op == "Conv" else None
            timeable = (readers is not None and int(node.attrs.get("group", 1)) == 1
                        and shape_of(node.inputs[0]) is not None and all(_dense_or_depthwise(r) for r, _ in readers))
            candidates = _candidates(kept, full, block)
            if timeable and len(candidates) > 1:
                c_in = plan.width(node.inputs[0].name)
                reader_out = [plan.fast_width(r.outputs[0].name) if r.outputs[0].name in ana.maps
                              else shape_of(r.outputs[0])[1] for r, _ in readers]
                ms = _time_candidates(node, readers, c_in, candidates, reader_out,
                                      timer, cache, report)
                best = min(ms, key=ms.get)
                if _faster(ms[best], ms[fast]):
                    chosen = best
                report.layers.append(LayerChoice(name, full, kept, fast, chosen, ms))
            _pad(roots, gone, chosen - kept, plan.padding)
        # Grouped convs: fast's per-group rule on top of the widths chosen above.
        return plan.padding | _grouped_padding(ana, removable, plan.padding, block)

    return choose


def _grouped_padding(ana, removable, padding, block) -> set[int]:
    """fast's grouped-conv rule alone (choose_padding with the per-layer rounding already done)."""
    fixed = set(removable) - set(padding)  # what stays removed after the per-layer choice
    extra = choose_padding(ana, fixed, block=block) if ana.grouped_convs else set()
    # choose_padding also rounds every creating layer; keep only what the grouped rule adds
    # for grouped convs' tensors.
    grouped_roots = set()
    for node in ana.grouped_convs:
        for tensor in (node.inputs[0].name, node.outputs[0].name):
            grouped_roots.update(ana.roots_of(tensor).tolist())
    return extra & grouped_roots


def _time_candidates(node, readers, c_in, widths, reader_out, timer, cache, report) -> dict[int, float]:
    models, keys, ms = {}, {}, {}
    for w in widths:
        model, key, x_shape = _neighbourhood(node, readers, c_in, w, reader_out)
        cached = cache.get(key)
        if cached is not None:
            ms[w] = cached
            report.cached += 1
        else:
            models[str(w)], keys[str(w)] = model, key
    if models:
        for w, t in timer(models, x_shape, LAYER_RUNS).items():
            ms[int(w)] = t
            cache.put(keys[w], t)
            report.timed += 1
    return dict(sorted(ms.items()))


# -- the whole-model guard ---------------------------------------------------------------------

def guard(candidates: dict[str, onnx.ModelProto], input_shape, timer: Timer, cache: TimingCache,
          report: WidthReport) -> str:
    """The name of the candidate kept: "fast" (the incumbent) unless another whole model is
    faster than it by more than TIE in each of GUARD_ROUNDS independent whole-model timings
    (a burst of load on a shared machine can make one round lie; it rarely makes two lie the
    same way); among several such, the fastest over the rounds. A candidate whose graph is
    fast's (or an earlier candidate's) is not timed; when "measured" is fast's graph and fast's
    is kept, the answer is "measured" (its widths are fast's)."""
    distinct: dict[str, bytes] = {}
    for name, model in candidates.items():
        data = model.SerializeToString()
        if data not in distinct.values():
            distinct[name] = data
    kept = "fast"
    if len(distinct) > 1:
        kept = _race(distinct, candidates, input_shape, timer, cache, report)
    if kept == "fast" and "measured" not in distinct:
        report.note = "the measured widths are fast's" + (
            "; the model without padding was not faster" if len(distinct) > 1 else "")
        return "measured"
    return kept


def _race(distinct: dict[str, bytes], candidates: dict[str, onnx.ModelProto], input_shape, timer: Timer,
          cache: TimingCache, report: WidthReport) -> str:
    """guard's timings of the distinct candidates (cached by their bytes): the winner's name."""
    digest = hashlib.sha256(b"|".join(distinct.values())).hexdigest()
    keys = {name: f"model:{digest}:{name}" for name in distinct}
    rounds = {name: cache.get(key) for name, key in keys.items()}
    if any(v is None for v in rounds.values()):
        rounds = {name: [] for name in distinct}
        racing = [name for name in distinct if name != "fast"]
        for _ in range(GUARD_ROUNDS):
            ms = timer({name: candidates[name] for name in distinct}, tuple(input_shape), MODEL_RUNS)
            report.timed += len(distinct)
            for name in rounds:
                rounds[name].append(round(ms[name], 4))
            racing = [name for name in racing if _faster(ms[name], ms["fast"])]
            if not racing:
                break  # every challenger lost a round: keep fast's
        for name, key in keys.items():
            cache.put(key, rounds[name])
    else:
        report.cached += sum(len(v) for v in rounds.values())
    report.whole_model_ms = rounds
    winners = [name for name in rounds if name != "fast" and len(rounds[name]) == GUARD_ROUNDS
               and all(map(_faster, rounds[name], rounds["fast"]))]
    return min(winners, key=lambda name: sum(rounds[name])) if winners else "fast"


def _faster(ms: float, than: float) -> bool:
    return ms < than * (1 - TIE)


def fold_measured(model: onnx.ModelProto, pipeline: str, make_ctx: Callable[[], "PassContext"], target: str,
                  input_shape, timer: Timer = ort_timer, cache: TimingCache | None = None):
    """run_pipeline with measured widths: (compiled model, its PassContext, WidthReport)."""
    from .pipeline import run_pipeline

    report = WidthReport()
    fast_ctx = make_ctx()
    fast_ctx.choose_widths = True
    fast = run_pipeline(model, pipeline, fast_ctx)
    if target not in TIMED_TARGETS:
        report.used = "fast"
        report.note = (f"target {target} is not timed (measured widths time ONNX Runtime CPU kernels, "
                       f"for targets {', '.join(TIMED_TARGETS)}); used fast")
        return fast, fast_ctx, report
    cache = cache if cache is not None else TimingCache()
    ctx = make_ctx()
    ctx.width_chooser = measured_chooser(timer, cache, report)
    measured = run_pipeline(model, pipeline, ctx)
    # The unpadded fold is a whole-model candidate too: on an AVX-512 machine (AMD EPYC Zen 4,
    # 2026-12-05, tools/bench_fold_torchvision.py) it ran faster than fast's widths for
    # ResNeXt-50, VGG-11, RegNetY-400MF and ConvNeXt-T, and no per-layer timing had found it.
    exact_ctx = make_ctx()
    exact_ctx.choose_widths = False
    exact = run_pipeline(model, pipeline, exact_ctx)
    kept = guard({"fast": fast, "measured": measured, "exact": exact}, input_shape, timer, cache, report)
    cache.save()
    report.cache = str(cache.path)
    report.used = kept
    if kept == "measured":
        return measured, ctx, report
    if kept == "exact":
        report.note = (f"the whole model without padding (exact widths) was faster than fast's by more than "
                       f"{TIE:.0%} in every timing, and than the measured widths'; kept exact")
        return exact, exact_ctx, report
    report.note = (f"the whole models with the measured widths and without padding were not faster than with "
                   f"fast's by more than {TIE:.0%} in every timing; kept fast's")
    return fast, fast_ctx, report
