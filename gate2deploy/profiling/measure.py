"""Latency measurement on the target runtime: one layer at a time, or a whole model.

Protocol, per entry: a session is built for a one-layer ONNX model (or the whole model),
`warmup` untimed runs, then `repeats` runs timed one by one with a monotonic clock.
Interference from other processes only ever adds time, and on a machine shared by several
people it is the rule, not the exception, so the runs that count are the undisturbed ones:
those within `FAST_BAND` (25%) of the fastest run. The entry's value is their median, its
stability figure their coefficient of variation (std / mean) together with the fraction of
runs that were undisturbed. On an idle machine every run is within a few percent of the
fastest and this is the plain median. An entry whose CV exceeds `max_cv`, or where fewer than
half the runs were undisturbed, is measured again (`retries` times) and the attempt with the
lowest value kept; if even that one fails the test it is flagged `unstable` in the LUT and
the report.

Back ends: `OrtCpuBackend` (ONNX Runtime, CPUExecutionProvider, the threads given, graph
optimisations at their default level so layers run with the kernels and fusions the deployed
model gets) and `TensorRTBackend` (TensorRT engines on an NVIDIA GPU, timed with CUDA events).
TensorRT is imported only when that target is chosen; where it or a GPU is missing the
profile stops with a one-line error.
"""
from __future__ import annotations

import json
import os
import platform
import tempfile
import time
from dataclasses import asdict, dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..capture import IR_VERSION, OPSET
from ..errors import UserError

FAST_BAND = 0.25
MIN_UNDISTURBED = 0.5


@dataclass
class Settings:
    warmup: int = 3
    repeats: int = 15
    max_cv: float = 0.05
    retries: int = 2


@dataclass
class Measurement:
    ms: float  # median of the kept samples
    cv: float  # coefficient of variation of the kept samples
    kept: int
    rejected: int
    attempts: int
    unstable: bool

    def to_json(self) -> dict:
        d = asdict(self)
        d["ms"], d["cv"] = round(self.ms, 5), round(self.cv, 4)
        return d


def summarize(samples_ms: list[float]) -> tuple[float, float, int, int]:
    """(median, cv, kept, rejected) of the undisturbed runs (within FAST_BAND of the fastest)."""
    x = np.asarray(samples_ms, dtype=np.float64)
    keep = x <= x.min() * (1.0 + FAST_BAND)
    kept = x[keep]
    cv = float(kept.std() / kept.mean()) if kept.mean() > 0 else 0.0
    return float(np.median(kept)), cv, int(keep.sum()), int((~keep).sum())


def _verdict(samples: list[float], max_cv: float) -> tuple[float, float, int, int, bool]:
    ms, cv, kept, rejected = summarize(samples)
    return ms, cv, kept, rejected, cv > max_cv or kept < MIN_UNDISTURBED * len(samples)


def measure(run, settings: Settings) -> Measurement:
    """Time `run()` by the protocol above."""
    best = None
    for attempt in range(1 + max(0, settings.retries)):
        for _ in range(settings.warmup):
            run()
        samples = []
        for _ in range(settings.repeats):
            t0 = time.perf_counter()
            run()
            samples.append((time.perf_counter() - t0) * 1e3)
        ms, cv, kept, rejected, unstable = _verdict(samples, settings.max_cv)
        best = _keep(best, Measurement(ms, cv, kept, rejected, attempt + 1, unstable))
        if not unstable:
            break
    return best


def _keep(best: Measurement | None, new: Measurement) -> Measurement:
    """The fastest attempt so far (interference only adds time), with its own verdict; the
    caller stops at the first stable attempt."""
    attempts = new.attempts
    if best is None or new.ms < best.ms:
        best = new
    best.attempts = attempts
    return best


# ---------------------------------------------------------------------------------------
# One-layer models
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LayerSpec:
    """The geometry a LUT entry is measured for (see lut.layer_key)."""

    op: str  # "Conv" | "Gemm"
    batch: int
    cin: int
    cout: int
    h: int
    w: int
    kh: int
    kw: int
    stride: tuple[int, int]
    pads: tuple[int, int, int, int]
    dilation: tuple[int, int]
    groups: int


