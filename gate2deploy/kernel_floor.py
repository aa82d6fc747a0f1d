"""The kernel-time floor of a folded model's latency/MACs quotient, from ONNX Runtime's profiler.

Definition (tools/bench_fold_torchvision.py prints it per model; tools/profile_fold_ops.py
splits it by op kind). The profiler times every node's kernel (its `*_kernel_time` events:
no session entry, scheduling or thread hand-off between nodes). Per node, the median of its
undisturbed runs (profiling/measure.py's `summarize`: within a band of its fastest run, so a
shared machine's interference drops out), summed per *op kind*: dense convs, grouped /
depthwise convs (read from the graph ONNX Runtime optimised), and every other op type. Each
kind has a *work ratio*, folded / dense: its MACs ratio for convs and Gemm/MatMul; for every
other kind (pooling, concat, element-wise ops, layout reorders: memory-bound) the ratio of
activation elements over all tensors of the graph. The floor is the time ratio folded /
dense if every kind's dense kernel time shrank exactly with its work:

    floor ratio = sum over kinds (dense kernel ms of the kind x its work ratio) / dense kernel ms

and the floor quotient is floor ratio / physical MACs ratio. Why a floor: it keeps each
kernel's dense efficiency per unit of work, which narrower layers can only lose (MLAS's
blocked convs lose efficiency per MAC as layers narrow: tools/bench_conv_widths.py), and it
charges the op mix the folded graph really has (what does not shrink with MACs, such as
squeeze-excitation or the BatchNorm after a concat, keeps its share). It excludes the
framework's time between kernels, which is not a kernel cost. The plain kernel-time quotient
(sum of folded kernel times / dense, over the MACs ratio) is printed beside it as a check; it
is not a floor: the profiler adds a fixed cost per node, so on models of many small nodes it
reads above the wall-clock quotient.
"""
from __future__ import annotations

import collections
import json
import os
import tempfile

import numpy as np
import onnx

from .profiling.measure import node_kernel_durations, summarize
from .report import model_cost

DENSE, GROUPED = "dense Conv", "grouped/depthwise Conv"


def kernel_ms_by_kind(model: onnx.ModelProto, x: np.ndarray, runs: int, threads: int = 2) -> dict[str, float]:
    """Per op kind, the sum over its nodes of each node's undisturbed-run median kernel ms."""
    from .runtimes.ort import open_session

    with tempfile.TemporaryDirectory(prefix="g2d-floor-") as tmp:
        optimized_path = os.path.join(tmp, "optimized.onnx")
        session = open_session(model, threads=threads, profile=True, profile_prefix=os.path.join(tmp, "profile"),
                               optimized_path=optimized_path)
        feeds = {session.get_inputs()[0].name: x}
        for _ in range(runs + 5):  # the first five warm the caches and the allocator
            session.run(None, feeds)
        with open(session.end_profiling()) as f:
            events = json.load(f)
        optimized = onnx.load(optimized_path, load_external_data=False)
    grouped = {n.name for n in optimized.graph.node if n.op_type in ("Conv", "FusedConv")
               and next((a.i for a in n.attribute if a.name == "group"), 1) > 1}
    totals: dict[str, float] = collections.defaultdict(float)
    for node, (op, durations) in node_kernel_durations(events).items():
        kind = (GROUPED if node in grouped else DENSE) if op in ("Conv", "FusedConv") else op
        totals[kind] += summarize([d / 1e3 for d in durations[-runs:]])[0]
    return dict(totals)


def work(model: onnx.ModelProto) -> dict[str, float]:
    """MACs per layer kind (DENSE, GROUPED, Gemm), and activation elements ("elements") summed
    over every tensor the graph computes."""
    cost = model_cost(model)
    groups = {n.name: next((a.i for a in n.attribute if a.name == "group"), 1) for n in model.graph.node}
    out = collections.defaultdict(float)
    for layer in cost.layers.values():
        kind = "Gemm" if layer.op in ("Gemm", "MatMul") else GROUPED if groups.get(layer.name, 1) > 1 else DENSE
        out[kind] += layer.macs
    inferred = onnx.shape_inference.infer_shapes(model)
    for vi in list(inferred.graph.value_info) + list(inferred.graph.output):
        dims = vi.type.tensor_type.shape.dim
        if dims and all(d.HasField("dim_value") for d in dims):
            out["elements"] += float(np.prod([d.dim_value for d in dims]))
    return dict(out)


def work_ratio(kind: str, dense: dict[str, float], folded: dict[str, float]) -> float:
    """A kind's work ratio. Layer kinds the source graph does not have are ONNX Runtime's own
    rewrites of memory-bound ops (it runs a BatchNormalization it cannot fuse as a 1x1
    depthwise conv, e.g. DenseNet's after each concat): their work is activation elements."""
    key = kind if dense.get(kind) else "elements"
    return folded.get(key, 0.0) / dense[key]


def floor_ratio(dense_ms: dict[str, float], dense_work: dict[str, float], folded_work: dict[str, float]) -> float:
    """The module docstring's floor ratio, from the dense model's kernel ms by kind."""
    return sum(t * work_ratio(k, dense_work, folded_work) for k, t in dense_ms.items()) / sum(dense_ms.values())
