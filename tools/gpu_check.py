#!/usr/bin/env python
"""GPU check of the Triton kernels (runtimes/triton_kernels.py) and their ahead-of-time build;
run by tools/gpu_check.sh on a host with an NVIDIA GPU (no TensorRT needed). ~2-3 minutes.

For each shape of --shapes (N x C x H x W, C = O, 3x3, stride 1, pad 1; default
1x128x28x28, 8x128x28x28, 8x256x14x14, 32x64x56x56):
1. Exactness: CGConv, PGConv, FBSConv on CUDA against runtimes/reference.py (numpy /
   torch-CPU float32), in fp32 and fp16 (inputs rounded to fp16 first; the reference runs on
   those values; fp16 outputs are allowed their own rounding step), at gate-on 0, 20 and 100%
   (CG, PG: per-channel thresholds at quantiles of the stage-1 output, on random data; FBS:
   density 0.2, 0.5, 1), plus a "clustered 20%" row for CG and PG (below). Outputs that differ
   more than 1e-4 x max|Y_ref| must be flipped gates at a tie (the decision value within
   1e-5 x its range of the threshold), as in tests/test_native_ops.py.
2. Speed: each op timed with CUDA events (median of --repeats after 5 warm-up calls; the op's
   whole call, host and device-side work included: CG's cached plan, PG's max|X| reduction,
   FBS's saliency and top-k) against a dense cuDNN convolution of the same shape through
   PyTorch (torch.backends.cudnn.benchmark on), printed per shape as fp32 with TF32 OFF (the
   same precision as our fp32 kernels, which use IEEE fp32 dots: the speed-up column of fp32
   rows is against this one), fp32 with TF32 ON (PyTorch's default for cuDNN convs; column
   "vs TF32"), and fp16 (the speed-up of fp16 rows). Goal (issue 19): gated faster than dense
   at 20% gate-on (CG, PG) and density 0.5 (FBS).
   "stage-2 tiles": the fraction of the kernel's (BLOCK_M x BLOCK_N) output tiles holding at
   least one gate that is on, i.e. those that run stage 2; the rest skip it. Random gates at
   20% leave almost no tile without a gate on. Real channel gating is spatially clustered
   (whole image regions on or off), so the "clustered 20%" rows use inputs whose gate map is
   blocky: X = noise + a large offset in randomly chosen 8x8 regions (~22% of the regions of
   each sample, the same for all channels) and W with a positive mean on the stage-1 part,
   so the stage-1 sums, hence the gates, are high in those regions; thresholds are still the
   per-channel 20% quantiles. Their own data, so their dense time is the same shape's.
3. AOT (--aot DIR, fp32, the first shape): the three kernels compiled ahead of time by Triton's
   AOT compiler (triton.tools.compile: C source embedding the cubin), a small C harness
   generated here, built with nvcc against the CUDA driver API, run on files written here, and
   its output compared with the reference the same way. PG's scale goes in as a pointer to a
   float (an fp32 scalar argument is passed as a C double by Triton >= 3.4's launcher and was
   misread); levels and unit are compiled in. The host-side parts (CG's plan, FBS's channel
   slots) are computed here with the same torch functions the wrappers use.

Prints one table per shape; exit status 1 if any check is not exact. `--device cpu` runs
steps 1-2 on Triton's interpreter at a small size (TRITON_INTERPRET=1 is set here): a smoke
test of this script on a machine without a GPU, timings meaningless.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

TOL = 1e-4
TIE = 1e-5
FP16_STEP = 2.0 ** -10
DEFAULT_SHAPES = "1x128x28x28,8x128x28x28,8x256x14x14,32x64x56x56"
WARMUP = 5
K, S, P, D = 3, (1, 1), (1, 1, 1, 1), (1, 1)
REGION = 8  # the clustered pattern's region side


def parse_shapes(text: str) -> list[tuple[int, int, int, int]]:
    shapes = []
    for item in text.split(","):
        parts = item.strip().lower().split("x")
        if len(parts) != 4 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise argparse.ArgumentTypeError(f"a shape is NxCxHxW with positive ints, not {item!r}")
        shapes.append(tuple(int(p) for p in parts))
    return shapes


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--shapes", type=parse_shapes, default=parse_shapes(DEFAULT_SHAPES),
                   help=f"comma-separated NxCxHxW (C = O, 3x3, pad 1); default {DEFAULT_SHAPES}")
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--aot", metavar="DIR", help="also build and run the AOT kernels (needs nvcc) in DIR")
    return p.parse_args(argv)


def compare(y: np.ndarray, y_ref: np.ndarray, stage1=None, thr=None, fp16=False) -> tuple[bool, str]:
    """(exact, description): |y - y_ref| <= TOL x max|y_ref| except flipped gates at ties."""
    if not np.isfinite(y).all():
        return False, "non-finite output"
    diff = np.abs(y - y_ref)
    if fp16:
        diff = np.where(diff <= np.abs(y_ref) * FP16_STEP, 0.0, diff)
    scale = max(float(np.abs(y_ref).max()), 1e-30)
    bad = diff > TOL * scale
    worst = float(np.where(bad, 0.0, diff).max()) / scale
    if not bad.any():
        return True, f"{worst:.1e}"
    if stage1 is None:
        return False, f"{int(bad.sum())} off ({float(diff.max()) / scale:.1e})"
    margin = np.abs(stage1 - thr.reshape(1, -1, 1, 1))
    at_tie = margin[bad] <= TIE * max(float(np.abs(stage1).max()), 1e-30)
    return bool(at_tie.all()), f"{worst:.1e}, {int(bad.sum())} flips ({int((~at_tie).sum())} not at ties)"


def stage2_tiles(gate: np.ndarray, tk, group: int = 1) -> float:
    """Fraction of the kernel's output tiles (flattened (n, oh, ow) x channels within a
    group, the wrappers' tile sizes) with some gate on."""
    n, o, oh, ow = gate.shape
    m, og = n * oh * ow, o // group
    bm, bn = tk.tile_sizes(m, og, group)
    g = gate.transpose(0, 2, 3, 1).reshape(m, o)
    mt, nt = -(-m // bm), -(-og // bn)
    padded = np.zeros((mt * bm, group, nt * bn), bool)
    padded[:m, :, :og] = g.reshape(m, group, og)
    return float(padded.reshape(mt, bm, group, nt, bn).any(axis=(1, 4)).mean())


class Bench:
    def __init__(self, device: str, repeats: int):
        import torch

        self.torch, self.device, self.repeats = torch, device, repeats
        if device == "cuda":
            torch.backends.cudnn.benchmark = True

    def ms(self, fn) -> tuple:
        """(eager ms, CUDA-graph ms or None): medians of self.repeats timed calls after WARMUP.
        Eager: the Python call as a user makes it (Triton's launcher and the torch ops'
        host overhead included; at small sizes that dominates). Graph: the same call captured
        once in a CUDA graph and replayed: GPU time only, what an engine that launches the
        compiled kernels (TensorRT AOT plugins) would see. The wrappers never synchronise
        with the host, which is what makes them capturable."""
        torch = self.torch
        for _ in range(WARMUP):
            fn()
        eager = statistics.median(self._timed(fn) for _ in range(self.repeats))
        if self.device != "cuda":
            return eager, None
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                fn()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                fn()
            for _ in range(WARMUP):
                graph.replay()
            replay = statistics.median(self._timed(graph.replay) for _ in range(self.repeats))
        except Exception as exc:  # noqa: BLE001 - report, keep the eager figure
            print(f"  (CUDA graph capture failed: {str(exc).splitlines()[0][:100]})")
            replay = None
        return eager, replay

    def _timed(self, fn) -> float:
        torch = self.torch
        if self.device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3


def clustered_offset(rng, n: int, h: int, w: int) -> np.ndarray:
    """[N, 1, H, W]: 1 in about 22% of each sample's REGION x REGION regions, else 0."""
    rh, rw = -(-h // REGION), -(-w // REGION)
    on = rng.random((n, 1, rh, rw)) < 0.22
    on[:, :, 0, 0] |= ~on.reshape(n, -1).any(axis=1)[:, None]  # at least one region per sample
    return np.kron(on, np.ones((1, 1, REGION, REGION)))[:, :, :h, :w].astype(np.float32)


def check_shape(shape, args, tk, ref, rng, bench, torch, F):
    """Rows (op, dtype, gate-on, exact text, ms, dense ms, TF32 dense ms or None, tiles) and
    the exactness of every row, for one NxCxHxW shape."""
    dev = args.device
    n, c, hw_h, hw_w = shape
    o = c
    rows, all_exact = [], True

    def T(a, dtype):
        return torch.from_numpy(np.ascontiguousarray(a)).to(device=dev, dtype=dtype)

    def dense_ms(x, w, tf32):
        old = torch.backends.cudnn.allow_tf32
        torch.backends.cudnn.allow_tf32 = tf32
        try:
            return bench.ms(lambda: F.conv2d(x, w, None, 1, 1))
        finally:
            torch.backends.cudnn.allow_tf32 = old

    dense_times = {}
    for dtype_name, np_dtype, dtype in (("fp32", np.float32, torch.float32), ("fp16", np.float16, torch.float16)):
        def rounded(a):
            return np.asarray(a, np.float32).astype(np_dtype).astype(np.float32)

        fp16 = dtype_name == "fp16"
        x = rounded(rng.standard_normal((n, c, hw_h, hw_w)))
        w = rounded(rng.standard_normal((o, c, K, K)) * 0.05)
        xt, wt = T(x, dtype), T(w, dtype)
        dense = dense_ms(xt, wt, False)
        tf32 = dense_ms(xt, wt, True) if dtype_name == "fp32" and dev == "cuda" else None
        dense_times[dtype_name] = dense
        if tf32 is not None:
            dense_times["fp32 TF32"] = tf32
        region = clustered_offset(rng, n, hw_h, hw_w)

        def row(op, on, ok, text, ms, tiles=None):
            nonlocal all_exact
            rows.append((op, dtype_name, on, text, ms, dense, tf32, tiles))
            all_exact &= ok

        # CG: p = 4, base path = the first quarter of the input channels
        mask = np.zeros((o, c), np.float32)
        mask[:, : c // 4] = 1
        mt = T(mask, torch.float32)
        w_cl = rounded(w + mask[:, :, None, None] * 0.02)  # positive mean on the base part
        x_cl = rounded(x + 4.0 * region)
        cases = [(f"{f:.0%}", x, w, xt, wt, f) for f in (0.0, 0.2, 1.0)]
        cases.append(("clust20%", x_cl, w_cl, T(x_cl, dtype), T(w_cl, dtype), 0.2))
        for label, xa, wa, xa_t, wa_t, frac in cases:
            yp = ref.conv2d(xa, wa * mask[:, :, None, None], S, P, D)
            thr = ref.thresholds_for_fraction(yp, frac)
            y_ref = ref.cg_conv_reference(xa, wa, mask, thr, S, P, D)
            tt = T(thr, torch.float32)
            y = tk.cg_conv(xa_t, wa_t, mt, tt, S, P, D).float().cpu().numpy()
            ok, text = compare(y, y_ref, yp, thr, fp16)
            ms = bench.ms(lambda: tk.cg_conv(xa_t, wa_t, mt, tt, S, P, D))
            row("CGConv", label, ok, text, ms, stage2_tiles(yp > thr.reshape(1, -1, 1, 1), tk))

        # PG: abits 8, pred_bits 4, on non-negative (post-ReLU) inputs, weights 8-bit
        def q8(a):
            return rounded(np.round(a / np.abs(a).max() * 127) / 127 * np.abs(a).max())

        x_relu = np.maximum(x, 0)
        wq = q8(w)
        xr_cl = rounded(np.maximum(x, 0) + 4.0 * region)
        wq_cl = q8(w + 0.02)
        cases = [(f"{f:.0%}", x_relu, wq, f) for f in (0.0, 0.2, 1.0)] + [("clust20%", xr_cl, wq_cl, 0.2)]
        for label, xa, wa, frac in cases:
            xa_t, wa_t = T(xa, dtype), T(wa, dtype)
            x_hb, _, _ = ref.pg_split_activations(xa, 8, 4)
            msb = ref.conv2d(x_hb, wa, S, P, D)
            thr = ref.thresholds_for_fraction(msb, frac)
            y_ref = ref.pg_conv_reference(xa, wa, thr, 8, 4, 0.0, S, P, D)
            tt = T(thr, torch.float32)
            y = tk.pg_conv(xa_t, wa_t, tt, 8, 4, 0.0, S, P, D).float().cpu().numpy()
            ok, text = compare(y, y_ref, msb, thr, fp16)
            ms = bench.ms(lambda: tk.pg_conv(xa_t, wa_t, tt, 8, 4, 0.0, S, P, D))
            row("PGConv", label, ok, text, ms, stage2_tiles(msb > thr.reshape(1, -1, 1, 1), tk))

        # FBS: density = fraction of output channels on per sample
        fc_w = rng.standard_normal((o, c)).astype(np.float32)
        fc_b = (rng.standard_normal(o) + 1).astype(np.float32)
        sc, sh, be = (rng.standard_normal(o).astype(np.float32) for _ in range(3))
        params = [T(a, torch.float32) for a in (fc_w, fc_b, sc, sh, be)]
        for density in (0.2, 0.5, 1.0):
            y_ref = ref.fbs_conv_reference(x, w, fc_w, fc_b, sc, sh, be, density, "avg", S, P, D)
            y = tk.fbs_conv(xt, wt, *params, density, "avg", S, P, D).float().cpu().numpy()
            ok, text = compare(y, y_ref, fp16=fp16)
            ms = bench.ms(lambda: tk.fbs_conv(xt, wt, *params, density, "avg", S, P, D))
            row("FBSConv", f"d={density:g}", ok, text, ms)
    return rows, all_exact, dense_times


# (N, C, O, H, W, k, strides, pads, dilations, PG group): the odd geometries of
# tests/test_triton_ops.py and a larger one, run compiled on the GPU (the tests run them on
# the interpreter only)
GEOMETRIES = [
    (2, 4, 6, 5, 6, 3, (1, 1), (1, 1, 1, 1), (1, 1), 2),
    (1, 6, 4, 7, 7, 3, (2, 1), (0, 1, 2, 0), (1, 2), 1),
    (3, 48, 40, 13, 11, 3, (2, 2), (1, 0, 2, 1), (2, 1), 4),
    (2, 24, 24, 9, 9, 5, (1, 1), (2, 2, 2, 2), (1, 1), 24),
]


def geometry_check(tk, ref, torch, dev, rng) -> bool:
    """CG, PG (groups), FBS (pools, Identity, pool_pads, fixed threshold) on odd geometries,
    fp32 and fp16, gate-on 20% (FBS density 0.5): exactness only."""
    ok_all, lines = True, []
    for gi, (n, c, o, h, w, k, s, p, d, group) in enumerate(GEOMETRIES):
        for dtype_name, np_dtype, dtype in (("fp32", np.float32, torch.float32), ("fp16", np.float16, torch.float16)):
            def T(a, dt=dtype):
                return torch.from_numpy(np.ascontiguousarray(a)).to(device=dev, dtype=dt)

            def rounded(a):
                return np.asarray(a, np.float32).astype(np_dtype).astype(np.float32)

            fp16, results = dtype_name == "fp16", []
            x = rounded(rng.standard_normal((n, c, h, w)))
            wt = rounded(rng.standard_normal((o, c, k, k)) * 0.1)
            mask = (rng.random((o, c)) < 0.4).astype(np.float32)  # a general base mask
            yp = ref.conv2d(x, wt * mask[:, :, None, None], s, p, d)
            thr = ref.thresholds_for_fraction(yp, 0.2)
            y = tk.cg_conv(T(x), T(wt), T(mask, torch.float32), T(thr, torch.float32), s, p, d)
            results.append(("CG",) + compare(y.float().cpu().numpy(), ref.cg_conv_reference(x, wt, mask, thr, s, p, d),
                                             yp, thr, fp16))
            wg = rounded(rng.standard_normal((o, c // group, k, k)) * 0.1)
            x_hb, _, _ = ref.pg_split_activations(x, 6, 3)
            msb = ref.conv2d(x_hb, wg, s, p, d, group)
            thr = ref.thresholds_for_fraction(msb, 0.2)
            y = tk.pg_conv(T(x), T(wg), T(thr, torch.float32), 6, 3, 0.0, s, p, d, group)
            results.append((f"PG g={group}",) + compare(y.float().cpu().numpy(),
                                                       ref.pg_conv_reference(x, wg, thr, 6, 3, 0.0, s, p, d, group),
                                                       msb, thr, fp16))
            fc_w = rng.standard_normal((o, c)).astype(np.float32)
            fc_b = rng.standard_normal(o).astype(np.float32)
            sc, sh, be = (rng.standard_normal(o).astype(np.float32) for _ in range(3))
            for pool, act, pool_pads, threshold in (("max", "Relu", (0, 0, 0, 0), None),
                                                    ("l2", "Identity", (1, 2, 0, 1), None),
                                                    ("l1", "Relu", (0, 0, 0, 0), 0.3)):
                y_ref = ref.fbs_conv_reference(x, wt, fc_w, fc_b, sc, sh, be, 0.5, pool, s, p, d,
                                               activation=act, pool_pads=pool_pads, threshold=threshold)
                y = tk.fbs_conv(T(x), T(wt), *(T(a, torch.float32) for a in (fc_w, fc_b, sc, sh, be)), 0.5, pool,
                                s, p, d, act, pool_pads, threshold)
                results.append((f"FBS {pool}/{act}{'/thr' if threshold is not None else ''}",)
                               + compare(y.float().cpu().numpy(), y_ref, fp16=fp16))
            ok_all &= all(ok for _, ok, _ in results)
            lines.append(f"  geometry {gi} {dtype_name}: " + "; ".join(
                f"{name} {'exact' if ok else 'NOT EXACT'} ({text})" for name, ok, text in results))
    print("\nOdd geometries (stride 2, asymmetric pads, dilation, groups, general CG mask, FBS options), "
          "20% on / density 0.5:")
    print("\n".join(lines))
    return ok_all


def _fmt_ms(t) -> str:
    return "n/a" if t is None else f"{t:.4f}"


def _ratio(dense, ours) -> str:
    return "" if dense is None or ours is None else f"{dense / ours:.2f}x"


def print_table(shape, rows, dense_times):
    n, c, h, w = shape
    dense = ", ".join(f"{k} {_fmt_ms(v[0])} ms (graph {_fmt_ms(v[1])})" for k, v in dense_times.items())
    print(f"\n== N={n} C=O={c} {h}x{w} 3x3 pad 1 ==   dense cuDNN: {dense}")
    print(f"{'op':8} {'dtype':5} {'gate-on':8} {'exact (err/max, flips)':34} {'ms':>7} {'speed-up':>8} "
          f"{'graph ms':>8} {'speed-up':>8} {'vs TF32':>7} {'stage-2 tiles':>13}")
    for op, dt, on, text, ms, dense_ms, tf32, tiles in rows:
        tiles_text = f"{tiles:.0%}" if tiles is not None else ""
        print(f"{op:8} {dt:5} {on:8} {text:34} {_fmt_ms(ms[0]):>7} {_ratio(dense_ms[0], ms[0]):>8} "
              f"{_fmt_ms(ms[1]):>8} {_ratio(dense_ms[1], ms[1]):>8} "
              f"{_ratio(tf32[1] if tf32 else None, ms[1]):>7} {tiles_text:>13}")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"  # before triton_kernels is imported
        args.shapes = [(min(s[0], 2), min(s[1], 8), min(s[2], 6), min(s[3], 6)) for s in args.shapes[:1]]
        args.repeats = min(args.repeats, 3)
    import torch
    import torch.nn.functional as F

    from gate2deploy.runtimes import reference as ref
    from gate2deploy.runtimes import triton_kernels as tk

    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA GPU is visible (torch.cuda.is_available() is False)", file=sys.stderr)
        return 2
    bench = Bench(args.device, args.repeats)
    rng = np.random.default_rng(19)
    name = torch.cuda.get_device_name(0) if args.device == "cuda" else "CPU (Triton interpreter)"
    print(f"device: {name}; torch {torch.__version__}; median of {args.repeats} runs after {WARMUP} "
          f"warm-up; speed-up = dense / ours, same precision (fp32 rows: cuDNN with TF32 off; "
          f"'vs TF32': graph time of cuDNN fp32 with TF32 on / ours); 'ms': the eager Python call, "
          f"'graph ms': replayed CUDA graph (GPU time only)")
    all_exact = True
    t_start = time.perf_counter()
    for shape in args.shapes:
        rows, exact, dense_times = check_shape(shape, args, tk, ref, rng, bench, torch, F)
        print_table(shape, rows, dense_times)
        all_exact &= exact
        sys.stdout.flush()
    all_exact &= geometry_check(tk, ref, torch, args.device, rng)
    print(f"\n(kernel checks and timings: {time.perf_counter() - t_start:.0f} s, compiles included)")

    all_exact &= trt_aot_plugin_check(torch, args.device)
    if args.aot:
        if args.device != "cuda":
            print("AOT: skipped (needs a GPU)")
        else:
            all_exact &= aot_check(Path(args.aot), ref, tk, torch, rng, args.shapes[0])
    print("\nALL EXACT" if all_exact else "\nNOT EXACT: see the table")
    return 0 if all_exact else 1


# ------------------------------------------------------------------------------------------
# TensorRT's AOT plugin launch, without TensorRT
# ------------------------------------------------------------------------------------------
def trt_aot_plugin_check(torch, device: str = "cuda") -> bool:
    """The gated tiny model (tests/models/gated_tiny.py) exported with --target trt, lowered for
    TensorRT's AOT plugins (runtimes/tensorrt_aot.py) and run with onnx's reference evaluator
    for the standard ops and every plugin node launched as TensorRT launches an AOT plugin:
    the PTX of compile_for_aot loaded with the CUDA driver (cuModuleLoadData) and launched
    with cuLaunchKernel on aot_launch's grid, block and shared memory with exactly (input
    pointers, int32 extras, output pointers). Compared with the PyTorch model at batch 1 and 8.
    On "cpu" (Triton's interpreter) the plugins run through tensorrt_aot.launch instead (the
    same kernels, grid and argument order, from Python)."""
    import contextlib
    import io
    import tempfile

    import onnx

    from gate2deploy.cli import main as cli_main
    from gate2deploy.runtimes import tensorrt_aot as aot

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from test_tensorrt_export import TINY, tiny_model  # the model and its BN / threshold set-up

    how = ("PTX via cuModuleLoadData + cuLaunchKernel" if device == "cuda"
           else "tensorrt_aot.launch on the interpreter")
    print(f"\nTensorRT AOT plugins, launched as TensorRT does ({how}; inputs / int32 extras / outputs), "
          f"gated tiny model vs PyTorch:")
    launcher = ptx_launcher(torch) if device == "cuda" else aot.launch
    ok_all = True
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "tiny.pth"
        torch.save(tiny_model().state_dict(), ckpt)
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            cli_main(["export", str(ckpt), "--model", TINY, "--input-shape", "1,3,8,8", "--target", "trt",
                      "-o", str(Path(tmp) / "m.engine"), "--physical-widths", "exact", "--plugins", "aot"])
        lowered = aot.lower_for_aot(onnx.load(str(Path(tmp) / "m.trt.onnx")))
    for batch in (1, 8):
        x = np.random.default_rng(batch).standard_normal((batch, 3, 8, 8)).astype(np.float32)
        (y,) = aot.evaluate_lowered(lowered, {lowered.graph.input[0].name: x}, launcher, device)
        with torch.no_grad():
            y_ref = tiny_model()(torch.from_numpy(x)).numpy()
        rel = float(np.max(np.abs(y - y_ref)) / np.max(np.abs(y_ref)))
        ok = rel <= 1e-4
        print(f"  batch {batch}: {'exact' if ok else 'NOT EXACT'} (max rel err {rel:.2e})")
        ok_all &= ok
    return ok_all


def ptx_launcher(torch):
    """launcher(op, CUDA tensors, attributes) -> outputs: the plugin's kernel compiled as the AOT
    implementation compiles it (compile_for_aot: PTX without Triton's scratch parameters),
    loaded with the CUDA driver and launched with exactly (inputs, int32 extras, outputs) on
    aot_launch's grid, block and shared memory, on torch's current stream."""
    import ctypes

    from gate2deploy.runtimes import tensorrt_aot as aot

    cuda = ctypes.CDLL("libcuda.so.1")
    torch.zeros(1, device="cuda")  # the primary context is current on this thread
    loaded = {}

    def check(result, what):
        if result != 0:
            raise RuntimeError(f"{what} failed: CUresult {result}")

    def launch(op, inputs, attrs):
        inputs, plan, outputs = aot.prepare_launch(op, inputs, attrs)
        key = (plan.kernel, repr(plan.signature))
        if key not in loaded:
            name, ptx, threads, shared = aot.compile_for_aot(plan)
            module, func = ctypes.c_void_p(), ctypes.c_void_p()
            check(cuda.cuModuleLoadData(ctypes.byref(module), ptx.encode() + b"\0"), "cuModuleLoadData")
            check(cuda.cuModuleGetFunction(ctypes.byref(func), module, name.encode()), "cuModuleGetFunction")
            loaded[key] = (func, threads, shared)
        func, threads, shared = loaded[key]
        args = ([ctypes.c_uint64(t.data_ptr()) for t in inputs] + [ctypes.c_int32(int(v)) for v in plan.extras]
                + [ctypes.c_uint64(t.data_ptr()) for t in outputs])
        params = (ctypes.c_void_p * len(args))(*[ctypes.cast(ctypes.byref(a), ctypes.c_void_p) for a in args])
        gx, gy, gz = (int(g) for g in plan.grid)
        stream = ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)
        check(cuda.cuLaunchKernel(func, gx, gy, gz, threads, 1, 1, shared, stream, params, None), "cuLaunchKernel")
        torch.cuda.synchronize()
        return outputs

    return launch


# ------------------------------------------------------------------------------------------
# AOT: triton.tools.compile -> C with the cubin embedded -> nvcc harness
# ------------------------------------------------------------------------------------------
HARNESS = r"""
#include <cuda.h>
#include <stdio.h>
#include <stdlib.h>
#include "{header}"

static CUdeviceptr upload(const char *path, size_t *bytes) {{
  FILE *f = fopen(path, "rb");
  if (!f) {{ fprintf(stderr, "cannot open %s\n", path); exit(2); }}
  fseek(f, 0, SEEK_END); *bytes = (size_t)ftell(f); fseek(f, 0, SEEK_SET);
  void *host = malloc(*bytes);
  if (fread(host, 1, *bytes, f) != *bytes) {{ fprintf(stderr, "short read %s\n", path); exit(2); }}
  fclose(f);
  CUdeviceptr dev;
  cuMemAlloc(&dev, *bytes);
  cuMemcpyHtoD(dev, host, *bytes);
  free(host);
  return dev;
}}

int main(void) {{
  CUdevice device; CUcontext ctx; size_t bytes;
  if (cuInit(0) != CUDA_SUCCESS || cuDeviceGet(&device, 0) != CUDA_SUCCESS) {{ fprintf(stderr, "no CUDA device\n"); return 2; }}
  cuDevicePrimaryCtxRetain(&ctx, device);
  cuCtxSetCurrent(ctx);
{uploads}
  CUdeviceptr out; size_t out_bytes = {out_bytes};
  cuMemAlloc(&out, out_bytes);
  cuMemsetD8(out, 0, out_bytes);  /* FBS leaves inactive channels untouched: Y starts at 0 */
  CUresult r = {kernel}(0, {call_args});
  if (r != CUDA_SUCCESS || cuCtxSynchronize() != CUDA_SUCCESS) {{ fprintf(stderr, "launch failed: %d\n", (int)r); return 1; }}
  void *host = malloc(out_bytes);
  cuMemcpyDtoH(host, out, out_bytes);
  FILE *f = fopen("{out_path}", "wb"); fwrite(host, 1, out_bytes, f); fclose(f);
  printf("ran {kernel}\n");
  return 0;
}}
"""


def aot_build_and_run(workdir: Path, kernel: str, signature: list, values: dict, grid: str,
                      out_elems: int) -> np.ndarray:
    """Compile runtimes.triton_kernels.`kernel` AOT with `signature` [(argument, Triton type
    or constexpr value)] (triton_kernels.kernel_signatures), build a harness with nvcc, run
    it with `values` {argument: numpy array for an input pointer / int for an i32; the
    output pointer absent}, return the output (float32)."""
    from triton.tools.compile import CompileArgs, compile_kernel

    import gate2deploy.runtimes.triton_kernels as tk

    workdir.mkdir(parents=True, exist_ok=True)
    sig_text = ", ".join(str(t) for _, t in signature)
    func, files = compile_kernel(CompileArgs(path=tk.__file__, kernel_name=kernel, signature=sig_text,
                                             grid=grid, num_warps=tk.NUM_WARPS, num_stages=tk.NUM_STAGES,
                                             out_name=kernel, out_path=workdir / kernel))
    header = next(f for f in files if f.suffix == ".h")
    source = next(f for f in files if f.suffix == ".c")
    uploads, call_args = [], []
    out_path = workdir / f"{kernel}.out.bin"
    for name, typ in signature:
        if not isinstance(typ, str):
            continue  # a constexpr: compiled in
        if typ.startswith("*") and name not in values:
            call_args.append("out")
        elif typ.startswith("*"):
            path = workdir / f"{kernel}.{name}.bin"
            array = np.ascontiguousarray(values[name])
            expected = {"*fp32": np.float32, "*i32": np.int32}[typ]
            assert array.dtype == expected, f"{name}: {array.dtype} for {typ}"
            array.tofile(path)
            uploads.append(f'  CUdeviceptr {name} = upload("{path}", &bytes);')
            call_args.append(name)
        else:
            assert typ == "i32", f"{name}: scalar type {typ} (only i32 scalars are passed)"
            call_args.append(f"(int32_t){int(values[name])}")
    harness = workdir / f"{kernel}_harness.c"
    harness.write_text(HARNESS.format(header=header.name, uploads="\n".join(uploads), out_bytes=out_elems * 4,
                                      kernel=func, call_args=", ".join(call_args), out_path=out_path))
    exe = workdir / f"{kernel}_harness"
    # -include stdlib.h: the generated source calls exit() without including it
    subprocess.run(["nvcc", "-O2", "-include", "stdlib.h", "-x", "cu", str(harness), "-x", "cu", str(source), "-o", str(exe),
                    "-lcuda", f"-I{workdir}"], check=True)
    subprocess.run([str(exe)], check=True)
    return np.fromfile(out_path, np.float32)


def aot_check(workdir: Path, ref, tk, torch, rng, shape) -> bool:
    n, c, h, w_ = shape
    o = c
    print(f"\nAOT (triton.tools.compile + nvcc harness, fp32, N={n} C=O={c} {h}x{w_}):")
    x = rng.standard_normal((n, c, h, w_)).astype(np.float32)
    w = (rng.standard_normal((o, c, K, K)) * 0.05).astype(np.float32)
    oh, ow = h, w_  # 3x3, stride 1, pad 1
    m = n * oh * ow
    total = n * o * oh * ow
    geometry = {"sh": S[0], "sw": S[1], "pt": P[0], "pl": P[1], "dh": D[0], "dw": D[1]}
    dims = {"M": m, "C": c, "H": h, "W": w_, "O": o, "OH": oh, "OW": ow, **geometry}
    ok_all = True

    def run(kernel, values, cols, stage1=None, thr=None, y_ref=None, label=""):
        nonlocal ok_all
        bm, bn = tk.tile_sizes(m if kernel != "_fbs_conv_kernel" else oh * ow, cols, 1 if kernel != "_fbs_conv_kernel" else n)
        sig = tk.kernel_signatures("fp32", K, K, bm, bn, 8, 4)[kernel]
        rows = "M" if kernel != "_fbs_conv_kernel" else "OH * OW"
        third = "1" if kernel != "_fbs_conv_kernel" else str(n)  # N is not an argument
        cols_arg = {"_cg_conv_kernel": "O", "_pg_conv_kernel": "OG", "_fbs_conv_kernel": "S"}[kernel]
        groups = " * (O / OG)" if kernel == "_pg_conv_kernel" else ""
        grid = f"({rows} + {bm - 1}) / {bm}, ({cols_arg} + {bn - 1}) / {bn}{groups}, {third}"
        y = aot_build_and_run(workdir, kernel, sig, values, grid, total).reshape(n, o, oh, ow)
        ok, text = compare(y, y_ref, stage1, thr)
        print(f"  {label}: {'exact' if ok else 'NOT EXACT'} ({text})")
        ok_all &= ok

    mask = np.zeros((o, c), np.float32)
    mask[:, : c // 4] = 1
    yp = ref.conv2d(x, w * mask[:, :, None, None], S, P, D)
    thr = ref.thresholds_for_fraction(yp, 0.2)
    w1, w2, chans, counts = (t.numpy() for t in tk.cg_plan(torch.from_numpy(w), torch.from_numpy(mask)))
    run("_cg_conv_kernel", {"x_ptr": x, "w1_ptr": w1, "w2_ptr": w2, "chan_ptr": chans, "count_ptr": counts,
                            "thr_ptr": thr, **dims}, o, yp, thr,
        ref.cg_conv_reference(x, w, mask, thr, S, P, D), "CGConv AOT, 20% on")

    xr = np.maximum(x, 0)
    scale = tk.pg_scale(torch.from_numpy(xr)).numpy()
    x_hb, x_lb, _ = ref.pg_split_activations(xr, 8, 4)
    msb = ref.conv2d(x_hb, w, S, P, D)
    thr = ref.thresholds_for_fraction(msb, 0.2)
    w_cl = np.ascontiguousarray(w.transpose(0, 2, 3, 1))  # the kernels read W as [O, KH, KW, C]
    # PG is two launches, as the wrapper makes them: the quantization kernel (X's MSB and LSB
    # parts; the harness reads back one output per run, so it runs twice), checked bit for bit
    # against the reference's parts, then the conv on the parts it wrote.
    split_sig = tk.kernel_signatures("fp32", K, K, tk.BLOCK_M, tk.BLOCK_N, 8, 4)["_pg_split_kernel"]
    split_grid = f"({xr.size} + {tk.SPLIT_BLOCK - 1}) / {tk.SPLIT_BLOCK}, 1, 1"
    split_in = {"x_ptr": xr, "scale_ptr": scale, "NUMEL": xr.size}
    parts = {}
    for name, other in (("msb_ptr", "lsb_ptr"), ("lsb_ptr", "msb_ptr")):
        parts[name] = aot_build_and_run(workdir, "_pg_split_kernel", split_sig,
                                        {**split_in, other: np.zeros_like(xr)}, split_grid, xr.size).reshape(xr.shape)
    split_exact = np.array_equal(parts["msb_ptr"], x_hb) and np.array_equal(parts["lsb_ptr"], x_lb)
    print(f"  PG quantization AOT: {'bit-identical to' if split_exact else 'DIFFERS from'} the reference's parts")
    ok_all &= split_exact
    run("_pg_conv_kernel", {**parts, "w_ptr": w_cl, "thr_ptr": thr, "scale_ptr": scale, **dims,
                            "CW": c, "OG": o}, o, msb, thr,
        ref.pg_conv_reference(xr, w, thr, 8, 4, 0.0, S, P, D), "PGConv AOT, 20% on (scale by pointer)")

    fc_w = rng.standard_normal((o, c)).astype(np.float32)
    fc_b = (rng.standard_normal(o) + 1).astype(np.float32)
    sc, sh, be = (rng.standard_normal(o).astype(np.float32) for _ in range(3))
    # g exactly as the reference computes it, so that both select the same channels
    gamma = torch.relu(torch.nn.functional.linear(torch.from_numpy(ref.fbs_pool(x)), torch.from_numpy(fc_w),
                                                  torch.from_numpy(fc_b))).numpy()
    slots, valid = (t.numpy() for t in tk.fbs_slots(torch.from_numpy(gamma), 0.5))
    run("_fbs_conv_kernel", {"x_ptr": x, "w_ptr": w_cl, "slot_ptr": slots, "valid_ptr": valid, "gamma_ptr": gamma,
                             "scale_ptr": sc, "shift_ptr": sh, "beta_ptr": be, **dims, "S": slots.shape[1]},
        slots.shape[1], y_ref=ref.fbs_conv_reference(x, w, fc_w, fc_b, sc, sh, be, 0.5, "avg", S, P, D),
        label="FBSConv AOT, density 0.5 (kernel only; slots from torch)")
    return ok_all


if __name__ == "__main__":
    sys.exit(main())
