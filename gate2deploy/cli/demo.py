"""`gate2deploy demo`: the whole export path on a built-in default model, no files needed.

It makes a Gator-style checkpoint of torchvision's ResNet-18 (random weights and BN
statistics, random hard gates keeping about half of each hyper-edge's channels, saved in
exactly Gator's layout), then runs `gate2deploy export` on it (load, recognise the gates,
capture, fold, verify against PyTorch, report) and times the dense and the folded model in
ONNX Runtime. Everything lands in the output folder (default ./gate2deploy-demo).
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from ..errors import UserError


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="export a built-in Gator-gated ResNet-18 end to end")
    p.add_argument("-o", "--out-dir", default="gate2deploy-demo")
    p.add_argument("--keep", type=float, default=0.5, help="fraction of channels each gate keeps")
    p.add_argument("--input-shape", default="1,3,224,224")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..benchmark import latencies_ms
    from ..capture import capture
    from ..frontend import parse_shape
    from ..importers.gator import make_gator_checkpoint
    from . import main as cli_main

    if not 0 < args.keep <= 1:
        raise UserError(f"--keep must be in (0, 1], not {args.keep}")
    shape = parse_shape(args.input_shape)  # before the 45 MB checkpoint is written
    if len(shape) != 4 or shape[1] != 3:
        raise UserError(f"--input-shape {args.input_shape}: the demo's ResNet-18 takes N,3,H,W images")
    out = Path(args.out_dir)
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"-o {out}: cannot create the folder: {exc.strerror or exc}") from None
    if not os.access(out, os.W_OK):
        raise UserError(f"cannot write to {out}")
    ckpt, onnx_path, report = out / "resnet18_gator.pth", out / "resnet18_folded.onnx", out / "report.json"
    make_gator_checkpoint(ckpt, args.keep)
    print(f"made a Gator-style checkpoint: {ckpt}")
    cmd = ["export", str(ckpt), "--model", "torchvision.models:resnet18", "--target", "onnx",
           "-o", str(onnx_path), "--input-shape", args.input_shape, "--report", str(report)]
    print("$ gate2deploy " + " ".join(cmd))
    code = cli_main(cmd)
    if code:  # the export said why; the checkpoint made for it goes too (nothing half-done stays)
        ckpt.unlink(missing_ok=True)
        if created and not any(out.iterdir()):
            out.rmdir()
        return code

    import onnx
    import torchvision
    dense = capture(torchvision.models.resnet18().eval(), torch.randn(shape))
    times, _ = latencies_ms({"dense": dense, "folded": onnx.load(str(onnx_path))}, shape, runs=40)
    print(f"ONNX Runtime CPU, 2 threads, median of 40 runs in alternating blocks: dense {times['dense']:.2f} ms, "
          f"folded {times['folded']:.2f} ms ({times['folded'] / times['dense']:.3f}x)")
    print(f"wrote {onnx_path} and {report}")
    return 0
