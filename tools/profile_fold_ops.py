#!/usr/bin/env python
"""Where a folded torchvision model's time goes, by op kind, next to the dense model's.

Issue 3 asks a folded model to keep the dense model's speed per MAC. This shows, for the
models of `tools/bench_fold_torchvision.py` (same random weights, same random 50% channel
masks, same fold with fast physical widths), ONNX Runtime's own kernel time per op kind
(from its profiler: no session or Python overhead), dense vs folded, and each kind's ratio
next to the whole model's MACs ratio. Convolutions are split into dense convs and grouped /
depthwise convs (read from the optimized graph ONNX Runtime runs). Kinds whose time ratio
stays well above the MACs ratio are what keeps the latency ratio up: memory-bound ops scale
with channels x pixels, not with MACs.

    python tools/profile_fold_ops.py mobilenet_v2 efficientnet_b0 --runs 60
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_fold_torchvision as bf  # noqa: E402  (the same models, masks and fold)

from gate2deploy.capture import capture  # noqa: E402
from gate2deploy.report import model_cost  # noqa: E402


def kernel_ms_by_kind(model: onnx.ModelProto, x: np.ndarray, runs: int) -> dict[str, float]:
    """Mean kernel ms per run for each op kind of the graph ONNX Runtime actually runs."""
    with tempfile.TemporaryDirectory() as tmp:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 2
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.enable_profiling = True
        opts.profile_file_prefix = os.path.join(tmp, "profile")
        opts.optimized_model_filepath = os.path.join(tmp, "optimized.onnx")
        opts.log_severity_level = 3
        session = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        for _ in range(runs):
            session.run(None, {"input": x})
        with open(session.end_profiling()) as f:
            events = json.load(f)
        optimized = onnx.load(os.path.join(tmp, "optimized.onnx"))
    grouped = {n.name for n in optimized.graph.node if n.op_type == "Conv"
               and next((a.i for a in n.attribute if a.name == "group"), 1) > 1}
    totals: dict[str, float] = collections.defaultdict(float)
    for e in events:
        if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time"):
            continue
        node, op = e["name"][: -len("_kernel_time")], e["args"].get("op_name", "?")
        kind = ("grouped/depthwise Conv" if node in grouped else "dense Conv") if op == "Conv" else op
        totals[kind] += e["dur"] / 1e3 / runs
    return dict(totals)


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
          f"(profiler, mean of {args.runs} runs)")
    for name in args.models:
        size = bf.CASES[name].bench_size
        prepared = bf.prepare(name, size)
        folded, _, _ = bf.fold(prepared)
        dense = capture(bf.build_model(name), torch.randn(1, 3, size, size))
        x = np.random.default_rng(0).standard_normal((1, 3, size, size)).astype(np.float32)
        d, f = kernel_ms_by_kind(dense, x, args.runs), kernel_ms_by_kind(folded, x, args.runs)
        macs = model_cost(folded).macs / model_cost(dense).macs
        print(f"\n{name} ({size}x{size}): physical MACs ratio {macs:.3f}, "
              f"kernel time ratio {sum(f.values()) / sum(d.values()):.3f}")
        print(f"  {'op kind':24} {'dense ms':>9} {'folded ms':>9} {'ratio':>6}")
        for kind in sorted(d, key=lambda k: -d[k]):
            if d[kind] < 0.01 * sum(d.values()):
                continue
            print(f"  {kind:24} {d[kind]:9.3f} {f.get(kind, 0.0):9.3f} {f.get(kind, 0.0) / d[kind]:6.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
