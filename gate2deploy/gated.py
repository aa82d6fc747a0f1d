"""Dynamic gating layers: drop-in PyTorch modules with the seed semantics, each exported as
ONE `gate2deploy` ONNX node (runtimes/OPS.md).

- `CGConv2d`: Channel Gating (dnn-gating, gating-semantics.md §3) -> `gate2deploy::CGConv`.
- `PGConv2d`: Precision Gating (dnn-gating, §4) -> `gate2deploy::PGConv`; with `PactReLU`
  (PACT clipping, learned `upper_bound`) and `QuantizedConv2d` (the seed's statically
  quantized conv, which exports as standard ONNX ops).
- `FBSConv2d`: Feature Boosting and Suppression (Mayo `_gate`, policy parametric, §5; online
  top-k or a fixed threshold, pools avg/max/l1/l2, activation relu or none) ->
  `gate2deploy::FBSConv`; the conv, its affine-free BatchNorm, the saliency predictor and the
  activation are one module and one node.

State-dict keys and shapes equal the seed's (`weight`, `mask`, `threshold` [1, O, 1, 1],
`bn.running_mean/var/num_batches_tracked` for CG; `weight`, `threshold` for PG;
`upper_bound` for PACT), so seed checkpoints load unchanged.

In eval mode each module's forward is the seed's eval forward, operation for operation (the
gate compares `sigmoid(alpha * (z - delta))` with 0.5 exactly as the seed does). The exported
node states the same function in its folded form (CG: the BatchNorm folded into a threshold on
the partial sum; PG: the weights quantized at export; FBS: the BatchNorm as scale and shift);
the two agree except where a value sits within float rounding of a gate's threshold (a tie),
which tests count as flipped gates.

Training works as in the seed (straight-through estimators for round/floor/clamp and the gate),
so new models can be trained with these modules; the export path is eval-only.

Gate statistics: set `module.gate_counter = GateCounter()` (see `gate2deploy.gate_stats`) and
eval forwards accumulate how many gates were on.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .errors import UserError
from .ops import DOMAIN

__all__ = ["CGConv2d", "PGConv2d", "FBSConv2d", "PactReLU", "QuantizedConv2d", "GateCounter",
           "GATED_TYPES", "channel_shuffle", "quantize_sign_magnitude", "truncate_msb"]


@dataclass
class GateCounter:
    """Running totals of one gated layer's decisions over eval forwards."""

    gates_on: float = 0.0       # CG/PG: output elements computed fully; FBS: active channels
    gates_total: float = 0.0
    samples: int = 0
    in_density_x_out_density: float = 0.0  # FBS: sum over samples of in_density * out_density

    def fraction_on(self) -> float:
        return self.gates_on / self.gates_total if self.gates_total else float("nan")


# --------------------------------------------------------------------------- helpers

def _ste(fn, x: torch.Tensor) -> torch.Tensor:
    """fn(x) in the forward, identity gradient (the seed's Round/Floor/Clamp backward)."""
    if not x.requires_grad:
        return fn(x)
    return x + (fn(x) - x).detach()


def _gate_greater(z: torch.Tensor, threshold, sparse: bool = False) -> torch.Tensor:
    """float(z > threshold) with an identity gradient (the seed's GreaterThan), or with
    `sparse` the gradient zeroed where z < threshold (the seed's SparseGreaterThan, chosen by
    its `sparse_bp`; cg_utils.py / pg_utils.py)."""
    hard = torch.gt(z, threshold).float()
    if not z.requires_grad:
        return hard
    through = z * (z >= threshold).float() if sparse else z
    return through + (hard - through).detach()


def onnx_conv_attributes(conv: nn.Conv2d) -> dict[str, list[int]]:
    """ONNX Conv attributes (strides, pads top/left/bottom/right, dilations) of a torch conv."""
    if isinstance(conv.padding, str):
        raise UserError(f"{type(conv).__name__}: padding={conv.padding!r} is not supported at export; use ints")
    if conv.padding_mode != "zeros":
        raise UserError(f"{type(conv).__name__}: padding_mode={conv.padding_mode!r} is not supported; only 'zeros'")
    ph, pw = conv.padding
    return {"strides": list(conv.stride), "pads": [ph, pw, ph, pw], "dilations": list(conv.dilation)}


