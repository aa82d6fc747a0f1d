"""Triton kernels for CGConv, PGConv and FBSConv (runtimes/OPS.md): the GPU path.

Each op is a direct convolution over a block of output elements (flattened n, o, oh, ow),
written to skip the gated work the same way the CPU kernels do:
  CG:  loop 1 accumulates the base-path channels; the gate is decided per element; loop 2
       (the remaining channels) loads only where the gate is on and is skipped for blocks
       where no gate is on.
  PG:  X is split on the fly into its MSB and LSB parts (per-tensor scale computed first);
       the LSB convolution is masked and skipped the same way.
  FBS: the saliency, top-k and active-channel list are computed first (small, in torch);
       the kernel's grid covers only the active (sample, channel) pairs, and input channels
       that are all zero in a sample are skipped; everything else stays exactly 0.

Precision: X and W may be float32 or float16 (the same for both); every product is
accumulated in float32, gates are decided on the float32 sums (so an fp16 model gates like
the reference run on the same fp16 values), and Y has X's dtype. The other inputs (masks,
thresholds, FBS's saliency layer and BN vectors) are used in float32; FBS's saliency is
computed in float32 from X.

No GPU is available to this project: the kernels are tested numerically on the CPU with
Triton's interpreter (TRITON_INTERPRET=1 must be set before this module is imported; fp32 and
fp16, bfloat16 returns NaN there). Without the interpreter the wrappers need CUDA tensors and
say so with a UserError. `reference.py` is the specification the tests compare against;
tools/gpu_check.sh runs the same comparison on a GPU.
"""
from __future__ import annotations

import math

import torch

from gate2deploy.errors import UserError
from gate2deploy.ops import FBS_ACTIVATIONS, FBS_POOLS

try:  # Triton is a dependency of the CUDA torch build, but keep the import guarded.
    import triton
    import triton.language as tl
    from triton import knobs as _knobs

    INTERPRETED = bool(_knobs.runtime.interpret)
    _TRITON_ERROR = None
except Exception as exc:  # noqa: BLE001 - any import failure means "no Triton"
    triton = tl = None
    INTERPRETED = False
    _TRITON_ERROR = f"Triton is not usable: {str(exc).splitlines()[0] if str(exc) else exc}"

BLOCK = 128


DTYPES = (torch.float32, torch.float16)


def _check_device(x: torch.Tensor, w: torch.Tensor, *params: torch.Tensor) -> None:
    """X and W: float32 or float16, the same; parameters: any float dtype (used as float32)."""
    if _TRITON_ERROR:
        raise UserError(_TRITON_ERROR)
    if x.dtype not in DTYPES or w.dtype != x.dtype:
        raise UserError(f"the Triton kernels take X and W both float32 or both float16, not "
                        f"{x.dtype} and {w.dtype}")
    for t in params:
        if not t.dtype.is_floating_point:
            raise UserError(f"the Triton kernels take float parameters, not {t.dtype}")
    on_cuda = all(t.is_cuda for t in (x, w, *params))
    if not INTERPRETED and not on_cuda:
        raise UserError("the Triton kernels need CUDA tensors on a GPU (or TRITON_INTERPRET=1 "
                        "set before import, to run them on the CPU interpreter)")


def _f32(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float32).contiguous()


def _geometry(x, w, strides, pads, dilations, group):
    if x.dim() != 4 or w.dim() != 4:
        raise UserError(f"X and W must be 4-D, not {tuple(x.shape)} and {tuple(w.shape)}")
    n, c, h, wd = x.shape
    o, cw, kh, kw = w.shape
    if c != cw * group or o % group:
        raise UserError(f"X {tuple(x.shape)} and W {tuple(w.shape)} do not fit group={group}")
    (sh, sw), (pt, pl, pb, pr), (dh, dw) = strides, pads, dilations
    oh = (h + pt + pb - (kh - 1) * dh - 1) // sh + 1
    ow = (wd + pl + pr - (kw - 1) * dw - 1) // sw + 1
    if oh < 1 or ow < 1:
        raise UserError("kernel (with dilation) is larger than the padded input")
    return n, c, h, wd, o, cw, kh, kw, sh, sw, pt, pl, dh, dw, oh, ow


