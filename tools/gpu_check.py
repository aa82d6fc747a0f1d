#!/usr/bin/env python
"""GPU check of the Triton kernels (runtimes/triton_kernels.py) and their ahead-of-time build;
run by tools/gpu_check.sh on a host with an NVIDIA GPU (no TensorRT needed). Minutes.

1. Exactness: CGConv, PGConv, FBSConv on CUDA against runtimes/reference.py (numpy, fp64-free
   float32 as the CPU kernels' tests), in fp32 and fp16 (inputs rounded to fp16 first; the
   reference runs on those values; fp16 outputs are allowed their own rounding step), at
   gate-on 0, 20 and 100% (CG, PG: per-channel thresholds at quantiles of the stage-1 output;
   FBS: density 0.2, 0.5, 1). Outputs that differ more than 1e-4 x max|Y_ref| must be flipped
   gates at a tie (the decision value within 1e-5 x its range of the threshold), as in
   tests/test_native_ops.py.
2. Speed: each op timed with CUDA events (median of --repeats after warm-up; the op's whole
   call, host work included: PG's max|X|, FBS's top-k) against a dense cuDNN convolution of
   the same shape through PyTorch (torch.backends.cudnn.benchmark on), same dtype. Goal
   (issue 19): gated faster than dense at 20% gate-on (CG, PG) and density 0.5 (FBS).
3. AOT (--aot DIR): CG's and PG's kernels compiled ahead of time by Triton's AOT compiler
   (triton.tools.compile: C source embedding the cubin), a small C harness generated here,
   built with nvcc against the CUDA driver API, run on files written here, and its output
   compared with the reference the same way. FBS is not built AOT: its channel selection
   (pooling, saliency, top-k) runs in torch before the kernel.

Prints one table; exit status 1 if any check is not exact. `--device cpu` runs steps 1-2 on
Triton's interpreter at a small size (TRITON_INTERPRET=1 is set here): a smoke test of this
script on a machine without a GPU, timings meaningless.
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


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--channels", type=int, default=128)
    p.add_argument("--size", type=int, default=28)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=50)
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


class Bench:
    def __init__(self, device: str, repeats: int):
        import torch

        self.torch, self.device, self.repeats = torch, device, repeats
        if device == "cuda":
            torch.backends.cudnn.benchmark = True

    def ms(self, fn) -> float:
        torch = self.torch
        for _ in range(5):
            fn()
        times = []
        for _ in range(self.repeats):
            if self.device == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"  # before triton_kernels is imported
        args.channels, args.size, args.repeats = min(args.channels, 8), min(args.size, 6), min(args.repeats, 3)
    import torch
    import torch.nn.functional as F

    from gate2deploy.runtimes import reference as ref
    from gate2deploy.runtimes import triton_kernels as tk

    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA GPU is visible (torch.cuda.is_available() is False)", file=sys.stderr)
        return 2
    dev = args.device
    bench = Bench(dev, args.repeats)
    n, c, o, hw, k = args.batch, args.channels, args.channels, args.size, 3
    s, p, d = (1, 1), (1, 1, 1, 1), (1, 1)
    rng = np.random.default_rng(19)
    rows, all_exact = [], True
    name = torch.cuda.get_device_name(0) if dev == "cuda" else "CPU (Triton interpreter)"
    print(f"device: {name}; torch {torch.__version__}; shape N={n} C=O={c} {hw}x{hw} k={k}; "
          f"median of {args.repeats} runs")

    def T(a, dtype):
        return torch.from_numpy(np.ascontiguousarray(a)).to(device=dev, dtype=dtype)

    def dense_ms(x, w):
        return bench.ms(lambda: F.conv2d(x, w, None, 1, 1))

    for dtype_name, np_dtype, dtype in (("fp32", np.float32, torch.float32), ("fp16", np.float16, torch.float16)):
        def rounded(a):
            return a.astype(np_dtype).astype(np.float32)

        x = rounded(rng.standard_normal((n, c, hw, hw)))
        x_relu = np.maximum(x, 0)
        w = rounded(rng.standard_normal((o, c, k, k)) * 0.05)
        xt, wt = T(x, dtype), T(w, dtype)
        dense = dense_ms(xt, wt)

        # CG: p = 4, base path = the first quarter of the input channels
        mask = np.zeros((o, c), np.float32)
        mask[:, : c // 4] = 1
        yp = ref.conv2d(x, w * mask[:, :, None, None], s, p, d)
        for frac in (0.0, 0.2, 1.0):
            thr = ref.thresholds_for_fraction(yp, frac)
            y_ref = ref.cg_conv_reference(x, w, mask, thr, s, p, d)
            mt, tt = T(mask, torch.float32), T(thr, torch.float32)
            y = tk.cg_conv(xt, wt, mt, tt, s, p, d).float().cpu().numpy()
            ok, text = compare(y, y_ref, yp, thr, dtype_name == "fp16")
            ms = bench.ms(lambda: tk.cg_conv(xt, wt, mt, tt, s, p, d))
            rows.append(("CGConv", dtype_name, f"{frac:.0%}", text, ms, dense))
            all_exact &= ok

        # PG: abits 8, pred_bits 4, on non-negative (post-ReLU) inputs, weights 8-bit
        wq = rounded(np.round(w / np.abs(w).max() * 127) / 127 * np.abs(w).max())
        xq, wqt = T(x_relu, dtype), T(wq, dtype)
        x_hb, _, _ = ref.pg_split_activations(x_relu, 8, 4)
        msb = ref.conv2d(x_hb, wq, s, p, d)
        for frac in (0.0, 0.2, 1.0):
            thr = ref.thresholds_for_fraction(msb, frac)
            y_ref = ref.pg_conv_reference(x_relu, wq, thr, 8, 4, 0.0, s, p, d)
            tt = T(thr, torch.float32)
            y = tk.pg_conv(xq, wqt, tt, 8, 4, 0.0, s, p, d).float().cpu().numpy()
            ok, text = compare(y, y_ref, msb, thr, dtype_name == "fp16")
            ms = bench.ms(lambda: tk.pg_conv(xq, wqt, tt, 8, 4, 0.0, s, p, d))
            rows.append(("PGConv", dtype_name, f"{frac:.0%}", text, ms, dense))
            all_exact &= ok

        # FBS: density = fraction of output channels on per sample
        fc_w = rng.standard_normal((o, c)).astype(np.float32)
        fc_b = (rng.standard_normal(o) + 1).astype(np.float32)
        sc, sh, be = (rng.standard_normal(o).astype(np.float32) for _ in range(3))
        params = [T(a, torch.float32) for a in (fc_w, fc_b, sc, sh, be)]
        for density in (0.2, 0.5, 1.0):
            y_ref = ref.fbs_conv_reference(x, w, fc_w, fc_b, sc, sh, be, density, "avg", s, p, d)
            y = tk.fbs_conv(xt, wt, *params, density, "avg", s, p, d).float().cpu().numpy()
            ok, text = compare(y, y_ref, fp16=dtype_name == "fp16")
            ms = bench.ms(lambda: tk.fbs_conv(xt, wt, *params, density, "avg", s, p, d))
            rows.append(("FBSConv", dtype_name, f"d={density:g}", text, ms, dense))
            all_exact &= ok

    print(f"\n{'op':8} {'dtype':5} {'gate-on':8} {'exact (err/max, flips)':34} {'triton ms':>10} "
          f"{'dense ms':>9} {'speed-up':>8}")
    for op, dt, on, text, ms, dense in rows:
        print(f"{op:8} {dt:5} {on:8} {text:34} {ms:10.4f} {dense:9.4f} {dense / ms:8.2f}x")

    if args.aot:
        if dev != "cuda":
            print("AOT: skipped (needs a GPU)")
        else:
            all_exact &= aot_check(Path(args.aot), ref, rng, n, c, o, hw, k, s, p, d)
    print("\nALL EXACT" if all_exact else "\nNOT EXACT: see the table")
    return 0 if all_exact else 1


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
  CUresult r = {kernel}(0, {call_args});
  if (r != CUDA_SUCCESS || cuCtxSynchronize() != CUDA_SUCCESS) {{ fprintf(stderr, "launch failed: %d\n", (int)r); return 1; }}
  void *host = malloc(out_bytes);
  cuMemcpyDtoH(host, out, out_bytes);
  FILE *f = fopen("{out_path}", "wb"); fwrite(host, 1, out_bytes, f); fclose(f);
  printf("ran {kernel}\n");
  return 0;
}}
"""


