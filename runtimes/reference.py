"""Reference implementations of the `gate2deploy` custom ops: the executable specification.

Each function computes exactly what runtimes/OPS.md states, written plainly (whole-tensor
numpy/torch, no skipping of work), so that the native ONNX Runtime kernels, the Triton kernels
and the portable ONNX decomposition can all be tested against it, and it against the PyTorch
modules in `gate2deploy.gated`.

Conventions (as ONNX Conv): float32 numpy arrays in, float32 numpy arrays out, NCHW;
`strides` (sh, sw), `pads` (top, left, bottom, right), `dilations` (dh, dw), `group`.
Each function takes `return_gate=True` to also return its boolean gate, which tests use to
count flipped gates (the gates are discontinuous; a flip is only acceptable at a tie).
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["conv2d", "cg_conv_reference", "pg_conv_reference", "fbs_conv_reference",
           "sparse_input_conv_reference", "quantize_activation_reference",
           "pg_split_activations", "fbs_active_channels", "fbs_pool"]


def _f32(name: str, a) -> np.ndarray:
    a = np.asarray(a)
    if a.dtype != np.float32:
        raise TypeError(f"{name} must be float32, not {a.dtype}")
    return np.ascontiguousarray(a)


def _check_conv_attrs(strides, pads, dilations) -> tuple[tuple[int, int], tuple[int, ...], tuple[int, int]]:
    strides, pads, dilations = tuple(int(s) for s in strides), tuple(int(p) for p in pads), \
        tuple(int(d) for d in dilations)
    if len(strides) != 2 or min(strides) < 1:
        raise ValueError(f"strides must be 2 positive ints, not {strides}")
    if len(pads) != 4 or min(pads) < 0:
        raise ValueError(f"pads must be 4 non-negative ints (top, left, bottom, right), not {pads}")
    if len(dilations) != 2 or min(dilations) < 1:
        raise ValueError(f"dilations must be 2 positive ints, not {dilations}")
    return strides, pads, dilations


def conv2d(x: np.ndarray, w: np.ndarray, strides=(1, 1), pads=(0, 0, 0, 0), dilations=(1, 1),
           group: int = 1) -> np.ndarray:
    """ONNX Conv without bias (asymmetric pads allowed), float32."""
    strides, pads, dilations = _check_conv_attrs(strides, pads, dilations)
    x, w = _f32("X", x), _f32("W", w)
    if x.ndim != 4 or w.ndim != 4:
        raise ValueError(f"X and W must be 4-D, not {x.shape} and {w.shape}")
    if x.shape[1] != w.shape[1] * group or w.shape[0] % group:
        raise ValueError(f"X {x.shape} and W {w.shape} do not fit group={group}")
    top, left, bottom, right = pads
    odd = ~np.isfinite(w)
    if odd.any():
        # A NaN / inf weight times the zero padding: PyTorch's conv2d (the modules' semantics)
        # and ONNX Runtime's Conv never multiply the padding, so it adds nothing there, while
        # the explicit F.pad below would make it NaN. Those weights' products are added over
        # the taps that read the input only.
        y = conv2d(x, np.where(odd, np.float32(0), w), strides, pads, dilations, group)
        og, cw = w.shape[0] // group, w.shape[1]
        oh, ow = np.meshgrid(np.arange(y.shape[2]), np.arange(y.shape[3]), indexing="ij")
        for o, ci, i, j in zip(*np.nonzero(odd)):
            ih = oh * strides[0] - top + i * dilations[0]
            iw = ow * strides[1] - left + j * dilations[1]
            valid = (ih >= 0) & (ih < x.shape[2]) & (iw >= 0) & (iw < x.shape[3])
            rows, cols = np.nonzero(valid)
            c = (o // og) * cw + ci
            with np.errstate(invalid="ignore", over="ignore"):
                y[:, o, rows, cols] += w[o, ci, i, j] * x[:, c, ih[valid], iw[valid]]
        return y
    xt = torch.from_numpy(x)
    if (top, left) == (bottom, right):
        padding = (top, left)
    else:  # torch's conv2d only pads symmetrically: pad explicitly with zeros
        xt, padding = F.pad(xt, (left, right, top, bottom)), (0, 0)
    with torch.no_grad():
        y = F.conv2d(xt, torch.from_numpy(w), None, strides, padding, dilations, group)
    return y.numpy()


def _per_channel(name: str, a, o: int) -> np.ndarray:
    a = _f32(name, a).reshape(-1)
    if a.size != o:
        raise ValueError(f"{name} must have {o} values (one per output channel), not {a.size}")
    return a.reshape(1, o, 1, 1)


def _activation(y: np.ndarray, activation: str | None) -> np.ndarray:
    """act(y) for the ops' `activation` attribute: "Relu", or none (None / "")."""
    if activation not in (None, "", "Relu"):
        raise ValueError(f"activation must be 'Relu' or none, not {activation!r}")
    return np.maximum(y, np.float32(0)) if activation == "Relu" else y


