#!/usr/bin/env python
"""Layer-level speed of the native gated kernels vs ONNX Runtime's dense Conv.

For each op (CGConv, PGConv, FBSConv) this builds single-node ONNX models (the custom op and
a plain Conv of the same shape, no bias), opens both in ONNX Runtime CPU with the same
thread count, and times them in one run, in alternating blocks (dense x 10, op x 10, ...,
each block after a settling time; gate2deploy/benchmark.py says why), so that machine noise
hits both alike; medians reported. The gate-on fraction is swept from
0% to 100%:
  CG, PG: per-channel thresholds at quantiles of the stage-1 output (Yp / out_msb) of the
          benchmark input, so exactly that fraction of output elements is gated on;
  FBS:    the density attribute (fraction of active output channels per sample); the input
          has a fraction `--fbs-in-density` of its channels non-zero (default: the same as
          the output density, i.e. the input came from an FBS layer of the same density;
          Mayo's MACs = conv MACs x in_density x out_density). "speed-up" repeats one input
          (the active sets, and the op's prepared-weight cache, stay the same); "sets vary"
          cycles through four inputs with different saliencies, as real data does.
It prints the speed-up (dense time / op time) per fraction and the crossover (the gate-on
fraction above which the op is slower than dense, linearly interpolated). One shape by default
(`--channels` x `--size`, 128 x 28); `--shapes 16x32,32x16,64x8,64x56,128x28,256x14,512x7` runs
the CIFAR ResNet-20's and the ImageNet ResNet-18's 3x3 layer shapes one after another.

Whole networks (`--networks cg,pg,fbs`, batch 1): the seed's CIFAR ResNet-20 with Channel
Gating (gate2deploy.models.dnn_gating.resnet20_cg, p = 4, block-diagonal base paths: CG on
conv1 of each block) and with Precision Gating (resnet20_pg, abits 3 / pred 2, wbits 8), at
32x32; and the FBS ResNet-18 (gate2deploy.models.fbs, weights: torchvision ResNet-18 with
random init and random BatchNorm statistics, mapped by fbs_state_dict_from_dense: the
saliency of a channel is its BN scale, so each layer keeps the same top-k channels for every
input) at 224x224. Each is exported with
`--target ort` (custom ops, run with the native kernels) and `--target onnx` (portable
lowering, stock ONNX Runtime) and timed in alternating blocks against the dense equivalent network:
the same exported graph with every gated node replaced by a plain ONNX Conv of the same
weight shape and attributes (for PG, the quantized weights in fp32). The gate-on fraction of
a whole network comes from its thresholds: CG and PG add an offset to every gated layer's
threshold (sweeping the fraction), FBS sets the density; the printed on% is the measured
MAC-weighted gate-on fraction over the gated layers (gate2deploy.gate_stats on the
benchmark input; FBS: the density). Weights are random (kaiming init), so fractions come
from the offsets, not from training. Each network's table ends with issue 18's verdict per
variant (the default export "ort", and "meas", --gated-kernels measured): the speed-up as a
share of the MAC bound at the goal point (the row nearest 20% on for CG and PG, density 0.5
for FBS; goal >= 0.8) and the lowest speed-up of the sweep (goal >= 0.95x), each MET or MISSED.

Kernel paths: the first line prints the native library's configuration (ISA table: avx512 /
avx2 / generic, AMX, PG's int8 kernel (pg_int8=avx2|vnni|off), ONNX Runtime NCHWc delegation,
second-stage setting; G2D_ISA, G2D_AMX=0, G2D_PG_INT8=0|avx2, G2D_ORT_CONV=0 and
G2D_SECOND_STAGE=sparse|dense force narrower paths, for numerics on tiers
the machine lacks: their speed there says nothing about the tier). Each layer row says which
paths ran while it was timed: second-stage spans sparse (s) / dense GEMM + select (d), convs
delegated to ONNX Runtime's NCHWc conv (nchwc), samples on AMX tiles (amx) or on PG's int8
kernel (int8), FBS layers in ONNX Runtime's blocked layout (blocked) and FBS subsets computed
as the whole layer instead of repacked (whole); "bound" is the
layer's MAC bound (CG: 1 / (1/p + (1 - 1/p) r); PG: abits / (pred + (abits - pred) r), in
abits-bit MAC equivalents, gate_stats' bit_weighted_macs; FBS: 1 / (in x out density)).

Networks print, beside each speed-up, the network's MAC bound: dense MACs / MACs the gated
network executes at that gate-on fraction (CG: gate_stats' expected MACs; PG: its
bit-weighted MACs), the non-gated layers counted dense in both; and a third variant, "meas":
the `--target ort` graph after `--gated-kernels measured` (gate2deploy/kernel_choice.py: each
CG/PG/FBS layer keeps the faster of its native kernel and its standard-op form on this machine).
`--net-batches 1,8 --net-threads 1,2` sweep batch and threads (defaults 1 and --threads);
`--net-points` picks offsets by index (default all).

ISA tiers side by side (`--tiers all`, or a list such as `amx,avx512_vnni`): the whole
benchmark once per native-kernel tier this CPU has (gate2deploy/profiling/device.py
isa_tiers), widest first, each in a child process with the library's forcing variables
(TIER_ENV; the library reads them when it loads). The dense baseline is ONNX Runtime's own
best kernels every time: a forced tier as wide as the machine's vectors (`avx512_vnni` on an
AMX machine: everything but the tiles) is that tier's speed on this core; `avx2` on an
AVX-512 machine runs against an AVX-512 dense conv, so it is printed for its paths and
numerics, not as that tier's speed.

A/B of two builds (`--baseline-library PATH`, CG and PG layers, all networks): each op, and
each network, is also timed on another build of the native library (e.g. the previous
commit's, left in ~/.cache/gate2deploy/native) in the same alternating blocks, under the same
session options (FBS networks: that build asked for its blocked layout and registered);
layers print "new/old" = before / op; networks "before" and "after" columns, "after" being
this checkout's build as a private copy holding one session, as "before" does (compare those
two: the build that "ort" and the other variants share reads 0-4 points slower than such a
copy of itself, build_ab_variants; two copies of one build still come out up to ~3 points
apart at 300 paired rounds; under --isolated every process holds one build once, and "ort" is
the after). Before timing, the variants that run the ort model itself on another build or
layout ("after", "before", "nchw") are run once and compared with it; a row whose variant
computes another function (a build ignoring an attribute the graph sets) says "OUTPUTS
DIFFER" after its path (variants_disagreeing).

Threading: ONNX Runtime's default (intra-op workers spin between ops, as in a deployment);
`--spin off` disables spinning in every session, the figure for hosts that run so.

    python tools/bench_gated_ops.py                 # 128 ch, 28x28, 3x3, batch 1, 2 threads
    python tools/bench_gated_ops.py --ops cg --repeats 50 --channels 64 --size 56
    python tools/bench_gated_ops.py --ops none --networks cg,pg,fbs --repeats 21
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from gate2deploy.benchmark import paired_ratio, time_isolated, time_paired, time_sessions, whole_blocks
from gate2deploy.kernel_choice import dense_twin as dense_equivalent
from gate2deploy.runtimes import reference as ref
from gate2deploy.runtimes.ort import open_session

FRACTIONS = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0]
# Native-kernel tiers (profiling/device.py names) and the variables that force the library
# down to each (runtimes/native: G2D_AMX in pg_amx.cc, G2D_ISA in conv_common.cc; PG's int8
# kernel follows the ISA table).
TIER_ENV = {
    "amx": {},
    "avx512_vnni": {"G2D_AMX": "0"},
    "avx2": {"G2D_AMX": "0", "G2D_ISA": "avx2"},
}


# Set in run_tiers' children: they run the benchmark itself with the same arguments (--tiers
# included, however abbreviated) instead of starting children of their own.
TIER_CHILD = "G2D_BENCH_TIER"


def run_tiers(spec: str, argv: list[str]) -> int:
    """The benchmark with `argv` once per tier in `spec` ("all": every tier in TIER_ENV this
    CPU has, widest first), each in a child process with TIER_ENV's variables."""
    import subprocess

    from gate2deploy.profiling.device import isa_tiers

    cpu = isa_tiers()
    have = [t for t in cpu if t in TIER_ENV]
    tiers = have if spec == "all" else spec.split(",")
    unknown = [t for t in tiers if t not in TIER_ENV]
    missing = [t for t in tiers if t in TIER_ENV and t not in have]
    if unknown or missing:
        print(f"bench_gated_ops: --tiers: {', '.join(unknown + missing)}: "
              f"{'unknown' if unknown else 'not on this CPU'} (this CPU: {', '.join(have) or 'none'})",
              file=sys.stderr)
        return 2
    status = 0
    for tier in tiers:
        env = TIER_ENV[tier]
        forced = " ".join(f"{k}={v}" for k, v in env.items()) or "none"
        note = ("; the dense baseline runs ONNX Runtime's AVX-512 kernels: paths and numerics, "
                "not this tier's speed" if tier == "avx2" and "avx512" in cpu else "")
        print(f"\n=== tier {tier} (forced: {forced}){note} ===", flush=True)
        status |= subprocess.run([sys.executable, __file__, *argv],
                                 env={**os.environ, **env, TIER_CHILD: tier}).returncode
    return status


