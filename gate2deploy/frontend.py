"""Front end shared by the subcommands: checkpoint + flags -> PyTorch model with its masks.

`add_model_arguments` declares the flags; `build_gated_model` loads the checkpoint (safe by
default), builds the architecture, recognises the mask sources and attaches them:
- gate2deploy.nn modules inside the user's model: nothing to do, they capture themselves;
- Gator checkpoints (recognised from their `forward_hooks.*.gating_module.*` keys);
- network slimming from BatchNorm scales (`--netslim-density`);
- channels dead in the weights need no source: the fold finds them in the graph.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field

import torch
from torch import nn

from .errors import UserError
from .importers import gator
from .importers.netslim import RULES, SCOPES, NetslimReport, netslim_specs
from .loading import build_model, load_checkpoint, load_weights
from .nn import MaskSpec, attach_masks


@dataclass
class GatedModel:
    model: nn.Module
    example: torch.Tensor
    masks: list[MaskSpec] = field(default_factory=list)
    sources: dict = field(default_factory=dict)  # for the report: what supplied the masks


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="a .pt2 torch.export program, a state_dict checkpoint "
                   "(with --model), or a pickled module (with --trust-pickle)")
    p.add_argument("--model", help="architecture for a state_dict: package.module:callable or file.py:callable")
    p.add_argument("--model-kwargs", help="JSON keyword arguments for the --model callable")
    p.add_argument("--model-path", action="append", default=[], metavar="DIR",
                   help="folder to import --model's and pickled modules' code from (repeatable); a "
                        "--model file.py finds its own repository's root without it")
    p.add_argument("--input-shape", required=True, help="e.g. 1,3,224,224 (the batch size is fixed in the export)")
    p.add_argument("--trust-pickle", action="store_true",
                   help="allow checkpoints that unpickle Python objects (runs code from the file)")
    p.add_argument("--netslim-density", type=float, help="network slimming: fraction of BN channels to keep")
    p.add_argument("--netslim-rule", choices=RULES, default="mayo",
                   help="mayo: raw gamma, keep > (k+1)-th largest; abs: |gamma| percentile (Liu et al.)")
    p.add_argument("--netslim-scope", choices=SCOPES, default="global", help="one threshold for all layers, or per layer")


def parse_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(v) for v in text.replace("x", ",").split(","))
    except ValueError:
        raise UserError(f"--input-shape {text!r} is not a comma-separated list of integers") from None
    if len(shape) < 2 or any(d <= 0 for d in shape):
        raise UserError(f"--input-shape {text!r} needs at least 2 positive dimensions (batch first)")
    return shape


def build_gated_model(args: argparse.Namespace) -> GatedModel:
    shape = parse_shape(args.input_shape)
    ckpt = load_checkpoint(args.checkpoint, trust_pickle=args.trust_pickle, model_paths=args.model_path)
    sources: dict = {"checkpoint": str(ckpt.path), "format": ckpt.meta.get("format", "state_dict")}
    specs: list[MaskSpec] = []
    if ckpt.module is not None:
        model = ckpt.module
    else:
        if not args.model:
            raise UserError(f"{ckpt.path} holds only weights: pass --model package.module:callable "
                            "(or file.py:callable) to build the architecture")
        model = build_model(args.model, args.model_kwargs, args.model_path)
        weights = ckpt.state_dict
        if gator.is_gator(weights):
            weights, gate_masks = gator.split_checkpoint(weights)
            load_weights(model, weights, str(ckpt.path))
            specs += gator.mask_specs(model, gate_masks)
            sources["gator"] = {"edges": len(gate_masks), "arch": ckpt.meta.get("arch"),
                                "kept_channels": [int(m.sum()) for _, m in sorted(gate_masks.items())]}
        else:
            load_weights(model, weights, str(ckpt.path))
    model.eval()
    example = torch.randn(shape)
    _check_runs(model, example)
    if args.netslim_density is not None:
        slim_specs, report = netslim_specs(model, example, args.netslim_density, args.netslim_rule, args.netslim_scope)
        specs += slim_specs
        sources["netslim"] = _netslim_summary(report)
    attach_masks(model, specs)
    return GatedModel(model, example, specs, sources)


def _check_runs(model: nn.Module, example: torch.Tensor) -> None:
    try:
        with torch.no_grad():
            model(example)
    except Exception as exc:  # noqa: BLE001 - any failure here is the shape not fitting
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(f"--input-shape {','.join(map(str, example.shape))} does not fit the model: {first}") from None


def _netslim_summary(r: NetslimReport) -> dict:
    total = sum(r.kept.values())
    return {"rule": r.rule, "scope": r.scope, "density": r.density,
            "participating_layers": len(r.participating), "kept_channels": total,
            "excluded": r.excluded}