def _conv_out_type(g, x, weight_shape, attrs):
    """The TorchScript type of an op's conv-shaped output (for the exporter's bookkeeping)."""
    sizes = x.type().sizes() if hasattr(x.type(), "sizes") else None
    if sizes is None or any(s is None for s in sizes):
        return x.type()
    n, _, h, w = sizes
    kh, kw = weight_shape[2], weight_shape[3]
    (sh, sw), (pt, pl, pb, pr), (dh, dw) = attrs["strides"], attrs["pads"], attrs["dilations"]
    ho = (h + pt + pb - dh * (kh - 1) - 1) // sh + 1
    wo = (w + pl + pr - dw * (kw - 1) - 1) // sw + 1
    return x.type().with_sizes([n, weight_shape[0], ho, wo])


def _exporting() -> bool:
    return torch.onnx.is_in_onnx_export()


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """(N, C, H, W) -> view (N, groups, C/groups, H, W), swap axes 1 and 2, flatten (the seed's)."""
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).contiguous().view(n, -1, h, w)


# --------------------------------------------------------------------------- quantizers

def quantize_sign_magnitude(x: torch.Tensor, bits: int, scale: torch.Tensor | float | None = None) -> torch.Tensor:
    """The seed's TorchQuantize: bits 0 = float, 1 = binarize, else sign-magnitude with a
    per-tensor scale (max|x| + 1e-7 over the whole tensor unless `scale` is given), round half
    to even. Operation order as the seed's TorchRoundToBits."""
    if bits == 0:
        return x
    if bits == 1:
        y = _ste(lambda t: torch.clamp(t, -1.0, 1.0), x)
        y = (y + 1.0) / 2.0
        y = _ste(torch.round, y)
        return y * 2.0 - 1.0
    sign = torch.sign(x).detach()
    mag = torch.abs(x)
    s = (torch.max(mag).detach() + 1e-7) if scale is None else scale
    mag = _ste(lambda t: torch.clamp(t, 0.0, 1.0), mag / s)
    levels = 2.0 ** bits - 1.0
    mag = _ste(torch.round, mag * levels) / levels
    return mag * s * sign


def truncate_msb(x: torch.Tensor, bits: int, msb_bits: int, scale: torch.Tensor | float | None = None) -> torch.Tensor:
    """The seed's TorchTruncate: quantize to `bits`, keep the `msb_bits` most significant."""
    sign = torch.sign(x).detach()
    mag = torch.abs(x)
    s = (torch.max(mag).detach() + 1e-7) if scale is None else scale
    mag = _ste(lambda t: torch.clamp(t, 0.0, 1.0), mag / s)
    mag = _ste(torch.round, mag * (2.0 ** bits - 1.0))
    unit = 2 ** (bits - msb_bits) * 1.0
    mag = _ste(torch.floor, mag / unit)
    mag = mag * unit
    mag = mag / (2.0 ** bits - 1.0)
    return mag * s * sign


# --------------------------------------------------------------------------- PACT

class _PactClip(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, upper_bound):
        ctx.save_for_backward(x, upper_bound)
        return torch.clamp(x, 0, upper_bound.data)

    @staticmethod
    def backward(ctx, grad):
        x, ub = ctx.saved_tensors
        grad_x = grad.clone()
        grad_x[x < 0] = 0
        grad_x[x > ub] = 0
        grad_ub = grad.clone()
        grad_ub[x <= ub] = 0
        return grad_x, grad_ub.sum()


class PactReLU(nn.Module):
    """PACT: clamp(x, 0, upper_bound) with a learned scalar `upper_bound` (key shape [])."""

    def __init__(self, upper_bound: float = 6.0):
        super().__init__()
        self.upper_bound = nn.Parameter(torch.tensor(upper_bound))

    def forward(self, x):
        if self.training and torch.is_grad_enabled():
            return _PactClip.apply(x, self.upper_bound)
        # Exact same values as clamp(x, 0, ub); exports as Relu + Min with an initializer.
        return torch.minimum(torch.relu(x), self.upper_bound.detach().to(x.dtype))


