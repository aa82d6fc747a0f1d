#!/usr/bin/env python
"""Benchmark of the sensAI export (issue 16): 10 class groups of a CIFAR VGG-19-BN-style and
a CIFAR bottleneck-ResNet-style model (CIFAR-100, 10 classes per group, each group pruned to
its own widths as prune_and_get_model.py does; random candidates stand in for APoZ ones),
batch 1, ONNX Runtime CPU, the same thread count everywhere:

- fused:      the exported model, equal-structure groups fused into grouped convolutions;
- branches:   the same N group models as parallel branches of one ONNX graph (ONNX
              Runtime's default sequential execution);
- sequential: the N group models as N ONNX models run one after another (plus the
              combination in numpy), as sensAI's evaluate.py runs them.

Every model goes through gate2deploy.compile (target onnx, verified). Timing: alternating
blocks, medians (gate2deploy/benchmark.py). Also checks that the fused model's output equals
the seed's combination of the group models' outputs.

    python tools/bench_sensai.py [--repeats 30] [--threads 2] [--resnet-depth 56]
"""
from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

import gate2deploy  # noqa: E402
from gate2deploy.benchmark import time_sessions  # noqa: E402
from gate2deploy.importers.sensai import grouped_model  # noqa: E402
from gate2deploy.verify import make_session  # noqa: E402

GROUPS = [list(range(10 * g, 10 * g + 10)) for g in range(10)]


class Sequential:
    """N sessions run one after another, then sensAI's combination in numpy."""

    def __init__(self, sessions, groups):
        self.sessions = sessions
        perm = [c for g in groups for c in g]
        self.order = np.argsort(perm)

    def run(self, _, feed):
        outs = []
        for s in self.sessions:
            z = s.run(None, feed)[0]
            e = np.exp(z - z.max(axis=1, keepdims=True))
            outs.append((e / e.sum(axis=1, keepdims=True))[:, 1:])
        return [np.concatenate(outs, axis=1)[:, self.order]]


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except Exception:  # noqa: BLE001
        return platform.processor() or "unknown CPU"


def bench(name, models, threads, repeats):
    example = torch.randn(1, 3, 32, 32)
    fused_module = grouped_model(models, GROUPS, example)
    assert fused_module.plan["fused"] == [list(range(10))], fused_module.plan
    fused = gate2deploy.compile(fused_module, example, target="onnx")
    branches = gate2deploy.compile(grouped_model(models, GROUPS, example, fuse=False), example, target="onnx")
    singles = [gate2deploy.compile(m, example, target="onnx").onnx_model for m in models]
    sessions = {}
    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)
    # ONNX Runtime's workers spin after a run by default; with several sessions run one after
    # another (sequential), or on a busy host, that spinning competes with the next run
    # (gate2deploy/benchmark.py). Every configuration is timed both ways.
    for spin in (True, False):
        tag = "" if spin else "-nospin"
        sessions["fused" + tag] = make_session(fused.onnx_model, threads=threads, spinning=spin)
        sessions["branches" + tag] = make_session(branches.onnx_model, threads=threads, spinning=spin)
        sessions["sequential" + tag] = Sequential([make_session(m, threads=threads, spinning=spin) for m in singles],
                                                  GROUPS)
    outs = {k: s.run(None, {"input": x})[0] for k, s in sessions.items()}
    err = max(float(np.abs(outs["fused"] - outs[k]).max()) for k in ("branches", "sequential"))
    times = time_sessions(sessions, {k: [{"input": x}] for k in sessions}, runs=repeats)
    med = {k: statistics.median(t) for k, t in times.items()}
    print(f"{name}: MACs fused {fused.report['macs_after'] / 1e6:.0f} M vs the groups' {branches.report['macs_after'] / 1e6:.0f} M "
          f"(padding to the widest group: {fused.report['macs_after'] / branches.report['macs_after']:.2f}x); "
          f"max |fused - seed combination| {err:.1e}")
    for tag, what in (("", "spinning (default)"), ("-nospin", "no spinning")):
        f = med["fused" + tag]
        print(f"  {what:18s}: fused {f:7.2f} ms | branches {med['branches' + tag]:7.2f} ms | sequential "
              f"{med['sequential' + tag]:7.2f} ms || sequential/fused {med['sequential' + tag] / f:.2f}x (goal >= 2), "
              f"branches/fused {med['branches' + tag] / f:.2f}x (goal >= 1.3)")
    return med


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=30, help="timed runs per configuration, in blocks of 10")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--resnet-depth", type=int, default=56, help="bottleneck ResNet depth 9n+2 (seed: 110, 164)")
    ap.add_argument("--spread", type=float, default=0.05,
                    help="group models pruned per layer 30-70%% +- this per group (how far the groups' widths "
                         "differ, which the fused model pads); negative: each group 0-40%% at random")
    args = ap.parse_args()
    from models.sensai_nets import CFG_E, group_models

    torch.set_num_threads(1)  # PyTorch only builds and checks the models here
    print(f"CPU: {cpu_name()}; ONNX Runtime threads {args.threads}; batch 1; 10 groups x 10 classes")
    spread = None if args.spread < 0 else args.spread
    print(f"pruning: {'uniform 0-40% per group and layer' if spread is None else f'per layer 30-70%, +-{spread:.0%} per group'}")
    bench("VGG-19-BN", group_models("vgg", GROUPS, 100, seed=1, layer_spread=spread, cfg=CFG_E),
          args.threads, args.repeats)
    bench(f"ResNet-{args.resnet_depth} (bottleneck)",
          group_models("resnet", GROUPS, 100, seed=2, layer_spread=spread, depth=args.resnet_depth),
          args.threads, args.repeats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
