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


def make_gator_checkpoint(path: Path, keep: float, seed: int = 0, arch: str = "resnet18",
                          ddp_prefix: bool = False) -> list[torch.Tensor]:
    """A torchvision model wrapped the way Gator saves it, with random gates; returns the
    gate masks in hyper-edge order. `ddp_prefix` adds DataParallel's `module.` prefix."""
    import torchvision

    from ..importers.gator import hyper_edges

    gen = torch.Generator().manual_seed(seed)
    model = getattr(torchvision.models, arch)()
    for m in model.modules():  # non-trivial BN statistics, so folding mistakes would show
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1, generator=gen)
            m.running_var.uniform_(0.5, 1.5, generator=gen)
            m.weight.data.uniform_(0.5, 1.5, generator=gen)
            m.bias.data.normal_(0, 0.1, generator=gen)
    state = {f"net.{k}": v for k, v in model.state_dict().items()}
    masks = []
    for i, edge in enumerate(hyper_edges(model)):
        logits = torch.randn(edge.channels, generator=gen) + torch.special.logit(torch.tensor(keep))
        state[f"forward_hooks.{i}.gating_module.gating_weights"] = logits
        state[f"forward_hooks.{i}.gating_module.active_channels_mask"] = logits >= 0
        masks.append(logits >= 0)
    if ddp_prefix:
        state = {f"module.{k}": v for k, v in state.items()}
    torch.save({"epoch": 90, "arch": arch, "state_dict": state, "best_acc1": 0.0, "optimizer": {}}, path)
    return masks


def run(args) -> int:
    from ..benchmark import median_latencies_ms
    from ..capture import capture
    from ..frontend import parse_shape
    from . import main as cli_main

    if not 0 < args.keep <= 1:
        raise UserError(f"--keep must be in (0, 1], not {args.keep}")
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if not os.access(out, os.W_OK):
        raise UserError(f"cannot write to {out}")
    ckpt, onnx_path, report = out / "resnet18_gator.pth", out / "resnet18_folded.onnx", out / "report.json"
    make_gator_checkpoint(ckpt, args.keep)
    print(f"made a Gator-style checkpoint: {ckpt}")
    cmd = ["export", str(ckpt), "--model", "torchvision.models:resnet18", "--target", "onnx",
           "-o", str(onnx_path), "--input-shape", args.input_shape, "--report", str(report)]
    print("$ gate2deploy " + " ".join(cmd))
    code = cli_main(cmd)
    if code:
        return code

    import onnx
    import torchvision
    shape = parse_shape(args.input_shape)
    dense = capture(torchvision.models.resnet18().eval(), torch.randn(shape))
    times = median_latencies_ms({"dense": dense, "folded": onnx.load(str(onnx_path))}, shape, repeats=20)
    print(f"ONNX Runtime CPU, 2 threads, median of 20: dense {times['dense']:.2f} ms, "
          f"folded {times['folded']:.2f} ms ({times['folded'] / times['dense']:.3f}x)")
    print(f"wrote {onnx_path} and {report}")
    return 0
