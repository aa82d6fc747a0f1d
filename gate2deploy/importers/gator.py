"""Gator checkpoints (seed 002): hard channel gates on hyper-edges.

Checkpoint layout, exactly as Gator saves it (gating-semantics.md §2; gator/main.py
`save_checkpoint`): a dict with `epoch, arch, state_dict, best_acc1, optimizer` whose
`state_dict` is that of `NetWithAuxiliaryOutputs` (gator/models/net_auxiliary_extension.py):
the base net under `net.<module path>` and, per hyper-edge i, the hook module
`forward_hooks.<i>.gating_module.gating_weights` and `.active_channels_mask` (`module.`
prefixes from DDP are stripped by the loader). Recognised from those keys alone.

**Which hyper-edge is gate i** is decided by Gator's mapper, and this module states its rule
(gator/models/gates_mapper.py; Gator picks `ResNetGatesModulesMapper` for ResNets and
`NaiveSequentialGatesModulesMapper` for everything else, gator/models/wrapped_gated_models.py
`get_wrapped_gating_net_and_criteria`):

- ResNet mapper (`ResNetGatesModulesMapper.map_modules_inner`). An *open* residual edge starts
  with the stem (`conv1` out, through its alias `bn1`). Walking stages `layer1..layer4` (3 when
  there is no `layer4`: the CIFAR ResNets) and their blocks in order:
  1. every block's `conv1` input joins the open residual edge;
  2. at the first block of a stage that is not layer1, or of any stage of Bottleneck blocks,
     the downsample conv's input joins it too, the open edge is *appended* to the list, and a
     new open edge starts at the downsample's output (alias `downsample.1`);
  3. the block's inner edges are appended (conv1 -> conv2, then conv2 -> conv3 for
     Bottlenecks), each as its out side (alias BN) and the next conv's in side;
  4. the block's last conv output (alias its BN) joins the open residual edge.
  The last open edge is appended only when `no_last_conv` is False.
  So for BasicBlock ResNets (18, 34, the CIFAR 20/56/...) the stem edge, which layer1 shares,
  comes *after* layer1's inner edges: [layer1.0 inner, layer1.1 inner, stem + layer1 residual,
  layer2.0 inner, ...]; for Bottleneck ResNets (50, 101, 152) it is edge 0 (37 edges for
  ResNet-50).
- Naive sequential mapper (`NaiveSequentialGatesModulesMapper.map_modules_inner`): the
  `nn.Conv2d` modules in `net.modules()` order; edge i is (conv i out, conv i+1 in) with conv
  i+1's input channel count; a BatchNorm2d met after a conv (in the same order) is that conv's
  output alias, the last one met wins; when `no_last_conv` is False one more edge holds the last
  conv's output alone.

Gate application (gator/models/channel_gates.py `ModulesChannelsGatingHooks`): an "out" side is
a forward hook multiplying the alias module's output (the BN after the conv, or the conv itself
without one), an "in" side a forward pre-hook multiplying the conv's input. The gate value of
`ChannelsLogisticGatingMasked.forward` is a stochastic hard sample times the permanent mask,
and the mask is recomputed first (`deactivate_channels`: channels with `gating_weights` below
logit(0.5) = 0 are switched off for good). The export uses that deterministic part: keep =
`active_channels_mask` and `gating_weights >= 0`; the stochastic sample is never drawn.
Gator's converter (gator/models/gated_prunning.py `prune_net_with_hooks`) keeps the same
channels. A checkpoint of the unmasked `ChannelsLogisticGating` class has no
`active_channels_mask`; `gating_weights >= 0` is then the mask, and the report says so.

The ResNet mapper never lists `fc`; the last residual edge still zeroes fc's input channels
(every producer of that stream is gated), so the importer adds fc's input side to that edge:
the same function, and the fold then removes those fc columns.

`no_last_conv` is not stored in the checkpoint. The seed's default is False (its
`get_wrapped_gating_net_and_criteria`); the gate count tells the two apart (one edge fewer
with True), so when the user does not state it (`--gator-no-last-conv true|false`), the count
decides, and a count that fits neither is an error naming both counts and the flag.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..errors import UserError
from ..nn import MaskSpec

GATE_KEY = "forward_hooks.{index}.gating_module.{field}"  # as Gator's wrapper names them
HOOK_KEY = re.compile(r"^forward_hooks\.(\d+)\.gating_module\.(gating_weights|active_channels_mask)$")


@dataclass
class HyperEdge:
    name: str
    out_modules: list[str] = field(default_factory=list)  # BN (or conv) modules: gate their output
    in_modules: list[str] = field(default_factory=list)  # conv / linear modules: gate their input
    channels: int = 0


@dataclass
class GatorGates:
    """The gates of a Gator checkpoint: keep-masks by hook index, and how they were read."""

    masks: dict[int, torch.Tensor]
    mask_rule: str  # how keep was derived (for the report)


def is_gator(state_dict: dict) -> bool:
    return any(HOOK_KEY.match(k) for k in state_dict)


def is_resnet(model: nn.Module) -> bool:
    """Gator's ResNet mapper applies (it checks isinstance ResNet / CifarResnet; here: the
    attributes that mapper reads)."""
    return (all(hasattr(model, a) for a in ("conv1", "bn1", "layer1", "layer2", "layer3", "fc"))
            and all(hasattr(b, "conv1") and hasattr(b, "conv2") for b in model.layer1.children()))


def hyper_edges(model: nn.Module, no_last_conv: bool = False) -> list[HyperEdge]:
    """Gator's hyper-edges of `model`, in Gator's order (module docstring)."""
    return _resnet_edges(model, no_last_conv) if is_resnet(model) else _naive_sequential_edges(model, no_last_conv)


def _bn_of(block: nn.Module, path: str, conv: str) -> str:
    """The BN aliasing a block conv's output (bn<i> after conv<i>), as the mapper's alias_map."""
    bn = "bn" + conv[len("conv"):]
    if not isinstance(getattr(block, bn, None), nn.BatchNorm2d):
        raise UserError(f"Gator's ResNet mapper expects {path}.{bn} (a BatchNorm2d) after {path}.{conv}")
    return f"{path}.{bn}"


def _resnet_edges(model: nn.Module, no_last_conv: bool) -> list[HyperEdge]:
    edges: list[HyperEdge] = []
    residual = HyperEdge("stem", ["bn1"], [], model.conv1.out_channels)
    stages = [f"layer{i}" for i in range(1, 5 if hasattr(model, "layer4") else 4)]
    for i, stage_name in enumerate(stages, start=1):
        for j, (bname, block) in enumerate(getattr(model, stage_name).named_children()):
            path = f"{stage_name}.{bname}"
            bottleneck = hasattr(block, "conv3")
            residual.in_modules.append(f"{path}.conv1")
            if j == 0 and (i > 1 or bottleneck):
                down = getattr(block, "downsample", None)
                if not isinstance(down, nn.Sequential) or len(down) < 2:
                    raise UserError(f"Gator's ResNet mapper expects {path}.downsample (conv, BN) here; "
                                    f"{type(model).__name__} has none")
                residual.in_modules.append(f"{path}.downsample.0")
                edges.append(residual)
                residual = HyperEdge(f"{stage_name}.residual", [f"{path}.downsample.1"], [], down[0].out_channels)
            convs = ["conv1", "conv2", "conv3"] if bottleneck else ["conv1", "conv2"]
            for a, b in zip(convs, convs[1:]):
                edges.append(HyperEdge(f"{path}.{a}->{b}", [_bn_of(block, path, a)], [f"{path}.{b}"],
                                       getattr(block, a).out_channels))
            residual.out_modules.append(_bn_of(block, path, convs[-1]))
    if not no_last_conv:
        residual.in_modules.append("fc")  # zero already (module docstring); lets the fold cut fc
        edges.append(residual)
    return edges


def _naive_sequential_edges(model: nn.Module, no_last_conv: bool) -> list[HyperEdge]:
    convs: list[tuple[str, nn.Conv2d]] = []
    alias: dict[str, str] = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            convs.append((name, m))
        elif isinstance(m, nn.BatchNorm2d) and convs:
            alias[convs[-1][0]] = name  # the last BN met after a conv wins, as in the mapper
    if not convs:
        raise UserError(f"Gator's hyper-edges: {type(model).__name__} has no Conv2d")
    edges = [HyperEdge(f"{a}->{b}", [alias.get(a, a)], [b], mb.in_channels)
             for (a, _), (b, mb) in zip(convs, convs[1:])]
    if not no_last_conv:
        last, m = convs[-1]
        edges.append(HyperEdge(last, [alias.get(last, last)], [], m.out_channels))
    return edges


def split_checkpoint(state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], GatorGates]:
    """Separate the base network's weights (`net.` prefix removed) from the gates, whose keep
    masks follow `ChannelsLogisticGatingMasked` (module docstring)."""
    base, active, weights = {}, {}, {}
    for key, value in state_dict.items():
        m = HOOK_KEY.match(key)
        if m:
            (active if m.group(2) == "active_channels_mask" else weights)[int(m.group(1))] = value
        elif key.startswith("net."):
            base[key[4:]] = value
        elif not key.startswith("forward_hooks."):
            base[key] = value
    indices = sorted(set(active) | set(weights))
    if indices != list(range(len(indices))):
        # with a gap, the first five missing indices lie below len(indices) + 5 (and below the
        # largest): no list of every index up to it (a damaged key can name gate 10**9)
        present = set(indices)
        missing = [i for i in range(min(len(indices) + 5, indices[-1])) if i not in present]
        raise UserError(f"Gator checkpoint: gates {missing[:5]} are missing (gate indices run 0..{max(indices)} "
                        "with gaps); the file is damaged or not written by Gator")
    for i, tensor in [*weights.items(), *active.items()]:
        if not isinstance(tensor, torch.Tensor) or tensor.is_complex():
            what = "a complex tensor" if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise UserError(f"Gator gate {i}: its gating tensors hold {what}, not real numbers")
    masks = {}
    for i in indices:
        w = weights.get(i)
        if w is not None and not torch.isfinite(w.float()).all():
            raise UserError(f"Gator gate {i}: gating_weights hold NaN or Inf")
        keep = None if w is None else w.reshape(-1).float() >= 0
        if i in active:
            a = active[i].reshape(-1).float()
            if not ((a == 0) | (a == 1)).all():
                raise UserError(f"Gator gate {i}: active_channels_mask holds values other than 0 and 1")
            if keep is not None and keep.numel() != a.numel():
                raise UserError(f"Gator gate {i}: gating_weights has {keep.numel()} channels, "
                                f"active_channels_mask {a.numel()}")
            keep = a.bool() if keep is None else a.bool() & keep
        masks[i] = keep
    rule = ("active_channels_mask and gating_weights >= 0 (ChannelsLogisticGatingMasked)" if len(active) == len(indices)
            else "gating_weights >= 0 (no active_channels_mask stored: the unmasked, stochastic gate's "
                 "deterministic keep set)")
    return base, GatorGates(masks, rule)


def parse_no_last_conv(flag: str | None, config: str | None) -> bool | None:
    """`no_last_conv` as the user states it: --gator-no-last-conv, or Gator's own gating config
    JSON (--gator-config, the file given to Gator's --gating_config_path, whose keys are the
    wrapper's keyword arguments; absent there means the seed's default, False). None: unstated."""
    stated = None
    if flag is not None:
        if flag.lower() not in ("true", "false"):
            raise UserError(f"--gator-no-last-conv takes true or false, not {flag!r}")
        stated = flag.lower() == "true"
    if config is not None:
        try:
            cfg = json.loads(Path(config).read_text())
        except (OSError, ValueError) as exc:
            raise UserError(f"--gator-config {config}: not a readable JSON file ({exc})") from None
        if not isinstance(cfg, dict):
            raise UserError(f"--gator-config {config}: expected Gator's gating config (a JSON object)")
        value = cfg.get("no_last_conv", False)
        if not isinstance(value, bool):
            raise UserError(f"--gator-config {config}: no_last_conv must be true or false, not {value!r}")
        if stated is not None and stated != value:
            raise UserError(f"--gator-no-last-conv {flag} contradicts no_last_conv={value} in {config}")
        stated = value
    return stated


def resolve_edges(model: nn.Module, n_gates: int, no_last_conv: bool | None) -> tuple[list[HyperEdge], bool]:
    """The hyper-edges the checkpoint's `n_gates` gates belong to, and the no_last_conv that
    gives them: the stated one (checked against the count), else the one the count fits."""
    options = [no_last_conv] if no_last_conv is not None else [False, True]
    for option in options:
        edges = hyper_edges(model, option)
        if len(edges) == n_gates:
            return edges, option
    counts = {opt: len(hyper_edges(model, opt)) for opt in (False, True)}
    mapper = "ResNet" if is_resnet(model) else "naive sequential"
    fits = [opt for opt, c in counts.items() if c == n_gates]
    hint = (f"; it fits --gator-no-last-conv {str(fits[0]).lower()}" if fits else
            ": does --model build the architecture Gator wrapped?")
    raise UserError(f"Gator checkpoint has {n_gates} gates; Gator's {mapper} mapper gives {type(model).__name__} "
                    f"{counts[False]} hyper-edges (no_last_conv false) or {counts[True]} (true)"
                    + (f", and no_last_conv was stated {str(no_last_conv).lower()}" if no_last_conv is not None else "")
                    + hint)


def mask_specs(model: nn.Module, gates: GatorGates, no_last_conv: bool | None = None) -> tuple[list[MaskSpec], dict]:
    """One MaskSpec per (module, side) of every hyper-edge, and the report's summary."""
    edges, no_last_conv = resolve_edges(model, len(gates.masks), no_last_conv)
    modules = dict(model.named_modules())
    specs = []
    for i, edge in enumerate(edges):
        mask = gates.masks[i]
        if mask.numel() != edge.channels:
            raise UserError(f"Gator gate {i} has {mask.numel()} channels, but hyper-edge {i} of Gator's order "
                            f"({edge.name}) has {edge.channels}: does --model match the trained architecture?")
        for module in edge.out_modules + edge.in_modules:
            if module not in modules:
                raise UserError(f"Gator hyper-edge {i} ({edge.name}) names {module}, which the model lacks")
        for module in edge.out_modules:
            specs.append(MaskSpec(module, "out", mask.float(), f"gator edge {i} {edge.name}"))
        for module in edge.in_modules:
            specs.append(MaskSpec(module, "in", mask.float(), f"gator edge {i} {edge.name}"))
    summary = {"edges": len(edges), "mapper": "ResNet" if is_resnet(model) else "naive sequential",
               "no_last_conv": no_last_conv, "mask_rule": gates.mask_rule,
               "edge_names": [e.name for e in edges],
               "kept_channels": [int(gates.masks[i].sum()) for i in range(len(edges))]}
    return specs, summary