# --------------------------------------------------------------------------- QuantizedConv2d

class QuantizedConv2d(nn.Conv2d):
    """The seed's QuantizedConv2d: conv(quant_a(x), quant_w(W) * rescale) with dynamic
    per-tensor activation scale. Exports as standard ONNX ops, the weights quantized once."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1,
                 groups=1, bias=True, padding_mode="zeros", wbits=0, abits=0):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation,
                         groups, bias, padding_mode)
        self.wbits, self.abits = int(wbits), int(abits)
        k = kernel_size if isinstance(kernel_size, int) else kernel_size[0]
        self.weight_rescale = math.sqrt(1.0 / (k ** 2 * in_channels)) if self.wbits == 1 else 1.0
        self.static_scale: float = 0.0  # > 0: calibrated activation scale instead of max|x|

    def quantized_weight(self) -> torch.Tensor:
        if _exporting():  # a constant in the exported graph, not quantizer ops on the initializer
            with torch.no_grad():
                return quantize_sign_magnitude(self.weight.data, self.wbits) * self.weight_rescale
        return quantize_sign_magnitude(self.weight, self.wbits) * self.weight_rescale

    def forward(self, x):
        scale = float(self.static_scale) if self.static_scale and self.static_scale > 0 else None
        return F.conv2d(quantize_sign_magnitude(x, self.abits, scale), self.quantized_weight(), self.bias,
                        self.stride, self.padding, self.dilation, self.groups)


# --------------------------------------------------------------------------- CG

def _cg_seed_eval(x, weight, mask, threshold, running_mean, running_var, eps, alpha,
                  stride, padding, dilation, groups, counter=None):
    yp = F.conv2d(x, weight * mask, None, stride, padding, dilation, groups)
    bn = F.batch_norm(yp, running_mean, running_var, None, None, False, 0.0, eps)
    d = _gate_greater(torch.sigmoid(alpha * (bn - threshold)) - 0.5 * torch.ones_like(yp), 0.0)
    if counter is not None:
        counter.gates_on += float(d.sum())
        counter.gates_total += d.numel()
        counter.samples += x.shape[0]
    y = F.conv2d(x, weight, None, stride, padding, dilation, groups)
    return y * d + yp * (torch.ones_like(d) - d)


class _CGConvFn(torch.autograd.Function):
    """Eval-mode CG as one node. Forward: the seed's formula; symbolic: gate2deploy::CGConv
    with the BatchNorm folded into `threshold` and the mask reduced to [O, C]."""

    @staticmethod
    def forward(ctx, x, weight, mask, threshold, running_mean, running_var, base_mask,
                folded_threshold, eps, alpha, conv_args, onnx_attrs):
        return _cg_seed_eval(x, weight, mask, threshold, running_mean, running_var, eps, alpha,
                             *conv_args)

    @staticmethod
    def symbolic(g, x, weight, mask, threshold, running_mean, running_var, base_mask,
                 folded_threshold, eps, alpha, conv_args, onnx_attrs):
        out = g.op(f"{DOMAIN}::CGConv", x, weight, base_mask, folded_threshold,
                   strides_i=onnx_attrs["strides"], pads_i=onnx_attrs["pads"],
                   dilations_i=onnx_attrs["dilations"])
        out.setType(_conv_out_type(g, x, onnx_attrs["weight_shape"], onnx_attrs))
        return out


class CGConv2d(nn.Conv2d):
    """Channel Gating conv (dnn-gating `CGConv2d`, same constructor and state-dict keys).

    out = where(gate, conv(x, W), conv(x, W * mask)) per output element, where the gate is
    BN_noaffine(partial sum) > threshold (compared as the seed: sigmoid(alpha * (.)) > 0.5).
    The base path (`mask`) uses 1/p of the input channels: the first I/p (use_group=False) or
    block-diagonal chunks (use_group=True). `shuffle` permutes the input channels first.
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1,
                 groups=1, bias=False, padding_mode="zeros", sparse_bp=False, use_group=False,
                 shuffle=False, p=4, th=-6.0, alpha=2.0):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation,
                         groups, bias, padding_mode)
        self.p, self.th, self.alpha = int(p), float(th), float(alpha)
        self.use_group, self.shuffle, self.sparse_bp = bool(use_group), bool(shuffle), bool(sparse_bp)
        self.bn = nn.BatchNorm2d(out_channels, affine=False)
        kh, kw = self.kernel_size
        in_chunk, out_chunk = int(in_channels / self.p), int(out_channels / self.p)
        mask = torch.zeros(out_channels, in_channels // groups, kh, kw)
        if use_group:
            for i in range(self.p):
                mask[i * out_chunk:(i + 1) * out_chunk, i * in_chunk:(i + 1) * in_chunk] = 1.0
        else:
            mask[:, :in_chunk] = 1.0
        # A Parameter without gradient, as the seed: the key `mask` is in its checkpoints.
        self.mask = nn.Parameter(mask, requires_grad=False)
        self.threshold = nn.Parameter(self.th * torch.ones(1, out_channels, 1, 1))
        self.gate_counter: GateCounter | None = None

    def _conv_args(self):
        return (self.stride, self.padding, self.dilation, self.groups)

    def forward(self, x):
        if self.shuffle:
            x = channel_shuffle(x, self.p)
        if self.training:
            yp = F.conv2d(x, self.weight * self.mask, self.bias, *self._conv_args())
            z = torch.sigmoid(self.alpha * (self.bn(yp) - self.threshold)) - 0.5 * torch.ones_like(yp)
            d = _gate_greater(z, 0.0, self.sparse_bp)
            y = F.conv2d(x, self.weight, self.bias, *self._conv_args())
            return y * d + yp * (torch.ones_like(d) - d)
        if self.bias is not None:
            raise UserError("CGConv2d with bias is not supported (the seed sets bias=False)")
        if not _exporting():
            return _cg_seed_eval(x, self.weight, self.mask, self.threshold, self.bn.running_mean,
                                 self.bn.running_var, self.bn.eps, self.alpha, *self._conv_args(),
                                 counter=self.gate_counter)
        base_mask, folded = self.export_constants()
        attrs = dict(onnx_conv_attributes(self), weight_shape=tuple(self.weight.shape))
        return _CGConvFn.apply(x, self.weight, self.mask, self.threshold, self.bn.running_mean,
                               self.bn.running_var, base_mask, folded, self.bn.eps, self.alpha,
                               self._conv_args(), attrs)

    def export_constants(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(base_mask [O, C], threshold [O] = rm + delta * sqrt(rv + eps)) for CGConv."""
        if self.groups != 1:
            raise UserError("CGConv2d with groups != 1 cannot be exported (the CGConv op has no groups)")
        if not self.alpha > 0:
            raise UserError(f"CGConv2d alpha must be > 0 to export (gate sigmoid(alpha*z) > 0.5), not {self.alpha}")
        with torch.no_grad():
            mask = self.mask.data
            base = mask[:, :, 0, 0]
            if not torch.equal(mask, base[:, :, None, None].expand_as(mask)):
                raise UserError("CGConv2d mask varies over the kernel window; CGConv needs a per-channel base path")
            if not torch.all((base == 0) | (base == 1)):
                raise UserError("CGConv2d mask must be 0/1")
            rm, rv = self.bn.running_mean.data, self.bn.running_var.data
            folded = rm + self.threshold.data.reshape(-1) * torch.sqrt(rv + self.bn.eps)
        return base.clone().float(), folded.float()


# --------------------------------------------------------------------------- PG

def _pg_seed_eval(x, wq, threshold, abits, pred_bits, alpha, scale, stride, padding, dilation,
                  groups, counter=None, sparse=False):
    x_hb = truncate_msb(x, abits, pred_bits, scale)
    out_msb = F.conv2d(x_hb, wq, None, stride, padding, dilation, groups)
    gate = _gate_greater(torch.sigmoid(alpha * (out_msb - threshold)), 0.5, sparse)
    if counter is not None:
        counter.gates_on += float(gate.sum())
        counter.gates_total += gate.numel()
        counter.samples += x.shape[0]
    out_lsb = F.conv2d(quantize_sign_magnitude(x, abits, scale) - x_hb, wq, None, stride, padding,
                       dilation, groups)
    return out_msb + gate * out_lsb


class _PGConvFn(torch.autograd.Function):
    """Eval-mode PG as one node. Forward: the seed's formula; symbolic: gate2deploy::PGConv
    with the quantized weights as a constant."""

    @staticmethod
    def forward(ctx, x, wq, threshold, folded_threshold, abits, pred_bits, alpha, scale,
                conv_args, onnx_attrs):
        return _pg_seed_eval(x, wq, threshold, abits, pred_bits, alpha, scale, *conv_args)

    @staticmethod
    def symbolic(g, x, wq, threshold, folded_threshold, abits, pred_bits, alpha, scale,
                 conv_args, onnx_attrs):
        out = g.op(f"{DOMAIN}::PGConv", x, wq, folded_threshold,
                   abits_i=int(abits), pred_bits_i=int(pred_bits),
                   static_scale_f=float(scale) if scale is not None else 0.0,
                   strides_i=onnx_attrs["strides"], pads_i=onnx_attrs["pads"],
                   dilations_i=onnx_attrs["dilations"], group_i=int(conv_args[3]))
        out.setType(_conv_out_type(g, x, onnx_attrs["weight_shape"], onnx_attrs))
        return out


class PGConv2d(nn.Conv2d):
    """Precision Gating conv (dnn-gating `PGConv2d`, same constructor and state-dict keys).

    out = out_msb + gate * out_lsb, out_msb = conv(MSB part of x, W_q), gate = out_msb > delta
    (compared as the seed: sigmoid(alpha * (out_msb - delta)) > 0.5), out_lsb = conv(LSB part).
    Activations are quantized to `abits` with a dynamic per-tensor scale (max|x| over the whole
    batch), or with `static_scale` when it is > 0 (set by `gate_stats.calibrate_pg_scales`;
    not part of the state dict, so checkpoints keep the seed's keys).
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1,
                 groups=1, bias=False, padding_mode="zeros", wbits=8, abits=8, pred_bits=4,
                 sparse_bp=False, alpha=5):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation,
                         groups, bias, padding_mode)
        if not (int(abits) > 0 and 0 < int(pred_bits) < int(abits)):
            raise ValueError(f"PGConv2d needs 0 < pred_bits < abits, not pred_bits={pred_bits}, abits={abits}")
        self.wbits, self.abits, self.pred_bits = int(wbits), int(abits), int(pred_bits)
        self.alpha, self.sparse_bp = float(alpha), bool(sparse_bp)
        k = kernel_size if isinstance(kernel_size, int) else kernel_size[0]
        self.weight_rescale = math.sqrt(1.0 / (k ** 2 * in_channels)) if self.wbits == 1 else 1.0
        self.threshold = nn.Parameter(torch.zeros(1, out_channels, 1, 1))
        self.static_scale: float = 0.0
        self.gate_counter: GateCounter | None = None

    def quantized_weight(self) -> torch.Tensor:
        if _exporting():  # a constant in the exported graph (quantization is static)
            with torch.no_grad():
                return quantize_sign_magnitude(self.weight.data, self.wbits) * self.weight_rescale
        return quantize_sign_magnitude(self.weight, self.wbits) * self.weight_rescale

    def _scale(self):
        return float(self.static_scale) if self.static_scale and self.static_scale > 0 else None

    def forward(self, x):
        if self.bias is not None:
            raise UserError("PGConv2d with bias is not supported (the seed requires bias=False)")
        conv_args = (self.stride, self.padding, self.dilation, self.groups)
        if not _exporting():
            counter = None if self.training else self.gate_counter
            return _pg_seed_eval(x, self.quantized_weight(), self.threshold, self.abits,
                                 self.pred_bits, self.alpha, self._scale(), *conv_args, counter=counter,
                                 sparse=self.sparse_bp)
        if not self.alpha > 0:
            raise UserError(f"PGConv2d alpha must be > 0 to export, not {self.alpha}")
        with torch.no_grad():
            folded = self.threshold.data.reshape(-1).clone()
        attrs = dict(onnx_conv_attributes(self), weight_shape=tuple(self.weight.shape))
        return _PGConvFn.apply(x, self.quantized_weight(), self.threshold, folded, self.abits,
                               self.pred_bits, self.alpha, self._scale(), conv_args, attrs)


# --------------------------------------------------------------------------- FBS

def fbs_top_k(density: float, channels: int) -> int:
    """Mayo's k = ceil(O * density) (computed in float64)."""
    return math.ceil(channels * float(density))


def fbs_density_attribute(density: float, channels: int) -> float:
    """The float32 `density` attribute whose float64 ceil(O * density) is the module's k
    (OPS.md): the module's density if float32 rounding keeps k, else (k - 0.5) / O."""
    k = fbs_top_k(density, channels)
    as_f32 = float(torch.tensor(density, dtype=torch.float32))
    if fbs_top_k(as_f32, channels) == k:
        return density
    return (k - 0.5) / channels


def _fbs_active(g: torch.Tensor, density: float, threshold: float | None = None) -> torch.Tensor:
    """Mayo's bool_actives (mayo/net/tf/gate/base.py): with a fixed `threshold` (thresholds
    `local` / `global`, a stored scalar) g > threshold; else (`online`) g > the (k+1)-th
    largest g per sample, k = ceil(O * density), everything active when k >= O."""
    if threshold is not None:
        return (g > threshold).to(g.dtype)
    o = g.shape[1]
    k = fbs_top_k(density, o)
    if k >= o:
        return torch.ones_like(g)
    kth = torch.sort(g, dim=1).values[:, o - k - 1:o - k]  # (k+1)-th largest per sample
    return (g > kth).to(g.dtype)


NO_POOL_PADS = (0, 0, 0, 0)


def _fbs_activation(t: torch.Tensor, activation: str | None) -> torch.Tensor:
    return torch.relu(t) if activation == "relu" else t


def _fbs_pool(x: torch.Tensor, pool: str, pool_pads=NO_POOL_PADS) -> torch.Tensor:
    """Mayo's GatedConvolutionBase.subsample over the whole H x W (mayo/net/tf/gate/base.py):
    avg mean(x), max max(x), l1 mean(|x|), l2 mean(x^2) (no square root), of x zero-padded by
    pool_pads (top, left, bottom, right): the padded zeros count in the mean's area and in
    the max."""
    if any(pool_pads):
        top, left, bottom, right = pool_pads
        x = F.pad(x, (left, right, top, bottom))
    if pool == "avg":
        return x.mean(dim=(2, 3))
    if pool == "max":
        return x.amax(dim=(2, 3))
    if pool == "l1":
        return x.abs().mean(dim=(2, 3))
    return x.pow(2).mean(dim=(2, 3))


def _fbs_saliency(x, pool, gate_w, gate_b, hidden_w=None, hidden_b=None, activation="relu",
                  pool_pads=NO_POOL_PADS):
    """gamma = act(fc(pool_HW(x))) [N, O], with an optional hidden layer + act (Mayo's
    _predictor: both 1x1 convs use the layer's activation_fn)."""
    pooled = _fbs_pool(x, pool, pool_pads)
    if hidden_w is not None:
        pooled = _fbs_activation(F.linear(pooled, hidden_w, hidden_b), activation)
    return _fbs_activation(F.linear(pooled, gate_w, gate_b), activation)


def _fbs_eval(x, weight, conv_args, running_mean, running_var, eps, beta, gate_w, gate_b,
              hidden_w, hidden_b, density, pool, training=False, counter=None, activation="relu",
              pool_pads=NO_POOL_PADS, threshold=None):
    """The FBS layer's forward (see FBSConv2d); `training` selects batch-statistics BN."""
    g = _fbs_saliency(x, pool, gate_w, gate_b, hidden_w, hidden_b, activation, pool_pads)
    active = _fbs_active(g.detach(), density, threshold)
    if counter is not None:
        counter.gates_on += float(active.sum())
        counter.gates_total += active.numel()
        counter.samples += x.shape[0]
        in_density = (x.abs().amax(dim=(2, 3)) > 0).float().mean(dim=1)
        counter.in_density_x_out_density += float((in_density * active.mean(dim=1)).sum())
    y = F.conv2d(x, weight, None, *conv_args)
    y = F.batch_norm(y, running_mean, running_var, None, None, training, 0.1, eps)
    a4 = active[:, :, None, None]
    return _fbs_activation(a4 * g[:, :, None, None] * y + a4 * beta[None, :, None, None], activation)


class _FBSConvFn(torch.autograd.Function):
    """Eval-mode FBS as one node. Forward: the module's formula; symbolic: gate2deploy::FBSConv
    with the BatchNorm as scale and shift."""

    @staticmethod
    def forward(ctx, x, weight, gate_w, gate_b, bn_scale, bn_shift, beta, running_mean,
                running_var, eps, conv_args, onnx_attrs, density):
        return _fbs_eval(x, weight, conv_args, running_mean, running_var, eps, beta, gate_w,
                         gate_b, None, None, density, onnx_attrs["pool"],
                         activation=onnx_attrs["activation"], pool_pads=onnx_attrs["pool_pads"],
                         threshold=onnx_attrs["threshold"])

    @staticmethod
    def symbolic(g, x, weight, gate_w, gate_b, bn_scale, bn_shift, beta, running_mean,
                 running_var, eps, conv_args, onnx_attrs, density):
        # The Mayo options are written only when they differ from the op's defaults, so a
        # default layer exports the same node as before they existed.
        options = {}
        if onnx_attrs["activation"] is None:
            options["activation_s"] = "Identity"
        if any(onnx_attrs["pool_pads"]):
            options["pool_pads_i"] = list(onnx_attrs["pool_pads"])
        if onnx_attrs["threshold"] is not None:
            options["threshold_f"] = onnx_attrs["threshold"]
        out = g.op(f"{DOMAIN}::FBSConv", x, weight, gate_w, gate_b, bn_scale, bn_shift, beta,
                   density_f=onnx_attrs["density"], pool_s=onnx_attrs["pool"],
                   strides_i=onnx_attrs["strides"], pads_i=onnx_attrs["pads"],
                   dilations_i=onnx_attrs["dilations"], **options)
        out.setType(_conv_out_type(g, x, onnx_attrs["weight_shape"], onnx_attrs))
        return out


class FBSConv2d(nn.Module):
    """FBS gated conv + BN + activation (Mayo `_gate`, policy `parametric`; mayo/net/tf/gate/
    base.py and parametric.py).

        gamma = act(fc(pool_HW(pad(x, pool_pads))))   (pool avg|max|l1|l2; optional hidden
                                                        layer + act)
        active = online (threshold None): per sample, gamma > the (k+1)-th largest gamma,
                 k = ceil(O * density); fixed (Mayo's `local`/`global` stored threshold, a
                 float): gamma > threshold
        out = act(active * gamma * BN_noaffine(conv(x)) + active * beta)

    `activation` is "relu" (default) or None (Mayo's `activation_fn: null`: no ReLU on the
    gate nor on the output). Pools as Mayo's `subsample`: l2 is mean(x^2) without a square
    root. `pool_pads` (top, left, bottom, right) zero-pads x for the saliency only (Mayo pads
    before the gated conv, so its pool sees the zeros: they count in the mean's area and in
    the max). `threshold` and `pool_pads` are not in the state dict (Mayo's threshold variable
    is read by its importer).

    Keys: `conv.weight`, `bn.running_mean/var/num_batches_tracked`, `beta`, `gate.weight`,
    `gate.bias` (and `gate_hidden.weight/bias` with a hidden layer). Exports as one FBSConv node
    (a hidden layer is reported as not exportable).
    """

    POOLS = ("avg", "max", "l1", "l2")
    ACTIVATIONS = ("relu", None)

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1,
                 density: float = 1.0, pool: str = "avg", hidden: int | None = None, eps: float = 1e-5,
                 activation: str | None = "relu", pool_pads=NO_POOL_PADS, threshold: float | None = None):
        super().__init__()
        if pool not in self.POOLS:
            raise ValueError(f"pool must be one of {self.POOLS}, not {pool!r}")
        if not 0.0 < float(density) <= 1.0:
            raise ValueError(f"density must be in (0, 1], not {density}")
        if activation not in self.ACTIVATIONS:
            raise ValueError(f"activation must be 'relu' or None, not {activation!r}")
        pool_pads = tuple(pool_pads)
        if len(pool_pads) != 4 or not all(isinstance(p, int) and p >= 0 for p in pool_pads):
            raise ValueError(f"pool_pads must be 4 ints >= 0 (top, left, bottom, right), not {pool_pads!r}")
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation, bias=False)
        self.bn = nn.BatchNorm2d(out_channels, affine=False, eps=eps)
        self.beta = nn.Parameter(torch.zeros(out_channels))
        self.gate_hidden = nn.Linear(in_channels, hidden) if hidden else None
        self.gate = nn.Linear(hidden or in_channels, out_channels)
        nn.init.constant_(self.gate.bias, 1.0)  # start with every channel salient
        self.density, self.pool = float(density), pool
        self.activation, self.pool_pads = activation, pool_pads
        self.threshold = threshold
        self.gate_counter: GateCounter | None = None

    @property
    def threshold(self) -> float | None:
        """The fixed gate threshold, or None for the online top-k."""
        return self._threshold

    @threshold.setter
    def threshold(self, value: float | None) -> None:
        if value is not None and not math.isfinite(float(value)):
            raise ValueError(f"threshold must be a finite float or None, not {value!r}")
        # float32, as the op's attribute and Mayo's variable: the comparison is the same in
        # the module and in the exported node.
        self._threshold = None if value is None else float(torch.tensor(float(value), dtype=torch.float32))

    def _conv_args(self):
        c = self.conv
        return (c.stride, c.padding, c.dilation, c.groups)

    def _gate_options(self) -> dict:
        return dict(activation=self.activation, pool_pads=self.pool_pads, threshold=self.threshold)

    def forward(self, x):
        hidden = self.gate_hidden
        if self.training or not _exporting():
            counter = None if self.training else self.gate_counter
            # Running statistics are updated as BatchNorm2d does, through the module.
            if self.training:
                self.bn.num_batches_tracked += 1
            return _fbs_eval(x, self.conv.weight, self._conv_args(), self.bn.running_mean,
                             self.bn.running_var, self.bn.eps, self.beta, self.gate.weight,
                             self.gate.bias, hidden.weight if hidden else None,
                             hidden.bias if hidden else None, self.density, self.pool,
                             self.training, counter, **self._gate_options())
        if hidden is not None:
            raise UserError("FBSConv2d with a hidden layer (Mayo `factor` > 0) cannot be "
                            "exported as FBSConv (one gate layer only)")
        scale, shift = self.bn_scale_shift()
        attrs = dict(onnx_conv_attributes(self.conv), weight_shape=tuple(self.conv.weight.shape),
                     density=fbs_density_attribute(self.density, self.conv.out_channels), pool=self.pool,
                     **self._gate_options())
        with torch.no_grad():
            w, fc_w, fc_b, beta = (t.data.clone() for t in (self.conv.weight, self.gate.weight,
                                                           self.gate.bias, self.beta))
        return _FBSConvFn.apply(x, w, fc_w, fc_b, scale, shift, beta, self.bn.running_mean,
                                self.bn.running_var, self.bn.eps, self._conv_args(), attrs,
                                self.density)

    def saliency_of(self, x: torch.Tensor) -> torch.Tensor:
        """The predicted channel saliency gamma [N, O] for input x."""
        hidden = self.gate_hidden
        return _fbs_saliency(x, self.pool, self.gate.weight, self.gate.bias,
                             hidden.weight if hidden else None, hidden.bias if hidden else None,
                             self.activation, self.pool_pads)

    def top_k(self) -> int:
        """Active output channels per sample: ceil(O * density)."""
        return fbs_top_k(self.density, self.conv.out_channels)

    def bn_scale_shift(self) -> tuple[torch.Tensor, torch.Tensor]:
        """BN_noaffine(y) = y * scale + shift with scale = 1/sqrt(rv + eps), shift = -rm * scale."""
        with torch.no_grad():
            scale = 1.0 / torch.sqrt(self.bn.running_var.data + self.bn.eps)
            return scale.clone(), (-self.bn.running_mean.data * scale).clone()


GATED_TYPES = (CGConv2d, PGConv2d, FBSConv2d)