def gated_post_epilogue(y, post_scale=None, post_shift=None, activation: str | None = None,
                        clip_max: float | None = None, quantize_levels: float | None = None,
                        quantize_scale: float = 0.0, quantize_eps: float = 1e-7):
    """The optional epilogue of CGConv and PGConv (OPS.md), in order: act(post_scale[o] * Y +
    post_shift[o]) (act = ReLU for activation "Relu"); then min(Y, clip_max) (ONNX Min: NaN
    stays NaN); then QuantizeActivation(levels=quantize_levels, scale=quantize_scale,
    eps=quantize_eps) over the whole tensor. Each step only when given. What
    passes/fuse_gated_epilogue.py fuses: a following BatchNormalization, Relu, Min (PACT's
    clamp) and the next quantized conv's activation quantizer."""
    if (post_scale is None) != (post_shift is None):
        raise ValueError("post_scale and post_shift come together")
    if post_scale is not None:
        o = y.shape[1]
        a = _per_channel("post_scale", post_scale, o)
        b = _per_channel("post_shift", post_shift, o)
        y = a * y + b
    y = _activation(y, activation).astype(np.float32)
    if clip_max is not None:
        if np.isnan(clip_max):
            raise ValueError("clip_max must not be NaN")
        y = np.minimum(y, np.float32(clip_max))  # NaN propagates, as ONNX Min
    if quantize_levels is not None:
        y = quantize_activation_reference(y, quantize_levels, quantize_scale, quantize_eps)
    return y.astype(np.float32)


def cg_conv_reference(x, w, base_mask, threshold, strides=(1, 1), pads=(0, 0, 0, 0),
                      dilations=(1, 1), return_gate: bool = False, post_scale=None,
                      post_shift=None, activation: str | None = None, **epilogue):
    """CGConv (OPS.md, semantics §3): the partial sum Yp over the base-path channels decides,
    per output element, whether the full sum Yf replaces it:

        Yp = conv(X, W * base_mask[:, :, None, None]); Yf = conv(X, W)
        Y = where(Yp > threshold[o], Yf, Yp)

    then the optional epilogue (gated_post_epilogue, `epilogue`: its clip_max and quantize_*
    keywords). Evaluated as the seed (and
    gate2deploy.gated's CGConv2d) writes it, Y = Yf * d + Yp * (1 - d) with d = (Yp > thr):
    the same values for finite data, and NaN wherever Yp or Yf is NaN or inf (0 * inf), as
    PyTorch gives; a plain `where` would keep a finite Yp beside a NaN Yf. (Changed from
    `where` to match the PyTorch module on non-finite inputs.)
    """
    x, w = _f32("X", x), _f32("W", w)
    o, c = w.shape[:2]
    base_mask = _f32("base_mask", base_mask)
    if base_mask.shape != (o, c):
        raise ValueError(f"base_mask must have shape {(o, c)}, not {base_mask.shape}")
    thr = _per_channel("threshold", threshold, o)
    yp = conv2d(x, w * base_mask[:, :, None, None], strides, pads, dilations)
    yf = conv2d(x, w, strides, pads, dilations)
    gate = yp > thr
    d = gate.astype(np.float32)
    with np.errstate(invalid="ignore"):  # 0 * inf -> NaN is the intended result
        y = (yf * d + yp * (np.float32(1) - d)).astype(np.float32)
    y = gated_post_epilogue(y, post_scale, post_shift, activation, **epilogue)
    return (y, gate) if return_gate else y


def pg_split_activations(x, abits: int, pred_bits: int, static_scale: float = 0.0):
    """PG's activation quantizer: (x_hb, x_lb, s), the MSB and LSB parts of X as floats.

    s = static_scale if > 0 else max|X| + 1e-7 (over the whole tensor, batch included);
    q = round_half_even(min(|X| / s, 1) * (2^B - 1)); q_hb keeps the top `pred_bits` bits.
    The operation order follows the seed's TorchTruncate (divide by 2^B-1, then times s, then
    times sign) so that the MSB part is bit-identical to the seed's.
    """
    x = _f32("X", x)
    b, bh = int(abits), int(pred_bits)
    if not 0 < bh < b:
        raise ValueError(f"need 0 < pred_bits < abits, not pred_bits={bh}, abits={b}")
    levels = np.float32(2.0 ** b - 1.0)
    lsb_unit = np.float32(2.0 ** (b - bh))
    sign = np.sign(x)
    mag = np.abs(x)
    if static_scale > 0:
        s = np.float32(static_scale)
    else:
        s = np.float32(mag.max() if mag.size else 0.0) + np.float32(1e-7)
    q = np.round(np.minimum(mag / s, np.float32(1.0)) * levels)  # np.round: half to even
    q_hb = np.floor(q / lsb_unit) * lsb_unit
    q_lb = q - q_hb
    x_hb = (q_hb / levels) * s * sign
    x_lb = (q_lb / levels) * s * sign
    return x_hb.astype(np.float32), x_lb.astype(np.float32), float(s)


