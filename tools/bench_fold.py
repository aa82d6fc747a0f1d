#!/usr/bin/env python
"""Benchmark of the compiler core (issue 2): export the issue's scenarios through the real
CLI, then time dense vs folded in ONNX Runtime CPU in one run, in alternating blocks (medians;
gate2deploy/benchmark.py says why).

Scenarios: a Gator-gated torchvision ResNet-50 (37 random gates keeping ~50%), and
network-slimmed CIFAR VGG-16 and ResNet-20 (Mayo's rule, density 0.5). Prints per model:
MACs ratio, latency ratio, their quotient, compile time and the verification error.

    python tools/bench_fold.py [--repeats 30] [--threads 2]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import onnx
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from gate2deploy.benchmark import latencies_ms, whole_blocks  # noqa: E402
from gate2deploy.capture import capture  # noqa: E402
from gate2deploy.cli import main as cli  # noqa: E402
from gate2deploy.importers.gator import make_gator_checkpoint  # noqa: E402
from gate2deploy.loading import build_model  # noqa: E402


def scenarios(tmp: Path):
    from models.cifar_nets import randomize_batchnorm

    ckpt = tmp / "gator_r50.pth"
    make_gator_checkpoint(ckpt, keep=0.5, seed=1, arch="resnet50")
    yield "gator resnet50", ckpt, "torchvision.models:resnet50", "1,3,224,224", []
    for name in ("vgg16_bn", "resnet20"):
        spec = f"{REPO}/tests/models/cifar_nets.py:{name}"
        model = randomize_batchnorm(build_model(spec), seed=4)
        path = tmp / f"{name}.pt"
        torch.save(model.state_dict(), path)
        yield f"netslim {name}", path, spec, "1,3,32,32", ["--netslim-density", "0.5"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=30, help="timed runs per model, in blocks of 10")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        for name, ckpt, spec, shape, extra in scenarios(tmp):
            out, report = tmp / "m.onnx", tmp / "r.json"
            code = cli(["export", str(ckpt), "--model", spec, "-o", str(out), "--input-shape", shape,
                        "--report", str(report), *extra])
            if code:
                print(f"{name}: export failed ({code})")
                return code
            r = json.loads(report.read_text())
            dims = tuple(int(v) for v in shape.split(","))
            dense = capture(build_model(spec).eval(), torch.randn(dims))
            t, _ = latencies_ms({"dense": dense, "folded": onnx.load(str(out))}, dims,
                                runs=args.repeats, threads=args.threads)
            macs = r["macs_after"] / r["macs_before"]
            lat = t["folded"] / t["dense"]
            rows.append((name, macs, t["dense"], t["folded"], lat, lat / macs, r["compile_seconds"], r["max_rel_err"]))
    print(f"\nONNX Runtime CPU, {args.threads} threads, batch 1, median of {whole_blocks(args.repeats)} runs in alternating blocks of 10")
    print(f"{'model':18} {'MACs':>6} {'dense ms':>9} {'folded ms':>9} {'latency':>8} {'lat/MACs':>8} {'compile s':>9} {'rel err':>9}")
    for name, macs, td, tf, lat, q, cs, err in rows:
        print(f"{name:18} {macs:6.3f} {td:9.2f} {tf:9.2f} {lat:8.3f} {q:8.2f} {cs:9.2f} {err:9.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