def aot_build_and_run(workdir: Path, kernel: str, signature: list[tuple[str, str, object]], grid: str,
                      out_elems: int) -> np.ndarray:
    """Compile runtimes.triton_kernels.`kernel` AOT with `signature` [(arg name, type or
    constexpr value, numpy array for inputs / scalar value / None for the output)], build a
    harness with nvcc, run it, return the output (float32)."""
    from triton.tools.compile import CompileArgs, compile_kernel

    import gate2deploy.runtimes.triton_kernels as tk

    workdir.mkdir(parents=True, exist_ok=True)
    sig_text = ", ".join(str(t) for _, t, _ in signature)
    func, files = compile_kernel(CompileArgs(path=tk.__file__, kernel_name=kernel, signature=sig_text,
                                             grid=grid, num_warps=4, num_stages=3, out_name=kernel,
                                             out_path=workdir / kernel))
    header = next(f for f in files if f.suffix == ".h")
    source = next(f for f in files if f.suffix == ".c")
    uploads, call_args = [], []
    out_path = workdir / f"{kernel}.out.bin"
    for name, typ, value in signature:
        if not isinstance(typ, str):
            continue  # a constexpr: compiled in
        if typ.startswith("*") and value is None:
            call_args.append("out")
        elif typ.startswith("*"):
            path = workdir / f"{kernel}.{name}.bin"
            np.ascontiguousarray(value, np.float32).tofile(path)
            uploads.append(f'  CUdeviceptr {name} = upload("{path}", &bytes);')
            call_args.append(name)
        elif typ == "i32":
            call_args.append(f"(int32_t){int(value)}")
        else:
            call_args.append(f"(float){float(value)!r}f")
    harness = workdir / f"{kernel}_harness.c"
    harness.write_text(HARNESS.format(header=header.name, uploads="\n".join(uploads), out_bytes=out_elems * 4,
                                      kernel=func, call_args=", ".join(call_args), out_path=out_path))
    exe = workdir / f"{kernel}_harness"
    # -include stdlib.h: the generated source calls exit() without including it
    subprocess.run(["nvcc", "-O2", "-include", "stdlib.h", "-x", "cu", str(harness), "-x", "cu", str(source), "-o", str(exe),
                    "-lcuda", f"-I{workdir}"], check=True)
    subprocess.run([str(exe)], check=True)
    return np.fromfile(out_path, np.float32)


