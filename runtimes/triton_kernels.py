"""Triton kernels for CGConv, PGConv and FBSConv (runtimes/OPS.md): the GPU path.

Each op is a tiled implicit-GEMM convolution: a program computes a tile of BLOCK_M output
positions (n, oh, ow flattened; FBS: (oh, ow) of one sample) x BLOCK_N output channels with
`tl.dot`, looping over K = (kh, kw, input channel) as (tap, chunk of BLOCK_K channels) with
W read channels-last ([O, KH, KW, C], a cached copy); the im2col addresses are computed in
the kernel (per tap a BLOCK_M row vector, plus a BLOCK_K channel-offset vector) and the zero
padding is a load mask. The gated work is skipped per tile:
  CG:  stage 1 runs over the union of the base-path channels only (W * base_mask gathered to
       that list), the gate is decided per element on the fp32 sum, stage 2 runs over the
       union of the remaining channels (W * (1 - base_mask) gathered) only in tiles where
       some gate is on; Y = where(gate, acc1 + acc2, acc1). For the usual mask (the same
       first C/p channels base for every output) no multiply-add is wasted; any 0/1 mask
       stays exact (a channel that is base for some outputs only is in both lists, with
       zero weights where it does not belong). The plan (lists, gathered weights, counts)
       is built with device ops only and cached per (W, base_mask) tensor objects.
  PG:  the per-tensor scale (max|X| + 1e-7, or static_scale) is reduced on the device and
       passed as a pointer to one float32 (no fp32 scalar kernel argument: since Triton 3.4
       the AOT C launcher passes an fp32 scalar as a C double, which the cubin misreads);
       `levels` and `unit` are constexprs. X is quantized once per call in the reference's
       operation order (_pg_split_kernel: its MSB and LSB parts, fp16 integer levels or fp32
       values; quantizing each loaded X tile inside the conv, as before, redid it for every
       output-channel tile and both stages, and PG ran at 0.1-0.17x cuDNN on the H200):
       stage 1 = conv of the MSB part, stage 2 = LSB part, skipped per tile with no gate on;
       Y = acc1 + (gate ? acc2 : 0). Groups: a tile's output channels lie within one group.
  FBS: the saliency (pool, predictor) and each sample's active channels are a few torch ops
       on the device: a fixed-size grid of channel slots per sample (the top k = ceil(O *
       density) by saliency, or all O sorted by saliency for a fixed threshold) with a
       validity flag = the reference's rule (g > the (k+1)-th largest, ties excluded; or
       g > threshold). The kernel gathers the valid slots' weight rows, skips tiles with
       no valid slot, and scatters act(g * (bn_scale * acc + bn_shift) + beta) to Y, which
       is zero-initialised, so inactive channels are exactly 0 (or, for TensorRT's AOT plugin,
       whose output is not initialised: every channel is a slot and the kernel writes the
       invalid ones as 0, ZERO_INVALID).
No wrapper synchronises with the host (no .item(), float() of a device value, nonzero()):
they run inside TensorRT plugins on TensorRT's stream.

Precision: X and W may be float32 or float16 (the same for both); every product is
accumulated in float32, gates are decided on the float32 sums, and Y has X's dtype. fp32
dots use input_precision="ieee" (TF32 would break the 1e-4 relative contract); fp16 dots
use the tensor cores with fp32 accumulation. PG in fp16 feeds the integer quantization
levels (sign * q_hb / unit, sign * q_lb: exact in fp16 while they fit in 11 bits) to the
tensor cores and applies the scale s * unit / levels (or s / levels) to the fp32 sum, which
equals the reference up to float32 rounding; wider levels fall back to an fp32 ieee dot of
the dequantized values. The other inputs (masks, thresholds, FBS's saliency layer and BN
vectors) are used in float32; FBS's saliency is computed in float32 from X.
Divisions that the reference does in IEEE float32 (|X| / s, q / levels) use tl.div_rn:
Triton's `/` on float32 is the approximate div.full.f32 on NVIDIA GPUs. PG's round half to
even is PTX's cvt.rni (inline asm) when compiled: Triton's fp fusion turned floor(v + 0.5)
into an fma with v's multiply, which flipped quantization levels on the H200 (gate "flips"
not at ties, 2026-12-04); the interpreter keeps the floor formula (numpy, no fusion).

Tile sizes: BLOCK_M x BLOCK_N = 128 x 64 (BLOCK_K 32, 4 warps, 3 stages), halved along M
(down to 32) then N while the grid has fewer tiles than an H100/H200 has SMs (132): a
batch-1 layer on 7 x 2 tiles would idle 90% of the GPU.

Where it ran: on the development machines (no GPU) the kernels are tested numerically on
Triton's interpreter (TRITON_INTERPRET=1 must be set before this module is imported; fp32
and fp16, bfloat16 returns NaN there) and compiled for sm_90 with Triton's bundled ptxas
(tests/test_triton_compile.py). Without the interpreter the wrappers need CUDA tensors and
say so with a UserError. `reference.py` is the specification the tests compare against;
tools/gpu_check.sh runs the same comparison, the timings and the AOT build on a GPU (it ran
on an H200 with Triton 3.6 on 2026-12-04: all exact; README "TensorRT ... GPU kernels").
"""
from __future__ import annotations

