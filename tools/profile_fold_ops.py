#!/usr/bin/env python
"""Where a folded torchvision model's time goes, by op kind, next to the dense model's.

Issue 3 asks a folded model to keep the dense model's speed per MAC. This shows, for the
models of `tools/bench_fold_torchvision.py` (same random weights, same random 50% channel
masks, same fold with fast physical widths), ONNX Runtime's own kernel time per op kind
(from its profiler: no session or Python overhead), dense vs folded, and each kind's ratio
next to the whole model's MACs ratio. Convolutions are split into dense convs and grouped /
depthwise convs (read from the optimized graph ONNX Runtime runs). ONNX Runtime's default
threading (workers spin), as in tools/bench_fold_torchvision.py.

Each kind also gets its *work ratio*, folded / dense: the MACs ratio of its layers for
convolutions and Gemm/MatMul, and for every other kind (pooling, concat, element-wise ops,
layout reorders: memory-bound, their work is the activations they read and write) the ratio
of activation elements, summed over every tensor of the graph. From those, the *floor*: the
kernel time ratio if every kind's time shrank exactly with its work, and the quotient it
implies (floor / physical MACs ratio). A floor quotient above the goal (1.10) means no choice
of widths reaches the goal under these kernels; only a different op mix (fusions) could.
Kinds whose time ratio stays well above their work ratio are kernels that lose efficiency
at the smaller widths.

    python tools/profile_fold_ops.py mobilenet_v2 efficientnet_b0 --runs 60
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_fold_torchvision as bf  # noqa: E402  (the same models, masks and fold)

from gate2deploy.capture import capture  # noqa: E402
from gate2deploy.kernel_floor import floor_ratio, kernel_ms_by_kind, work, work_ratio  # noqa: E402
from gate2deploy.report import model_cost  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("models", nargs="+", help=f"any of {', '.join(bf.CASES)}")
    p.add_argument("--runs", type=int, default=60)
    args = p.parse_args(argv)
    unknown = [m for m in args.models if m not in bf.CASES]
    if unknown:
        p.error(f"unknown model(s): {', '.join(unknown)}")
    torch.set_num_threads(2)
    print(f"# ONNX Runtime {ort.__version__} CPU, 2 threads, batch 1, kernel time per run "
          f"(profiler, per node the median of its undisturbed runs of {args.runs}; workers spin, ORT's default)")
    for name in args.models:
        size = bf.CASES[name].bench_size
        prepared = bf.prepare(name, size)
        folded, _, _, _ = bf.fold(prepared)
        dense = capture(bf.build_model(name), torch.randn(1, 3, size, size))
        x = np.random.default_rng(0).standard_normal((1, 3, size, size)).astype(np.float32)
        d, f = kernel_ms_by_kind(dense, x, args.runs), kernel_ms_by_kind(folded, x, args.runs)
        wd, wf = work(dense), work(folded)
        macs = model_cost(folded).macs / model_cost(dense).macs
        measured = sum(f.values()) / sum(d.values())
        floor = floor_ratio(d, wd, wf)
        print(f"\n{name} ({size}x{size}): physical MACs ratio {macs:.3f}; kernel time ratio "
              f"{measured:.3f} (quotient {measured / macs:.2f}); floor {floor:.3f} (quotient {floor / macs:.2f})")
        print(f"  {'op kind':24} {'dense ms':>9} {'folded ms':>9} {'ratio':>6} {'work':>6}")
        for kind in sorted(d, key=lambda k: -d[k]):
            if d[kind] < 0.01 * sum(d.values()):
                continue
            print(f"  {kind:24} {d[kind]:9.3f} {f.get(kind, 0.0):9.3f} {f.get(kind, 0.0) / d[kind]:6.3f} "
                  f"{work_ratio(kind, wd, wf):6.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
