#!/usr/bin/env python
"""Where a gated network's time goes, layer by layer (issue 18): each gated node of the CG or
PG ResNet-20 (tools/bench_gated_ops.py's networks, batch 1, 32x32) timed alone on the
activation it receives in the network, against a plain ONNX Conv of the same weight (the
dense twin's layer), with the native kernel's per-stage times (G2D_STAGE_TIMES=1: padded
copies, the rest of the set-up ("setup"), channel-last copies, stage 1, gate, gated-on lists,
sparse and dense stage 2, copy to Y, the whole RunGatedConv ("call") and for CG the whole op
("op": op - call is its checks and the output's allocation)) and
the layer's own gate-on fraction (`on%`, gate2deploy.gate_stats.onnx_gate_statistics: the
network's gated nodes lowered to standard ops, gates exposed, on the same input).

`--baseline-library old.so` adds a before/after column: the same node run by another build
of the native library (e.g. the main branch's, from ~/.cache/gate2deploy/native), timed in
the same alternating blocks, with the largest output difference between the two builds, and
that build's stage times after the new one's ("| before:"). PG's int8 path (pg_int8.cc)
times pad (its tables and int8 layout fill), stage1 (MSB), gate, sparse2 (dot products) /
dense2 (block) for the LSB stage, store and call; strided layers on the NCHWc delegate (AVX2 tier)
show the wall times only.

Timing: the sessions of one layer in alternating blocks of 10 runs (gate2deploy.benchmark),
medians; 1 intra-op thread by default. With 2+ threads the sessions of one process compete for
the cores (each one's spinning workers), so `--isolated ROUNDS` times each session in a process
of its own instead (gate2deploy.benchmark.time_isolated: the dense twin, the gated node and
`--baseline-library`'s build of it, ONNX Runtime's default threading, ROUNDS rounds), the
speed-ups medians of per-round ratios; the stage times still come from runs in this process. Stage times come from `--repeats` further runs of the
gated node (summed, divided by the count); they cover the kernel call only (the session's own overhead is in
the wall times of both the gated and the dense node).

    python tools/bench_network_layers.py --net cg --offset 1.0        # ~20% gated on
    python tools/bench_network_layers.py --net cg --baseline-library ~/.cache/gate2deploy/native/libgate2deploy_ops-release-<old>.so
"""
from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import sys
from pathlib import Path

os.environ.setdefault("G2D_STAGE_TIMES", "1")  # read once by the library, before it loads

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
from onnx import helper  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_gated_ops as nets  # noqa: E402  (the networks, their export and dense twin)

from gate2deploy.benchmark import paired_ratio, time_isolated, time_sessions  # noqa: E402
from gate2deploy.gate_stats import onnx_gate_statistics  # noqa: E402
from gate2deploy.kernel_choice import _constants, _gated_inputs, _single_node  # noqa: E402
from gate2deploy.runtimes.ort import custom_ops_library_path  # noqa: E402


def dense_twin(model: onnx.ModelProto, node: onnx.NodeProto, feeds: dict) -> onnx.ModelProto:
    """The node's dense twin alone: Conv(X, W) with its conv attributes, then its fused
    epilogue as nodes (bench_gated_ops' dense_equivalent, on the single-node model; the
    quantizer of a PG layer's epilogue needs the library)."""
    return nets.dense_equivalent(_single_node(model, node, feeds))


def stage_times(lib, sess: ort.InferenceSession, feed: dict, repeats: int) -> str:
    """The per-stage times of `repeats` runs of `sess`, from `lib` (the build that runs it):
    runs of their own (the timing before settles each block with untimed runs)."""
    lib.G2DStageTimesReset()
    for _ in range(repeats):
        sess.run(None, feed)
    stages = lib.G2DStageTimesReport(repeats).decode()
    return " ".join(f for f in stages.split() if "=" in f and not f.endswith("=0.0"))