import math
import weakref

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

# Defaults from a sweep on the H200 (graph-replayed CG / PG at 8x128x28x28 and 32x64x56x56,
# fp32 and fp16): 128 x 64 x 32 with 4 warps, 3 stages was the best or within 5% everywhere.
BLOCK_M, BLOCK_N, BLOCK_K, NUM_WARPS, NUM_STAGES = 128, 64, 32, 4, 3
SPLIT_BLOCK = 1024  # elements per program of PG's quantization kernel
MIN_BLOCK = 32  # the smallest tile side the size heuristic picks (tl.dot needs >= 16)
SM_COUNT = 132  # H100 SXM / H200: the tile heuristic aims at one full wave at least
FP16_EXACT_INT = 2048  # integers up to this are exact in float16 (11 significant bits)

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
    _check_int32_size(max(x.numel(), w.numel(), n * o * oh * ow))
    return n, c, h, wd, o, cw, kh, kw, sh, sw, pt, pl, dh, dw, oh, ow


def _check_int32_size(largest: int) -> None:
    """The kernels index with int32 (Triton's program ids and aranges; the AOT signatures' i32)."""
    if largest >= 2 ** 31:
        raise UserError(f"tensor of {largest} elements: the Triton kernels index with int32 "
                        f"(at most {2 ** 31 - 1} elements per tensor); split the batch")