def pg_conv_reference(x, w, threshold, abits: int, pred_bits: int, static_scale: float = 0.0,
                      strides=(1, 1), pads=(0, 0, 0, 0), dilations=(1, 1), group: int = 1,
                      return_gate: bool = False, post_scale=None, post_shift=None,
                      activation: str | None = None, **epilogue):
    """PGConv (OPS.md, semantics §4). W is already quantized (float values).

        out_msb = conv(x_hb, W); gate = out_msb > threshold[o]
        Y = out_msb + gate * conv(x_lb, W)

    then the optional epilogue (gated_post_epilogue, `epilogue`: its clip_max and quantize_*
    keywords).
    """
    w = _f32("W", w)
    thr = _per_channel("threshold", threshold, w.shape[0])
    x_hb, x_lb, _ = pg_split_activations(x, abits, pred_bits, static_scale)
    out_msb = conv2d(x_hb, w, strides, pads, dilations, group)
    gate = out_msb > thr
    out_lsb = conv2d(x_lb, w, strides, pads, dilations, group)
    y = (out_msb + gate.astype(np.float32) * out_lsb).astype(np.float32)
    y = gated_post_epilogue(y, post_scale, post_shift, activation, **epilogue)
    return (y, gate) if return_gate else y


def fbs_active_channels(g: np.ndarray, density: float, threshold: float | None = None) -> np.ndarray:
    """Mayo's bool_actives (mayo/net/tf/gate/base.py). Online (threshold None): per sample
    keep k = ceil(O * density) channels, active where g > the (k+1)-th largest g of that
    sample; all active when k >= O. k is computed in float64 from the given density (OPS.md).
    Fixed (Mayo's `local` / `global` stored threshold): active where g > float32(threshold)."""
    n, o = g.shape
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], not {density}")
    if threshold is not None:
        return g > np.float32(threshold)
    k = math.ceil(o * float(density))
    if k >= o:
        return np.ones_like(g, dtype=bool)
    kth = np.sort(g, axis=1)[:, o - k - 1]  # ascending: index o-k-1 is the (k+1)-th largest
    return g > kth[:, None]


def fbs_pool(x: np.ndarray, pool: str = "avg", pool_pads=(0, 0, 0, 0)) -> np.ndarray:
    """FBSConv's saliency pool [N, C] (OPS.md; Mayo's subsample): of X zero-padded by
    pool_pads (top, left, bottom, right), avg mean(x), max max(x), l1 mean(|x|), l2 mean(x^2)."""
    xt = torch.from_numpy(_f32("X", x))
    top, left, bottom, right = (int(p) for p in pool_pads)
    if min(top, left, bottom, right) < 0:
        raise ValueError(f"pool_pads must be >= 0, not {tuple(pool_pads)}")
    if top or left or bottom or right:
        xt = F.pad(xt, (left, right, top, bottom))
    if pool == "avg":
        pooled = xt.mean(dim=(2, 3))
    elif pool == "max":
        pooled = xt.amax(dim=(2, 3))
    elif pool == "l1":
        pooled = xt.abs().mean(dim=(2, 3))
    elif pool == "l2":
        pooled = (xt * xt).mean(dim=(2, 3))
    else:
        raise ValueError(f"pool must be 'avg', 'max', 'l1' or 'l2', not {pool!r}")
    return pooled.numpy()


