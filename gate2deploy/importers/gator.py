"""Gator checkpoints (seed 002): hard channel gates on hyper-edges.

Checkpoint layout, exactly as Gator saves it (gating-semantics.md §2): a dict with `epoch,
arch, state_dict, best_acc1, optimizer` whose `state_dict` holds the wrapped net's weights
under `net.<module path>` and, per hyper-edge i, `forward_hooks.<i>.gating_module.
gating_weights` and `.active_channels_mask` (`module.` prefixes from DDP are stripped by the
loader). Recognised from those keys alone.

A hyper-edge is the set of (module, side) pairs sharing one gate: "out" multiplies the output
of the BatchNorm after a conv, "in" multiplies a consuming conv's (or fc's) input. The export
uses the permanent `active_channels_mask` (a channel with gating_weights < 0 was pruned and is
never re-enabled); the stochastic training gate is never sampled.

Hyper-edge order for torchvision ResNets (Gator's GatesModulesMapper order; 37 edges for
ResNet-50): [0] the stem (conv1's BN out; layer1.0's conv1 and downsample in), then per stage
the inner edges of each block in block order (conv1->conv2, then conv2->conv3 for
bottlenecks), then the stage's residual edge (its downsample BN out, every block's last BN
out, the first-conv input of its later blocks, the next stage's first conv and downsample
inputs; for layer4 the fc input). A stage without a downsample (layer1 of ResNet-18/34) has
no residual edge of its own: its residual stream is the stem's, so its members join edge 0.
For torchvision VGG (`features` Sequential) each conv is one edge: its BN out (or the conv's
own output without BN) and the next conv's input.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

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


def is_gator(state_dict: dict) -> bool:
    return any(HOOK_KEY.match(k) for k in state_dict)


def hyper_edges(model: nn.Module) -> list[HyperEdge]:
    """Gator's hyper-edges of a torchvision ResNet or VGG, in Gator's order."""
    if all(hasattr(model, a) for a in ("conv1", "bn1", "layer1", "layer4", "fc")):
        return _resnet_edges(model)
    if isinstance(getattr(model, "features", None), nn.Sequential):
        return _sequential_edges(model)
    raise UserError(
        f"Gator hyper-edges are known for torchvision ResNets and VGGs, not {type(model).__name__}; "
        "convert the gates to gate2deploy.nn.ChannelMask modules in your model instead")


def _resnet_edges(model: nn.Module) -> list[HyperEdge]:
    stem = HyperEdge("stem", ["bn1"], [], model.bn1.num_features)
    edges = [stem]
    residual = stem  # the edge carrying the current residual stream
    stages = [f"layer{i}" for i in range(1, 5)]
    for stage_name in stages:
        stage = getattr(model, stage_name)
        blocks = list(stage.named_children())
        first = f"{stage_name}.{blocks[0][0]}"
        residual.in_modules.append(f"{first}.conv1")
        if blocks[0][1].downsample is not None:
            residual.in_modules.append(f"{first}.downsample.0")
            stage_edge = HyperEdge(f"{stage_name}.residual", [f"{first}.downsample.1"])
        else:
            stage_edge = residual  # no downsample: the stream continues on the same edge
        inner_edges = []
        for idx, (bname, block) in enumerate(blocks):
            path = f"{stage_name}.{bname}"
            convs = sorted(n for n, m in block.named_children() if re.fullmatch(r"conv\d", n))
            for a, b in zip(convs, convs[1:]):
                bn = f"{path}.bn{a[-1]}"
                inner_edges.append(HyperEdge(f"{path}.{a}->{b}", [bn], [f"{path}.{b}"],
                                             getattr(block, f"bn{a[-1]}").num_features))
            last_bn = f"{path}.bn{convs[-1][-1]}"
            stage_edge.out_modules.append(last_bn)
            stage_edge.channels = getattr(block, f"bn{convs[-1][-1]}").num_features
            if idx > 0:
                stage_edge.in_modules.append(f"{path}.conv1")
        edges.extend(inner_edges)
        if stage_edge is not residual:
            edges.append(stage_edge)
        residual = stage_edge
    residual.in_modules.append("fc")
    return edges


def _sequential_edges(model: nn.Module) -> list[HyperEdge]:
    items = list(model.features.named_children())
    convs = [(i, name) for i, (name, m) in enumerate(items) if isinstance(m, nn.Conv2d)]
    edges = []
    for n, (i, name) in enumerate(convs):
        nxt = items[i + 1] if i + 1 < len(items) else None
        out = f"features.{nxt[0]}" if nxt is not None and isinstance(nxt[1], nn.BatchNorm2d) else f"features.{name}"
        ins = [f"features.{convs[n + 1][1]}"] if n + 1 < len(convs) else []
        edges.append(HyperEdge(f"features.{name}", [out], ins, items[i][1].out_channels))
    return edges


def split_checkpoint(state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[int, torch.Tensor]]:
    """Separate the base network's weights (`net.` prefix removed) from the gate masks."""
    base, masks, weights = {}, {}, {}
    for key, value in state_dict.items():
        m = HOOK_KEY.match(key)
        if m:
            (masks if m.group(2) == "active_channels_mask" else weights)[int(m.group(1))] = value
        elif key.startswith("net."):
            base[key[4:]] = value
        elif not key.startswith("forward_hooks."):
            base[key] = value
    for i, w in weights.items():
        masks.setdefault(i, w >= 0)  # older checkpoints without the permanent mask
    return base, masks


def mask_specs(model: nn.Module, masks: dict[int, torch.Tensor]) -> list[MaskSpec]:
    """One MaskSpec per (module, side) of every hyper-edge."""
    edges = hyper_edges(model)
    if sorted(masks) != list(range(len(edges))):
        raise UserError(
            f"Gator checkpoint has {len(masks)} gates but {type(model).__name__} has {len(edges)} "
            "hyper-edges: does --model match the trained architecture?")
    specs = []
    for i, edge in enumerate(edges):
        mask = masks[i].reshape(-1).bool()
        if mask.numel() != edge.channels:
            raise UserError(f"Gator gate {i} ({edge.name}) has {mask.numel()} channels, "
                            f"the model has {edge.channels} there")
        for module in edge.out_modules:
            specs.append(MaskSpec(module, "out", mask.float(), f"gator edge {i} {edge.name}"))
        for module in edge.in_modules:
            specs.append(MaskSpec(module, "in", mask.float(), f"gator edge {i} {edge.name}"))
    return specs


def make_gator_checkpoint(path, keep: float, seed: int = 0, arch: str = "resnet18",
                          ddp_prefix: bool = False) -> list[torch.Tensor]:
    """Write a torchvision model wrapped the way Gator saves it (the layout this module
    reads), with random weights, non-trivial BN statistics and random gates keeping about
    `keep` of each hyper-edge; returns the gate masks in hyper-edge order. `ddp_prefix` adds
    DataParallel's `module.` prefix. For the demo, tests and benchmarks."""
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
        state[GATE_KEY.format(index=i, field="active_channels_mask")] = logits >= 0
        masks.append(logits >= 0)
    if ddp_prefix:
        state = {f"module.{k}": v for k, v in state.items()}
    torch.save({"epoch": 90, "arch": arch, "state_dict": state, "best_acc1": 0.0, "optimizer": {}}, path)
    return masks