def tile_sizes(m: int, cols: int, tiles_per_col_group: int = 1) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_N) for an output of `m` positions x `cols` channels (per group, times
    `tiles_per_col_group` groups / samples): BLOCK_M x BLOCK_N, halved (M first, down to
    MIN_BLOCK) while the grid has fewer than SM_COUNT tiles. Smaller tiles reuse each loaded
    X / W value less, but a batch-1 layer on 7 x 2 tiles would idle 90% of the GPU."""
    bm, bn = BLOCK_M, BLOCK_N
    while bm > MIN_BLOCK and triton.cdiv(m, bm) * triton.cdiv(cols, bn) * tiles_per_col_group < SM_COUNT:
        bm //= 2
    while bn > MIN_BLOCK and triton.cdiv(m, bm) * triton.cdiv(cols, bn) * tiles_per_col_group < SM_COUNT:
        bn //= 2
    return bm, bn


if triton is not None:

    @triton.jit
    def _max_combine(a, b):
        return tl.maximum(a, b)

    @triton.jit
    def _any(flags):
        """True if any element of the 2-D `flags` is set. (tl.reduce with our own combine
        function rather than tl.max: the standard library's jit functions are compiled-mode
        objects when triton was imported before TRITON_INTERPRET was set, as in a test
        session.)"""
        per_row = tl.reduce(flags.to(tl.int32), 1, _max_combine)
        return tl.reduce(per_row, 0, _max_combine) > 0

    @triton.jit
    def _round_half_even(v):
        r = tl.floor(v + 0.5)
        tie = (r - v) == 0.5
        odd = (r - 2.0 * tl.floor(r * 0.5)) == 1.0
        return tl.where(tie & odd, r - 1.0, r)

    @triton.jit
    def _pg_part(x, scale, LEVELS: tl.constexpr, UNIT: tl.constexpr, PART: tl.constexpr,
                 INT_LEVELS: tl.constexpr, RINT_ASM: tl.constexpr):
        """PG's MSB (PART 1) or LSB (PART 2) part of the X tile `x` (reference
        pg_split_activations). INT_LEVELS: the integer levels sign * q_hb / UNIT or
        sign * q_lb as float16 (the caller scales the sum); else the dequantized value in
        float32, in the reference's operation order (q / levels) * s * sign.
        RINT_ASM: round half to even with PTX's cvt.rni. Compiled, floor(v + 0.5) would be
        contracted with v's multiply into one fma (Triton enables fp fusion), which rounds
        differently from numpy's two roundings; the inline asm is opaque to that. The
        interpreter (numpy, no fusion) uses the floor formula."""
        xv = x.to(tl.float32)
        v = tl.minimum(tl.div_rn(tl.abs(xv), scale), 1.0) * LEVELS
        if RINT_ASM:
            q = tl.inline_asm_elementwise("cvt.rni.f32.f32 $0, $1;", "=f,f", [v],
                                          dtype=tl.float32, is_pure=True, pack=1)
        else:
            q = _round_half_even(v)
        q_hb = tl.floor(q * (1.0 / UNIT)) * UNIT  # UNIT is a power of two: exact
        sign = tl.where(xv > 0, 1.0, tl.where(xv < 0, -1.0, 0.0))
        if INT_LEVELS:
            if PART == 1:
                part = (q_hb * (1.0 / UNIT)) * sign
            else:
                part = (q - q_hb) * sign
            out = part.to(tl.float16)
        else:
            if PART == 1:
                part = q_hb
            else:
                part = q - q_hb
            out = tl.div_rn(part, LEVELS) * scale * sign
        return out

    @triton.jit
    def _mma(a, b, acc):
        """acc + a @ b with fp32 accumulation: IEEE fp32 products for fp32 operands (never
        TF32), the tensor cores for fp16."""
        if a.dtype == tl.float32:
            acc = tl.dot(a, b.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b.to(a.dtype), acc)
        return acc

    @triton.jit
    def _conv_tile(acc, x_ptr, w_ptr, chan_ptr, n, oh, ow, m_ok, o, o_ok, c_len, w_tap, c0,
                   C, H, W, sh, sw, pt, pl, dh, dw,
                   KH: tl.constexpr, KW: tl.constexpr, GATHER: tl.constexpr, BLOCK_K: tl.constexpr):
        """acc[m, j] + sum over taps t = (i, j) and list positions ci < c_len of
        X[n, chan(ci), ih, iw] * W[o[j], t, ci], W laid out [O, KH, KW, w_tap] (channels
        innermost). chan(ci) = chan_ptr[ci] (GATHER) or c0 + ci. X's dtype decides the dot
        (_mma): PG passes its quantized parts here in place of X.

        One flat loop over (tap, chunk of BLOCK_K channels), so that Triton pipelines it:
        the tap's input row (ih, iw, padding mask) is a BLOCK_M vector, and a channel chunk
        adds a BLOCK_K vector of channel offsets (no per-element im2col division)."""
        chunks = (c_len + BLOCK_K - 1) // BLOCK_K
        x_n = n * (C * H * W)
        for it in range(0, KH * KW * chunks):
            tap = it // chunks
            ci = (it - tap * chunks) * BLOCK_K + tl.arange(0, BLOCK_K)
            k_ok = ci < c_len
            i = tap // KW
            ih = oh * sh - pt + i * dh
            iw = ow * sw - pl + (tap - i * KW) * dw
            inside = m_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            if GATHER:
                c = tl.load(chan_ptr + ci, mask=k_ok, other=0)
            else:
                c = c0 + ci
            a = tl.load(x_ptr + (x_n + ih * W + iw)[:, None] + (c * (H * W))[None, :],
                        mask=inside[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(w_ptr + (o * (KH * KW * w_tap) + tap * w_tap)[None, :] + ci[:, None],
                        mask=k_ok[:, None] & o_ok[None, :], other=0.0)
            acc = _mma(a, b, acc)
        return acc

    @triton.jit
    def _rows(pid_m, M, OH, OW, BLOCK_M: tl.constexpr):
        """(n, oh, ow, valid) of the tile's flattened output positions."""
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        pos = rows % (OH * OW)
        return rows // (OH * OW), pos // OW, pos % OW, rows < M

    @triton.jit
    def _cg_conv_kernel(x_ptr, w1_ptr, w2_ptr, chan_ptr, count_ptr, thr_ptr,
                        M, C, H, W, O, OH, OW, sh, sw, pt, pl, dh, dw, y_ptr,
                        KH: tl.constexpr, KW: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        # chan_ptr: [2, C] int32, the base-channel list then the rest list (each padded to
        # C); count_ptr: their lengths; w1 / w2: W * mask / W * (1 - mask), columns gathered
        # to those lists and laid out [O, KH, KW, C].
        n, oh, ow, m_ok = _rows(tl.program_id(0), M, OH, OW, BLOCK_M)
        o = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        o_ok = o < O
        acc1 = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
        acc1 = _conv_tile(acc1, x_ptr, w1_ptr, chan_ptr, n, oh, ow, m_ok, o, o_ok,
                          tl.load(count_ptr), C, 0, C, H, W, sh, sw, pt, pl, dh, dw,
                          KH, KW, True, BLOCK_K)
        thr = tl.load(thr_ptr + o, mask=o_ok, other=0.0)
        gate = (acc1 > thr[None, :]) & m_ok[:, None] & o_ok[None, :]
        acc2 = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
        if _any(gate):  # stage 2 only in tiles where some gate is on
            acc2 = _conv_tile(acc2, x_ptr, w2_ptr, chan_ptr + C, n, oh, ow, m_ok, o, o_ok,
                              tl.load(count_ptr + 1), C, 0, C, H, W, sh, sw, pt, pl, dh, dw,
                              KH, KW, True, BLOCK_K)
        y = tl.where(gate, acc1 + acc2, acc1)
        out = ((n[:, None] * O + o[None, :]) * OH + oh[:, None]) * OW + ow[:, None]
        tl.store(y_ptr + out, y.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & o_ok[None, :])

    @triton.jit
    def _pg_split_kernel(x_ptr, scale_ptr, NUMEL, msb_ptr, lsb_ptr, LEVELS: tl.constexpr,
                         UNIT: tl.constexpr, INT_LEVELS: tl.constexpr, RINT_ASM: tl.constexpr,
                         BLOCK: tl.constexpr):
        # X's MSB and LSB parts (_pg_part), once per call: the conv kernel reads them instead
        # of quantizing every loaded X tile for each of its output-channel tiles and stages.
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ok = i < NUMEL
        x = tl.load(x_ptr + i, mask=ok, other=0.0)
        scale = tl.load(scale_ptr)
        msb = _pg_part(x, scale, LEVELS, UNIT, 1, INT_LEVELS, RINT_ASM)
        lsb = _pg_part(x, scale, LEVELS, UNIT, 2, INT_LEVELS, RINT_ASM)
        tl.store(msb_ptr + i, msb.to(msb_ptr.dtype.element_ty), mask=ok)
        tl.store(lsb_ptr + i, lsb.to(lsb_ptr.dtype.element_ty), mask=ok)

    @triton.jit
    def _pg_conv_kernel(msb_ptr, lsb_ptr, w_ptr, thr_ptr, scale_ptr, M, C, H, W, O, OH,
                        OW, CW, OG, sh, sw, pt, pl, dh, dw, y_ptr, KH: tl.constexpr, KW: tl.constexpr,
                        LEVELS: tl.constexpr, UNIT: tl.constexpr, INT_LEVELS: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        # msb_ptr / lsb_ptr: X's parts from _pg_split_kernel ([N, C, H, W]; float16 integer
        # levels with INT_LEVELS, else float32 dequantized values).
        # Grid axis 1: (group, tile of BLOCK_N channels within the group).
        n, oh, ow, m_ok = _rows(tl.program_id(0), M, OH, OW, BLOCK_M)
        tiles = (OG + BLOCK_N - 1) // BLOCK_N
        g = tl.program_id(1) // tiles
        o_in = (tl.program_id(1) % tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
        o_ok = o_in < OG
        o = g * OG + o_in
        scale = tl.load(scale_ptr)
        msb = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
        msb = _conv_tile(msb, msb_ptr, w_ptr, msb_ptr, n, oh, ow, m_ok, o, o_ok, CW, CW, g * CW,
                         C, H, W, sh, sw, pt, pl, dh, dw, KH, KW, False, BLOCK_K)
        if INT_LEVELS:  # the sums of integer levels, scaled as one dequantized value
            msb = msb * (scale * (UNIT / LEVELS))
        thr = tl.load(thr_ptr + o, mask=o_ok, other=0.0)
        gate = (msb > thr[None, :]) & m_ok[:, None] & o_ok[None, :]
        lsb = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
        if _any(gate):
            lsb = _conv_tile(lsb, lsb_ptr, w_ptr, lsb_ptr, n, oh, ow, m_ok, o, o_ok, CW, CW,
                             g * CW, C, H, W, sh, sw, pt, pl, dh, dw, KH, KW, False, BLOCK_K)
            if INT_LEVELS:
                lsb = lsb * tl.div_rn(scale, LEVELS)
        y = msb + tl.where(gate, lsb, 0.0)
        out = ((n[:, None] * O + o[None, :]) * OH + oh[:, None]) * OW + ow[:, None]
        tl.store(y_ptr + out, y.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & o_ok[None, :])

    @triton.jit
    def _fbs_conv_kernel(x_ptr, w_ptr, slot_ptr, valid_ptr, gamma_ptr, scale_ptr, shift_ptr,
                         beta_ptr, S, C, H, W, O, OH, OW, sh, sw, pt, pl, dh, dw, y_ptr,
                         KH: tl.constexpr, KW: tl.constexpr, RELU: tl.constexpr,
                         ZERO_INVALID: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        # Grid: (tile of output positions, tile of channel slots, sample). slot_ptr / valid_ptr:
        # [N, S] channel index and validity of each slot; invalid slots are never computed.
        # ZERO_INVALID: the slots hold every channel once (a permutation) and invalid ones are
        # written as 0, for a caller whose Y is not zero-initialised (TensorRT's AOT plugin:
        # one kernel, no memset); else they are not written at all.
        n = tl.program_id(2)
        s = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        in_range = s < S
        active = tl.load(valid_ptr + n * S + s, mask=in_range, other=0) != 0
        o = tl.load(slot_ptr + n * S + s, mask=in_range, other=0)
        _, oh, ow, m_ok = _rows(tl.program_id(0), OH * OW, OH, OW, BLOCK_M)
        dst = ((n * O + o[None, :]) * OH + oh[:, None]) * OW + ow[:, None]
        if _any(active[None, :]):
            nv = tl.full((BLOCK_M,), 0, tl.int32) + n
            acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
            acc = _conv_tile(acc, x_ptr, w_ptr, x_ptr, nv, oh, ow, m_ok, o, active, C, C, 0,
                             C, H, W, sh, sw, pt, pl, dh, dw, KH, KW, False, BLOCK_K)
            g = tl.load(gamma_ptr + n * O + o, mask=active, other=0.0)
            bn_scale = tl.load(scale_ptr + o, mask=active, other=0.0)
            bn_shift = tl.load(shift_ptr + o, mask=active, other=0.0)
            beta = tl.load(beta_ptr + o, mask=active, other=0.0)
            out = g[None, :] * (bn_scale[None, :] * acc + bn_shift[None, :]) + beta[None, :]
            if RELU:
                out = tl.maximum(out, 0.0)
            if ZERO_INVALID:
                tl.store(y_ptr + dst, tl.where(active[None, :], out, 0.0).to(y_ptr.dtype.element_ty),
                         mask=m_ok[:, None] & in_range[None, :])
            else:
                tl.store(y_ptr + dst, out.to(y_ptr.dtype.element_ty),
                         mask=m_ok[:, None] & active[None, :])
        elif ZERO_INVALID:
            zero = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
            tl.store(y_ptr + dst, zero.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & in_range[None, :])


# ------------------------------------------------------------------------------------------
# CG's plan: base / rest channel lists and the weights gathered to them
# ------------------------------------------------------------------------------------------
_DERIVED: dict = {}
_DERIVED_MAX = 64


def _derived(kind: str, tensors: tuple, build):
    """build(), cached per `kind` and tensor objects: weak references (so a freed tensor's
    address reused by another never hits) and the tensors' in-place versions. A caller
    that wraps the same memory in a new tensor each call (TensorRT's plugin) just rebuilds,
    with device ops only."""
    key = (kind, *(id(t) for t in tensors))
    versions = tuple(t._version for t in tensors)
    hit = _DERIVED.get(key)
    if hit is not None:
        refs, old_versions, value = hit
        if all(r() is t for r, t in zip(refs, tensors)) and old_versions == versions:
            return value
    value = build()
    if len(_DERIVED) >= _DERIVED_MAX:
        _DERIVED.pop(next(iter(_DERIVED)))
    _DERIVED[key] = (tuple(weakref.ref(t) for t in tensors), versions, value)
    return value


def channels_last_weights(w: torch.Tensor) -> torch.Tensor:
    """W [O, C, KH, KW] as the kernels read it: [O, KH, KW, C] contiguous (cached)."""
    return _derived("channels_last", (w,), lambda: w.permute(0, 2, 3, 1).contiguous())


def cg_plan(w: torch.Tensor, base_mask: torch.Tensor) -> tuple:
    """(w1, w2, chans, counts) for _cg_conv_kernel, built with device ops only (no host
    synchronisation): chans [2, C] int32 = the channels that are base for some output (in
    channel order, then padding) and those that are not base for some output; counts [2]
    int32 their numbers; w1 = W * mask and w2 = W * (1 - mask) with the columns gathered to
    those lists, laid out [O, KH, KW, C]. Written with `where` so that a weight of the other
    path is exactly 0. Cached per (W, base_mask) (_derived)."""
    def build():
        on = base_mask != 0
        in_base = on.any(dim=0)
        in_rest = (~on).any(dim=0)
        # stable argsort of "not in the list": the list's channels first, in channel order
        order_b = torch.argsort((~in_base).to(torch.int32), stable=True)
        order_r = torch.argsort((~in_rest).to(torch.int32), stable=True)
        zero = torch.zeros((), dtype=w.dtype, device=w.device)
        on4 = on[:, :, None, None]
        w1 = torch.where(on4, w, zero)[:, order_b].permute(0, 2, 3, 1).contiguous()
        w2 = torch.where(on4, zero, w)[:, order_r].permute(0, 2, 3, 1).contiguous()
        chans = torch.stack([order_b, order_r]).to(torch.int32).contiguous()
        counts = torch.stack([in_base.sum(), in_rest.sum()]).to(torch.int32)
        return w1, w2, chans, counts

    return _derived("cg_plan", (w, base_mask), build)


def cg_conv(x: torch.Tensor, w: torch.Tensor, base_mask: torch.Tensor, threshold: torch.Tensor,
            strides=(1, 1), pads=(0, 0, 0, 0), dilations=(1, 1)) -> torch.Tensor:
    """CGConv (OPS.md) with Triton."""
    _check_device(x, w, base_mask, threshold)
    n, c, h, wd, o, cw, kh, kw, sh, sw, pt, pl, dh, dw, oh, ow = _geometry(
        x, w, strides, pads, dilations, 1)
    if tuple(base_mask.shape) != (o, c) or threshold.numel() != o:
        raise UserError(f"base_mask must be {(o, c)} and threshold have {o} values")
    w1, w2, chans, counts = cg_plan(w, base_mask)
    y = torch.empty((n, o, oh, ow), dtype=x.dtype, device=x.device)
    m = n * oh * ow
    if y.numel() == 0:
        return y
    bm, bn = tile_sizes(m, o)
    _cg_conv_kernel[(triton.cdiv(m, bm), triton.cdiv(o, bn))](
        x.contiguous(), w1, w2, chans, counts, _f32(threshold).view(-1),
        m, c, h, wd, o, oh, ow, sh, sw, pt, pl, dh, dw, y, KH=kh, KW=kw,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=BLOCK_K, num_warps=NUM_WARPS, num_stages=NUM_STAGES)
    return y


def pg_scale(x: torch.Tensor, static_scale: float = 0.0) -> torch.Tensor:
    """PG's per-tensor scale as a 1-element float32 device tensor (no host sync):
    static_scale if > 0, else max|X| + 1e-7 in float32 (reference.pg_split_activations)."""
    if static_scale > 0:
        return torch.full((1,), static_scale, dtype=torch.float32, device=x.device)
    return (x.abs().amax().to(torch.float32) + torch.tensor(1e-7, dtype=torch.float32)).reshape(1)


def pg_levels(abits: int, pred_bits: int) -> tuple[float, float]:
    """(levels, unit) = (2^abits - 1, 2^(abits - pred_bits)): the kernel's constexprs."""
    return float(2 ** abits - 1), float(2 ** (abits - pred_bits))


def pg_int_levels(dtype: torch.dtype, abits: int, pred_bits: int) -> bool:
    """Whether an fp16 PG kernel feeds the integer levels to the tensor cores (both parts'
    largest level exact in float16); fp32 always uses the dequantized values."""
    return (dtype == torch.float16 and 2 ** pred_bits - 1 <= FP16_EXACT_INT
            and 2 ** (abits - pred_bits) - 1 <= FP16_EXACT_INT)


def pg_parts(x: torch.Tensor, scale: torch.Tensor, abits: int, pred_bits: int) -> torch.Tensor:
    """X's PG parts [2, *X.shape] (MSB, LSB; reference.pg_split_activations), quantized once
    per call for pg_conv's kernel: float16 integer levels (sign * q_hb / unit, sign * q_lb)
    where pg_int_levels says the tensor cores take them, else float32 dequantized values.
    `scale`: pg_scale's device tensor."""
    _check_device(x, x, scale)
    _check_int32_size(x.numel())
    levels, unit = pg_levels(abits, pred_bits)
    int_levels = pg_int_levels(x.dtype, abits, pred_bits)
    x = x.contiguous()
    parts = torch.empty((2, *x.shape), dtype=torch.float16 if int_levels else torch.float32, device=x.device)
    if x.numel():
        _pg_split_kernel[(triton.cdiv(x.numel(), SPLIT_BLOCK),)](
            x, scale, x.numel(), parts[0], parts[1], LEVELS=levels, UNIT=unit, INT_LEVELS=int_levels,
            RINT_ASM=not INTERPRETED, BLOCK=SPLIT_BLOCK, num_warps=NUM_WARPS)
    return parts


def pg_conv(x: torch.Tensor, w: torch.Tensor, threshold: torch.Tensor, abits: int,
            pred_bits: int, static_scale: float = 0.0, strides=(1, 1), pads=(0, 0, 0, 0),
            dilations=(1, 1), group: int = 1) -> torch.Tensor:
    """PGConv (OPS.md) with Triton; the dynamic scale max|X| + 1e-7 is reduced on the device."""
    _check_device(x, w, threshold)
    if not 0 < pred_bits < abits:
        raise UserError(f"need 0 < pred_bits < abits, not pred_bits={pred_bits}, abits={abits}")
    n, c, h, wd, o, cw, kh, kw, sh, sw, pt, pl, dh, dw, oh, ow = _geometry(
        x, w, strides, pads, dilations, group)
    if threshold.numel() != o:
        raise UserError(f"threshold must have {o} values")
    y = torch.empty((n, o, oh, ow), dtype=x.dtype, device=x.device)
    if y.numel() == 0:
        return y
    m, og = n * oh * ow, o // group
    levels, unit = pg_levels(abits, pred_bits)
    scale = pg_scale(x, static_scale)
    parts = pg_parts(x, scale, abits, pred_bits)
    int_levels = parts.dtype == torch.float16  # the parts hold integer levels (pg_parts)
    bm, bn = tile_sizes(m, og, group)
    grid = (triton.cdiv(m, bm), group * triton.cdiv(og, bn))
    _pg_conv_kernel[grid](
        parts[0], parts[1], channels_last_weights(w), _f32(threshold).view(-1), scale,
        m, c, h, wd, o, oh, ow, cw, og, sh, sw, pt, pl, dh, dw, y, KH=kh, KW=kw, LEVELS=levels,
        UNIT=unit, INT_LEVELS=int_levels, BLOCK_M=bm, BLOCK_N=bn,
        BLOCK_K=BLOCK_K, num_warps=NUM_WARPS, num_stages=NUM_STAGES)
    return y


def fbs_slots(gamma: torch.Tensor, density: float, threshold: float | None = None):
    """(slots, valid): per sample a fixed number of channel slots [N, S] int32 and their
    validity [N, S] int32, on the device without a host sync. Online: the top k = ceil(O *
    density) channels by g, valid where g > the (k+1)-th largest g (reference
    fbs_active_channels: ties at the cut are excluded, so some of the k slots may be
    invalid); all O valid when k >= O. Fixed threshold: all O channels sorted by g
    (descending, so the valid ones come first and whole tiles of invalid slots are skipped),
    valid where g > float32(threshold)."""
    n, o = gamma.shape
    k = math.ceil(o * float(density))
    if threshold is not None:
        values, slots = torch.sort(gamma, dim=1, descending=True)
        valid = values > float(torch.tensor(threshold, dtype=torch.float32))
    elif k >= o:
        slots = torch.arange(o, device=gamma.device).expand(n, o)
        valid = torch.ones((n, o), dtype=torch.bool, device=gamma.device)
    else:
        values, slots = torch.topk(gamma, k + 1, dim=1)  # descending; values[:, k] = the cut
        valid = values[:, :k] > values[:, k:]
        slots = slots[:, :k]
    return slots.to(torch.int32).contiguous(), valid.to(torch.int32).contiguous()


def fbs_conv(x: torch.Tensor, w: torch.Tensor, fc_w: torch.Tensor, fc_b: torch.Tensor,
             bn_scale: torch.Tensor, bn_shift: torch.Tensor, beta: torch.Tensor, density: float,
             pool: str = "avg", strides=(1, 1), pads=(0, 0, 0, 0), dilations=(1, 1),
             activation: str = "Relu", pool_pads=(0, 0, 0, 0), threshold: float | None = None) -> torch.Tensor:
    """FBSConv (OPS.md) with Triton: only the active (sample, channel) pairs are computed;
    the saliency (pool, predictor, channel slots) is a few whole-tensor torch ops."""
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
    y = torch.zeros((n, o, oh, ow), dtype=x.dtype, device=x.device)
    if y.numel() == 0:
        return y
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
    slots, valid = fbs_slots(gamma, density, threshold)
    s = slots.shape[1]
    bm, bn = tile_sizes(oh * ow, s, n)
    _fbs_conv_kernel[(triton.cdiv(oh * ow, bm), triton.cdiv(s, bn), n)](
        x.contiguous(), channels_last_weights(w), slots, valid, gamma.contiguous(),
        _f32(bn_scale).view(-1), _f32(bn_shift).view(-1), _f32(beta).view(-1),
        s, c, h, wd, o, oh, ow, sh, sw, pt, pl, dh, dw, y, KH=kh, KW=kw,
        RELU=activation == "Relu", ZERO_INVALID=False, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=BLOCK_K, num_warps=NUM_WARPS, num_stages=NUM_STAGES)
    return y


# ------------------------------------------------------------------------------------------
# Signatures for ahead-of-time compilation (tests/test_triton_compile.py, tools/gpu_check.py)
# ------------------------------------------------------------------------------------------
_GEOMETRY_ARGS = ("sh", "sw", "pt", "pl", "dh", "dw")


def kernel_signatures(dtype: str = "fp32", kh: int = 3, kw: int = 3, block_m: int = BLOCK_M,
                      block_n: int = BLOCK_N, abits: int = 8, pred_bits: int = 4,
                      relu: bool = True, zero_invalid: bool = False) -> dict:
    """{kernel name: [(argument, Triton type or constexpr value)]}, in argument order, for
    X / W / Y of `dtype` ("fp32" or "fp16"): what triton.compile's ASTSource and
    triton.tools.compile take. Every kernel takes its input pointers, then its i32 scalars,
    then its output pointers (then the constexprs): the order in which TensorRT's AOT
    plugins launch a kernel (runtimes/tensorrt_aot.py), so the same kernel serves both. Scalars are i32 or pointers (PG's scale is a *fp32): no fp32
    scalar argument, which Triton >= 3.4's AOT launcher would pass as a C double. Boolean
    constexprs are written as 0 / 1 (the AOT compiler parses constexprs as numbers)."""
    t = f"*{dtype}"
    ints = lambda *names: [(name, "i32") for name in names]  # noqa: E731
    blocks = [("KH", kh), ("KW", kw)]
    tiles = [("BLOCK_M", block_m), ("BLOCK_N", block_n), ("BLOCK_K", BLOCK_K)]
    levels, unit = pg_levels(abits, pred_bits)
    int_levels = pg_int_levels(torch.float16 if dtype == "fp16" else torch.float32, abits, pred_bits)
    parts = "*fp16" if int_levels else "*fp32"  # PG's quantized X parts (pg_conv)
    return {
        "_cg_conv_kernel": [
            ("x_ptr", t), ("w1_ptr", t), ("w2_ptr", t), ("chan_ptr", "*i32"), ("count_ptr", "*i32"),
            ("thr_ptr", "*fp32"), *ints("M", "C", "H", "W", "O", "OH", "OW"),
            *ints(*_GEOMETRY_ARGS), ("y_ptr", t), *blocks, *tiles],
        "_pg_split_kernel": [
            ("x_ptr", t), ("scale_ptr", "*fp32"), *ints("NUMEL"), ("msb_ptr", parts), ("lsb_ptr", parts),
            ("LEVELS", levels), ("UNIT", unit), ("INT_LEVELS", int(int_levels)), ("RINT_ASM", 1),
            ("BLOCK", SPLIT_BLOCK)],
        "_pg_conv_kernel": [
            ("msb_ptr", parts), ("lsb_ptr", parts), ("w_ptr", t), ("thr_ptr", "*fp32"), ("scale_ptr", "*fp32"),
            *ints("M", "C", "H", "W", "O", "OH", "OW", "CW", "OG"), *ints(*_GEOMETRY_ARGS), ("y_ptr", t),
            *blocks, ("LEVELS", levels), ("UNIT", unit), ("INT_LEVELS", int(int_levels)), *tiles],
        "_fbs_conv_kernel": [
            ("x_ptr", t), ("w_ptr", t), ("slot_ptr", "*i32"), ("valid_ptr", "*i32"),
            ("gamma_ptr", "*fp32"), ("scale_ptr", "*fp32"), ("shift_ptr", "*fp32"),
            ("beta_ptr", "*fp32"), *ints("S", "C", "H", "W", "O", "OH", "OW"),
            *ints(*_GEOMETRY_ARGS), ("y_ptr", t), *blocks, ("RELU", int(relu)),
            ("ZERO_INVALID", int(zero_invalid)), *tiles],
    }
