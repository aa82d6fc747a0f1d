#!/usr/bin/env python
"""Layer-level speed of the native gated kernels vs ONNX Runtime's dense Conv.

For each op (CGConv, PGConv, FBSConv) this builds single-node ONNX models (the custom op and
a plain Conv of the same shape, no bias), opens both in ONNX Runtime CPU with the same
thread count, and times them in one run: interleaved repeats (dense, op, dense, op, ...)
so that machine noise hits both alike; medians reported. The gate-on fraction is swept from
0% to 100%:
  CG, PG: per-channel thresholds at quantiles of the stage-1 output (Yp / out_msb) of the
          benchmark input, so exactly that fraction of output elements is gated on;
  FBS:    the density attribute (fraction of active output channels per sample); the input
          has a fraction `--fbs-in-density` of its channels non-zero (default: the same as
          the output density, i.e. the input came from an FBS layer of the same density;
          Mayo's MACs = conv MACs x in_density x out_density).
It prints the speed-up (dense time / op time) per fraction and the crossover (the gate-on
fraction above which the op is slower than dense, linearly interpolated).

Thread pools: each session has its own intra-op pool, and ONNX Runtime's workers spin after
a run. Interleaving two sessions on a busy 2-core machine, one session's spinning worker
starves the other's (runs of ~20 ms in either session). `--spin off` (the default here)
disables spinning in BOTH sessions (session.intra_op.allow_spinning=0), which keeps the
comparison fair; `--spin on` measures with ONNX Runtime's default.

    python tools/bench_gated_ops.py                 # 128 ch, 28x28, 3x3, batch 1, 2 threads
    python tools/bench_gated_ops.py --ops cg --repeats 50 --channels 64 --size 56
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from gate2deploy.runtimes import reference as ref
from gate2deploy.runtimes.ort import open_session

FRACTIONS = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0]


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


def dense_session(w, x_shape, threads, conv_attrs):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    for key, value in SESSION_CONFIG.items():
        opts.add_session_config_entry(key, value)
    model = node_model("Conv", "", x_shape, [w], conv_attrs)
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def custom_session(model, threads):
    return open_session(model, threads, config=SESSION_CONFIG)


def time_pair(dense, op, x, repeats, warmup=5):
    feed = {"x": x}
    for _ in range(warmup):
        dense.run(None, feed)
        op.run(None, feed)
    td, to = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        dense.run(None, feed)
        td.append(time.perf_counter() - t)
        t = time.perf_counter()
        op.run(None, feed)
        to.append(time.perf_counter() - t)
    return statistics.median(td) * 1e3, statistics.median(to) * 1e3


def thresholds(stage1, frac):
    per = stage1.transpose(1, 0, 2, 3).reshape(stage1.shape[1], -1)
    if frac <= 0:
        return (per.max(axis=1) + 1).astype(np.float32)
    if frac >= 1:
        return (per.min(axis=1) - 1).astype(np.float32)
    return np.quantile(per, 1 - frac, axis=1).astype(np.float32)


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


def sweep(name, make_op, dense, x, args, goal=None):
    print(f"\n{name}")
    print(f"  {'on%':>5} {'dense ms':>9} {'op ms':>9} {'speed-up':>9}")
    rows = []
    for frac in args.fractions:
        op = make_op(frac)
        td, to = time_pair(dense, op, x, args.repeats)
        rows.append((frac, td / to))
        mark = ""
        if goal and abs(frac - goal[0]) < 1e-9:
            mark = f"   goal >= {goal[1]}x: {'MET' if td / to >= goal[1] else 'MISSED'}"
        print(f"  {frac * 100:5.0f} {td:9.3f} {to:9.3f} {td / to:9.2f}{mark}", flush=True)
    c = crossover(rows)
    print(f"  crossover (op slower than dense above): "
          f"{'never (faster at 100%)' if c is None else f'{c * 100:.0f}% gated on'}")
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ops", default="cg,pg,fbs")
    p.add_argument("--channels", type=int, default=128)
    p.add_argument("--size", type=int, default=28)
    p.add_argument("--kernel", type=int, default=3)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--cg-p", type=int, default=4, help="CG: 1/p of input channels in the base path")
    p.add_argument("--wbits", type=int, default=8, help="PG: weight bits (0 = float weights)")
    p.add_argument("--fbs-in-density", type=float, default=None,
                   help="FBS: fraction of non-zero input channels (default: = output density)")
    p.add_argument("--fractions", type=lambda s: [float(v) for v in s.split(",")], default=FRACTIONS)
    p.add_argument("--spin", choices=["on", "off"], default="off",
                   help="ONNX Runtime intra-op thread spinning in both sessions (default off)")
    args = p.parse_args(argv)
    if args.spin == "off":
        SESSION_CONFIG["session.intra_op.allow_spinning"] = "0"

    c = o = args.channels
    k, hw = args.kernel, args.size
    rng = np.random.default_rng(0)
    x_shape = (args.batch, c, hw, hw)
    x = rng.standard_normal(x_shape).astype(np.float32)
    w = (rng.standard_normal((o, c, k, k)) / np.sqrt(c * k * k)).astype(np.float32)
    pad = k // 2
    conv = dict(strides=[1, 1], pads=[pad] * 4, dilations=[1, 1])
    ops = args.ops.split(",")
    print(f"layer: batch {args.batch}, {c}->{o} channels, {hw}x{hw}, {k}x{k}, pad {pad}; "
          f"ONNX Runtime {ort.__version__} CPU, {args.threads} threads; "
          f"medians of {args.repeats} interleaved repeats")

    if "cg" in ops:
        mask = np.zeros((o, c), np.float32)
        mask[:, : c // args.cg_p] = 1
        yp = ref.conv2d(x, w * mask[:, :, None, None], pads=conv["pads"])
        dense = dense_session(w, x_shape, args.threads, conv)
        sweep(f"CGConv p={args.cg_p} (base path = first 1/{args.cg_p} of input channels)",
              lambda f: custom_session(node_model("CGConv", "gate2deploy", x_shape,
                                                [w, mask, thresholds(yp, f)], conv), args.threads),
              dense, x, args, goal=(0.2, 1.6))

    if "pg" in ops:
        xa = np.clip(x, 0, None).astype(np.float32)  # PG inputs come after the PACT clamp
        wq = quantize(w, args.wbits) if args.wbits else w
        dense = dense_session(wq, x_shape, args.threads, conv)
        for abits, pred in [(3, 2), (8, 4)]:
            x_hb, _, _ = ref.pg_split_activations(xa, abits, pred)
            msb = ref.conv2d(x_hb, wq, pads=conv["pads"])
            attrs = dict(conv, abits=abits, pred_bits=pred, static_scale=0.0)
            sweep(f"PGConv abits {abits} / pred {pred}, wbits {args.wbits or 'float'}",
                  lambda f: custom_session(node_model("PGConv", "gate2deploy", x_shape,
                                                    [wq, thresholds(msb, f)], attrs), args.threads),
                  dense, xa, args, goal=(0.2, 1.3))

    if "fbs" in ops:
        fc_w = rng.standard_normal((o, c)).astype(np.float32)
        fc_b = rng.standard_normal(o).astype(np.float32) + 3.0  # g > 0: top-k picks exactly k
        scale, shift, beta = (rng.standard_normal(o).astype(np.float32) for _ in range(3))
        dense = dense_session(w, x_shape, args.threads, conv)
        print("\nFBSConv (on% = density; input channel density "
              f"{'= output density' if args.fbs_in_density is None else args.fbs_in_density})")
        print(f"  {'on%':>5} {'dense ms':>9} {'op ms':>9} {'speed-up':>9}")
        rows = []
        for frac in [f for f in args.fractions if f > 0]:
            in_density = frac if args.fbs_in_density is None else args.fbs_in_density
            xf = x.copy()
            xf[:, int(round(c * in_density)):] = 0.0  # channels a previous FBS layer switched off
            attrs = dict(conv, density=float(frac), pool="avg")
            op = custom_session(node_model("FBSConv", "gate2deploy", x_shape,
                                         [w, fc_w, fc_b, scale, shift, beta], attrs), args.threads)
            td, to = time_pair(dense, op, xf, args.repeats)
            rows.append((frac, td / to))
            mark = ""
            if abs(frac - 0.5) < 1e-9:
                mark = f"   goal >= 2.5x: {'MET' if td / to >= 2.5 else 'MISSED'}"
            print(f"  {frac * 100:5.0f} {td:9.3f} {to:9.3f} {td / to:9.2f}{mark}", flush=True)
        cx = crossover(rows)
        print(f"  crossover (op slower than dense above): "
              f"{'never (faster at 100%)' if cx is None else f'{cx * 100:.0f}% density'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