def node_model(op, domain, x_shape, inits, attrs) -> onnx.ModelProto:
    names = [f"p{i}" for i in range(len(inits))]
    node = helper.make_node(op, ["x", *names], ["y"], domain=domain, **attrs)
    graph = helper.make_graph(
        [node], op, [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [helper.make_tensor(n, TensorProto.FLOAT, a.shape, a.ravel()) for n, a in zip(names, inits)])
    opsets = [helper.make_opsetid("", 17)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 10
    return model


SESSION_CONFIG: dict[str, str] = {}


def _native():
    import ctypes

    from gate2deploy.runtimes.ort import custom_ops_library_path

    lib = ctypes.CDLL(str(custom_ops_library_path()))
    for name in ("G2DSecondStageRuns", "G2DDelegatedConvRuns", "G2DAmxConvRuns", "G2DPGInt8Runs",
                 "G2DBlockedLayoutRuns", "G2DWholeLayerRuns", "G2DBatchedBlockedRuns"):
        getattr(lib, name).restype = ctypes.c_int64
    lib.G2DKernelConfig.restype = ctypes.c_char_p
    return lib


def path_counts() -> dict[str, int]:
    """The native library's per-path run counters (conv_common.cc, nchwc_conv.cc, pg_amx.cc,
    pg_int8.cc; "blocked": FBS layers in ONNX Runtime's blocked layout, runtimes/ort_layout.py;
    "whole": FBS subsets computed as the whole layer instead of repacked; "batched": samples of
    a batch sharing one delegate call, subset_conv.cc)."""
    lib = _native()
    return {"s": lib.G2DSecondStageRuns(0), "d": lib.G2DSecondStageRuns(1),
            "nchwc": lib.G2DDelegatedConvRuns(), "amx": lib.G2DAmxConvRuns(),
            "int8": lib.G2DPGInt8Runs(), "blocked": lib.G2DBlockedLayoutRuns(),
            "whole": lib.G2DWholeLayerRuns(), "batched": lib.G2DBatchedBlockedRuns()}


def paths_since(before: dict[str, int]) -> str:
    """Which paths ran since `before` (path_counts()), e.g. "s+d+nchwc"; "-" for none."""
    after = path_counts()
    return "+".join(k for k in before if after[k] > before[k]) or "-"


def dense_session(w, x_shape, threads, conv_attrs):
    return plain_session(node_model("Conv", "", x_shape, [w], conv_attrs), threads)


def custom_session(model, threads, layout="auto", library=None):
    """The project's session (runtimes.ort.open_session, FBS in the blocked layout where it
    pays) with --spin's setting; `library`: another build of the native library registered
    (and asked for its layout) instead of this checkout's, so every build compared
    (`--baseline-library`) runs under the same options."""
    return open_session(model, threads, config=SESSION_CONFIG, layout=layout, library=library)


_PRIVATE_COPY: list[str] = []


def private_library_copy() -> str:
    """This checkout's native library copied to a temporary path (once per process, removed at
    exit): loaded from there it is an instance of its own. In-process A/B of two builds needs
    it: the build every other session of the run shares (ort, meas, nchw, ...) read 0-4 points
    slower than copies of itself holding one session each, in 8 of 9 comparisons (A/As of the
    CG and PG ResNet-20s, 300 paired rounds, Intel Xeon, 2026-12-07), while two such copies
    came out 0-3 points apart either way: so "before" is set against "after", this copy, never
    against "ort"."""
    if not _PRIVATE_COPY:
        import atexit
        import shutil
        import tempfile

        from gate2deploy.runtimes.ort import custom_ops_library_path

        folder = tempfile.mkdtemp(prefix="g2d_after_")
        atexit.register(shutil.rmtree, folder, True)
        _PRIVATE_COPY.append(shutil.copy(custom_ops_library_path(), os.path.join(folder, "after.so")))
    return _PRIVATE_COPY[0]


def check_baseline_library(parser: argparse.ArgumentParser, path: str | None) -> None:
    """--baseline-library (this tool's and the tools that import it) must name a file: else
    the usage and one line naming it, exit 2, before anything is built or timed (ONNX
    Runtime's own refusal was a traceback)."""
    if path and not os.path.isfile(path):
        parser.error(f"--baseline-library {path} does not exist")


def build_ab_variants(args) -> dict:
    """--baseline-library's two network variants: "after", this checkout's build (a private
    copy), and "before", the other build, each holding only that session."""
    if not args.baseline_library:
        return {}
    return {"after": lambda m, t: custom_session(m, t, library=private_library_copy()),
            "before": lambda m, t: custom_session(m, t, library=args.baseline_library)}


# The variants that time the ort model itself on another build or layout: they compute the
# function of its own kernels, so their outputs must be the ort session's.
SAME_FUNCTION_VARIANTS = ("after", "before", "nchw")
AGREE_RTOL = 0.1  # relative L2 difference of an output still called "the same function"


def variants_disagreeing(sessions: dict, feed: dict, reference: str = "ort",
                         names=SAME_FUNCTION_VARIANTS) -> list[str]:
    """The variants among `names` whose first output on `feed` is not `reference`'s: a
    relative L2 difference above AGREE_RTOL, another shape, or NaN where the reference has
    none (or the reverse). Why: a build that ignores an attribute the graph sets (a layout
    attribute newer than the build, say) computes another function, and its time must not be
    printed as the same model's (2026-12-07, a trial of CGConv writing the blocked layout: the
    session-start build, given the new `output_block`, wrote NCHW where the graph read blocked,
    and its "before" column timed that; docs/performance.md, twenty-eighth session). The
    tolerance is coarse on purpose: summation order may flip a gate near its threshold between
    builds, which moves an output far less than a wrong layout does."""
    ref = np.asarray(sessions[reference].run(None, feed)[0], dtype=np.float64)
    bad = []
    for name in names:
        if name not in sessions:
            continue
        out = np.asarray(sessions[name].run(None, feed)[0], dtype=np.float64)
        if out.shape != ref.shape or not np.array_equal(np.isnan(out), np.isnan(ref)):
            bad.append(name)
            continue
        keep = ~np.isnan(ref)
        diff = np.linalg.norm(out[keep] - ref[keep])
        if not diff <= AGREE_RTOL * max(float(np.linalg.norm(ref[keep])), 1e-30):  # inf - inf: NaN, never
            bad.append(name)
    return bad


def disagreement_note(bad: list[str]) -> str:
    """What a row says after its path column when variants_disagreeing found any."""
    return f"  OUTPUTS DIFFER from ort: {', '.join(bad)} (another function: not comparable)" if bad else ""


def time_pair(dense, op, x, repeats):
    """Median ms of dense and op, timed in one run; x is one input or a list cycled through."""
    feeds = [{"x": v} for v in (x if isinstance(x, list) else [x])]
    return median_ms_in_blocks([dense, op], feeds, repeats)


def quantize(w, bits):
    s = np.float32(np.abs(w).max()) + np.float32(1e-7)
    levels = np.float32(2 ** bits - 1)
    return ((np.round(np.abs(w) / s * levels) / levels) * s * np.sign(w)).astype(np.float32)


def crossover(rows):
    """Smallest gate-on fraction where speed-up drops below 1 (interpolated), or None."""
    for (f0, s0), (f1, s1) in zip(rows, rows[1:]):
        if s0 >= 1 > s1:
            return f0 + (f1 - f0) * (s0 - 1) / (s0 - s1)
    return None if rows[-1][1] >= 1 else rows[0][0]


# Issue 18's network goals: at the goal point (CG and PG ResNet-20: ~20% gated on; FBS
# ResNet-18: density 0.5) a speed-up of at least this share of the MAC bound, and at every
# point at least this speed-up (where gating cannot pay, the dense path).
NETWORK_BOUND_SHARE = 0.8
NETWORK_FLOOR = 0.95
NETWORK_GOAL_NEAR = 0.05  # a row this close to the goal point stands for it (--net-points)


def network_goal(rows, at):
    """Issue 18's verdict on one network's rows [(gate-on fraction, MAC bound or None,
    {variant: speed-up})], per variant ("ort": the default export; "meas": --gated-kernels
    measured): lines saying the speed-up / bound at the row nearest `at` (the goal point; none
    judged when no row lies within NETWORK_GOAL_NEAR of it, as --net-points may leave out) and
    the lowest speed-up of all rows, each MET or MISSED."""
    frac, bound, speedup = min(rows, key=lambda r: abs(r[0] - at))
    near = abs(frac - at) <= NETWORK_GOAL_NEAR
    lines = []
    for variant in ("ort", "meas"):
        if not all(variant in r[2] for r in rows):
            continue
        parts = []
        if bound and near:
            share = speedup[variant] / bound
            parts.append(f"at {frac * 100:.1f}% on {speedup[variant]:.2f}x = {share:.2f} of the bound "
                         f"{bound:.2f} (>= {NETWORK_BOUND_SHARE}: "
                         f"{'MET' if share >= NETWORK_BOUND_SHARE else 'MISSED'})")
        low = min(rows, key=lambda r: r[2][variant])
        parts.append(f"lowest {low[2][variant]:.2f}x at {low[0] * 100:.1f}% on (>= {NETWORK_FLOOR}x: "
                     f"{'MET' if low[2][variant] >= NETWORK_FLOOR else 'MISSED'})")
        lines.append(f"  goal, {variant}: " + "; ".join(parts))
    return lines


def sweep(name, make_model, dense, x, args, goal=None, bound=None):
    """One op's rows: make_model(fraction) -> its single-node model. With --baseline-library,
    the same model on that build is timed in the same alternating blocks ("before" columns)."""
    base = args.baseline_library
    print(f"\n{name}")
    extra = f" {'before ms':>9} {'new/old':>7}" if base else ""
    print(f"  {'on%':>5} {'dense ms':>9} {'op ms':>9} {'speed-up':>9} {'bound':>6}{extra}  path")
    rows = []
    for frac in args.fractions:
        model = make_model(frac)
        sessions = [dense, custom_session(model, args.threads)]
        if base:
            sessions.append(custom_session(model, args.threads, library=base))
        bad = variants_disagreeing({"ort": sessions[1], "before": sessions[2]}, {"x": x}) if base else []
        before = path_counts()
        times = median_ms_in_blocks(sessions, [{"x": x}], args.repeats)
        path = paths_since(before) + disagreement_note(bad)
        td, to = times[:2]
        rows.append((frac, td / to))
        mark = ""
        if goal and abs(frac - goal[0]) < 1e-9:
            mark = f"   goal >= {goal[1]}x: {'MET' if td / to >= goal[1] else 'MISSED'}"
        b = f"{bound(frac):6.2f}" if bound else f"{'':6}"
        old = f" {times[2]:9.3f} {times[2] / to:7.2f}" if base else ""
        print(f"  {frac * 100:5.0f} {td:9.3f} {to:9.3f} {td / to:9.2f} {b}{old}  {path}{mark}", flush=True)
    c = crossover(rows)
    print(f"  crossover (op slower than dense above): "
          f"{'never (faster at 100%)' if c is None else f'{c * 100:.0f}% gated on'}")
    return rows


# ----------------------------------------------------------------------------- whole networks

CG_OFFSETS = [4.0, 1.5, 1.0, 0.6, 0.3, 0.0, -0.5, -4.0]  # added to CG's threshold (BN units)
PG_OFFSETS = [50.0, 2.0, 1.0, 0.5, 0.25, 0.0, -0.5, -50.0]  # added to PG's threshold
FBS_DENSITIES = [0.25, 0.5, 0.75, 1.0]


def plain_session(model: onnx.ModelProto, threads: int):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    for key, value in SESSION_CONFIG.items():
        opts.add_session_config_entry(key, value)
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def median_ms_in_blocks(sessions, feeds, repeats):
    """Median ms of each session, timed in alternating blocks of 10 runs with a settling time
    at each switch (gate2deploy.benchmark.time_sessions says why); `repeats` timed runs per
    session, rounded up to whole blocks. `feeds` is one feed dict or a list cycled through."""
    feeds = feeds if isinstance(feeds, list) else [feeds]
    by_index = dict(enumerate(sessions))
    times = time_sessions(by_index, {i: feeds for i in by_index}, runs=repeats)
    return [statistics.median(times[i]) for i in by_index]


def export_both(model, x):
    from gate2deploy.capture import capture
    from gate2deploy.pipeline import PassContext, run_pipeline

    captured = capture(model, x)
    return run_pipeline(captured, "ort", PassContext()), run_pipeline(captured, "onnx", PassContext())


def gated_on_fraction(model, x) -> float:
    """MAC-weighted gate-on fraction over the gated layers (for CG: of the second stage)."""
    return gate_figures(model, x, None)[0]


def gate_figures(model, x, ort_model) -> tuple[float, float | None]:
    """(MAC-weighted gate-on fraction over the gated layers, the network's MAC bound: dense
    MACs / executed MACs, per sample; None without ort_model). Executed: the gated layers'
    expected MACs (PG: bit-weighted, in abits-bit MAC equivalents), every other layer dense."""
    from gate2deploy.gate_stats import gate_statistics
    from gate2deploy.report import model_cost

    stats = gate_statistics(model, x)
    total = sum(s.dense_macs for s in stats)
    fraction = sum(s.gate_on_fraction * s.dense_macs for s in stats) / max(total, 1)
    if ort_model is None:
        return fraction, None
    network = model_cost(dense_equivalent(ort_model)).macs / x.shape[0]
    executed = network - total + sum(s.details.get("bit_weighted_macs", s.expected_macs) for s in stats)
    return fraction, network / executed


def network_sweep(title, points, args, extra=None, goal_at=None):
    """points: iterable of (label fraction, MAC bound or None, input or list of inputs, ort
    model, portable model, measured-choice model or None); prints one row each (with
    --paired: the sessions timed run by run, the "x" columns medians of per-round ratios to
    the dense twin). `extra`:
    {column name: function(ort model, threads) -> session}, further variants of the ort model
    timed in the same alternating blocks (the FBS networks: "nchw", the model in ONNX Runtime's
    own layout, runtimes/ort_layout.py; the PG networks: "unfused", the seed's activation
    quantizers as their standard-op chains, passes/fuse_activation_quantizer.py). `goal_at`:
    the gate-on fraction of issue 18's goal point; the verdict (network_goal) follows the
    table."""
    extra = extra or {}
    if args.isolated:  # variants that are other models than the ort one are not timed there
        # (and each process holds one instance of one build: "ort" is the "after" there)
        extra = {k: v for k, v in extra.items() if k == "before"}
    print(f"\n{title}")
    ab = "".join(f" {k + ' ms':>9}" for k in extra)
    ab_x = "".join(f" {k + ' x':>7}" for k in extra)
    print(f"  {'on%':>5} {'bound':>6} {'dense ms':>9} {'ort ms':>9} {'onnx ms':>9} {'meas ms':>9}{ab} "
          f"{'ort x':>7} {'onnx x':>7} {'meas x':>7}{ab_x}  native paths")
    rows = []
    for frac, bound, x, ort_model, portable, measured in points:
        if args.isolated:
            times, speedup, bad = isolated_point(ort_model, measured, x, args)
            print_network_row(frac, bound, times, speedup, extra, "(isolated)" + disagreement_note(bad))
            rows.append((frac, bound, speedup))
            continue
        sessions = {"dense": custom_session(dense_equivalent(ort_model), args.threads),  # stock ops,
                    # but a fused activation quantizer (not a gate) stays in the twin as in the export
                    "ort": custom_session(ort_model, args.threads),
                    "onnx": plain_session(portable, args.threads)}
        if measured is not None:
            sessions["meas"] = custom_session(measured, args.threads)
        sessions.update({k: make(ort_model, args.threads) for k, make in extra.items()})
        name = sessions["dense"].get_inputs()[0].name
        feeds = [{name: v} for v in x] if isinstance(x, list) else {name: x}
        bad = variants_disagreeing(sessions, feeds[0] if isinstance(feeds, list) else feeds)
        before = path_counts()
        if args.paired:  # run by run: medians, and the speed-ups as medians of per-round ratios
            runs = time_paired(sessions, {k: feeds if isinstance(feeds, list) else [feeds] for k in sessions},
                               rounds=args.paired)
            times = {k: statistics.median(v) for k, v in runs.items()}
            speedup = {k: paired_ratio(runs, "dense", k) for k in sessions}
        else:
            times = dict(zip(sessions, median_ms_in_blocks(list(sessions.values()), feeds, args.repeats)))
            speedup = {k: times["dense"] / t for k, t in times.items()}
        print_network_row(frac, bound, times, speedup, extra, paths_since(before) + disagreement_note(bad))
        rows.append((frac, bound, speedup))
    rows.sort(key=lambda r: r[0])
    c = crossover([(frac, speedup["ort"]) for frac, _, speedup in rows])
    print(f"  crossover (--target ort slower than dense above): "
          f"{'never (faster at 100%)' if c is None else f'{c * 100:.0f}% gated on'}")
    if goal_at is not None:
        for line in network_goal(rows, goal_at):
            print(line)


def print_network_row(frac, bound, times, speedup, extra, path):
    """One row of network_sweep's table: ms and speed-up per variant ("-" where a variant was
    not timed: no measured choice, or the onnx model under --isolated)."""
    def ms(k):
        return f" {times[k]:9.3f}" if k in times else f" {'-':>9}"

    def x(k):
        return f" {speedup[k]:7.2f}" if k in speedup else f" {'-':>7}"

    b = f"{bound:6.2f}" if bound else f"{'':6}"
    print(f"  {frac * 100:5.1f} {b}" + "".join(ms(k) for k in ("dense", "ort", "onnx", "meas", *extra))
          + "".join(x(k) for k in ("ort", "onnx", "meas", *extra)) + f"  {path}", flush=True)


def isolated_point(ort_model, measured, x, args):
    """--isolated: the dense twin, the ort model, the measured choice and (--baseline-library)
    the ort model on that build, each timed alone in a process of its own for --isolated
    rounds (gate2deploy.benchmark.time_isolated); (median ms, speed-up as the median of
    per-round ratios to the dense twin) per variant, and variants_disagreeing's list for
    "before" (checked here first, both builds in this process, before any timing). `x`: one
    input or a list cycled through."""
    variants = {"dense": (dense_equivalent(ort_model), None), "ort": (ort_model, None), "meas": (measured, None),
                "before": (ort_model, args.baseline_library) if args.baseline_library else (None, None)}
    models = {key: variant for key, variant in variants.items() if variant[0] is not None}
    name = ort_model.graph.input[0].name
    feeds = [{name: v} for v in x] if isinstance(x, list) else {name: x}
    bad = []
    if args.baseline_library:
        pair = {"ort": custom_session(ort_model, args.threads),
                "before": custom_session(ort_model, args.threads, library=args.baseline_library)}
        bad = variants_disagreeing(pair, feeds[0] if isinstance(feeds, list) else feeds)
        del pair
    runs = time_isolated(models, feeds, rounds=args.isolated, threads=args.threads)
    return ({k: statistics.median(v) for k, v in runs.items()}, {k: paired_ratio(runs, "dense", k) for k in runs},
            bad)


def unfused_quantizers(model: onnx.ModelProto) -> onnx.ModelProto:
    """The ort model with its activation quantizers expanded back into the standard-op chains
    they were fused from (passes/fuse_activation_quantizer.py expand_quantizers)."""
    from gate2deploy import ops
    from gate2deploy.passes import ir
    from gate2deploy.passes.fuse_activation_quantizer import expand_quantizers

    return ops.finalize(ir.export_model(expand_quantizers(ir.import_graph(model))))


def epilogue_as_nodes(model: onnx.ModelProto) -> onnx.ModelProto:
    """The ort model with each gated node's fused clamp and quantizer as nodes after it
    (passes/fuse_gated_epilogue.py split_gated_epilogues, output steps only): the export
    before those two steps were fused."""
    from gate2deploy import ops
    from gate2deploy.passes import ir
    from gate2deploy.passes.fuse_gated_epilogue import split_gated_epilogues

    graph = ir.import_graph(model)
    split_gated_epilogues(graph, output_steps_only=True)
    return ops.finalize(ir.export_model(graph))


def with_threshold_offset(model, offset):
    import copy

    import torch

    from gate2deploy.gated import CGConv2d, PGConv2d

    shifted = copy.deepcopy(model)
    with torch.no_grad():
        for m in shifted.modules():
            if isinstance(m, (CGConv2d, PGConv2d)):
                m.threshold.add_(offset)
    return shifted


def fbs_resnet18_states(gen) -> tuple[dict, dict]:
    """The FBS ResNet-18's two state dicts (module docstring): torchvision's ResNet-18 with
    random init and random BatchNorm (torchvision initializes every BN scale to 1: FBS's
    saliency, the BN scale here, would tie everywhere and top-k would keep no channel),
    mapped by fbs_state_dict_from_dense (fixed saliency: each layer keeps the same top-k
    channels for every input); and the same with random predictor weights, as a trained FBS
    layer has (the active channels then change with the input). `gen`: the torch.Generator
    drawn from (seeded 0 by the benchmarks; the varying inputs are drawn after)."""
    import torch
    import torchvision

    from gate2deploy.importers.fbs import fbs_state_dict_from_dense

    torch.manual_seed(0)
    sd = torchvision.models.resnet18(weights=None).state_dict()
    for key in [k for k in sd if k.endswith("running_var")]:
        bn = key[: -len("running_var")]
        c = sd[key].numel()
        sd[bn + "weight"] = torch.empty(c).uniform_(0.5, 1.5, generator=gen)
        sd[bn + "bias"] = torch.empty(c).uniform_(-0.1, 0.1, generator=gen)
        sd[bn + "running_mean"] = torch.empty(c).uniform_(-0.1, 0.1, generator=gen)
        sd[key] = torch.empty(c).uniform_(0.5, 2.0, generator=gen)
    dense_sd = fbs_state_dict_from_dense(sd)
    varying_sd = dict(dense_sd)
    for key, t in dense_sd.items():
        if key.endswith("gate.weight"):
            varying_sd[key] = torch.randn(t.shape, generator=gen) * 0.5 / t.shape[1] ** 0.5
    return dense_sd, varying_sd


def network_benchmarks(args) -> None:
    import torch

    from gate2deploy.kernel_choice import choose_gated_kernels

    nets = args.networks.split(",")
    # Each network is built right after seeding, so its weights (and gate-on rows) do not
    # depend on which other networks the run includes (tools/bench_network_layers.py builds
    # its one network the same way).
    if "cg" in nets or "pg" in nets:
        from gate2deploy.models.dnn_gating import resnet20_cg, resnet20_pg

        for name, build, offsets in [("cg", lambda: resnet20_cg(partitions=4, shuffle=False), CG_OFFSETS),
                                     ("pg", lambda: resnet20_pg(wbits=8, abits=3, pred_bits=2),
                                      PG_OFFSETS)]:
            if name not in nets:
                continue
            torch.manual_seed(0)
            base = build().eval()
            if args.net_points:
                offsets = [offsets[i] for i in args.net_points]
            for batch in args.net_batches:
                x = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(0))
                exported = []
                for offset in offsets:
                    model = with_threshold_offset(base, offset)
                    ort_model, portable = export_both(model, x)
                    exported.append((model, ort_model, portable))
                for threads in args.net_threads:
                    args.threads = threads
                    points = []
                    for model, ort_model, portable in exported:
                        frac, bound = gate_figures(model, x, ort_model)
                        measured, _ = choose_gated_kernels(ort_model, x.numpy(), threads=threads)
                        points.append((frac, bound, x.numpy(), ort_model, portable, measured))
                    label = ("ResNet-20 CG (p = 4, block-diagonal; 9 CGConv)" if name == "cg" else
                             "ResNet-20 PG (abits 3 / pred 2, wbits 8; 9 PGConv)")
                    extra = ({"unfused": lambda m, t: custom_session(unfused_quantizers(m), t),
                              "epi-nodes": lambda m, t: custom_session(epilogue_as_nodes(m), t)}
                             if name == "pg" else {})
                    extra.update(build_ab_variants(args))  # --baseline-library: both builds, same blocks
                    network_sweep(f"{label}, batch {batch}, {threads} threads, 32x32", points, args, extra,
                                  goal_at=0.2)
    if "fbs" in nets:
        from gate2deploy.models.fbs import fbs_resnet18

        gen = torch.Generator().manual_seed(0)
        dense_sd, varying_sd = fbs_resnet18_states(gen)
        for batch in args.net_batches:
            x = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(0))
            inputs = [torch.randn(batch, 3, 224, 224, generator=gen) for _ in range(4)]
            for title, state, feeds in [
                    ("FBS ResNet-18 (9 FBSConv), fixed saliency", dense_sd, None),
                    ("FBS ResNet-18, input-dependent saliency (active channels vary per input)",
                     varying_sd, inputs)]:
                exported = []
                for density in FBS_DENSITIES:
                    model = fbs_resnet18(density=density).eval()
                    model.load_state_dict(state)
                    example = x if feeds is None else feeds[0]
                    ort_model, portable = export_both(model, example)
                    # the bound: dense MACs / the MACs the active channels execute (input x
                    # output density per layer, gate_stats' FBS rule), on the (first) timed input
                    _, bound = gate_figures(model, example, ort_model)
                    exported.append((density, bound, example, feeds, ort_model, portable))
                for threads in args.net_threads:
                    args.threads = threads
                    points = []
                    for density, bound, example, feeds, ort_model, portable in exported:
                        # the measured choice times on the (first) example input
                        measured, _ = choose_gated_kernels(ort_model, example.numpy(), threads=threads)
                        points.append((density, bound, example.numpy() if feeds is None else
                                       [v.numpy() for v in feeds], ort_model, portable, measured))
                    network_sweep(f"{title}, batch {batch}, {threads} threads, 224x224; "
                                  f"on% = density", points, args,
                                  extra={"nchw": lambda m, t: custom_session(m, t, layout="nchw"),
                                         **build_ab_variants(args)}, goal_at=0.5)