if triton is not None:

    @triton.jit
    def _max_combine(a, b):
        return tl.maximum(a, b)

    @triton.jit
    def _any(flags):
        """True if any lane is set. (tl.reduce with our own combine function rather than
        tl.max: the standard library's jit functions are compiled-mode objects when triton
        was imported before TRITON_INTERPRET was set, as in a test session.)"""
        return tl.reduce(flags.to(tl.int32), 0, _max_combine) > 0

    @triton.jit
    def _tap_sum(x_ptr, w_ptr, n, o, oh, ow, cin, cw_idx, valid, C, H, W, CW,
                 KH: tl.constexpr, KW: tl.constexpr, sh, sw, pt, pl, dh, dw,
                 scale, levels, unit, PART: tl.constexpr):
        """Sum over the kh x kw taps of input channel `cin` (weight channel `cw_idx`) of the
        input itself (PART 0) or of its PG-quantized MSB (PART 1) or LSB (PART 2) part."""
        acc = tl.full(valid.shape, 0.0, tl.float32)
        for i in tl.static_range(KH):
            for j in tl.static_range(KW):
                ih = oh * sh - pt + i * dh
                iw = ow * sw - pl + j * dw
                inside = valid & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
                xv = tl.load(x_ptr + ((n * C + cin) * H + ih) * W + iw, mask=inside,
                             other=0.0).to(tl.float32)
                if PART != 0:
                    q = _round_half_even(tl.minimum(tl.abs(xv) / scale, 1.0) * levels)
                    q_hb = tl.floor(q / unit) * unit
                    part = q_hb if PART == 1 else q - q_hb
                    sign = tl.where(xv > 0, 1.0, tl.where(xv < 0, -1.0, 0.0))
                    xv = (part / levels) * scale * sign  # the reference's operation order
                wv = tl.load(w_ptr + ((o * CW + cw_idx) * KH + i) * KW + j, mask=valid,
                             other=0.0).to(tl.float32)
                acc += xv * wv
        return acc

    @triton.jit
    def _conv_tap_sum(x_ptr, w_ptr, n, o, oh, ow, cin, cw_idx, valid, C, H, W, CW,
                      KH: tl.constexpr, KW: tl.constexpr, sh, sw, pt, pl, dh, dw):
        return _tap_sum(x_ptr, w_ptr, n, o, oh, ow, cin, cw_idx, valid, C, H, W, CW,
                        KH, KW, sh, sw, pt, pl, dh, dw, 1.0, 1.0, 1.0, 0)

    @triton.jit
    def _output_coords(idx, O, OH, OW):
        """(n, o, oh, ow) of flat NCHW output indices."""
        return idx // (OW * OH * O), (idx // (OW * OH)) % O, (idx // OW) % OH, idx % OW

    @triton.jit
    def _cg_conv_kernel(x_ptr, w_ptr, mask_ptr, thr_ptr, y_ptr, total, C, H, W, O, OH, OW,
                        KH: tl.constexpr, KW: tl.constexpr, sh, sw, pt, pl, dh, dw,
                        BLOCK_SIZE: tl.constexpr):
        idx = tl.program_id(0) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
        valid = idx < total
        n, o, oh, ow = _output_coords(idx, O, OH, OW)
        partial = tl.full((BLOCK_SIZE,), 0.0, tl.float32)
        for c in range(0, C):  # stage 1: base-path channels only
            base = tl.load(mask_ptr + o * C + c, mask=valid, other=0.0)
            use = valid & (base != 0.0)
            partial += _conv_tap_sum(x_ptr, w_ptr, n, o, oh, ow, c, c, use, C, H, W, C, KH, KW,
                                     sh, sw, pt, pl, dh, dw)
        thr = tl.load(thr_ptr + o, mask=valid, other=0.0)
        gate = valid & (partial > thr)
        rest = tl.full((BLOCK_SIZE,), 0.0, tl.float32)
        if _any(gate):  # stage 2 only if some gate in the block is on
            for c in range(0, C):
                base = tl.load(mask_ptr + o * C + c, mask=gate, other=1.0)
                use = gate & (base == 0.0)
                rest += _conv_tap_sum(x_ptr, w_ptr, n, o, oh, ow, c, c, use, C, H, W, C, KH, KW,
                                      sh, sw, pt, pl, dh, dw)
        tl.store(y_ptr + idx, tl.where(gate, partial + rest, partial).to(y_ptr.dtype.element_ty),
                 mask=valid)

    @triton.jit
    def _round_half_even(v):
        r = tl.floor(v + 0.5)
        tie = (r - v) == 0.5
        odd = (r - 2.0 * tl.floor(r * 0.5)) == 1.0
        return tl.where(tie & odd, r - 1.0, r)

    @triton.jit
    def _pg_conv_kernel(x_ptr, w_ptr, thr_ptr, y_ptr, total, C, H, W, O, OH, OW, CW, OG,
                        KH: tl.constexpr, KW: tl.constexpr, sh, sw, pt, pl, dh, dw,
                        scale, levels, unit, BLOCK_SIZE: tl.constexpr):
        idx = tl.program_id(0) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
        valid = idx < total
        n, o, oh, ow = _output_coords(idx, O, OH, OW)
        c0 = (o // OG) * CW  # first input channel of o's group
        msb = tl.full((BLOCK_SIZE,), 0.0, tl.float32)
        for c in range(0, CW):
            msb += _tap_sum(x_ptr, w_ptr, n, o, oh, ow, c0 + c, c, valid, C, H, W, CW,
                            KH, KW, sh, sw, pt, pl, dh, dw, scale, levels, unit, 1)
        thr = tl.load(thr_ptr + o, mask=valid, other=0.0)
        gate = valid & (msb > thr)
        lsb = tl.full((BLOCK_SIZE,), 0.0, tl.float32)
        if _any(gate):
            for c in range(0, CW):
                lsb += _tap_sum(x_ptr, w_ptr, n, o, oh, ow, c0 + c, c, gate, C, H, W, CW,
                                KH, KW, sh, sw, pt, pl, dh, dw, scale, levels, unit, 2)
        tl.store(y_ptr + idx, (msb + lsb).to(y_ptr.dtype.element_ty), mask=valid)

    @triton.jit
    def _fbs_conv_kernel(x_ptr, w_ptr, pairs_ptr, gamma_ptr, nonzero_ptr, scale_ptr, shift_ptr,
                         beta_ptr, y_ptr, C, H, W, O, OH, OW, KH: tl.constexpr,
                         KW: tl.constexpr, sh, sw, pt, pl, dh, dw, RELU: tl.constexpr,
                         BLOCK_SIZE: tl.constexpr):
        # Grid: (active (n, o) pair, block of output pixels). Inactive pairs never run.
        pair = tl.program_id(0)
        n = tl.load(pairs_ptr + 2 * pair)
        o = tl.load(pairs_ptr + 2 * pair + 1)
        pix = tl.program_id(1) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
        valid = pix < OH * OW
        oh = pix // OW
        ow = pix % OW
        nv = tl.full((BLOCK_SIZE,), 0, tl.int32) + n
        ov = tl.full((BLOCK_SIZE,), 0, tl.int32) + o
        acc = tl.full((BLOCK_SIZE,), 0.0, tl.float32)
        for c in range(0, C):
            if tl.load(nonzero_ptr + n * C + c) != 0:  # input channel switched off: skip it
                acc += _conv_tap_sum(x_ptr, w_ptr, nv, ov, oh, ow, c, c, valid, C, H, W, C,
                                     KH, KW, sh, sw, pt, pl, dh, dw)
        g = tl.load(gamma_ptr + n * O + o)
        out = g * (tl.load(scale_ptr + o) * acc + tl.load(shift_ptr + o)) + tl.load(beta_ptr + o)
        if RELU:
            out = tl.maximum(out, 0.0)
        tl.store(y_ptr + ((n * O + o) * OH + oh) * OW + ow, out.to(y_ptr.dtype.element_ty),
                 mask=valid)


def cg_conv(x: torch.Tensor, w: torch.Tensor, base_mask: torch.Tensor, threshold: torch.Tensor,
            strides=(1, 1), pads=(0, 0, 0, 0), dilations=(1, 1)) -> torch.Tensor:
    """CGConv (OPS.md) with Triton."""
    _check_device(x, w, base_mask, threshold)
    n, c, h, wd, o, cw, kh, kw, sh, sw, pt, pl, dh, dw, oh, ow = _geometry(
        x, w, strides, pads, dilations, 1)
    if tuple(base_mask.shape) != (o, c) or threshold.numel() != o:
        raise UserError(f"base_mask must be {(o, c)} and threshold have {o} values")
    y = torch.empty((n, o, oh, ow), dtype=x.dtype, device=x.device)
    total = y.numel()
    _cg_conv_kernel[(triton.cdiv(total, BLOCK),)](
        x.contiguous(), w.contiguous(), _f32(base_mask), _f32(threshold).view(-1), y,
        total, c, h, wd, o, oh, ow, kh, kw, sh, sw, pt, pl, dh, dw, BLOCK_SIZE=BLOCK)
    return y


def pg_conv(x: torch.Tensor, w: torch.Tensor, threshold: torch.Tensor, abits: int,
            pred_bits: int, static_scale: float = 0.0, strides=(1, 1), pads=(0, 0, 0, 0),
            dilations=(1, 1), group: int = 1) -> torch.Tensor:
    """PGConv (OPS.md) with Triton; the dynamic scale max|X| + 1e-7 is reduced first."""
    _check_device(x, w, threshold)
    if not 0 < pred_bits < abits:
        raise UserError(f"need 0 < pred_bits < abits, not pred_bits={pred_bits}, abits={abits}")
    n, c, h, wd, o, cw, kh, kw, sh, sw, pt, pl, dh, dw, oh, ow = _geometry(
        x, w, strides, pads, dilations, group)
    if threshold.numel() != o:
        raise UserError(f"threshold must have {o} values")
    if static_scale > 0:
        scale = float(torch.tensor(static_scale, dtype=torch.float32))
    else:
        scale = float(x.abs().max().to(torch.float32) + torch.tensor(1e-7, dtype=torch.float32))
    y = torch.empty((n, o, oh, ow), dtype=x.dtype, device=x.device)
    total = y.numel()
    _pg_conv_kernel[(triton.cdiv(total, BLOCK),)](
        x.contiguous(), w.contiguous(), _f32(threshold).view(-1), y, total, c, h, wd, o,
        oh, ow, cw, o // group, kh, kw, sh, sw, pt, pl, dh, dw, scale, float(2 ** abits - 1),
        float(2 ** (abits - pred_bits)), BLOCK_SIZE=BLOCK)
    return y


def fbs_conv(x: torch.Tensor, w: torch.Tensor, fc_w: torch.Tensor, fc_b: torch.Tensor,
             bn_scale: torch.Tensor, bn_shift: torch.Tensor, beta: torch.Tensor, density: float,
             pool: str = "avg", strides=(1, 1), pads=(0, 0, 0, 0), dilations=(1, 1),
             activation: str = "Relu", pool_pads=(0, 0, 0, 0), threshold: float | None = None) -> torch.Tensor:
    """FBSConv (OPS.md) with Triton: only active (sample, channel) pairs are computed; the
    saliency (pool, predictor, top-k or fixed threshold) is a few whole-tensor torch ops."""
    _check_device(x, w, fc_w, fc_b, bn_scale, bn_shift, beta)
    if not 0.0 < density <= 1.0 or pool not in FBS_POOLS:
        raise UserError(f"density must be in (0, 1] and pool one of {FBS_POOLS}, not {density}, {pool!r}")
    if activation not in FBS_ACTIVATIONS:
        raise UserError(f"activation must be one of {FBS_ACTIVATIONS}, not {activation!r}")
    if len(pool_pads) != 4 or min(pool_pads) < 0:
        raise UserError(f"pool_pads must be 4 ints >= 0, not {tuple(pool_pads)}")
    if threshold is not None and not math.isfinite(threshold):
        raise UserError(f"threshold must be finite, not {threshold}")
    n, c, h, wd, o, cw, kh, kw, sh, sw, pt, pl, dh, dw, oh, ow = _geometry(
        x, w, strides, pads, dilations, 1)
    xf = x.to(torch.float32)
    if any(pool_pads):
        top, left, bottom, right = (int(p) for p in pool_pads)
        xf = torch.nn.functional.pad(xf, (left, right, top, bottom))
    if pool == "l1":
        xf = xf.abs()
    elif pool == "l2":
        xf = xf * xf
    pooled = xf.amax(dim=(2, 3)) if pool == "max" else xf.mean(dim=(2, 3))
    gamma = pooled @ _f32(fc_w).t() + _f32(fc_b)
    if activation == "Relu":
        gamma = torch.relu(gamma)
    k = math.ceil(o * float(density))
    if threshold is not None:
        active = gamma > float(torch.tensor(threshold, dtype=torch.float32))
    elif k >= o:
        active = torch.ones_like(gamma, dtype=torch.bool)
    else:
        cut = torch.sort(gamma, dim=1).values[:, o - k - 1:o - k]
        active = gamma > cut
    pairs = active.nonzero().to(torch.int32).contiguous()  # [(n, o)] of active channels
    nonzero = (x != 0).flatten(2).any(dim=2).to(torch.int32).contiguous()
    y = torch.zeros((n, o, oh, ow), dtype=x.dtype, device=x.device)
    if pairs.shape[0]:
        grid = (pairs.shape[0], triton.cdiv(oh * ow, BLOCK))
        _fbs_conv_kernel[grid](
            x.contiguous(), w.contiguous(), pairs, gamma.contiguous(), nonzero,
            _f32(bn_scale).view(-1), _f32(bn_shift).view(-1), _f32(beta).view(-1),
            y, c, h, wd, o, oh, ow, kh, kw, sh, sw, pt, pl, dh, dw, RELU=activation == "Relu",
            BLOCK_SIZE=BLOCK)
    return y