def isolated_layer_times(dense: onnx.ModelProto, gated: onnx.ModelProto, feed: dict, library: str,
                         args) -> tuple[dict[str, float], dict[str, float]]:
    """`--isolated`: the layer's sessions each timed in a process of its own (time_isolated):
    medians in us, and the speed-ups as medians of per-round ratios."""
    models = {"dense": (dense, library), "gated": (gated, library)}
    if args.baseline_library:
        models["before"] = (gated, args.baseline_library)
    # (the children without this process's stage timers: their shared counters cost time)
    times = time_isolated(models, feed, rounds=args.isolated, runs=args.repeats, threads=args.threads,
                          env={"G2D_STAGE_TIMES": "0"})
    ms = {k: statistics.median(t) * 1e3 for k, t in times.items()}
    ratio = {"gated": paired_ratio(times, "dense", "gated")}
    if args.baseline_library:
        ratio.update(before=paired_ratio(times, "dense", "before"), new_old=paired_ratio(times, "before", "gated"))
    return ms, ratio


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--net", choices=["cg", "pg"], default="cg")
    p.add_argument("--offset", type=float, default=None,
                   help="added to every gated layer's threshold (default: CG 1.0, PG 0.5: ~20%%/36%% on)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=200, help="timed runs per session")
    p.add_argument("--baseline-library", default=None, help="another build of the native library")
    p.add_argument("--isolated", type=int, default=0, metavar="ROUNDS",
                   help="time each session in a process of its own, ROUNDS rounds (the figure for 2+ "
                        "threads); speed-ups are medians of per-round ratios")
    p.add_argument("--spin", choices=["on", "off"], default="on",
                   help="ONNX Runtime intra-op thread spinning (default on, as ORT). With 2+ threads on a "
                        "machine with as many cores, the idle sessions' spinning workers compete with the "
                        "timed one in the alternating blocks: off separates the kernels' own cost")
    args = p.parse_args(argv)
    nets.check_baseline_library(p, args.baseline_library)
    if args.spin == "off":
        nets.SESSION_CONFIG["session.intra_op.allow_spinning"] = "0"

    import torch

    from gate2deploy.models.dnn_gating import resnet20_cg, resnet20_pg

    torch.manual_seed(0)
    base = (resnet20_cg(partitions=4, shuffle=False) if args.net == "cg"
            else resnet20_pg(wbits=8, abits=3, pred_bits=2)).eval()
    offset = args.offset if args.offset is not None else (1.0 if args.net == "cg" else 0.5)
    model = nets.with_threshold_offset(base, offset)
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    ort_model, _ = nets.export_both(model, x)
    frac, bound = nets.gate_figures(model, x, ort_model)
    library = str(custom_ops_library_path())
    lib = ctypes.CDLL(library)
    lib.G2DStageTimesReport.restype = ctypes.c_char_p
    lib.G2DKernelConfig.restype = ctypes.c_char_p
    base_lib = None
    if args.baseline_library:
        base_lib = ctypes.CDLL(args.baseline_library)  # the handle ONNX Runtime loads too
        base_lib.G2DStageTimesReport.restype = ctypes.c_char_p
    op = "CGConv" if args.net == "cg" else "PGConv"
    nodes = [n for n in ort_model.graph.node if n.op_type == op]
    acts = _gated_inputs(ort_model, nodes, x.numpy(), args.threads)
    consts = _constants(ort_model)
    # Each layer's gate-on fraction: the export's gate statistics (the nodes lowered to
    # standard ops with their gates exposed, run in ONNX Runtime), not the native kernels.
    on = {s.name: s.gate_on_fraction for s in onnx_gate_statistics(ort_model, x.numpy())}
    print(f"native kernels: {lib.G2DKernelConfig().decode()}; library {Path(library).name}")
    print(f"ResNet-20 {args.net.upper()}, batch 1, {args.threads} thread(s): gate-on {frac * 100:.1f}% "
          f"(MAC-weighted), network MAC bound {bound:.2f}; medians of {args.repeats} runs, us"
          + (f", each session in a process of its own, {args.isolated} rounds (speed-ups: medians of "
             f"per-round ratios)" if args.isolated else ""))
    head = f"  {'layer':26s} {'W':>14s} {'in':>6s} {'s':>3s} {'on%':>5s} {'dense':>7s} {'gated':>7s} {'x':>5s}"
    if args.baseline_library:
        head += f" {'before':>7s} {'x':>5s} {'new/old':>7s} {'max|d|':>8s}"
    print(head + "  stages (us per call)")
    for node in nodes:
        a = acts[node.input[0]]
        feed = [{node.input[0]: a}]
        single = _single_node(ort_model, node, feed[0])
        dense = dense_twin(ort_model, node, feed[0])
        # in-process sessions: the gated one (and its baseline) for the stage times and max|d|;
        # the dense one only when timed here
        sessions = {"gated": nets.custom_session(single, args.threads, library=library)}
        if args.baseline_library:
            sessions["before"] = nets.custom_session(single, args.threads, library=args.baseline_library)
        if args.isolated:
            ms, ratio = isolated_layer_times(dense, single, feed[0], library, args)
        else:
            sessions["dense"] = nets.custom_session(dense, args.threads, library=library)
            times = time_sessions(sessions, {k: feed for k in sessions}, runs=args.repeats)
            ms = {k: statistics.median(t) * 1e3 for k, t in times.items()}
            ratio = {"gated": ms["dense"] / ms["gated"]}
            if args.baseline_library:
                ratio.update(before=ms["dense"] / ms["before"], new_old=ms["before"] / ms["gated"])
        stages = stage_times(lib, sessions["gated"], feed[0], args.repeats)
        if args.baseline_library:
            stages += "  | before: " + stage_times(base_lib, sessions["before"], feed[0], args.repeats)
        w = consts[node.input[1]].dims
        strides = next((list(at.ints) for at in node.attribute if at.name == "strides"), [1, 1])
        row = (f"  {node.name[-26:]:26s} {str(list(w)):>14s} {a.shape[2]:>3d}x{a.shape[3]:<2d} "
               f"{strides[0]:>3d} {100 * on[node.name]:5.1f} {ms['dense']:7.1f} {ms['gated']:7.1f} {ratio['gated']:5.2f}")
        if args.baseline_library:
            diff = np.abs(sessions["gated"].run(None, feed[0])[0] - sessions["before"].run(None, feed[0])[0]).max()
            row += f" {ms['before']:7.1f} {ratio['before']:5.2f} {ratio['new_old']:7.2f} {diff:8.1e}"
        print(row + "  " + stages, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