def aot_check(workdir: Path, ref, rng, n, c, o, hw, k, s, p, d) -> bool:
    print("\nAOT (triton.tools.compile + nvcc harness, fp32):")
    x = rng.standard_normal((n, c, hw, hw)).astype(np.float32)
    w = (rng.standard_normal((o, c, k, k)) * 0.05).astype(np.float32)
    oh = ow = hw  # 3x3, stride 1, pad 1
    total = n * o * oh * ow
    grid = "(total + 127) / 128, 1, 1"
    geometry = [("sh", "i32", s[0]), ("sw", "i32", s[1]), ("pt", "i32", p[0]), ("pl", "i32", p[1]),
                ("dh", "i32", d[0]), ("dw", "i32", d[1])]
    ok_all = True
    mask = np.zeros((o, c), np.float32)
    mask[:, : c // 4] = 1
    yp = ref.conv2d(x, w * mask[:, :, None, None], s, p, d)
    thr = ref.thresholds_for_fraction(yp, 0.2)
    sig = [("x_ptr", "*fp32", x), ("w_ptr", "*fp32", w), ("mask_ptr", "*fp32", mask), ("thr_ptr", "*fp32", thr),
           ("y_ptr", "*fp32", None), ("total", "i32", total), ("C", "i32", c), ("H", "i32", hw),
           ("W", "i32", hw), ("O", "i32", o), ("OH", "i32", oh), ("OW", "i32", ow), ("KH", k, None),
           ("KW", k, None), *geometry, ("BLOCK_SIZE", 128, None)]
    y = aot_build_and_run(workdir, "_cg_conv_kernel", sig, grid, total).reshape(n, o, oh, ow)
    ok, text = compare(y, ref.cg_conv_reference(x, w, mask, thr, s, p, d), yp, thr)
    print(f"  CGConv AOT, 20% on: {'exact' if ok else 'NOT EXACT'} ({text})")
    ok_all &= ok

    xr = np.maximum(x, 0)
    scale = np.float32(np.abs(xr).max()) + np.float32(1e-7)
    x_hb, _, _ = ref.pg_split_activations(xr, 8, 4)
    msb = ref.conv2d(x_hb, w, s, p, d)
    thr = ref.thresholds_for_fraction(msb, 0.2)
    sig = [("x_ptr", "*fp32", xr), ("w_ptr", "*fp32", w), ("thr_ptr", "*fp32", thr), ("y_ptr", "*fp32", None),
           ("total", "i32", total), ("C", "i32", c), ("H", "i32", hw), ("W", "i32", hw), ("O", "i32", o),
           ("OH", "i32", oh), ("OW", "i32", ow), ("CW", "i32", c), ("OG", "i32", o), ("KH", k, None),
           ("KW", k, None), *geometry, ("scale", "fp32", scale), ("levels", "fp32", 255.0),
           ("unit", "fp32", 16.0), ("BLOCK_SIZE", 128, None)]
    y = aot_build_and_run(workdir, "_pg_conv_kernel", sig, grid, total).reshape(n, o, oh, ow)
    ok, text = compare(y, ref.pg_conv_reference(xr, w, thr, 8, 4, 0.0, s, p, d), msb, thr)
    print(f"  PGConv AOT, 20% on: {'exact' if ok else 'NOT EXACT'} ({text})")
    return ok_all and ok


if __name__ == "__main__":
    sys.exit(main())