def make_gator_checkpoint(path, keep: float, seed: int = 0, arch: str = "resnet18",
                          ddp_prefix: bool = False) -> list[torch.Tensor]:
    """Write a torchvision model wrapped the way Gator saves it, with random weights,
    non-trivial BN statistics and random gates keeping about `keep` of each hyper-edge; returns
    the keep masks in hook order. `ddp_prefix` adds DataParallel's `module.` prefix. For the
    demo and benchmarks; tests of the importer build their checkpoints independently
    (tests/test_gator_seed.py)."""
    import torchvision

    gen = torch.Generator().manual_seed(seed)
    model = getattr(torchvision.models, arch)()
    for m in model.modules():  # non-trivial BN statistics, so folding mistakes would show
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1, generator=gen)
            m.running_var.uniform_(0.5, 1.5, generator=gen)
            m.weight.data.uniform_(0.5, 1.5, generator=gen)
            m.bias.data.normal_(0, 0.1, generator=gen)
    state = {f"net.{k}": v for k, v in model.state_dict().items()}
    masks = []
    for i, edge in enumerate(hyper_edges(model)):
        logits = torch.randn(edge.channels, generator=gen) + torch.special.logit(torch.tensor(keep))
        state[GATE_KEY.format(index=i, field="gating_weights")] = logits
        state[GATE_KEY.format(index=i, field="active_channels_mask")] = (logits >= 0).float()
        masks.append(logits >= 0)
    if ddp_prefix:
        state = {f"module.{k}": v for k, v in state.items()}
    torch.save({"epoch": 90, "arch": arch, "state_dict": state, "best_acc1": 0.0, "optimizer": {}}, path)
    return masks
