"""Drop-in gating modules for users who build new models, and the exportable mask op.

`ChannelMask` and `HardChannelGate` are static masks: at deployment their zero channels are
removed by the fold pass. In PyTorch they multiply channel `c` (axis 1) by `mask[c]`; when
captured to ONNX they become one `gate2deploy::ChannelMask(x, mask)` node (attribute
`source` names where the mask came from), which the passes recognise without guessing at
ordinary `Mul` nodes.

`attach_masks` puts masks on an existing model without editing its code: an "out" mask
multiplies a module's output, an "in" mask its (first) input. This is how the Gator and
network-slimming importers express their gates.

The dynamic gates (Channel Gating, Precision Gating, FBS) live in `gate2deploy.gated` and are
re-exported here, so `gate2deploy.nn` is the one place to take drop-in modules from.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .ops import DOMAIN as MASK_DOMAIN


def _broadcast(mask: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return mask.to(x.dtype).view(1, -1, *([1] * (x.dim() - 2)))


class _ChannelMaskFn(torch.autograd.Function):
    """x * mask over axis 1; exported as gate2deploy::ChannelMask."""

    @staticmethod
    def forward(ctx, x, mask, source):  # noqa: D401 - torch API
        ctx.save_for_backward(mask)
        return x * _broadcast(mask, x)

    @staticmethod
    def backward(ctx, grad):
        (mask,) = ctx.saved_tensors
        return grad * _broadcast(mask, grad), None, None

    @staticmethod
    def symbolic(g, x, mask, source):
        out = g.op(f"{MASK_DOMAIN}::ChannelMask", x, mask, source_s=source)
        out.setType(x.type())
        return out


def channel_mask(x: torch.Tensor, mask: torch.Tensor, source: str = "") -> torch.Tensor:
    """Multiply channel c of `x` (axis 1) by `mask[c]`; exportable as one ONNX node."""
    if mask.dim() != 1 or x.dim() < 2 or x.shape[1] != mask.numel():
        raise ValueError(
            f"channel mask of shape {tuple(mask.shape)} does not fit a tensor of shape "
            f"{tuple(x.shape)} at {source or 'mask'}"
        )
    return _ChannelMaskFn.apply(x, mask, source)


class ChannelMask(nn.Module):
    """A fixed 0/1 mask over channels (axis 1). Zero channels are removed at export."""

    def __init__(self, mask: torch.Tensor | int):
        super().__init__()
        if isinstance(mask, int):
            mask = torch.ones(mask)
        self.register_buffer("mask", mask.detach().float().clone())

    def forward(self, x):
        return channel_mask(x, self.mask, self._source_name)

    _source_name = "ChannelMask"


class HardChannelGate(nn.Module):
    """A learned hard gate per channel, deterministic at deployment.

    Training (as in Gator): logistic noise + sigmoid with a straight-through 0/1 estimate.
    Evaluation and export use the deterministic gate `gating_weights >= 0` AND the permanent
    `active_channels_mask` (a channel once pruned is never re-enabled).
    """

    def __init__(self, channels: int, init_logit: float = 3.0):
        super().__init__()
        self.gating_weights = nn.Parameter(torch.full((channels,), float(init_logit)))
        self.register_buffer("active_channels_mask", torch.ones(channels, dtype=torch.bool))

    def deterministic_mask(self) -> torch.Tensor:
        return (self.active_channels_mask & (self.gating_weights >= 0)).float()

    def forward(self, x):
        if self.training:
            u = torch.rand_like(self.gating_weights).clamp(1e-6, 1 - 1e-6)
            soft = torch.sigmoid(self.gating_weights + torch.log(u) - torch.log1p(-u))
            hard = (soft > 0.5).float()
            gate = (hard - soft).detach() + soft
            gate = gate * self.active_channels_mask.float()
            return x * _broadcast(gate, x)
        # A fresh tensor from Python values: the exporter records the mask as a constant,
        # not as the ops that compute it from the parameters.
        return channel_mask(x, torch.tensor(self.deterministic_mask().tolist()), "HardChannelGate")


@dataclass(frozen=True)
class MaskSpec:
    """One static mask: `side` "out" multiplies `module`'s output, "in" its first input."""

    module: str
    side: str
    mask: torch.Tensor
    source: str  # human-readable origin, e.g. "gator edge 3" or "netslim layer1.0.bn1"

    @property
    def label(self) -> str:
        """What the captured ChannelMask node carries as its `source` attribute."""
        return f"{self.source} ({self.side} {self.module})"


def attach_masks(model: nn.Module, specs: list[MaskSpec]) -> list:
    """Register hooks applying `specs` to `model`; returns the handles (call .remove())."""
    modules = dict(model.named_modules())
    handles = []
    for spec in specs:
        if spec.module not in modules:
            raise KeyError(f"mask target {spec.module!r} is not a module of the model")
        mod = modules[spec.module]
        mask, label = spec.mask.detach().float(), spec.label
        if spec.side == "out":
            handles.append(mod.register_forward_hook(
                lambda m, i, o, mask=mask, label=label: channel_mask(o, mask, label)))
        elif spec.side == "in":
            handles.append(mod.register_forward_pre_hook(
                lambda m, i, mask=mask, label=label: (channel_mask(i[0], mask, label), *i[1:])))
        else:
            raise ValueError(f"mask side must be 'in' or 'out', not {spec.side!r}")
    return handles


# Re-exported drop-in dynamic gates (defined in gate2deploy.gated, which needs nothing from here).
from .gated import CGConv2d, FBSConv2d, PactReLU, PGConv2d, QuantizedConv2d  # noqa: E402,F401
