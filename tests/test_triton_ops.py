"""Triton kernels (runtimes/triton_kernels.py) vs the reference, on the CPU interpreter.

TRITON_INTERPRET=1 is set before the kernels module is imported (fp32 and fp16: bfloat16
gives NaN under the interpreter). Tolerance and gate-tie accounting as in test_native_ops.py:
|Y - Y_ref| <= 1e-4 * max|Y_ref|, except flipped gates that sit at a tie. In fp16 the inputs
are rounded to fp16 first and the reference runs on those same values in fp32 (the kernels
accumulate in fp32 and decide gates there); Y is fp16, so an element within one fp16 rounding
step of the reference (|Y_ref| * 2^-10) counts as equal before the tie accounting.
Gate-on fractions 0, 0.2 and 1 for CG and PG; FBS at densities 0.2 and 1 and with every
channel's saliency at 0 (no channel on).
Also: the TensorRT plugin path fails cleanly (one-line UserError) where TensorRT or a GPU is
missing, which is always the case on this project's machines.
"""
from __future__ import annotations


import numpy as np
import pytest
import torch

from gate2deploy.errors import UserError
from gate2deploy.runtimes import reference as ref

from test_native_ops import assert_close_with_ties, cg_base_mask, quantize_weights


@pytest.fixture(scope="module")
def tk(triton_interpreted):
    """runtimes.triton_kernels on the interpreter (conftest.triton_interpreted)."""
    return triton_interpreted


# (N, C, O, H, W, k, strides, pads, dilations): kept small, the interpreter is slow
GEOMS = [
    (2, 4, 6, 5, 6, 3, (1, 1), (1, 1, 1, 1), (1, 1)),
    (1, 6, 4, 7, 7, 3, (2, 1), (0, 1, 2, 0), (1, 2)),
]


DTYPES = {"fp32": (np.float32, torch.float32), "fp16": (np.float16, torch.float16)}
FP16_STEP = 2.0 ** -10  # fp16's relative spacing: rounding the output moves it at most half of it


def T(a):
    return torch.from_numpy(np.ascontiguousarray(a))


def as_dtype(a: np.ndarray, dtype: str) -> np.ndarray:
    """`a` rounded to `dtype` and back to float32: the values the kernel really sees."""
    return a.astype(DTYPES[dtype][0]).astype(np.float32)


