#!/usr/bin/env python
"""Where a gated network's time goes by op type (issue 18): ONNX Runtime's own node profile of
the CG or PG ResNet-20 of tools/bench_gated_ops.py and of its dense twin (each gated node a plain
Conv of its weights), per op type the node count and microseconds per run, summed over
`--runs` runs. It separates the gated kernels' own time from what ONNX Runtime adds around
them (the NCHWc ReorderInput / ReorderOutput pairs it places around each custom op).
Profiling adds its own overhead per node, and it is large beside these networks' small nodes:
the last lines print each session's unprofiled wall time (median of the same number of runs)
and the profiled node sum's excess over it per node (AMD EPYC Zen 4, 1 thread, 2026-12-06:
~2.7 us per node, so ONNX Runtime's 21 NCHWc reorders around the CG ResNet-20's custom ops,
76 us in the profile, cost ~17 us of wall time; a CGConv reading and writing the blocked layout
itself, which removed 13 of them, was no faster as a whole: docs/performance.md, twenty-fourth
session). Compare node types within a run, and wall times with tools/bench_gated_ops.py.

    python tools/profile_gated_network.py --net cg --offsets 3.0,1.0 --threads 1
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile
from pathlib import Path

import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_gated_ops as nets  # noqa: E402  (the networks, their export and dense twin)

from gate2deploy.runtimes.ort import custom_ops_library_path, session_options  # noqa: E402


def _session(model, library: str, threads: int, profile: bool) -> ort.InferenceSession:
    """The project's session options, as the benchmarks use them, with `library` registered
    (for the dense twin too: a PG network's twin keeps its fused QuantizeActivation nodes,
    bench_gated_ops.py)."""
    prefix = os.path.join(tempfile.gettempdir(), "g2d_node_profile")  # the profile is removed below
    so = session_options(threads=threads, profile=profile, profile_prefix=prefix, custom_ops=False, library=library)
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def node_times(model, library: str, feed: dict, threads: int, runs: int) -> dict[str, tuple[float, float]]:
    """{op type: (nodes per run, us per run)} from ONNX Runtime's profile of `runs` runs."""
    sess = _session(model, library, threads, profile=True)
    for _ in range(runs):
        sess.run(None, feed)
    path = sess.end_profiling()
    try:
        events = json.load(open(path))
    finally:
        os.remove(path)
    per_op = collections.defaultdict(list)
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            per_op[e["args"]["op_name"]].append(e["dur"])
    return {op: (len(d) / runs, sum(d) / runs) for op, d in per_op.items()}


def wall_us(model, library: str, feed: dict, threads: int, runs: int) -> float:
    """Median wall time in us of `runs` runs of an unprofiled session (the same options), after
    20 untimed ones."""
    import statistics

    from gate2deploy.benchmark import time_sessions

    sess = _session(model, library, threads, profile=False)
    for _ in range(20):
        sess.run(None, feed)
    return statistics.median(time_sessions({"one": sess}, {"one": [feed]}, runs=runs, block=runs,
                                           settle_s=0.0)["one"]) * 1e3


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--net", choices=["cg", "pg"], default="cg")
    p.add_argument("--offsets", default="3.0,1.0",
                   help="threshold offsets (CG: 3.0 ~1%% on, 1.0 ~20%%; PG: 0.5 ~36%%)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--runs", type=int, default=300)
    args = p.parse_args(argv)
    import torch

    from gate2deploy.models.dnn_gating import resnet20_cg, resnet20_pg

    torch.manual_seed(0)
    base = (resnet20_cg(partitions=4, shuffle=False) if args.net == "cg"
            else resnet20_pg(wbits=8, abits=3, pred_bits=2)).eval()
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    library = str(custom_ops_library_path())
    for offset in (float(o) for o in args.offsets.split(",")):
        model = nets.with_threshold_offset(base, offset)
        ort_model, _ = nets.export_both(model, x)
        frac, bound = nets.gate_figures(model, x, ort_model)
        feed = {ort_model.graph.input[0].name: x.numpy()}
        gated = node_times(ort_model, library, feed, args.threads, args.runs)
        dense = node_times(nets.dense_equivalent(ort_model), library, feed, args.threads, args.runs)
        print(f"ResNet-20 {args.net.upper()}, batch 1, {args.threads} thread(s), gate-on {frac * 100:.1f}% "
              f"(MAC bound {bound:.2f}); us per run (nodes per run), {args.runs} runs")
        print(f"  {'op type':16s} {'gated':>14s} {'dense twin':>14s}")
        for op in sorted(set(gated) | set(dense), key=lambda k: -max(gated.get(k, (0, 0))[1], dense.get(k, (0, 0))[1])):
            g, d = gated.get(op, (0, 0.0)), dense.get(op, (0, 0.0))
            print(f"  {op:16s} {g[1]:8.0f} ({g[0]:2.0f}) {d[1]:8.0f} ({d[0]:2.0f})")
        print(f"  {'all nodes':16s} {sum(v[1] for v in gated.values()):8.0f}      "
              f"{sum(v[1] for v in dense.values()):8.0f}")
        twin = nets.dense_equivalent(ort_model)
        walls = [wall_us(m, library, feed, args.threads, args.runs) for m in (ort_model, twin)]
        print(f"  {'wall, unprofiled':16s} {walls[0]:8.0f}      {walls[1]:8.0f}")
        per_node = [(sum(v[1] for v in t.values()) - w) / max(sum(v[0] for v in t.values()), 1)
                    for t, w in zip((gated, dense), walls)]
        print(f"  {'profiler us/node':16s} {per_node[0]:8.1f}      {per_node[1]:8.1f}   "
              "(node sum - wall, per node: in every node's figure above)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