def layer_model(spec: LayerSpec, seed: int = 0) -> onnx.ModelProto:
    """A one-node model computing `spec` with random weights (values do not change timing)."""
    rng = np.random.default_rng(seed)
    if spec.op == "Conv":
        x_shape = [spec.batch, spec.cin, spec.h, spec.w]
        w = rng.standard_normal((spec.cout, spec.cin // spec.groups, spec.kh, spec.kw)).astype(np.float32) * 0.05
        node = helper.make_node("Conv", ["x", "w", "b"], ["y"], kernel_shape=[spec.kh, spec.kw],
                                strides=list(spec.stride), pads=list(spec.pads),
                                dilations=list(spec.dilation), group=spec.groups)
    else:
        x_shape = [spec.batch, spec.cin]
        w = rng.standard_normal((spec.cout, spec.cin)).astype(np.float32) * 0.05
        node = helper.make_node("Gemm", ["x", "w", "b"], ["y"], transB=1)
    b = np.zeros(spec.cout, np.float32)
    graph = helper.make_graph(
        [node], "layer", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    return model


def _feeds(model: onnx.ModelProto, rng: np.random.Generator) -> dict[str, np.ndarray]:
    feeds = {}
    for inp in model.graph.input:
        shape = [d.dim_value for d in inp.type.tensor_type.shape.dim]
        feeds[inp.name] = rng.standard_normal(shape).astype(np.float32)
    return feeds


# ---------------------------------------------------------------------------------------
# Back ends
# ---------------------------------------------------------------------------------------
def machine_info() -> dict:
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    from .device import identity

    return {"hostname": platform.node(), "cpu": cpu, "cores": os.cpu_count(), "system": platform.platform(),
            **identity()}


class OrtCpuBackend:
    name = "ort"
    whole_method = "sum of per-node undisturbed medians (ONNX Runtime profiler)"

    def __init__(self, threads: int, settings: Settings):
        import onnxruntime as ort

        self.ort = ort
        self.threads = threads
        self.settings = settings
        self.rng = np.random.default_rng(0)

    def runtime_info(self) -> dict:
        return {"name": "onnxruntime", "version": self.ort.__version__, "provider": "CPUExecutionProvider",
                "graph_optimization": "ORT_ENABLE_ALL"}

    def _session(self, model: onnx.ModelProto, optimized_path: str | None = None):
        from ..runtimes.ort import open_session
        return open_session(model, threads=self.threads, optimized_path=optimized_path)

    def measure_model(self, model: onnx.ModelProto, settings: Settings | None = None) -> Measurement:
        sess = self._session(model)
        feeds = _feeds(model, self.rng)
        return measure(lambda: sess.run(None, feeds), settings or self.settings)

    def measure_whole(self, model: onnx.ModelProto, settings: Settings | None = None) -> Measurement:
        """Whole-model latency robust to other processes: the sum over the graph's nodes of
        each node's undisturbed-runs median, from ONNX Runtime's own profiler. A whole run
        (tens of ms) spans many scheduler time slices, so on a busy shared machine hardly any
        run is undisturbed; a node's run (well under a ms, like a LUT entry) often is. On an
        idle machine this is the wall time less the microseconds between nodes. cv and the
        undisturbed fraction are time-weighted over the nodes."""
        settings = settings or self.settings
        from ..runtimes.ort import open_session
        runs = max(3, settings.repeats)
        with tempfile.TemporaryDirectory(prefix="g2d-profile-") as tmp:
            sess = open_session(model, threads=self.threads, profile=True, profile_prefix=os.path.join(tmp, "ort"))
            feeds = _feeds(model, self.rng)
            for _ in range(settings.warmup + runs):
                sess.run(None, feeds)
            with open(sess.end_profiling()) as f:
                events = json.load(f)
        per_node = {name: [d / 1e3 for d in durations]
                    for name, (_, durations) in node_kernel_durations(events).items()}
        return sum_of_node_medians(per_node, runs, settings.max_cv)

    def measure_layer(self, spec: LayerSpec) -> tuple[Measurement, str]:
        """Time one layer; also report the kernel ONNX Runtime chose ("nchwc" blocked layout or
        "nchw"), read from the optimised graph, which the predictor uses to interpolate
        between like entries only."""
        model = layer_model(spec)
        with tempfile.TemporaryDirectory(prefix="g2d-profile-") as tmp:
            opt = os.path.join(tmp, "optimized.onnx")
            sess = self._session(model, opt)
            ops = {n.op_type for n in onnx.load(opt, load_external_data=False).graph.node}
        path = "nchwc" if "ReorderInput" in ops or "ReorderOutput" in ops else "nchw"
        feeds = _feeds(model, self.rng)
        return measure(lambda: sess.run(None, feeds), self.settings), path


def node_kernel_durations(events: list[dict]) -> dict[str, tuple[str, list[float]]]:
    """Per node of an ONNX Runtime profile (its events, as json-loaded): (op type, the node's
    kernel durations in us, in run order). Only the `*_kernel_time` events count: the kernel,
    without session entry, scheduling or hand-off between nodes."""
    nodes: dict[str, tuple[str, list[float]]] = {}
    for ev in events:
        if ev.get("cat") == "Node" and ev.get("name", "").endswith("_kernel_time"):
            name = ev["name"][: -len("_kernel_time")]
            nodes.setdefault(name, (ev.get("args", {}).get("op_name", "?"), []))[1].append(ev["dur"])
    return nodes


def sum_of_node_medians(per_node: dict[str, list[float]], runs: int, max_cv: float) -> Measurement:
    """Whole-model time as the sum over nodes (layers) of each one's undisturbed-runs median,
    from a profiler's per-node durations in ms (the last `runs` of each list count; warm-up
    runs come first). cv and the undisturbed fraction are time-weighted over the nodes."""
    total = cv_weighted = undisturbed = 0.0
    for durs in per_node.values():
        ms, cv, kept, _ = summarize(durs[-runs:])
        total += ms
        cv_weighted += cv * ms
        undisturbed += ms * kept / len(durs[-runs:])
    cv = cv_weighted / total if total else 0.0
    fraction = undisturbed / total if total else 1.0
    kept = int(round(fraction * runs))
    return Measurement(total, cv, kept, runs - kept, 1, cv > max_cv or fraction < MIN_UNDISTURBED)


class TensorRTBackend:
    """TensorRT engines on the GPU (`--target trt`, alias `tensorrt`): a LUT entry is a
    one-layer engine timed with CUDA events; the whole model is the sum of its layers'
    undisturbed medians from TensorRT's layer profiler (IProfiler), as the CPU back end sums
    ONNX Runtime's per-node profile. Only usable where TensorRT and an NVIDIA GPU are present;
    elsewhere the profile stops before writing anything, exit code 3 (TensorRTUnavailable).
    Never run on a GPU in this project."""

    name = "trt"
    whole_method = "sum of per-layer undisturbed medians (TensorRT IProfiler)"

    def __init__(self, threads: int, settings: Settings):
        from ..runtimes import TensorRTUnavailable, tensorrt_available

        problem = tensorrt_available()
        if problem:
            raise TensorRTUnavailable(f"--target trt needs TensorRT and an NVIDIA GPU: {problem}")
        import tensorrt as trt
        import torch

        self.trt, self.torch = trt, torch
        self.settings = settings
        self.logger = trt.Logger(trt.Logger.ERROR)

    def runtime_info(self) -> dict:
        return {"name": "tensorrt", "version": self.trt.__version__,
                "device": self.torch.cuda.get_device_name(0)}

    def _engine(self, model: onnx.ModelProto):
        trt = self.trt
        builder = trt.Builder(self.logger)
        network = builder.create_network(0)
        parser = trt.OnnxParser(network, self.logger)
        if not parser.parse(model.SerializeToString()):
            raise UserError(f"TensorRT cannot parse the model: {parser.get_error(0)}")
        config = builder.create_builder_config()
        blob = builder.build_serialized_network(network, config)
        if blob is None:
            raise UserError("TensorRT failed to build an engine for the model")
        return trt.Runtime(self.logger).deserialize_cuda_engine(blob)

    def _context(self, model: onnx.ModelProto):
        """An execution context with random CUDA buffers bound (kept alive with it)."""
        engine = self._engine(model)
        context = engine.create_execution_context()
        buffers = []
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            t = self.torch.randn(tuple(engine.get_tensor_shape(name)), device="cuda")
            context.set_tensor_address(name, t.data_ptr())
            buffers.append(t)
        return engine, context, buffers

    def _timed_run(self, model: onnx.ModelProto) -> Measurement:
        torch = self.torch
        engine, context, buffers = self._context(model)
        stream = torch.cuda.Stream()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

        def run():
            start.record(stream)
            context.execute_async_v3(stream.cuda_stream)
            end.record(stream)
            end.synchronize()
            return start.elapsed_time(end)

        best = None  # same protocol as measure(), on GPU time from the CUDA events
        for attempt in range(1 + self.settings.retries):
            for _ in range(self.settings.warmup):
                run()
            samples = [run() for _ in range(self.settings.repeats)]
            ms, cv, kept, rejected, unstable = _verdict(samples, self.settings.max_cv)
            best = _keep(best, Measurement(ms, cv, kept, rejected, attempt + 1, unstable))
            if not unstable:
                break
        return best

    def measure_model(self, model: onnx.ModelProto, settings: Settings | None = None) -> Measurement:
        return self._timed_run(model)

    def measure_whole(self, model: onnx.ModelProto, settings: Settings | None = None) -> Measurement:
        settings = settings or self.settings
        trt = self.trt
        per_layer: dict[str, list[float]] = {}

        class LayerTimes(trt.IProfiler):
            def report_layer_time(self, layer_name, ms):
                per_layer.setdefault(layer_name, []).append(float(ms))

        engine, context, buffers = self._context(model)
        profiler = LayerTimes()
        context.profiler = profiler
        stream = self.torch.cuda.Stream()
        runs = max(3, settings.repeats)
        for _ in range(settings.warmup + runs):
            context.execute_async_v3(stream.cuda_stream)
            stream.synchronize()
        return sum_of_node_medians(per_layer, runs, settings.max_cv)

    def measure_layer(self, spec: LayerSpec) -> tuple[Measurement, str]:
        return self._timed_run(layer_model(spec)), "tensorrt"


BACKENDS = {"onnx": OrtCpuBackend, "ort": OrtCpuBackend, "trt": TensorRTBackend}  # targets.py names (aliases: targets.ALIASES)


def make_backend(target: str, threads: int, settings: Settings):
    from ..targets import canonical_name
    target = canonical_name(target)
    if target not in BACKENDS:
        raise UserError(f"--target {target!r}: choose one of {', '.join(BACKENDS)}")
    return BACKENDS[target](threads, settings)