def run_out(y: torch.Tensor, dtype: str, y_ref: np.ndarray) -> np.ndarray:
    """The kernel's output as float32, with fp16 rounding of the output forgiven (see the
    module docstring); the dtype itself is checked too."""
    assert y.dtype == DTYPES[dtype][1]
    out = y.to(torch.float32).numpy()
    if dtype == "fp16":
        out = np.where(np.abs(out - y_ref) <= np.abs(y_ref) * FP16_STEP, y_ref, out)
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("frac", [0.0, 0.2, 1.0])
@pytest.mark.parametrize("gi", range(len(GEOMS)))
def test_triton_cg_conv(tk, gi, frac, dtype):
    n, c, o, h, w, k, s, p, d = GEOMS[gi]
    rng = np.random.default_rng(gi)
    x = as_dtype(rng.standard_normal((n, c, h, w)), dtype)
    wt = as_dtype(rng.standard_normal((o, c, k, k)), dtype)
    mask = cg_base_mask(o, c, 2, block_diagonal=gi == 1)
    yp = ref.conv2d(x, wt * mask[:, :, None, None], s, p, d)
    thr = ref.thresholds_for_fraction(yp, frac)
    np_dtype = DTYPES[dtype][0]
    y_ref = ref.cg_conv_reference(x, wt, mask, thr, s, p, d)
    y = tk.cg_conv(T(x.astype(np_dtype)), T(wt.astype(np_dtype)), T(mask), T(thr), s, p, d)
    assert_close_with_ties(run_out(y, dtype, y_ref), y_ref, yp, thr)
    on = (yp > thr.reshape(1, -1, 1, 1)).mean()
    assert on == frac if frac in (0.0, 1.0) else 0.1 < on < 0.3  # the gate-on fraction asked for


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", [(3, 2), (8, 4), (14, 2)])  # (14, 2): fp16 takes fp32 parts
@pytest.mark.parametrize("frac", [0.0, 0.2, 1.0])
@pytest.mark.parametrize("gi", range(len(GEOMS)))
def test_triton_pg_conv(tk, gi, frac, bits, dtype):
    n, c, o, h, w, k, s, p, d = GEOMS[gi]
    group = 2 if gi == 0 else 1
    rng = np.random.default_rng(gi)
    x = as_dtype(rng.standard_normal((n, c, h, w)), dtype)  # signs too
    wt = as_dtype(quantize_weights(rng.standard_normal((o, c // group, k, k)).astype(np.float32), 8), dtype)
    x_hb, _, _ = ref.pg_split_activations(x, *bits)
    msb = ref.conv2d(x_hb, wt, s, p, d, group)
    thr = ref.thresholds_for_fraction(msb, frac)
    np_dtype = DTYPES[dtype][0]
    y_ref = ref.pg_conv_reference(x, wt, thr, *bits, 0.0, s, p, d, group)
    y = tk.pg_conv(T(x.astype(np_dtype)), T(wt.astype(np_dtype)), T(thr), *bits, 0.0, s, p, d, group)
    assert_close_with_ties(run_out(y, dtype, y_ref), y_ref, msb, thr)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", [(3, 2), (8, 4), (12, 1), (14, 2)])  # (14, 2): fp16 X, fp32 parts
def test_triton_pg_parts_are_the_reference_parts(tk, bits, dtype):
    """pg_conv quantizes X once (pg_parts) and convolves the parts: the parts must be the
    reference's x_hb / x_lb bit for bit (float32 values), or, where the fp16 kernel feeds the
    tensor cores integer levels, exactly those levels (x_hb = level * s * unit / levels)."""
    rng = np.random.default_rng(7)
    x = as_dtype(rng.standard_normal((2, 3, 5, 7)) * 3, dtype)
    x[0, 0, 0, :3] = [0.0, -0.0, float(np.abs(x).max())]  # zeros and the scale's own element
    x_hb, x_lb, s = ref.pg_split_activations(x, *bits)
    xt = T(x.astype(DTYPES[dtype][0]))
    parts = tk.pg_parts(xt, tk.pg_scale(xt), *bits)
    levels, unit = 2.0 ** bits[0] - 1, 2.0 ** (bits[0] - bits[1])
    if tk.pg_int_levels(xt.dtype, *bits):
        assert parts.dtype == torch.float16
        # the reference's q levels from its own parts (exact: powers of two and small integers)
        q_hb = np.round(np.abs(x_hb) / np.float32(s) * levels) * np.sign(x_hb)
        q_lb = np.round(np.abs(x_lb) / np.float32(s) * levels) * np.sign(x_lb)
        np.testing.assert_array_equal(parts[0].float().numpy(), q_hb / unit)
        np.testing.assert_array_equal(parts[1].float().numpy(), q_lb)
    else:
        assert parts.dtype == torch.float32
        np.testing.assert_array_equal(parts[0].numpy(), x_hb)
        np.testing.assert_array_equal(parts[1].numpy(), x_lb)


def test_triton_kernels_refuse_tensors_beyond_int32_indexing(tk):
    """The kernels index with int32: a tensor of 2^31 elements or more is refused with one
    line before any launch (meta tensors: nothing is allocated)."""
    x = torch.empty((1, 1, 2 ** 16, 2 ** 15), device="meta")
    w = torch.empty((1, 1, 1, 1), device="meta")
    thr = torch.empty(1, device="meta")
    with pytest.raises(UserError, match="int32"):
        tk.pg_conv(x, w, thr, 3, 2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ["density0.2", "density1", "all_off"])
@pytest.mark.parametrize("gi", range(len(GEOMS)))
def test_triton_fbs_conv(tk, gi, case, dtype):
    n, c, o, h, w, k, s, p, d = GEOMS[gi]
    rng = np.random.default_rng(gi)
    x = rng.standard_normal((n, c, h, w)).astype(np.float32)
    x[:, 1] = 0.0  # a channel switched off by a previous layer
    x = as_dtype(x, dtype)
    wt = as_dtype(rng.standard_normal((o, c, k, k)), dtype)
    fc_w = rng.standard_normal((o, c)).astype(np.float32)
    # all_off: every saliency relu(...) is 0, so no channel is above the (k+1)-th largest
    fc_b = np.full(o, -1e3, np.float32) if case == "all_off" else (rng.standard_normal(o) + 1).astype(np.float32)
    density = 0.2 if case == "density0.2" else 1.0 if case == "density1" else 0.5
    sc, sh, be = (rng.standard_normal(o).astype(np.float32) for _ in range(3))
    np_dtype = DTYPES[dtype][0]
    y_ref, active = ref.fbs_conv_reference(x, wt, fc_w, fc_b, sc, sh, be, density, "avg", s, p, d,
                                           return_gate=True)
    y = tk.fbs_conv(T(x.astype(np_dtype)), T(wt.astype(np_dtype)), T(fc_w), T(fc_b), T(sc), T(sh),
                    T(be), density, "avg", s, p, d)
    y = run_out(y, dtype, y_ref)
    np.testing.assert_allclose(y, y_ref, rtol=0, atol=1e-4 * max(np.abs(y_ref).max(), 1e-30))
    assert (y[~active] == 0).all()
    assert active.any() == (case != "all_off") and active.all() == (case == "density1")


def test_triton_rejects_bad_input(tk):
    x = torch.zeros((1, 4, 5, 5))
    with pytest.raises(UserError, match="do not fit"):
        tk.cg_conv(x, torch.zeros((2, 3, 3, 3)), torch.zeros((2, 3)), torch.zeros(2))
    with pytest.raises(UserError, match="float32"):
        tk.cg_conv(x.double(), torch.zeros((2, 4, 3, 3)), torch.zeros((2, 4)), torch.zeros(2))
    with pytest.raises(UserError, match="float16"):  # X and W in different precisions
        tk.cg_conv(x.half(), torch.zeros((2, 4, 3, 3)), torch.zeros((2, 4)), torch.zeros(2))


def test_tensorrt_plugins_fail_cleanly_without_tensorrt():
    from gate2deploy.runtimes import tensorrt_available, tensorrt_plugins

    problem = tensorrt_available()
    if problem is None:
        pytest.skip("TensorRT and a GPU are available here")
    with pytest.raises(UserError) as info:
        tensorrt_plugins.register_plugins()
    assert len(str(info.value).splitlines()) == 1 and "TensorRT" in str(info.value)
    with pytest.raises(UserError):
        tensorrt_plugins.build_engine("model.onnx", "model.engine")


def test_prepare_for_tensorrt_adds_plugin_attributes():
    from gate2deploy.runtimes.tensorrt_plugins import prepare_for_tensorrt
    from test_native_ops import single_node_model, _cg_inputs

    model = single_node_model("CGConv", (1, 8, 5, 5), list(_cg_inputs()), {})
    prepared = prepare_for_tensorrt(model)
    attrs = {a.name: a for a in prepared.graph.node[0].attribute}
    assert attrs["plugin_namespace"].s == b"gate2deploy" and attrs["plugin_version"].s == b"1"
    assert not any(a.name.startswith("plugin") for a in model.graph.node[0].attribute)  # a copy
    bad = single_node_model("CGConv", (1, 8, 5, 5), list(_cg_inputs()), {})
    bad.graph.node[0].op_type = "Mystery"
    with pytest.raises(UserError, match="no TensorRT plugin"):
        prepare_for_tensorrt(bad)


@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_fbs_ties_threshold_and_options(tk, dtype):
    """The fixed slot grid (runtimes.triton_kernels.fbs_slots) keeps the reference's rule:
    saliency ties AT the cut are excluded (some of the k top slots are invalid), a fixed
    threshold (Mayo) activates g > threshold only; with the max / l2 pools, Identity and
    pool_pads. Expected values: reference.fbs_conv_reference (Mayo's bool_actives)."""
    n, c, o, h, w = 2, 4, 8, 5, 5
    rng = np.random.default_rng(7)
    x = as_dtype(rng.standard_normal((n, c, h, w)), dtype)
    wt = as_dtype(rng.standard_normal((o, c, 3, 3)), dtype)
    sc, sh, be = (rng.standard_normal(o).astype(np.float32) for _ in range(3))
    # fc_W = 0: g = act(fc_b) for every sample; values 3, 2, 2, 2, 1, ...: with density 0.25
    # (k = 2) the cut (3rd largest) is 2, so only the channel with 3 is active, not the ties
    fc_w = np.zeros((o, c), np.float32)
    fc_b = np.array([1, 2, 3, 2, 0.5, 2, 0.25, 0.1], np.float32)
    np_dtype = DTYPES[dtype][0]
    cases = [dict(density=0.25), dict(density=0.5, threshold=0.3, pool="max"),
             dict(density=0.5, activation="Identity", pool="l2", pool_pads=(1, 0, 2, 1))]
    for case in cases:
        density = case["density"]
        kw = {k: v for k, v in case.items() if k != "density"}
        y_ref, active = ref.fbs_conv_reference(x, wt, fc_w, fc_b, sc, sh, be, density, kw.pop("pool", "avg"),
                                               return_gate=True, **kw)
        y = tk.fbs_conv(T(x.astype(np_dtype)), T(wt.astype(np_dtype)), T(fc_w), T(fc_b), T(sc), T(sh), T(be),
                        density, case.get("pool", "avg"), **{k: v for k, v in case.items()
                                                             if k not in ("density", "pool")})
        y = run_out(y, dtype, y_ref)
        np.testing.assert_allclose(y, y_ref, rtol=0, atol=1e-4 * max(np.abs(y_ref).max(), 1e-30))
        assert (y[~active] == 0).all()
    # the tie case really has ties at the cut and excludes them: one channel on per sample
    _, active = ref.fbs_conv_reference(x, wt, fc_w, fc_b, sc, sh, be, 0.25, return_gate=True)
    assert active.sum(axis=1).tolist() == [1, 1]