RESNET_SHAPES = "16x32,32x16,64x8,64x56,128x28,256x14,512x7"


def layer_benchmarks(args, ops: list[str], c: int, hw: int) -> None:
    """The layer sweeps (CG, PG, FBS) of one shape: c -> c channels, hw x hw, --kernel."""
    o = c
    k = args.kernel
    rng = np.random.default_rng(0)
    x_shape = (args.batch, c, hw, hw)
    x = rng.standard_normal(x_shape).astype(np.float32)
    w = (rng.standard_normal((o, c, k, k)) / np.sqrt(c * k * k)).astype(np.float32)
    pad = k // 2
    conv = dict(strides=[1, 1], pads=[pad] * 4, dilations=[1, 1])
    print(f"\nlayer: batch {args.batch}, {c}->{o} channels, {hw}x{hw}, {k}x{k}, pad {pad}; "
          f"ONNX Runtime {ort.__version__} CPU, {args.threads} threads; "
          f"spinning {args.spin}; medians of {whole_blocks(args.repeats)} runs in alternating blocks of 10")

    if "cg" in ops:
        mask = np.zeros((o, c), np.float32)
        mask[:, : c // args.cg_p] = 1
        yp = ref.conv2d(x, w * mask[:, :, None, None], pads=conv["pads"])
        dense = dense_session(w, x_shape, args.threads, conv)
        sweep(f"CGConv p={args.cg_p} (base path = first 1/{args.cg_p} of input channels)",
              lambda f: node_model("CGConv", "gate2deploy", x_shape, [w, mask, ref.thresholds_for_fraction(yp, f)],
                                   conv),
              dense, x, args, goal=(0.2, 1.6),
              bound=lambda f: 1 / (1 / args.cg_p + (1 - 1 / args.cg_p) * f))

    if "pg" in ops:
        xa = np.clip(x, 0, None).astype(np.float32)  # PG inputs come after the PACT clamp
        wq = quantize(w, args.wbits) if args.wbits else w
        dense = dense_session(wq, x_shape, args.threads, conv)
        for abits, pred in [(3, 2), (8, 4)]:
            x_hb, _, _ = ref.pg_split_activations(xa, abits, pred)
            msb = ref.conv2d(x_hb, wq, pads=conv["pads"])
            attrs = dict(conv, abits=abits, pred_bits=pred, static_scale=0.0)
            sweep(f"PGConv abits {abits} / pred {pred}, wbits {args.wbits or 'float'}",
                  lambda f: node_model("PGConv", "gate2deploy", x_shape,
                                       [wq, ref.thresholds_for_fraction(msb, f)], attrs),
                  dense, xa, args, goal=(0.2, 1.3),
                  bound=lambda f, a=abits, p=pred: a / (p + (a - p) * f))

    if "fbs" in ops:
        fc_w = rng.standard_normal((o, c)).astype(np.float32)
        fc_b = rng.standard_normal(o).astype(np.float32) + 3.0  # g > 0: top-k picks exactly k
        scale, shift, beta = (rng.standard_normal(o).astype(np.float32) for _ in range(3))
        dense = dense_session(w, x_shape, args.threads, conv)
        print("\nFBSConv (on% = density; input channel density "
              f"{'= output density' if args.fbs_in_density is None else args.fbs_in_density})")
        print(f"  {'on%':>5} {'dense ms':>9} {'op ms':>9} {'speed-up':>9} {'sets vary':>10}")
        rows = []
        for frac in [f for f in args.fractions if f > 0]:
            in_density = frac if args.fbs_in_density is None else args.fbs_in_density
            live = int(round(c * in_density))
            # Inputs with channels >= live switched off by a previous FBS layer. Four such
            # inputs drawn independently give four different saliencies, so the active sets
            # change from run to run ("sets vary": the op's packed-weight cache misses), as
            # with real data; repeating one input keeps the sets (and the cache) fixed.
            varied = [rng.standard_normal(x_shape).astype(np.float32) for _ in range(4)]
            for v in varied:
                v[:, live:] = 0.0
            attrs = dict(conv, density=float(frac), pool="avg")
            op = custom_session(node_model("FBSConv", "gate2deploy", x_shape,
                                         [w, fc_w, fc_b, scale, shift, beta], attrs), args.threads)
            xf = x.copy()
            xf[:, live:] = 0.0
            td, to = time_pair(dense, op, xf, args.repeats)
            tdv, tov = time_pair(dense, op, varied, args.repeats)
            rows.append((frac, td / to))
            mark = ""
            if abs(frac - 0.5) < 1e-9:
                mark = f"   goal >= 2.5x: {'MET' if td / to >= 2.5 else 'MISSED'}"
            print(f"  {frac * 100:5.0f} {td:9.3f} {to:9.3f} {td / to:9.2f} {tdv / tov:10.2f}{mark}",
                  flush=True)
        cx = crossover(rows)
        print(f"  crossover (op slower than dense above): "
              f"{'never (faster at 100%)' if cx is None else f'{cx * 100:.0f}% density'}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ops", default="cg,pg,fbs")
    p.add_argument("--channels", type=int, default=128)
    p.add_argument("--size", type=int, default=28)
    p.add_argument("--shapes", type=lambda v: [tuple(int(n) for n in t.split("x")) for t in v.split(",")],
                   default=None, metavar="CxS,...",
                   help="layers: several shapes in one run, channels x map side each (e.g. "
                        f"{RESNET_SHAPES}: the CIFAR ResNet-20's and the ImageNet ResNet-18's 3x3 "
                        "layers); default --channels x --size")
    p.add_argument("--kernel", type=int, default=3)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--cg-p", type=int, default=4, help="CG: 1/p of input channels in the base path")
    p.add_argument("--wbits", type=int, default=8, help="PG: weight bits (0 = float weights)")
    p.add_argument("--fbs-in-density", type=float, default=None,
                   help="FBS: fraction of non-zero input channels (default: = output density)")
    p.add_argument("--fractions", type=lambda s: [float(v) for v in s.split(",")], default=FRACTIONS)
    p.add_argument("--networks", default="",
                   help="whole networks to sweep: any of cg,pg,fbs (default: none)")
    ints = lambda v: [int(t) for t in v.split(",")]  # noqa: E731
    p.add_argument("--net-batches", type=ints, default=[1], help="networks: batch sizes (default 1)")
    p.add_argument("--net-threads", type=ints, default=None, help="networks: thread counts (default --threads)")
    p.add_argument("--net-points", type=ints, default=None,
                   help="networks: indices into the threshold offsets to run (default all)")
    p.add_argument("--paired", type=int, default=0, metavar="ROUNDS",
                   help="networks: time run by run for ROUNDS rounds (gate2deploy.benchmark."
                        "time_paired; 1 thread or --spin off) and print speed-ups as medians of "
                        "per-round ratios, instead of alternating blocks of 10 (default)")
    p.add_argument("--isolated", type=int, default=0, metavar="ROUNDS",
                   help="networks: time the dense twin, the ort model, the measured choice (and "
                        "--baseline-library's build) each in a process of its own holding only that "
                        "session, ROUNDS rounds, speed-ups as medians of per-round ratios "
                        "(gate2deploy.benchmark.time_isolated): ONNX Runtime's default threading "
                        "without other sessions' workers on the cores, the figure for 2+ threads")
    p.add_argument("--spin", choices=["on", "off"], default="on",
                   help="ONNX Runtime intra-op thread spinning in every session (default on, as ORT)")
    p.add_argument("--baseline-library", default=None,
                   help="CG / PG layers and every network: also time each op (each network) on "
                        "this build of the native library (e.g. the previous commit's, from "
                        "~/.cache/gate2deploy/native) in the same blocks: layers 'before ms' and "
                        "'new/old' (before / op), networks 'before ms' and 'before x' (dense / before)")
    p.add_argument("--tiers", default=None,
                   help="run everything once per native-kernel tier: all, or a list of "
                        f"{', '.join(TIER_ENV)} (default: the widest this CPU has)")
    args = p.parse_args(argv)
    check_baseline_library(p, args.baseline_library)
    if args.tiers and TIER_CHILD not in os.environ:  # a child runs its one tier, as given
        return run_tiers(args.tiers, list(sys.argv[1:] if argv is None else argv))
    args.net_threads = args.net_threads or [args.threads]
    if args.spin == "off":
        SESSION_CONFIG["session.intra_op.allow_spinning"] = "0"

    ops = [op for op in args.ops.split(",") if op and op != "none"]
    print(f"native kernels: {_native().G2DKernelConfig().decode()}; CPU: "
          f"{__import__('gate2deploy.kernel_choice', fromlist=['cpu_model']).cpu_model()}")
    shapes = args.shapes or [(args.channels, args.size)]
    for c, hw in shapes if ops else []:
        layer_benchmarks(args, ops, c, hw)
    if args.networks and (args.paired or args.isolated):
        print(f"\nnetworks: {args.paired} rounds run by run, speed-ups = medians of per-round ratios"
              if args.paired else
              f"\nnetworks: each variant in a process of its own, {args.isolated} rounds, speed-ups = "
              "medians of per-round ratios; onnx not timed")
    if args.networks:
        network_benchmarks(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
