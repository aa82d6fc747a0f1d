#!/usr/bin/env python
"""Where a gated network's time goes by op type (issue 18): ONNX Runtime's own node profile of
the CG or PG ResNet-20 or the FBS ResNet-18 of tools/bench_gated_ops.py and of its dense twin
(each gated node a plain Conv of its weights), per op type the node count and microseconds per
run, summed over `--runs` runs; `--per-node` adds each conv node's time beside the twin's conv
of the same layer (print_per_node says how they are paired). Sessions are opened as a deployment
opens them (runtimes/ort.py open_session: FBS layers in ONNX Runtime's blocked layout where that
pays). It separates the gated kernels' own time from what ONNX Runtime adds around them (the
NCHWc ReorderInput / ReorderOutput pairs it places around each custom op).
Profiling adds its own overhead per node, and it is large beside these networks' small nodes:
the last lines print each session's unprofiled wall time (median of the same number of runs)
and the profiled node sum's excess over it per node (AMD EPYC Zen 4, 1 thread, 2026-12-06:
~2.7 us per node, so ONNX Runtime's 21 NCHWc reorders around the CG ResNet-20's custom ops,
76 us in the profile, cost ~17 us of wall time; a CGConv reading and writing the blocked layout
itself, which removed 13 of them, was no faster as a whole: docs/performance.md, twenty-fourth
session; a CGConv writing it, removing the 9 ReorderInputs after the CG layers, was within
0.99-1.01x at 1 thread on an Intel Xeon with AMX as well: twenty-eighth session). Compare node
types within a run, and wall times with tools/bench_gated_ops.py.
`--baseline-library old.so` profiles the gated network on that build too and adds a "before"
column (per op type, per node with `--per-node`, and the wall time): where a kernel change
went, node by node, the two builds' profiles taken one after the other in the same run.

    python tools/profile_gated_network.py --net cg --offsets 3.0,1.0 --threads 1
    python tools/profile_gated_network.py --net fbs --densities 1.0,0.5 --runs 40 --per-node
    python tools/profile_gated_network.py --net fbs --densities 1.0 --per-node --baseline-library old.so
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

from gate2deploy.profiling.measure import node_kernel_durations  # noqa: E402
from gate2deploy.runtimes.ort import custom_ops_library_path, open_session  # noqa: E402

CONV_OPS = ("Conv", "CGConv", "PGConv", "FBSConv", "SparseInputConv")


def _session(model, library: str, threads: int, profile: bool) -> ort.InferenceSession:
    """A session as a deployment opens it (open_session: the custom ops registered where the
    model uses them, a PG network's twin included, which keeps its fused QuantizeActivation
    nodes; FBS layers blocked where that pays), from `library`."""
    prefix = os.path.join(tempfile.gettempdir(), "g2d_node_profile")  # the profile is removed below
    return open_session(model, threads=threads, profile=profile, profile_prefix=prefix, library=library)


def node_profile(model, library: str, feed: dict, threads: int, runs: int) -> dict[str, tuple[str, list[float]]]:
    """{node name: (op type, its kernel times in us, one per run)} from ONNX Runtime's profile
    of `runs` runs."""
    sess = _session(model, library, threads, profile=True)
    for _ in range(runs):
        sess.run(None, feed)
    path = sess.end_profiling()
    try:
        with open(path) as f:
            events = json.load(f)
    finally:
        os.remove(path)
    return node_kernel_durations(events)


def node_times(nodes: dict[str, tuple[str, list[float]]], runs: int) -> dict[str, tuple[float, float]]:
    """{op type: (nodes per run, us per run)} of a node_profile."""
    per_op = collections.defaultdict(list)
    for op, durations in nodes.values():
        per_op[op] += durations
    return {op: (len(d) / runs, sum(d) / runs) for op, d in per_op.items()}


def print_per_node(gated: dict, dense: dict, exported, before: dict | None = None) -> None:
    """Each conv node of the gated network (median us over the runs) beside the twin's conv of
    the same layer: the node of the same name, or the one ONNX Runtime named after the tensor
    the gated node writes (it names a conv it moved to its blocked layout by its output, with
    "_nchwc"; a fused Add / Relu moves that output to theirs, which a fused gated node writes
    too). `before`: the gated network's profile on --baseline-library's build (the same graph:
    nodes of the same name), printed with the ratio gated / before."""
    import statistics

    output_of = {n.name: n.output[0] for n in exported.graph.node if n.output}
    twin = {name: statistics.median(d) for name, (op, d) in dense.items() if op in CONV_OPS}
    old = {name: statistics.median(d) for name, (op, d) in (before or {}).items() if op in CONV_OPS}
    ab = f" {'before us':>9s} {'/before':>7s}" if before is not None else ""
    print(f"  {'conv node (gated network)':48s} {'op':>16s} {'gated us':>9s} {'twin us':>8s} {'ratio':>6s}{ab}")
    for name, (op, d) in gated.items():
        if op not in CONV_OPS:
            continue
        out = output_of.get(name, "")
        t = next((twin[k] for k in (name, out + "_nchwc", out) if k in twin), None)
        g = statistics.median(d)
        row = f"  {name[-48:]:48s} {op:>16s} {g:9.0f} " + (f"{t:8.0f} {g / t:6.2f}" if t else f"{'-':>8s} {'-':>6s}")
        if before is not None:
            b = old.get(name)
            row += f" {b:9.0f} {g / b:7.2f}" if b else f" {'-':>9s} {'-':>7s}"
        print(row)


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


def _floats(text: str) -> list[float]:
    """A comma-separated list of numbers (argparse type: a bad one is a usage error)."""
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of numbers: {text!r}") from None


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"not a positive integer: {text!r}")
    return int(text)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--net", choices=["cg", "pg", "fbs"], default="cg")
    p.add_argument("--offsets", default="3.0,1.0", type=_floats,
                   help="CG / PG: threshold offsets (CG: 3.0 ~1%% on, 1.0 ~20%%; PG: 0.5 ~36%%)")
    p.add_argument("--densities", default="1.0,0.5", type=_floats, help="FBS: the densities (fixed saliency)")
    p.add_argument("--threads", type=_positive, default=1)
    p.add_argument("--runs", type=_positive, default=300)
    p.add_argument("--per-node", action="store_true", help="each conv node beside its twin's")
    p.add_argument("--baseline-library", default=None,
                   help="another build of the native library: the gated network profiled on it too")
    args = p.parse_args(argv)
    if args.net == "fbs" and not all(0 < d <= 1 for d in args.densities):
        p.error(f"--densities must lie in (0, 1], got {args.densities}")
    nets.check_baseline_library(p, args.baseline_library)
    library = str(custom_ops_library_path())
    baseline = args.baseline_library
    for title, model, x in networks(args):
        ort_model, _ = nets.export_both(model, x)
        frac, bound = nets.gate_figures(model, x, ort_model)
        feed = {ort_model.graph.input[0].name: x.numpy()}
        twin = nets.dense_equivalent(ort_model)
        # (model, library) per column: the gated network, the dense twin, and with
        # --baseline-library the gated network on that build
        columns = {"gated": (ort_model, library), "dense twin": (twin, library)}
        if baseline:
            columns["before"] = (ort_model, baseline)
        nodes = {k: node_profile(m, lib, feed, args.threads, args.runs) for k, (m, lib) in columns.items()}
        per_op = {k: node_times(v, args.runs) for k, v in nodes.items()}
        print(f"{title}, batch 1, {args.threads} thread(s), gate-on {frac * 100:.1f}% "
              f"(MAC bound {bound:.2f}); us per run (nodes per run), {args.runs} runs"
              + (f"; before: {baseline}" if baseline else ""))
        print(f"  {'op type':16s}" + "".join(f" {k:>14s}" for k in columns))
        ops = set().union(*per_op.values())
        for op in sorted(ops, key=lambda k: -max(t.get(k, (0, 0))[1] for t in per_op.values())):
            print(f"  {op:16s}" + "".join(f" {t.get(op, (0, 0.0))[1]:8.0f} ({t.get(op, (0, 0.0))[0]:2.0f})"
                                          for t in per_op.values()))
        print(f"  {'all nodes':16s}" + "".join(f" {sum(v[1] for v in t.values()):8.0f}     "
                                               for t in per_op.values()))
        walls = [wall_us(m, lib, feed, args.threads, args.runs) for m, lib in columns.values()]
        print(f"  {'wall, unprofiled':16s}" + "".join(f" {w:8.0f}     " for w in walls))
        per_node = [(sum(v[1] for v in t.values()) - w) / max(sum(v[0] for v in t.values()), 1)
                    for t, w in zip(per_op.values(), walls)]
        print(f"  {'profiler us/node':16s}" + "".join(f" {v:8.1f}     " for v in per_node)
              + "  (node sum - wall, per node: in every node's figure above)", flush=True)
        if args.per_node:
            print_per_node(nodes["gated"], nodes["dense twin"], ort_model, nodes.get("before"))
    return 0


def networks(args):
    """(title, torch model, input) per point: the CG / PG ResNet-20 at each threshold offset,
    or the FBS ResNet-18 (fixed saliency) at each density, as tools/bench_gated_ops.py builds
    them."""
    import torch

    if args.net == "fbs":
        from gate2deploy.models.fbs import fbs_resnet18

        dense_sd, _ = nets.fbs_resnet18_states(torch.Generator().manual_seed(0))
        x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
        for density in args.densities:
            model = fbs_resnet18(density=density).eval()
            model.load_state_dict(dense_sd)
            yield f"ResNet-18 FBS, density {density}", model, x
        return
    from gate2deploy.models.dnn_gating import resnet20_cg, resnet20_pg

    torch.manual_seed(0)
    base = (resnet20_cg(partitions=4, shuffle=False) if args.net == "cg"
            else resnet20_pg(wbits=8, abits=3, pred_bits=2)).eval()
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    for offset in args.offsets:
        yield f"ResNet-20 {args.net.upper()}", nets.with_threshold_offset(base, offset), x


if __name__ == "__main__":
    sys.exit(main())