def fbs_conv_reference(x, w, fc_w, fc_b, bn_scale, bn_shift, beta, density: float,
                       pool: str = "avg", strides=(1, 1), pads=(0, 0, 0, 0), dilations=(1, 1),
                       return_gate: bool = False, activation: str = "Relu",
                       pool_pads=(0, 0, 0, 0), threshold: float | None = None):
    """FBSConv (OPS.md, semantics §5):

        g = act(pool_HW(pad(X, pool_pads)) @ fc_W.T + fc_b)     [N, O]
        active = online top-k of g, or g > threshold (fbs_active_channels)
        Y = act(active * g * (bn_scale * conv(X, W) + bn_shift) + active * beta)

    act = ReLU for activation "Relu", identity for "Identity".
    """
    x, w = _f32("X", x), _f32("W", w)
    o, c = w.shape[:2]
    fc_w = _f32("fc_W", fc_w)
    if fc_w.shape != (o, x.shape[1]):
        raise ValueError(f"fc_W must have shape {(o, x.shape[1])}, not {fc_w.shape}")
    fc_b = _f32("fc_b", fc_b).reshape(-1)
    if fc_b.size != o:
        raise ValueError(f"fc_b must have {o} values, not {fc_b.size}")
    if activation not in ("Relu", "Identity"):
        raise ValueError(f"activation must be 'Relu' or 'Identity', not {activation!r}")
    scale, shift, b = (_per_channel(n, a, o) for n, a in
                       (("bn_scale", bn_scale), ("bn_shift", bn_shift), ("beta", beta)))
    pooled = torch.from_numpy(fbs_pool(x, pool, pool_pads))
    with torch.no_grad():
        g = F.linear(pooled, torch.from_numpy(fc_w), torch.from_numpy(fc_b))
        g = (torch.relu(g) if activation == "Relu" else g).numpy()
    active = fbs_active_channels(g, density, threshold)
    act = active.astype(np.float32)[:, :, None, None]
    y = conv2d(x, w, strides, pads, dilations)
    out = act * g[:, :, None, None] * (scale * y + shift) + act * b
    if activation == "Relu":
        out = np.maximum(out, np.float32(0))
    out = out.astype(np.float32)
    return (out, active) if return_gate else out


def sparse_input_conv_reference(x, w, b, strides=(1, 1), pads=(0, 0, 0, 0), dilations=(1, 1),
                                residual=None, activation: str | None = None):
    """SparseInputConv (OPS.md): act(Conv(X, W, B) + R), ONNX Conv with group 1."""
    b = _f32("B", b).reshape(-1)
    if b.size != np.asarray(w).shape[0]:
        raise ValueError(f"B must have {np.asarray(w).shape[0]} values, not {b.size}")
    y = conv2d(x, w, strides, pads, dilations) + b[None, :, None, None]
    if residual is not None:
        residual = _f32("R", residual)
        if residual.shape != y.shape:
            raise ValueError(f"R must have shape {y.shape}, not {residual.shape}")
        y = y + residual
    return _activation(y, activation).astype(np.float32)


def stream_conv_reference(x, w, b, strides=(1, 1), pads=(0, 0, 0, 0), dilations=(1, 1), group: int = 1,
                          activation: str | None = None):
    """StreamConv (OPS.md): act(Conv(X, W, B)), ONNX Conv with any group."""
    b = _f32("B", b).reshape(-1)
    if b.size != np.asarray(w).shape[0]:
        raise ValueError(f"B must have {np.asarray(w).shape[0]} values, not {b.size}")
    y = conv2d(x, w, strides, pads, dilations, group) + b[None, :, None, None]
    return _activation(y, activation).astype(np.float32)


def quantize_activation_reference(x, levels: float, scale: float = 0.0, eps: float = 1e-7) -> np.ndarray:
    """QuantizeActivation (OPS.md): the seed's sign-magnitude quantizer (gate2deploy.gated.
    quantize_sign_magnitude; dnn-gating utils/pg_utils.py TorchQuantize) in its float32
    operations, one by one, as the ONNX chain it replaces computes them: s = scale if > 0 else
    max|X| + eps (float32 sum); d = |X| / s; c = clip(d, 0, 1); r = round_half_even(c * levels);
    Y = ((r / levels) * s) * sign(X)."""
    x = _f32("X", x)
    f32 = np.float32
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        mag = np.abs(x)
        s = f32(scale) if scale > 0 else (mag.max() if mag.size else f32(0)) + f32(eps)
        s = f32(s)
        c = np.clip(mag / s, f32(0), f32(1))
        r = np.round(c * f32(levels))  # numpy rounds half to even, as ONNX Round
        return ((r / f32(levels)) * s * np.sign(x)).astype(np.float32)


def thresholds_for_fraction(stage1: np.ndarray, frac: float) -> np.ndarray:
    """Per-channel gate thresholds putting about `frac` of each channel's stage-1 values (CG's
    partial sums, PG's MSB outputs) above: the inputs tests and benchmarks drive the gated ops
    with, at a chosen gate-on fraction. Not part of any op's semantics."""
    per_channel = stage1.transpose(1, 0, 2, 3).reshape(stage1.shape[1], -1)
    if frac <= 0:
        return (per_channel.max(axis=1) + 1.0).astype(np.float32)
    if frac >= 1:
        return (per_channel.min(axis=1) - 1.0).astype(np.float32)
    # Midway across a gap between values: PG's stage 1 takes few distinct values (integer
    # sums, up to float rounding), and a threshold on one of them would manufacture ties.
    gap = 1e-4 * float(np.abs(stage1).max())
    thr = []
    for values in per_channel:
        q = np.quantile(values, 1.0 - frac)
        below, above = values[values <= q + gap], values[values > q + gap]
        thr.append((below.max() + above.min()) / 2 if above.size else q + gap)
    return np.asarray(thr, np.float32)
