"""Native ONNX Runtime kernels (runtimes/native/) vs the reference (runtimes/reference.py).

Tolerance: |Y_kernel - Y_ref| <= 1e-4 * max|Y_ref| elementwise (fp32; the kernels use other
summation orders, FMA, and for PG exact integer sums). The gates are discontinuous: an
element beyond that tolerance counts as a flipped gate, and is accepted only if it is a tie
(its stage-1 value is within 1e-5 * max|stage 1| of the threshold, or for FBS its saliency is
within 1e-5 of the top-k cut) and flips are rare (<= 0.5% of gates).

Comparisons are NaN-aware (tests/nan_compare.py): a NaN or inf must be matched by the same
NaN or inf in the reference, never excused by a tolerance.

Gate-on fractions 0, ~0.05 (sparse second stage), ~0.6 (dense second stage) and 1 are set
through the thresholds (per-channel quantiles of the reference's stage-1 output).

The `sanitizer` test reruns the small cases of this file in a subprocess against the
AddressSanitizer + UBSan build, with libasan preloaded; `isa` tests rerun them with the
generic and AVX2 inner loops forced.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from gate2deploy.capture import IR_VERSION
from gate2deploy.errors import UserError
from gate2deploy.runtimes import reference as ref
from gate2deploy.runtimes.ort import custom_ops_library_path, open_session
from gate2deploy.runtimes.ort_layout import nchwc_block
from nan_compare import assert_nonfinite_match, normwise_error

RTOL = 1e-4
TIE = 1e-5
MAX_FLIP_FRACTION = 0.005
IN_SUBPROCESS = os.environ.get("G2D_NATIVE_SUBPROCESS") == "1"


@pytest.fixture(scope="session", autouse=True)
def native_library():
    return custom_ops_library_path()


def single_node_model(op: str, x_shape, initializers: list[np.ndarray], attrs: dict,
                      dynamic_x: bool = False) -> onnx.ModelProto:
    names = [f"in{i}" for i in range(len(initializers))]
    node = helper.make_node(op, ["x", *names], ["y"], domain="gate2deploy", **attrs)
    x_dims = ["n", "c", "h", "w"] if dynamic_x else list(x_shape)  # x_shape unused if dynamic
    graph = helper.make_graph(
        [node], op,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_dims)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [helper.make_tensor(n, TensorProto.FLOAT, a.shape, a.ravel()) for n, a in zip(names, initializers)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("gate2deploy", 1)])
    model.ir_version = IR_VERSION
    return model


def run_node(op, x, initializers, attrs, dynamic_x=False):
    sess = open_session(single_node_model(op, x.shape, initializers, attrs, dynamic_x), threads=2)
    return sess.run(None, {"x": x})[0]


def native_counter(symbol: str, *args: int) -> int:
    """One of the native library's int64 run counters (exported C functions, read via ctypes;
    `args`: the counter's int arguments, e.g. G2DSecondStageRuns' kind)."""
    import ctypes

    fn = getattr(ctypes.CDLL(str(custom_ops_library_path())), symbol)
    fn.restype = ctypes.c_int64
    return fn(*args)


def delegated_conv_runs() -> int:
    """Convolutions the native library has handed to ONNX Runtime's NCHWc conv so far."""
    return native_counter("G2DDelegatedConvRuns")


def amx_conv_runs() -> int:
    """Samples PGConv has run on AMX int8 tiles so far (runtimes/native/pg_amx.h)."""
    return native_counter("G2DAmxConvRuns")


def pg_int8_runs() -> int:
    """Samples PGConv has run on its int8 kernels (AVX2 / VNNI) so far (runtimes/native/pg_int8.h)."""
    return native_counter("G2DPGInt8Runs")


def pg_int8_kernel() -> str:
    """Which int8 PG kernel this process runs: "avx2", "vnni" or "off" (G2DKernelConfig)."""
    import ctypes

    fn = ctypes.CDLL(str(custom_ops_library_path())).G2DKernelConfig
    fn.restype = ctypes.c_char_p
    return dict(kv.split("=", 1) for kv in fn().decode().split())["pg_int8"]


CPU_FLAGS = set(open("/proc/cpuinfo").read().split())
ORT_CONV_EXPECTED = os.environ.get("G2D_ORT_CONV") != "0" and "avx2" in CPU_FLAGS
AMX_EXPECTED = os.environ.get("G2D_AMX") != "0" and {"amx_tile", "amx_int8"} <= CPU_FLAGS
# PG's int8 kernels run where AMX does not, under the avx2 / avx512 ISA tables.
INT8_EXPECTED = (not AMX_EXPECTED and os.environ.get("G2D_PG_INT8") != "0" and "avx2" in CPU_FLAGS
                 and os.environ.get("G2D_ISA") != "generic")


def assert_close_with_ties(y, y_ref, stage1, thr_per_channel):
    assert y.shape == y_ref.shape
    assert_nonfinite_match(y, y_ref)  # a NaN never passes as "close" (nan_compare.py)
    finite = np.isfinite(y_ref)
    scale = max(float(np.abs(y_ref[finite]).max()) if finite.any() else 0.0, 1e-30)
    with np.errstate(invalid="ignore"):
        bad = (np.abs(y - y_ref) > RTOL * scale) & finite
    if bad.any():
        margin = np.abs(stage1 - thr_per_channel.reshape(1, -1, 1, 1))
        tie_scale = max(float(np.abs(stage1).max()), 1e-30)
        assert (margin[bad] <= TIE * tie_scale).all(), (
            f"{bad.sum()} mismatches not at gate ties; worst margin {margin[bad].max():.3g}")
        assert bad.mean() <= MAX_FLIP_FRACTION, f"{bad.sum()} flipped gates of {bad.size}"


def conv_attrs(strides, pads, dilations, group=1):
    return dict(strides=list(strides), pads=list(pads), dilations=list(dilations), group=group)


# (N, C, O, H, W, k, strides, pads, dilations): small but covering the geometry
GEOMETRIES = [
    (1, 8, 8, 6, 6, 3, (1, 1), (1, 1, 1, 1), (1, 1)),
    (2, 12, 10, 9, 7, 3, (2, 1), (1, 0, 2, 1), (1, 1)),
    (3, 16, 20, 11, 11, 3, (1, 2), (2, 2, 2, 2), (2, 2)),
    (2, 8, 36, 5, 8, 1, (1, 1), (0, 0, 0, 0), (1, 1)),
    (1, 32, 40, 14, 14, 3, (1, 1), (1, 1, 1, 1), (1, 1)),
    (2, 6, 7, 10, 9, 5, (3, 2), (2, 1, 0, 3), (1, 2)),
]
SMALL = GEOMETRIES[:3]
FRACTIONS = [0.0, 0.05, 0.6, 1.0]  # 0.05: sparse second stage, 0.6: dense (CG: at its switch, both)


def geometry(gi):
    """GEOMETRIES[gi]; the sanitizer/ISA reruns (a subprocess) use the small shapes only."""
    geom = GEOMETRIES[gi]
    if IN_SUBPROCESS and geom not in SMALL:
        pytest.skip("small shapes only in the sanitizer/ISA reruns")
    return geom


def random_case(geom, seed):
    n, c, o, h, w, k, s, p, d = geom
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, c, h, w)).astype(np.float32)
    wt = (rng.standard_normal((o, c, k, k)) / math.sqrt(c * k * k)).astype(np.float32)
    return rng, x, wt, s, p, d


# ----------------------------------------------------------------------------- CGConv

def cg_base_mask(o, c, p, block_diagonal):
    mask = np.zeros((o, c), np.float32)
    if block_diagonal:  # output chunk i uses input chunk i (use_group=True)
        for i in range(p):
            mask[i * o // p:(i + 1) * o // p, i * c // p:(i + 1) * c // p] = 1
    else:
        mask[:, :max(1, c // p)] = 1
    return mask


@pytest.mark.parametrize("frac", FRACTIONS)
@pytest.mark.parametrize("block_diagonal", [False, True])
@pytest.mark.parametrize("gi", range(len(GEOMETRIES)))
def test_cg_conv_matches_reference(gi, block_diagonal, frac):
    geom = geometry(gi)
    rng, x, w, s, p, d = random_case(geom, seed=gi)
    o, c = w.shape[:2]
    mask = cg_base_mask(o, c, 4 if c >= 8 else 2, block_diagonal)
    yp = ref.conv2d(x, w * mask[:, :, None, None], s, p, d)
    thr = ref.thresholds_for_fraction(yp, frac)
    y = run_node("CGConv", x, [w, mask, thr], conv_attrs(s, p, d))
    y_ref = ref.cg_conv_reference(x, w, mask, thr, s, p, d)
    assert_close_with_ties(y, y_ref, yp, thr)
    if frac in (0.0, 1.0):  # no gate near its threshold: exact agreement expected
        np.testing.assert_allclose(y, y_ref, rtol=0, atol=RTOL * np.abs(y_ref).max())


@pytest.mark.parametrize("frac", [0.1, 0.3, 0.7])
def test_cg_conv_with_irregular_base_groups(frac):
    """Outputs in three groups of unequal size, each with its own scattered quarter of the
    input channels as base path: the kernel's joint second stage (one pass for all groups,
    zero weights on each group's own base channels) must equal the reference."""
    rng = np.random.default_rng(5)
    n, c, o, h, wd = 2, 24, 20, 11, 9
    x = rng.standard_normal((n, c, h, wd)).astype(np.float32)
    w = (rng.standard_normal((o, c, 3, 3)) / math.sqrt(c * 9)).astype(np.float32)
    patterns = [rng.permutation(c) < c // 4 for _ in range(3)]
    mask = np.stack([patterns[g] for g in rng.integers(0, 3, o)]).astype(np.float32)
    yp = ref.conv2d(x, w * mask[:, :, None, None], (1, 1), (1, 1, 1, 1), (1, 1))
    thr = ref.thresholds_for_fraction(yp, frac)
    y = run_node("CGConv", x, [w, mask, thr], conv_attrs((1, 1), (1, 1, 1, 1), (1, 1)))
    y_ref = ref.cg_conv_reference(x, w, mask, thr, (1, 1), (1, 1, 1, 1), (1, 1))
    assert_close_with_ties(y, y_ref, yp, thr)


@pytest.mark.parametrize("op, block_diagonal, frac", [("CGConv", False, 0.3), ("CGConv", True, 0.3),
                                                      ("CGConv", True, 0.9), ("PGConv", False, 0.3)])
@pytest.mark.parametrize("affine, activation", [(True, "Relu"), (True, ""), (False, "Relu")])
def test_gated_ops_apply_the_fused_epilogue(op, block_diagonal, frac, affine, activation):
    """The optional epilogue (a BatchNorm and Relu fused by passes/fuse_gated_epilogue.py):
    act(post_scale * Y + post_shift), applied after the gate decided, on every path (AMX and
    the delegate for wide PG, our GEMM for CG: the joint second stage of block-diagonal masks
    and, at 90% on, the dense one included); scales of both signs, a zero scale."""
    rng = np.random.default_rng(11)
    for geom in [(2, 32, 48, 12, 10, 3, (1, 1), (1, 1, 1, 1), (1, 1)),
                 (1, 8, 12, 9, 7, 3, (2, 1), (1, 0, 2, 1), (1, 2))]:
        n, c, o, h, wd, k, s, p, d = geom
        x = rng.standard_normal((n, c, h, wd)).astype(np.float32)
        w = rng.standard_normal((o, c, k, k)).astype(np.float32)
        post_scale = rng.uniform(-2, 2, o).astype(np.float32)
        post_scale[0] = 0.0
        post_shift = rng.standard_normal(o).astype(np.float32)
        post = dict(post_scale=post_scale, post_shift=post_shift) if affine else {}
        attrs = dict(conv_attrs(s, p, d), **({"activation": activation} if activation else {}))
        if op == "CGConv":
            mask = cg_base_mask(o, c, 4, block_diagonal)
            yp = ref.conv2d(x, w * mask[:, :, None, None], s, p, d)
            thr = ref.thresholds_for_fraction(yp, frac)
            y = run_node(op, x, [w, mask, thr, *post.values()], attrs)
            y_ref = ref.cg_conv_reference(x, w, mask, thr, s, p, d, activation=activation, **post)
        else:
            w = quantize_weights(w, 8)
            x_hb, _, _ = ref.pg_split_activations(x, 8, 4)
            yp = ref.conv2d(x_hb, w, s, p, d)
            thr = ref.thresholds_for_fraction(yp, 0.3)
            attrs.update(abits=8, pred_bits=4)
            y = run_node(op, x, [w, thr, *post.values()], attrs)
            y_ref = ref.pg_conv_reference(x, w, thr, 8, 4, 0.0, s, p, d, activation=activation, **post)
        if activation == "Relu":
            assert (y >= 0).all() and (y == 0).any()
        # Gates flip only at ties (assert_close_with_ties); pre-epilogue decisions are yp.
        y_plain = (ref.cg_conv_reference(x, w, mask, thr, s, p, d) if op == "CGConv" else
                   ref.pg_conv_reference(x, w, thr, 8, 4, 0.0, s, p, d))
        expected = ref.gated_post_epilogue(y_plain, *(post.values() or (None, None)), activation)
        np.testing.assert_array_equal(expected, y_ref)
        assert_close_with_ties(y, y_ref, yp, thr)


def test_cg_conv_irregular_base_mask():
    """Any 0/1 base mask is allowed (each output its own base set)."""
    rng, x, w, s, p, d = random_case(GEOMETRIES[1], seed=7)
    o, c = w.shape[:2]
    mask = (rng.random((o, c)) < 0.4).astype(np.float32)
    mask[0] = 0  # an output with an empty base path: its Yp is 0
    mask[1] = 1  # one with everything in the base path
    yp = ref.conv2d(x, w * mask[:, :, None, None], s, p, d)
    thr = ref.thresholds_for_fraction(yp, 0.3)
    y = run_node("CGConv", x, [w, mask, thr], conv_attrs(s, p, d))
    assert_close_with_ties(y, ref.cg_conv_reference(x, w, mask, thr, s, p, d), yp, thr)


# ----------------------------------------------------------------------------- PGConv

def quantize_weights(w, wbits):
    """The seed's weight quantizer (sign-magnitude, per-tensor scale), float32."""
    if wbits == 0:
        return w
    s = np.float32(np.abs(w).max()) + np.float32(1e-7)
    levels = np.float32(2 ** wbits - 1)
    q = np.round(np.abs(w) / s * levels)
    return ((q / levels) * s * np.sign(w)).astype(np.float32)


PG_BITS = [(3, 2, 8), (8, 4, 8), (4, 1, 4), (8, 4, 0), (12, 6, 8)]  # abits, pred_bits, wbits


@pytest.mark.parametrize("frac", FRACTIONS)
@pytest.mark.parametrize("bits", PG_BITS, ids=lambda b: f"a{b[0]}p{b[1]}w{b[2]}")
@pytest.mark.parametrize("gi", range(len(GEOMETRIES)))
def test_pg_conv_matches_reference(gi, bits, frac):
    geom = geometry(gi)
    abits, pred, wbits = bits
    n, c, o, h, wd, k, s, p, d = geom
    group = 2 if (c % 2 == 0 and o % 2 == 0 and gi % 2 == 0) else 1
    rng = np.random.default_rng(gi)
    x = np.clip(rng.standard_normal((n, c, h, wd)), 0, 2.5).astype(np.float32)  # after PACT
    if gi == 1:
        x = rng.standard_normal((n, c, h, wd)).astype(np.float32)  # negative inputs too
    w = quantize_weights(rng.standard_normal((o, c // group, k, k)).astype(np.float32), wbits)
    x_hb, _, _ = ref.pg_split_activations(x, abits, pred)
    msb = ref.conv2d(x_hb, w, s, p, d, group)
    thr = ref.thresholds_for_fraction(msb, frac)
    attrs = dict(conv_attrs(s, p, d, group), abits=abits, pred_bits=pred, static_scale=0.0)
    y = run_node("PGConv", x, [w, thr], attrs)
    y_ref = ref.pg_conv_reference(x, w, thr, abits, pred, 0.0, s, p, d, group)
    assert_close_with_ties(y, y_ref, msb, thr)


@pytest.mark.parametrize("frac", [0.0, 0.2, 1.0])
@pytest.mark.parametrize("bits", [(3, 2, 8), (8, 4, 8)], ids=lambda b: f"a{b[0]}p{b[1]}w{b[2]}")
@pytest.mark.parametrize("geom", [
    (1, 32, 48, 12, 10, 3, (1, 1), (1, 1, 1, 1), (1, 1)),
    (2, 16, 32, 11, 13, 3, (2, 1), (1, 0, 2, 1), (2, 1)),
])
def test_pg_conv_wide_layers_run_on_a_fast_path(geom, bits, frac):
    """Group-1 layers run their integer stages on AMX int8 tiles where the CPU has them, else
    on the int8 VNNI kernel (any stride) / AVX2 kernel (stride 1), else (whole channel blocks)
    as fp32 convs on ONNX Runtime's NCHWc conv; all exact. Negative inputs included."""
    abits, pred, wbits = bits
    n, c, o, h, wd, k, s, p, d = geom
    rng = np.random.default_rng(c + o)
    x = rng.standard_normal((n, c, h, wd)).astype(np.float32)
    w = quantize_weights(rng.standard_normal((o, c, k, k)).astype(np.float32), wbits)
    x_hb, _, _ = ref.pg_split_activations(x, abits, pred)
    msb = ref.conv2d(x_hb, w, s, p, d)
    thr = ref.thresholds_for_fraction(msb, frac)
    amx_before, delegated_before, int8_before = amx_conv_runs(), delegated_conv_runs(), pg_int8_runs()
    attrs = dict(conv_attrs(s, p, d), abits=abits, pred_bits=pred, static_scale=0.0)
    y = run_node("PGConv", x, [w, thr], attrs)
    y_ref = ref.pg_conv_reference(x, w, thr, abits, pred, 0.0, s, p, d)
    assert_close_with_ties(y, y_ref, msb, thr)
    if AMX_EXPECTED:
        assert amx_conv_runs() == amx_before + n
    elif INT8_EXPECTED and (s == (1, 1) or pg_int8_kernel() == "vnni"):  # AVX2: stride 1 only
        assert pg_int8_runs() == int8_before + n
    elif ORT_CONV_EXPECTED:
        assert delegated_conv_runs() >= delegated_before + n * (1 if frac == 0.0 else 2)


@pytest.mark.parametrize("geom", [  # (W, strides, pads): W 32 at stride 2 is two whole vectors
    (32, (2, 2), (1, 1, 1, 1)), (33, (2, 2), (1, 0, 1, 2)), (31, (2, 2), (0, 1, 2, 0)),
    (40, (2, 2), (1, 1, 1, 1)), (5, (2, 2), (1, 1, 1, 1)), (17, (3, 2), (1, 1, 1, 1)),
    (19, (2, 3), (1, 2, 1, 1))])
def test_pg_int8_strided_layers_fill_their_phase_planes(geom):
    """Strided layers on the VNNI kernel: the split rows are dealt to the stride phases' planes
    (pg_int8.cc FillGroup, isa.deal_words: step 2 by permutes with masked ends, other steps word
    by word), for widths whose phase rows are whole vectors, a vector and a tail, or shorter,
    each padding parity; against runtimes/reference.py at three gate-on fractions."""
    width, strides, pads = geom
    rng = np.random.default_rng(width)
    x = rng.standard_normal((2, 12, 9, width)).astype(np.float32)
    w = quantize_weights(rng.standard_normal((8, 12, 3, 3)).astype(np.float32), 8)
    x_hb, _, _ = ref.pg_split_activations(x, 3, 2)
    msb = ref.conv2d(x_hb, w, strides, pads, (1, 1))
    for frac in (0.0, 0.3, 1.0):
        thr = ref.thresholds_for_fraction(msb, frac)
        before = pg_int8_runs()
        attrs = dict(conv_attrs(strides, pads, (1, 1)), abits=3, pred_bits=2, static_scale=0.0)
        y = run_node("PGConv", x, [w, thr], attrs)
        assert_close_with_ties(y, ref.pg_conv_reference(x, w, thr, 3, 2, 0.0, strides, pads, (1, 1)),
                               msb, thr)
        if INT8_EXPECTED and pg_int8_kernel() == "vnni":
            assert pg_int8_runs() == before + 2


# (W, strides, pads as ONNX's [top, left, bottom, right]): at stride 2, each padding parity and
# widths whose even / odd split is whole steps of four (32, 40), has a tail (33, 31) or is a tail
# alone (5), also with row stride 3; column strides 3, 4 and 1 take FillSource's general loop.
CG_STRIDED_GEOMS = [
    (32, (2, 2), (1, 1, 1, 1)), (33, (2, 2), (1, 0, 1, 2)), (31, (2, 2), (0, 1, 2, 0)),
    (40, (2, 2), (1, 1, 1, 1)), (5, (2, 2), (1, 1, 1, 1)), (17, (3, 2), (1, 1, 1, 1)),
    (19, (2, 3), (1, 2, 1, 1)), (21, (2, 1), (1, 1, 1, 1)), (23, (4, 4), (2, 1, 2, 3))]


def check_cg_strided_phase_planes(geoms=CG_STRIDED_GEOMS) -> None:
    """Strided fp32 layers read the stride phases' planes of the padded input (conv_common.cc
    FillSource: stride 2 splits each input row into its even and odd phase rows, other strides
    copy pixel by pixel; the padding zeroed around them): CGConv at each geometry, with and
    without a block-diagonal base path, at three gate-on fractions, against
    runtimes/reference.py (its own strided, padded convolution). Also run under each forced ISA
    tier (test_kernel_paths.py)."""
    for width, strides, pads in geoms:
        rng = np.random.default_rng(width)
        x = rng.standard_normal((2, 8, 11, width)).astype(np.float32)
        w = (rng.standard_normal((8, 8, 3, 3)) / np.sqrt(72)).astype(np.float32)
        for block_diagonal in (False, True):
            mask = cg_base_mask(8, 8, 4, block_diagonal)
            yp = ref.conv2d(x, w * mask[:, :, None, None], strides, pads, (1, 1))
            for frac in (0.0, 0.3, 1.0):
                thr = ref.thresholds_for_fraction(yp, frac)
                y = run_node("CGConv", x, [w, mask, thr], conv_attrs(strides, pads, (1, 1)))
                y_ref = ref.cg_conv_reference(x, w, mask, thr, strides=strides, pads=pads)
                assert_close_with_ties(y, y_ref, yp, thr)


@pytest.mark.parametrize("geom", CG_STRIDED_GEOMS)
def test_cg_strided_layers_fill_their_phase_planes(geom):
    check_cg_strided_phase_planes([geom])


def test_pg_conv_one_session_follows_changing_input_sizes():
    """The int8 path keeps its layout and output tables per weights and geometry (pg_int8.cc
    TablesFor): one session fed 12x10, then 7x9, then 12x10 again (dynamic H, W) must match the
    reference each time, which tables kept from the previous size would not."""
    rng = np.random.default_rng(5)
    c, o, abits, pred = 32, 40, 3, 2
    w = quantize_weights(rng.standard_normal((o, c, 3, 3)).astype(np.float32), 8)
    attrs = dict(conv_attrs((1, 1), (1, 1, 1, 1), (1, 1)), abits=abits, pred_bits=pred,
                 static_scale=0.0)
    thr = np.full(o, 0.05, np.float32)
    sess = open_session(single_node_model("PGConv", None, [w, thr], attrs, dynamic_x=True), threads=2)
    int8_before = pg_int8_runs()
    for h, wd in [(12, 10), (7, 9), (12, 10)]:
        x = np.clip(rng.standard_normal((1, c, h, wd)), 0, 2.5).astype(np.float32)
        x_hb, _, _ = ref.pg_split_activations(x, abits, pred)
        msb = ref.conv2d(x_hb, w, (1, 1), (1, 1, 1, 1), (1, 1))
        y = sess.run(None, {"x": x})[0]
        assert y.shape == (1, o, h, wd)
        y_ref = ref.pg_conv_reference(x, w, thr, abits, pred, 0.0, (1, 1), (1, 1, 1, 1), (1, 1))
        assert_close_with_ties(y, y_ref, msb, thr)
    if INT8_EXPECTED and not AMX_EXPECTED:
        assert pg_int8_runs() == int8_before + 3


def pg_path_cases_model(tmp_path) -> tuple[str, dict[str, np.ndarray]]:
    """Several PGConv layers in one model, chosen to cover the AMX path's layout cases: K split
    into several chunks and a short one, output channels not a multiple of 16 or 32, stride,
    asymmetric padding, dilation, 1x1, weights within int8 (no split), batch 2, an output one
    pixel wide."""
    rng = np.random.default_rng(5)
    feeds = {"x": rng.standard_normal((2, 36, 13, 11)).astype(np.float32),
             "x5": np.clip(rng.standard_normal((1, 5, 9, 9)), 0, None).astype(np.float32),
             "x3": rng.standard_normal((1, 8, 20, 3)).astype(np.float32)}
    layers = [  # input, O, k, strides, pads, dilations, abits, pred_bits, wbits
        ("x", 40, 3, (1, 1), (1, 1, 1, 1), (1, 1), 8, 4, 8),
        ("x", 16, 3, (2, 1), (1, 0, 2, 1), (2, 1), 3, 2, 8),
        ("x", 24, 1, (2, 2), (0, 0, 0, 0), (1, 1), 3, 2, 6),
        ("x5", 8, 3, (1, 1), (1, 1, 1, 1), (1, 1), 8, 4, 8),
        ("x3", 16, 3, (1, 1), (0, 0, 0, 0), (1, 1), 8, 4, 8),  # 1 pixel wide: scattered stores
    ]
    nodes, inits, outputs = [], [], []
    for i, (src, o, k, s, p, d, abits, pred, wbits) in enumerate(layers):
        xs = feeds[src]
        w = quantize_weights(rng.standard_normal((o, xs.shape[1], k, k)).astype(np.float32), wbits)
        x_hb, _, _ = ref.pg_split_activations(xs, abits, pred)
        thr = ref.thresholds_for_fraction(ref.conv2d(x_hb, w, s, p, d), 0.3)
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(thr, f"t{i}")]
        nodes.append(helper.make_node("PGConv", [src, f"w{i}", f"t{i}"], [f"y{i}"], domain="gate2deploy",
                                      strides=list(s), pads=list(p), dilations=list(d),
                                      abits=abits, pred_bits=pred))
        outputs.append(helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, None))
    inputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, list(v.shape)) for name, v in feeds.items()]
    graph = helper.make_graph(nodes, "pg_paths", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                     helper.make_opsetid("gate2deploy", 1)])
    model.ir_version = IR_VERSION
    path = str(tmp_path / "pg_paths.onnx")
    onnx.save(model, path)
    return path, feeds


@pytest.mark.skipif(IN_SUBPROCESS or not (AMX_EXPECTED or INT8_EXPECTED or ORT_CONV_EXPECTED),
                    reason="needs AMX, the int8 kernels or the NCHWc delegate")
@pytest.mark.parametrize("other", [
    {"G2D_AMX": "0", "G2D_PG_INT8": "0", "G2D_ORT_CONV": "0"},  # int16 GEMMs and dot products
    {"G2D_AMX": "0", "G2D_PG_INT8": "0"},  # fp32 stages on ONNX Runtime's NCHWc conv
    {"G2D_AMX": "0", "G2D_PG_INT8": "avx2"},  # the AVX2 int8 kernel (also under AVX-512)
], ids=["int16", "nchwc", "int8-avx2"])
def test_pg_conv_fast_paths_are_bitwise_equal(tmp_path, other):
    """Every integer path computes the same int32 sums and the same float epilogue, so the
    outputs are equal bit for bit: this process's path (AMX where present, else the int8
    kernel) against another path, run in a subprocess with the others disabled."""
    if other.get("G2D_PG_INT8") == "0" and "G2D_ORT_CONV" not in other and not (
            (AMX_EXPECTED or INT8_EXPECTED) and ORT_CONV_EXPECTED):
        pytest.skip("compares AMX or int8 with the NCHWc delegate: needs both")
    if other.get("G2D_PG_INT8") == "avx2" and not (AMX_EXPECTED or pg_int8_kernel() == "vnni"):
        pytest.skip("this process runs the AVX2 int8 kernel itself")
    path, feeds = pg_path_cases_model(tmp_path)
    np.savez(tmp_path / "feeds.npz", **feeds)
    script = ("import sys, numpy as np; from gate2deploy.runtimes.ort import open_session; "
              "d = sys.argv[1]; s = open_session(d + '/pg_paths.onnx', threads=2); "
              "f = dict(np.load(d + '/feeds.npz')); "
              "np.savez(d + '/y.npz', *s.run(None, f))")
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True,
                          env=dict(os.environ, **other), timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    expected = np.load(tmp_path / "y.npz")
    amx_before, delegated_before, int8_before = amx_conv_runs(), delegated_conv_runs(), pg_int8_runs()
    ys = open_session(path, threads=2).run(None, feeds)
    if AMX_EXPECTED:
        assert amx_conv_runs() == amx_before + 2 + 2 + 2 + 1 + 1  # every layer, every sample
    elif INT8_EXPECTED:  # every layer and sample on VNNI; AVX2: the stride-1 layers
        assert pg_int8_runs() == int8_before + (2 + 2 + 2 + 1 + 1 if pg_int8_kernel() == "vnni"
                                                else 2 + 1 + 1)
    else:
        assert delegated_conv_runs() > delegated_before
    for i, y in enumerate(ys):
        assert np.array_equal(y, expected[f"arr_{i}"]), f"layer {i}"


# abits, pred_bits, wbits, input sign. A constant input puts every activation at the top level
# (q = 2^abits - 1: both stages' counts at their largest) and equal-magnitude weights put every
# |q_w| at 2^wbits - 1 (but one, at 1), one sign per output channel: the int8 kernels' sums as
# large as they get.
PG_INT8_BOUND_CASES = [
    (8, 2, 8, 1.0),   # LSB counts 63, |q_w| 255: AVX2 pair sums 32130 <= 32767, one k-step per int16 sum
    (8, 1, 7, -1.0),  # LSB counts -127, |q_w| 127: pair sums -32258, negative inputs
    (8, 1, 8, 1.0),   # 127 x 255 x 2 > 32767: the AVX2 kernel must leave this layer to another path
    (3, 2, 8, -1.0),  # small counts, 9-bit weights: many k-steps per int16 sum
]


def pg_bound_case(abits, pred, wbits, sign):
    x = np.full((1, 20, 9, 7), 0.75 * sign, np.float32)
    o = 12
    w_sign = np.where(np.arange(o) % 2 == 0, 1.0, -1.0).astype(np.float32)
    w = np.ones((o, 20, 3, 3), np.float32)
    w[:, -1, -1, -1] = 1 / (2 ** wbits - 1)  # one weight at level 1: the grid needs all wbits bits
    w = quantize_weights(w * w_sign[:, None, None, None], wbits)
    # exact gates: channels 0, 1, 2, 4, 8 on (the int8 kernels' blocks of 4 output channels:
    # 3 of 4 on, stage 2 as a block; 1 of 4 on, stage 2 as dot products), the rest off
    thr = np.where(np.isin(np.arange(o), [0, 1, 2, 4, 8]), -1e30, 1e30).astype(np.float32)
    return x, w, thr


@pytest.mark.skipif(IN_SUBPROCESS, reason="runs a subprocess itself")
def test_pg_conv_int8_counts_at_the_saturation_bound(tmp_path):
    """Layers whose int8 sums reach the kernels' bounds: each matches the reference and, bit for
    bit, the int16 path (a subprocess with the int8 kernels and AMX off); the int8 kernel runs
    exactly where its bound (recomputed here from pg_int8.h's rule: AVX2 needs
    2 * max|q_w| * max|count| <= 32767, VNNI has no int16 step) holds and AMX did not take it."""
    kernel = pg_int8_kernel() if INT8_EXPECTED or AMX_EXPECTED else "off"
    xs, ys = [], []
    for i, (abits, pred, wbits, sign) in enumerate(PG_INT8_BOUND_CASES):
        x, w, thr = pg_bound_case(abits, pred, wbits, sign)
        xs.append(x)
        attrs = dict(conv_attrs((1, 1), (1, 1, 1, 1), (1, 1)), abits=abits, pred_bits=pred, static_scale=0.0)
        onnx.save(single_node_model("PGConv", x.shape, [w, thr], attrs), str(tmp_path / f"m{i}.onnx"))
        before = pg_int8_runs()
        y = run_node("PGConv", x, [w, thr], attrs)
        max_count = max(2 ** pred - 1, 2 ** (abits - pred) - 1)
        wmax = 2 ** wbits - 1
        amx_takes = AMX_EXPECTED and max_count <= (63 if wmax > 127 else 127)
        int8_takes = not amx_takes and (kernel == "vnni" or (kernel == "avx2" and 2 * wmax * max_count <= 32767))
        assert (pg_int8_runs() - before == 1) == int8_takes, (abits, pred, wbits, kernel)
        y_ref = ref.pg_conv_reference(x, w, thr, abits, pred, 0.0, (1, 1), (1, 1, 1, 1), (1, 1))
        x_hb, _, _ = ref.pg_split_activations(x, abits, pred)
        assert_close_with_ties(y, y_ref, ref.conv2d(x_hb, w, (1, 1), (1, 1, 1, 1), (1, 1)), thr)
        ys.append(y)
    np.savez(tmp_path / "x.npz", *xs)
    script = ("import sys, numpy as np; from gate2deploy.runtimes.ort import open_session; "
              "d = sys.argv[1]; xs = np.load(d + '/x.npz'); "
              "np.savez(d + '/y.npz', *[open_session(f'{d}/m{i}.onnx', threads=2).run("
              "None, {'x': xs[f'arr_{i}']})[0] for i in range(len(xs.files))])")
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, G2D_AMX="0", G2D_PG_INT8="0", G2D_ORT_CONV="0"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    expected = np.load(tmp_path / "y.npz")
    for i, y in enumerate(ys):
        assert np.array_equal(y, expected[f"arr_{i}"]), PG_INT8_BOUND_CASES[i]


STAGE_TIMES_SCRIPT = r"""
import ctypes, json, sys
import numpy as np
from gate2deploy.runtimes.ort import custom_ops_library_path, open_session
from gate2deploy.runtimes.ort_layout import nchwc_block
lib = ctypes.CDLL(str(custom_ops_library_path()))
lib.G2DStageTimesReport.restype = ctypes.c_char_p
lib.G2DPGInt8Runs.restype = ctypes.c_int64
d = sys.argv[1]
out = {}
for name in ("cg", "pg"):
    x = np.load(f"{d}/{name}_x.npy")
    session = open_session(f"{d}/{name}.onnx", threads=1)
    session.run(None, {"x": x})  # warm-up, then measured runs only
    lib.G2DStageTimesReset()
    int8_before = lib.G2DPGInt8Runs()
    for _ in range(5):
        session.run(None, {"x": x})
    text = lib.G2DStageTimesReport(5).decode()
    out[name] = {"int8": lib.G2DPGInt8Runs() - int8_before,
                 "stages": {k: float(v) for k, v in (f.split("=") for f in text.split(" (")[0].split())}}
print(json.dumps(out))
"""


@pytest.mark.skipif(IN_SUBPROCESS, reason="runs a subprocess itself")
def test_stage_timers_report_where_the_time_goes(tmp_path):
    """G2D_STAGE_TIMES=1 (read once per process: a subprocess): CGConv and PGConv runs report
    their stages (tools/bench_network_layers.py reads them); each stage is part of the call
    (one thread: the parts add up to at most the whole call), and PG's int8 kernel, where it
    runs, times its own stages too."""
    cases = {"cg": ("CGConv", lambda x, w: [w, cg_base_mask(w.shape[0], w.shape[1], 4, False),
                                            ref.thresholds_for_fraction(ref.conv2d(
                                                x, w * cg_base_mask(w.shape[0], w.shape[1], 4, False)[:, :, None, None],
                                                (1, 1), (1, 1, 1, 1), (1, 1)), 0.2)], {}),
             "pg": ("PGConv", lambda x, w: [quantize_weights(w, 8), np.zeros(w.shape[0], np.float32)],
                    dict(abits=3, pred_bits=2, static_scale=0.0))}
    rng = np.random.default_rng(11)
    for name, (op, inits, extra) in cases.items():
        x = np.abs(rng.standard_normal((1, 32, 24, 24))).astype(np.float32)
        w = (rng.standard_normal((32, 32, 3, 3)) / 17).astype(np.float32)
        model = single_node_model(op, x.shape, inits(x, w), {**conv_attrs((1, 1), (1, 1, 1, 1), (1, 1)), **extra})
        onnx.save(model, str(tmp_path / f"{name}.onnx"))
        np.save(tmp_path / f"{name}_x.npy", x)
    proc = subprocess.run([sys.executable, "-c", STAGE_TIMES_SCRIPT, str(tmp_path)], capture_output=True,
                          text=True, timeout=300, env=dict(os.environ, G2D_STAGE_TIMES="1"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    for name in ("cg", "pg"):
        stages = out[name]["stages"]
        if name == "pg" and not out[name]["int8"]:
            continue  # AMX or another path ran PG: those have no stage timers
        assert stages["call"] > 0 and stages["stage1"] > 0 and stages["pad"] > 0, (name, stages)
        parts = sum(v for k, v in stages.items() if k not in ("call", "op"))
        assert parts <= stages["call"] * 1.02, (name, stages)
        if name == "cg":  # CGConv's whole Compute around its RunGatedConv call, and its set-up apart
            assert stages["setup"] > 0 and stages["op"] >= stages["call"], stages
    if INT8_EXPECTED:
        assert out["pg"]["int8"] == 5


def test_pg_conv_static_scale_and_dynamic_weights():
    """static_scale > 0 replaces max|X|; W given as a graph input (not constant) also works."""
    rng, x, w, s, p, d = random_case(GEOMETRIES[0], seed=3)
    x = np.abs(x)
    w = quantize_weights(w, 6)
    x_hb, _, _ = ref.pg_split_activations(x, 4, 2, static_scale=1.5)
    msb = ref.conv2d(x_hb, w, s, p, d)
    thr = ref.thresholds_for_fraction(msb, 0.3)
    attrs = dict(conv_attrs(s, p, d), abits=4, pred_bits=2, static_scale=1.5)
    y = run_node("PGConv", x, [w, thr], attrs)
    assert_close_with_ties(y, ref.pg_conv_reference(x, w, thr, 4, 2, 1.5, s, p, d), msb, thr)

    model = single_node_model("PGConv", x.shape, [thr], attrs)
    node = model.graph.node[0]
    node.input[:] = ["x", "w_in", "in0"]
    model.graph.input.append(helper.make_tensor_value_info("w_in", TensorProto.FLOAT, w.shape))
    y2 = open_session(model).run(None, {"x": x, "w_in": w})[0]
    np.testing.assert_allclose(y2, y, rtol=0, atol=RTOL * np.abs(y).max())


@pytest.mark.parametrize("frac", [0.05, 0.2, 0.45])
@pytest.mark.parametrize("geom", [(1, 48, 20, 9, 11, 3, (1, 1), (1, 1, 1, 1), (1, 1)),
                                  (2, 40, 12, 8, 9, 3, (2, 1), (1, 0, 1, 1), (1, 1)),
                                  (1, 36, 12, 13, 12, 3, (5, 1), (1, 1, 1, 1), (1, 1))],
                         ids=["stride1", "phase_planes", "im2col"])
def test_cg_conv_sparse_second_stage_long_rows(geom, frac):
    """The sparse second stage (sampled dense-dense product, up to 50% gated on) with weight
    rows longer than one register chunk (36 channels x 9 taps = 324 floats: several chunks
    whose lane sums carry over), on each column source of conv_common.cc's ColumnSource (in
    place at stride 1, phase planes at strides 2-4, im2col panels above), and every tail
    length of a row's gated-on column list."""
    rng, x, w, s, p, d = random_case(geom, seed=11)
    o, c = w.shape[:2]
    mask = cg_base_mask(o, c, 4, False)
    yp = ref.conv2d(x, w * mask[:, :, None, None], s, p, d)
    thr = ref.thresholds_for_fraction(yp, frac)
    y = run_node("CGConv", x, [w, mask, thr], conv_attrs(s, p, d))
    assert_close_with_ties(y, ref.cg_conv_reference(x, w, mask, thr, s, p, d), yp, thr)


@pytest.mark.parametrize("block_diagonal", [False, True])
@pytest.mark.parametrize("geom", [(1, 8, 8, 24, 40, 3, (1, 1), (1, 1, 1, 1), (1, 1)),
                                  (1, 8, 8, 30, 44, 3, (2, 2), (2, 2, 2, 2), (2, 2))],
                         ids=["stride1", "stride2_dilation2"])
def test_cg_channel_last_rows_filled_for_every_gated_span(geom, block_diagonal):
    """The channel-last copy of the second stage's channels is filled row by row, by the first
    span whose gated-on outputs read those rows (conv_common.cc, need_channel_last_rows), in
    a scratch buffer that keeps the previous call's rows. A first call with gates on all over
    fills every row with one input; then, for each position of a two-row band of non-zero
    input (zero elsewhere, so only outputs whose fields overlap the band are gated on), the
    output must match the reference: a span that filled fewer rows than its fields cover
    would read the first input's stale rows."""
    n, c, o, h, w_, k, s, p, d = geom
    rng, x_all, w, s, p, d = random_case(geom, seed=23)
    mask = cg_base_mask(o, c, 4, block_diagonal)
    thr_all = ref.thresholds_for_fraction(ref.conv2d(x_all, w * mask[:, :, None, None], s, p, d), 0.2)
    channel_last_spans = 0
    for r0 in range(0, h - 1):
        run_node("CGConv", x_all, [w, mask, thr_all], conv_attrs(s, p, d))  # every row stale
        before = native_counter("G2DSecondStageRuns", 2)
        x = np.zeros_like(x_all)
        x[:, :, r0:r0 + 2] = rng.standard_normal((n, c, 2, w_)).astype(np.float32)
        yp = ref.conv2d(x, w * mask[:, :, None, None], s, p, d)
        # ~10% of the non-zero partial sums on; zero partial sums (away from the band) off
        thr = np.array([np.quantile(np.abs(yp[:, i]), 0.95) for i in range(o)], np.float32)
        y = run_node("CGConv", x, [w, mask, thr], conv_attrs(s, p, d))
        channel_last_spans += native_counter("G2DSecondStageRuns", 2) - before
        assert_close_with_ties(y, ref.cg_conv_reference(x, w, mask, thr, s, p, d), yp, thr)
    assert channel_last_spans > 0  # the band calls ran the channel-last sparse stage


def native_settings():
    """The native library (ctypes) with G2DSetSetting and G2DKernelConfig typed: the run-time
    settings and the configuration line that shows them."""
    import ctypes

    lib = ctypes.CDLL(str(custom_ops_library_path()))
    lib.G2DSetSetting.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
    lib.G2DKernelConfig.restype = ctypes.c_char_p
    return lib


def cg_counted_runs(x, w, mask, frac):
    """A 1-thread session of one 3x3 CGConv (pads 1) whose thresholds put `frac` of its gates
    on: (the gate-on fraction, runs) where runs(counter, n) runs it n times, checks every
    output against the reference and returns how much the native counter grew."""
    yp = ref.conv2d(x, w * mask[:, :, None, None], (1, 1), (1, 1, 1, 1), (1, 1))
    thr = ref.thresholds_for_fraction(yp, frac)
    sess = open_session(single_node_model("CGConv", x.shape, [w, mask, thr],
                                          conv_attrs((1, 1), (1, 1, 1, 1), (1, 1))), threads=1)
    y_ref = ref.cg_conv_reference(x, w, mask, thr, pads=(1, 1, 1, 1))

    def runs(counter: str, n: int) -> int:
        before = native_counter(counter)
        for _ in range(n):
            assert_close_with_ties(sess.run(None, {"x": x})[0], y_ref, yp, thr)
        return native_counter(counter) - before

    return float((yp > thr[None, :, None, None]).mean()), runs


def test_cg_few_span_layer_not_split_on_one_thread():
    """A block-diagonal CG layer with fewer than kFewGatedSpans spans splits its span tasks by
    plan only while another pool thread runs some of them (conv_common.h, GatedTaskParts): on a
    1-thread session, where the split only adds per-task cost, at most the first call splits
    (before the kernel has seen its pool). G2DSetSetting("split_spans", ...) switches the
    choice between runs of one session (tools/ab_native_setting.py): "always" splits every
    call, "never" none; an unknown name or value is refused and changes nothing. The output
    matches the reference on every call."""
    if os.environ.get("G2D_SPLIT_SPANS"):
        pytest.skip("G2D_SPLIT_SPANS forces the choice")
    rng = np.random.default_rng(3)
    x = rng.standard_normal((1, 32, 3, 3)).astype(np.float32)  # 13 columns: 1-2 spans on every tier
    w = (rng.standard_normal((32, 32, 3, 3)) / np.sqrt(288)).astype(np.float32)
    _, counted_runs = cg_counted_runs(x, w, cg_base_mask(32, 32, 4, True), 0.2)

    def split_calls(runs: int) -> int:
        return counted_runs("G2DSplitSpanCalls", runs)

    assert split_calls(5) <= 1
    lib = native_settings()
    try:
        assert lib.G2DSetSetting(b"split_spans", b"always") == 0
        assert "split_spans=always" in lib.G2DKernelConfig().decode()
        assert split_calls(4) == 4
        assert lib.G2DSetSetting(b"split_spans", b"sometimes") == -1
        assert lib.G2DSetSetting(b"no_such_setting", b"always") == -1
        assert split_calls(2) == 2  # still "always"
        assert lib.G2DSetSetting(b"split_spans", b"never") == 0
        assert split_calls(3) == 0
    finally:
        lib.G2DSetSetting(b"split_spans", b"auto")
    assert "split_spans=auto" in lib.G2DKernelConfig().decode()


CG_POOL_MIN_MACS = 0.7e6  # runtimes/native/conv_common.h, kCGPoolMinMacs


@pytest.mark.parametrize("frac", [0.01, 0.9])
def test_cg_small_call_runs_on_the_calling_thread(frac):
    """A CG call expected to execute fewer than kCGPoolMinMacs multiply-adds runs on the
    calling thread (its parallel sections cost more than they save); the expectation is stage
    1 plus the previous call's gated-on elements times their second-stage MACs, so the first
    call uses the pool. A 32-channel 16x16 layer with a 1/8 base path: stage 1 is 32 x 4 x 9 x
    256 = 0.29 M MACs, the whole layer 2.36 M: at 1% on ~0.32 M (one thread from the second
    call on), at 90% on ~2.2 M (always the pool). G2DSetSetting("cg_pool", "never" / "always")
    forces it; outputs match the reference on every call."""
    if os.environ.get("G2D_CG_POOL"):
        pytest.skip("G2D_CG_POOL forces the choice")
    rng = np.random.default_rng(8)
    x = rng.standard_normal((1, 32, 16, 16)).astype(np.float32)
    w = (rng.standard_normal((32, 32, 3, 3)) / np.sqrt(288)).astype(np.float32)
    on, counted_runs = cg_counted_runs(x, w, cg_base_mask(32, 32, 8, True), frac)
    stage1, whole = 32 * 4 * 9 * 256, 32 * 32 * 9 * 256
    small = stage1 + on * (whole - stage1) < CG_POOL_MIN_MACS
    assert small == (frac < 0.5), on  # the two cases straddle the threshold

    def serial_calls(runs: int) -> int:
        return counted_runs("G2DSerialCGCalls", runs)

    assert serial_calls(4) == (3 if small else 0)
    lib = native_settings()
    try:
        assert lib.G2DSetSetting(b"cg_pool", b"never") == 0
        assert "cg_pool=never" in lib.G2DKernelConfig().decode()
        assert serial_calls(2) == 0  # forced, not the rule's choice: not counted
        assert lib.G2DSetSetting(b"cg_pool", b"always") == 0
        assert serial_calls(2) == 0
        assert lib.G2DSetSetting(b"cg_pool", b"sometimes") == -1
    finally:
        lib.G2DSetSetting(b"cg_pool", b"auto")
    assert "cg_pool=auto" in lib.G2DKernelConfig().decode()


# ----------------------------------------------------------------------------- FBSConv

def check_fbs_against_reference(geom, density, pool, seed, zero_channels):
    """FBSConv on random data vs the reference; input channels in `zero_channels` are all zero
    (a previous FBS layer switched them off), except channel 0 of sample 0."""
    rng, x, w, s, p, d = random_case(geom, seed=seed)
    o, c = w.shape[:2]
    x[:, zero_channels] = 0.0
    x[0, 0] = 1.0  # ... so the active inputs differ between samples
    fc_w = rng.standard_normal((o, c)).astype(np.float32)
    fc_b = (rng.standard_normal(o) + 0.5).astype(np.float32)
    bn_scale, bn_shift, beta = (rng.standard_normal(o).astype(np.float32) for _ in range(3))
    attrs = dict(conv_attrs(s, p, d), density=float(np.float32(density)), pool=pool)
    y = run_node("FBSConv", x, [w, fc_w, fc_b, bn_scale, bn_shift, beta], attrs)
    y_ref, active = ref.fbs_conv_reference(x, w, fc_w, fc_b, bn_scale, bn_shift, beta,
                                           float(np.float32(density)), pool, s, p, d,
                                           return_gate=True)
    scale = max(float(np.abs(y_ref).max()), 1e-30)
    bad_channels = (np.abs(y - y_ref) > RTOL * scale).any(axis=(2, 3))
    assert (y[~active & ~bad_channels] == 0).all()  # skipped channels are exact zeros
    if bad_channels.any():  # only a top-k tie may select a different channel
        pooled = x.mean(axis=(2, 3)) if pool == "avg" else x.max(axis=(2, 3))
        g = np.maximum(pooled @ fc_w.T + fc_b, 0)
        k = math.ceil(o * float(np.float32(density)))
        cut = np.sort(g, axis=1)[:, o - k - 1:o - k]
        assert (np.abs(g - cut)[bad_channels] <= TIE * np.abs(g).max()).all()
        assert bad_channels.mean() <= 0.05


@pytest.mark.parametrize("pool", ["avg", "max"])
@pytest.mark.parametrize("density", [0.25, 0.5, 0.7, 1.0])
@pytest.mark.parametrize("gi", range(len(GEOMETRIES)))
def test_fbs_conv_matches_reference(gi, density, pool):
    geom = geometry(gi)
    c = geom[1]
    zero = np.random.default_rng(100 + gi).random(c) < 0.5
    check_fbs_against_reference(geom, density, pool, gi, zero)


@pytest.mark.parametrize("density", [0.25, 0.5])
@pytest.mark.parametrize("geom", [
    (1, 64, 64, 12, 12, 3, (1, 1), (1, 1, 1, 1), (1, 1)),
    (2, 64, 64, 13, 11, 3, (2, 1), (1, 0, 2, 1), (2, 1)),
    (1, 48, 64, 9, 9, 1, (1, 1), (0, 0, 0, 0), (1, 1)),
    (2, 3, 64, 23, 21, 7, (2, 2), (3, 3, 3, 3), (1, 1)),  # a stem: NCHW input form
])
def test_fbs_conv_wide_layers_run_on_ort_nchwc_conv(geom, density):
    """Whole channel blocks of active outputs, and whole blocks of inputs or fewer inputs than
    one block: the conv is delegated to ONNX Runtime's NCHWc conv (after its self-check), and
    the result still equals the reference."""
    before = delegated_conv_runs()
    c = geom[1]
    zero = np.arange(c) >= 32  # 32 live input channels: two or four whole blocks (or all 3)
    check_fbs_against_reference(geom, density, "avg", 7, zero)
    if ORT_CONV_EXPECTED:
        assert delegated_conv_runs() > before


@pytest.mark.parametrize("dead", [None, 1])
def test_fbs_stem_nchw_input_with_and_without_a_dead_channel(dead):
    """The delegate's NCHW input form (fewer channels than a block): with every channel live,
    in order, the kernel hands X over as it is (no copy); with a channel zero in every sample
    it gathers the live ones. Both equal the reference."""
    geom = (2, 3, 64, 23, 21, 7, (2, 2), (3, 3, 3, 3), (1, 1))
    zero = np.arange(3) == dead if dead is not None else np.zeros(3, bool)
    before = delegated_conv_runs()
    check_fbs_against_reference(geom, 0.5, "avg", 9, zero)
    if ORT_CONV_EXPECTED:
        assert delegated_conv_runs() > before


# ----------------------------------------------------------------------------- SparseInputConv

SPARSE_GEOMETRIES = GEOMETRIES + [
    (2, 64, 48, 12, 10, 3, (1, 1), (1, 1, 1, 1), (1, 1)),
    (3, 64, 64, 13, 11, 3, (2, 1), (1, 0, 2, 1), (2, 1)),
]


@pytest.mark.parametrize("zero_fraction", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("gi", range(len(SPARSE_GEOMETRIES)))
def test_sparse_input_conv_is_exactly_conv(gi, zero_fraction):
    """Conv + bias whatever input channels are zero (a different set per sample), including
    all of them (the output is then the bias)."""
    geom = geometry(gi) if gi < len(GEOMETRIES) else SPARSE_GEOMETRIES[gi]
    rng, x, w, s, p, d = random_case(geom, seed=200 + gi)
    n, c = x.shape[:2]
    for i in range(n):
        x[i, rng.permutation(c)[:int(round(zero_fraction * c))]] = 0.0
    b = rng.standard_normal(w.shape[0]).astype(np.float32)
    before = delegated_conv_runs()
    y = run_node("SparseInputConv", x, [w, b], conv_attrs(s, p, d))
    y_ref = ref.sparse_input_conv_reference(x, w, b, s, p, d)
    assert y.shape == y_ref.shape
    assert np.abs(y - y_ref).max() <= RTOL * max(float(np.abs(y_ref).max()), 1e-30)
    if zero_fraction == 1.0:
        assert (y == b[None, :, None, None]).all()
    if ORT_CONV_EXPECTED and gi >= len(GEOMETRIES) and zero_fraction == 0.5:
        assert delegated_conv_runs() > before  # 32 live inputs, whole blocks of outputs


@pytest.mark.parametrize("activation", [None, "Relu"])
@pytest.mark.parametrize("gi", [0, 1, len(GEOMETRIES), len(GEOMETRIES) + 1])
def test_sparse_input_conv_fused_residual_and_relu(gi, activation):
    """Y = act(Conv(X, W, B) + R): the residual Add and ReLU the pass fuses (own GEMM and
    ONNX Runtime's conv paths)."""
    geom = geometry(gi) if gi < len(GEOMETRIES) else SPARSE_GEOMETRIES[gi]
    rng, x, w, s, p, d = random_case(geom, seed=300 + gi)
    x[:, rng.permutation(x.shape[1])[: x.shape[1] // 2]] = 0.0
    b = rng.standard_normal(w.shape[0]).astype(np.float32)
    y_shape = ref.sparse_input_conv_reference(x, w, b, s, p, d).shape
    r = rng.standard_normal(y_shape).astype(np.float32)
    attrs = dict(conv_attrs(s, p, d), **({"activation": activation} if activation else {}))
    model = single_node_model("SparseInputConv", x.shape, [w, b], attrs)
    model.graph.input.append(helper.make_tensor_value_info("r", TensorProto.FLOAT, list(y_shape)))
    model.graph.node[0].input.append("r")
    y = open_session(model, threads=2).run(None, {"x": x, "r": r})[0]
    y_ref = ref.sparse_input_conv_reference(x, w, b, s, p, d, residual=r, activation=activation)
    assert np.abs(y - y_ref).max() <= RTOL * float(np.abs(y_ref).max())
    if activation:
        assert (y >= 0).all() and (y[y_ref == 0] == 0).all()


def test_fbs_conv_packed_weight_cache_follows_the_active_channels():
    """FBSConv keeps the last packed weights (constant W) keyed by the active output and
    input channel lists: one session, inputs whose active sets differ, repeat and alternate,
    every run equal to the reference (tolerance as above; saliencies are far from ties)."""
    rng, x, w, s, p, d = random_case(GEOMETRIES[4], seed=5)
    o, c = w.shape[:2]
    fc_w = rng.standard_normal((o, c)).astype(np.float32)
    fc_b = (rng.standard_normal(o) + 4.0).astype(np.float32)
    bn_scale, bn_shift, beta = (rng.standard_normal(o).astype(np.float32) for _ in range(3))
    attrs = dict(conv_attrs(s, p, d), density=0.5, pool="avg")
    sess = open_session(single_node_model("FBSConv", x.shape, [w, fc_w, fc_b, bn_scale, bn_shift,
                                                                beta], attrs), threads=2)
    inputs = []
    for seed in range(3):
        xi = np.random.default_rng(100 + seed).standard_normal(x.shape).astype(np.float32)
        xi[:, np.random.default_rng(seed).random(c) < 0.5] = 0.0  # different live inputs
        inputs.append(xi)
    actives = []
    for xi in inputs + inputs[::-1] + inputs[:1]:
        y = sess.run(None, {"x": xi})[0]
        y_ref, active = ref.fbs_conv_reference(xi, w, fc_w, fc_b, bn_scale, bn_shift, beta,
                                               0.5, "avg", s, p, d, return_gate=True)
        np.testing.assert_allclose(y, y_ref, rtol=0, atol=RTOL * np.abs(y_ref).max())
        actives.append(active.tobytes())
    assert len(set(actives)) > 1, "the inputs should switch different output channels on"


@pytest.mark.parametrize("op", ["FBSConv", "SparseInputConv"])
def test_changing_subsets_of_a_small_output_run_as_the_whole_layer(op):
    """Active sets that change from run to run on a layer with few output pixels (7x7, as
    ResNet-18's last stage): the kernel computes every output from every input on the whole
    layer's filter instead of repacking the subset's (runtimes/native/subset_conv.cc UseWhole),
    and every run still equals the reference, inactive FBS outputs exact zeros."""
    rng = np.random.default_rng(31)
    c = o = 64
    w = (rng.standard_normal((o, c, 3, 3)) / 24).astype(np.float32)
    fc_w = rng.standard_normal((o, c)).astype(np.float32)
    fc_b = (rng.standard_normal(o) + 4.0).astype(np.float32)
    bn_scale, bn_shift, beta = (rng.standard_normal(o).astype(np.float32) for _ in range(3))
    bias = rng.standard_normal(o).astype(np.float32)
    attrs = dict(conv_attrs((1, 1), (1, 1, 1, 1), (1, 1)))
    if op == "FBSConv":
        attrs.update(density=0.75, pool="avg")
        inits = [w, fc_w, fc_b, bn_scale, bn_shift, beta]
    else:
        attrs.pop("group")
        inits = [w, bias]
    sess = open_session(single_node_model(op, (1, c, 7, 7), inits, attrs), threads=2)
    before = native_counter("G2DWholeLayerRuns")
    inputs = []
    for seed in range(3):
        xi = np.random.default_rng(200 + seed).standard_normal((1, c, 7, 7)).astype(np.float32)
        if op == "SparseInputConv":  # a different quarter (and one) of the inputs off each time
            xi[:, np.random.default_rng(seed).permutation(c)[: c // 4 + 1]] = 0.0
        inputs.append(xi)
    actives = []
    for xi in inputs + inputs[::-1]:
        y = sess.run(None, {"x": xi})[0]
        if op == "FBSConv":
            y_ref, active = ref.fbs_conv_reference(xi, w, fc_w, fc_b, bn_scale, bn_shift, beta, 0.75,
                                                   "avg", (1, 1), (1, 1, 1, 1), (1, 1), return_gate=True)
            assert (y[~active] == 0).all()
            actives.append(active.tobytes())
        else:
            y_ref = ref.sparse_input_conv_reference(xi, w, bias, pads=(1, 1, 1, 1))
            actives.append((xi != 0).any(axis=(2, 3)).tobytes())
        np.testing.assert_allclose(y, y_ref, rtol=0, atol=RTOL * np.abs(y_ref).max())
    assert len(set(actives)) > 1, "the inputs should change the active sets"
    if ORT_CONV_EXPECTED:
        assert native_counter("G2DWholeLayerRuns") > before
    # One input again and again (fixed active sets): from its second run on, the subset's own
    # filter is packed and kept, and the whole layer no longer runs.
    y_first = sess.run(None, {"x": inputs[0]})[0]
    repeated = native_counter("G2DWholeLayerRuns")
    for _ in range(3):
        np.testing.assert_allclose(sess.run(None, {"x": inputs[0]})[0], y_first, rtol=0,
                                   atol=RTOL * np.abs(y_first).max())
    assert native_counter("G2DWholeLayerRuns") == repeated


def test_fbs_conv_all_inputs_zero_and_single_output():
    x = np.zeros((2, 4, 5, 5), np.float32)
    rng = np.random.default_rng(0)
    w = rng.standard_normal((1, 4, 3, 3)).astype(np.float32)
    params = [rng.standard_normal(s).astype(np.float32) for s in [(1, 4), 1, 1, 1, 1]]
    params[1][:] = 1.0  # g = relu(fc_b) = 1 > 0
    attrs = dict(conv_attrs((1, 1), (1, 1, 1, 1), (1, 1)), density=1.0, pool="avg")
    y = run_node("FBSConv", x, [w, *params], attrs)
    np.testing.assert_allclose(y, ref.fbs_conv_reference(x, w, *params, 1.0, "avg", (1, 1),
                                                         (1, 1, 1, 1), (1, 1)), atol=1e-6)


# ----------------------------------------------------------------------------- validation

def _cg_inputs(o=4, c=8, k=3):
    rng = np.random.default_rng(0)
    return (rng.standard_normal((o, c, k, k)).astype(np.float32), cg_base_mask(o, c, 2, False),
            np.zeros(o, np.float32))


BAD_CASES = {
    "cg_x_rank": ("CGConv", (1, 8, 5), list(_cg_inputs()), conv_attrs((1, 1), (0, 0, 0, 0), (1, 1))),
    "cg_channels": ("CGConv", (1, 6, 5, 5), list(_cg_inputs()), conv_attrs((1, 1), (0, 0, 0, 0), (1, 1))),
    "cg_mask_shape": ("CGConv", (1, 8, 5, 5), [_cg_inputs()[0], np.ones((4, 7), np.float32),
                                               np.zeros(4, np.float32)], {}),
    "cg_mask_values": ("CGConv", (1, 8, 5, 5), [_cg_inputs()[0], np.full((4, 8), 0.5, np.float32),
                                                np.zeros(4, np.float32)], {}),
    "cg_threshold": ("CGConv", (1, 8, 5, 5), [*_cg_inputs()[:2], np.zeros(3, np.float32)], {}),
    "cg_group": ("CGConv", (1, 8, 5, 5), list(_cg_inputs()), {"group": 2}),
    "cg_kernel_too_big": ("CGConv", (1, 8, 2, 2), list(_cg_inputs()), {}),
    "cg_strides": ("CGConv", (1, 8, 5, 5), list(_cg_inputs()), {"strides": [0, 1]}),
    "cg_pads": ("CGConv", (1, 8, 5, 5), list(_cg_inputs()), {"pads": [1, 1]}),
    "pg_pred_bits": ("PGConv", (1, 8, 5, 5), [_cg_inputs()[0], np.zeros(4, np.float32)],
                     {"abits": 4, "pred_bits": 4}),
    "pg_missing_abits": ("PGConv", (1, 8, 5, 5), [_cg_inputs()[0], np.zeros(4, np.float32)], {}),
    "pg_group": ("PGConv", (1, 8, 5, 5), [_cg_inputs()[0], np.zeros(4, np.float32)],
                 {"abits": 4, "pred_bits": 2, "group": 3}),
    "pg_static_scale": ("PGConv", (1, 8, 5, 5), [_cg_inputs()[0], np.zeros(4, np.float32)],
                        {"abits": 4, "pred_bits": 2, "static_scale": -1.0}),
    "fbs_density": ("FBSConv", (1, 8, 5, 5), [_cg_inputs()[0], np.zeros((4, 8), np.float32)]
                    + [np.zeros(4, np.float32)] * 4, {"density": 0.0}),
    "fbs_pool": ("FBSConv", (1, 8, 5, 5), [_cg_inputs()[0], np.zeros((4, 8), np.float32)]
                 + [np.zeros(4, np.float32)] * 4, {"density": 0.5, "pool": "min"}),
    "fbs_fc_shape": ("FBSConv", (1, 8, 5, 5), [_cg_inputs()[0], np.zeros((4, 6), np.float32)]
                     + [np.zeros(4, np.float32)] * 4, {"density": 0.5}),
    "fbs_beta_shape": ("FBSConv", (1, 8, 5, 5), [_cg_inputs()[0], np.zeros((4, 8), np.float32)]
                       + [np.zeros(4, np.float32)] * 3 + [np.zeros(5, np.float32)], {"density": 0.5}),
    "sparse_bias_shape": ("SparseInputConv", (1, 8, 5, 5), [_cg_inputs()[0], np.zeros(3, np.float32)], {}),
    "sparse_group": ("SparseInputConv", (1, 8, 5, 5), [_cg_inputs()[0], np.zeros(4, np.float32)],
                     {"group": 2}),
    "sparse_channels": ("SparseInputConv", (1, 6, 5, 5), [_cg_inputs()[0], np.zeros(4, np.float32)], {}),
    "sparse_activation": ("SparseInputConv", (1, 8, 5, 5), [_cg_inputs()[0], np.zeros(4, np.float32)],
                          {"activation": "Sigmoid"}),
    "sparse_residual_shape": ("SparseInputConv", (1, 8, 5, 5), [_cg_inputs()[0], np.zeros(4, np.float32),
                                                                np.zeros((1, 4, 2, 2), np.float32)], {}),
    "cg_post_scale_alone": ("CGConv", (1, 8, 5, 5), [*_cg_inputs(), np.ones(4, np.float32)], {}),
    "cg_post_shape": ("CGConv", (1, 8, 5, 5), [*_cg_inputs(), np.ones(4, np.float32),
                                               np.zeros(3, np.float32)], {}),
    "cg_activation": ("CGConv", (1, 8, 5, 5), list(_cg_inputs()), {"activation": "Tanh"}),
    "pg_post_shape": ("PGConv", (1, 8, 5, 5), [_cg_inputs()[0], np.zeros(4, np.float32),
                                               np.ones(5, np.float32), np.zeros(4, np.float32)],
                      {"abits": 4, "pred_bits": 2}),
    "pg_activation": ("PGConv", (1, 8, 5, 5), [_cg_inputs()[0], np.zeros(4, np.float32)],
                      {"abits": 4, "pred_bits": 2, "activation": "relu"}),
}


# Non-finite inputs: the kernels compute what the reference (and the PyTorch module, see
# reference.py) computes, NaN and inf included; compared with nan_compare (NaN matches only NaN,
# inf only the same inf). Before: PGConv refused inf with the dynamic scale and mapped NaN to
# finite values with a static scale; FBSConv refused NaN and wrote 0 for channels the reference
# makes NaN.

def _with_nonfinite(value, positions):
    x = np.random.default_rng(7).standard_normal((2, 8, 5, 5)).astype(np.float32)
    for pos in positions:
        x[pos] = value
    return x


NONFINITE = [np.nan, np.inf, -np.inf]
SPOTS = [[(0, 3, 2, 2)], [(0, 1, 0, 0), (1, 6, 4, 3)]]


@pytest.mark.parametrize("spots", SPOTS)
@pytest.mark.parametrize("value", NONFINITE)
@pytest.mark.parametrize("static_scale", [0.0, 1.5])
@pytest.mark.parametrize("integer_weights", [False, True])  # fp32 path / integer paths
def test_pg_nonfinite_input_follows_the_reference(value, spots, static_scale, integer_weights):
    w, _, _ = _cg_inputs()
    if integer_weights:  # on a 4-bit grid: the kernel's integer paths apply to finite inputs
        w = (np.round(w / np.abs(w).max() * 7) / 7 * np.abs(w).max()).astype(np.float32)
    x = _with_nonfinite(value, spots)
    thr = np.full(4, 0.1, np.float32)
    attrs = {"abits": 4, "pred_bits": 2, "static_scale": static_scale, "pads": [3, 3, 3, 3],
             "dilations": [2, 2]}  # the padding rows' outputs see no input: finite everywhere
    y = run_node("PGConv", x, [w, thr], attrs)
    with np.errstate(invalid="ignore"):
        y_ref = ref.pg_conv_reference(x, w, thr, 4, 2, static_scale, pads=(3, 3, 3, 3),
                                      dilations=(2, 2))
    assert_nonfinite_match(y, y_ref)
    if static_scale == 0 or np.isnan(value):
        assert np.isnan(y_ref).any()  # the case is not vacuous
    assert normwise_error(y, y_ref) <= RTOL


@pytest.mark.parametrize("others", ["zero", "grid"])
def test_pg_nan_weight_is_not_taken_for_a_zero_one(others):
    """A NaN weight among zeros (or among weights on a 2-bit grid) is no integer weight: the
    output is NaN where it multiplies the input, as the reference's. (The grid search took the
    largest |w| with std::max, which drops NaN, so W = {NaN, 0, ...} passed as all zeros and
    gave finite outputs: found by the fuzzer at 1500 examples.)"""
    x = np.random.default_rng(8).standard_normal((1, 3, 4, 4)).astype(np.float32)
    w = np.zeros((2, 3, 1, 1), np.float32) if others == "zero" else \
        np.array([-1, 1, 0.5, -0.5, 0, 1], np.float32).reshape(2, 3, 1, 1)
    w[1, 2, 0, 0] = np.nan
    thr = np.full(2, 0.1, np.float32)
    y = run_node("PGConv", x, [w, thr], {"abits": 2, "pred_bits": 1, "static_scale": 0.7})
    with np.errstate(invalid="ignore"):
        y_ref = ref.pg_conv_reference(x, w, thr, 2, 1, 0.7)
    assert np.isnan(y_ref[0, 1]).all() and np.isfinite(y_ref[0, 0]).all()  # not vacuous
    assert_nonfinite_match(y, y_ref)
    assert normwise_error(y, y_ref) <= RTOL


@pytest.mark.parametrize("spots", SPOTS)
@pytest.mark.parametrize("value", NONFINITE)
@pytest.mark.parametrize("pool", ["avg", "max"])
def test_fbs_nonfinite_input_follows_the_reference(value, spots, pool):
    w, _, _ = _cg_inputs()
    rng = np.random.default_rng(3)
    params = [rng.standard_normal((4, 8)).astype(np.float32), rng.standard_normal(4).astype(np.float32),
              np.ones(4, np.float32), np.full(4, 0.1, np.float32), np.zeros(4, np.float32)]
    x = _with_nonfinite(value, spots)
    y = run_node("FBSConv", x, [w, *params], {"density": 0.5, "pool": pool, "pads": [1, 1, 1, 1]})
    with np.errstate(invalid="ignore", over="ignore"):
        y_ref = ref.fbs_conv_reference(x, w, *params, 0.5, pool, pads=(1, 1, 1, 1))
    assert_nonfinite_match(y, y_ref)
    assert not np.isfinite(y_ref).all()
    assert normwise_error(y, y_ref) <= RTOL


def test_fbs_nonfinite_parameter_follows_the_reference():
    """An inf bn_shift on a channel the top-k switches off: 0 * inf is NaN in the reference."""
    w, _, _ = _cg_inputs()
    x = np.random.default_rng(1).standard_normal((2, 8, 5, 5)).astype(np.float32)
    fc_w = np.zeros((4, 8), np.float32)
    fc_b = np.array([4, 3, 2, 1], np.float32)  # channels 0, 1 active at density 0.5
    shift = np.array([0, 0, 0, np.inf], np.float32)
    params = [fc_w, fc_b, np.ones(4, np.float32), shift, np.zeros(4, np.float32)]
    y = run_node("FBSConv", x, [w, *params], {"density": 0.5})
    with np.errstate(invalid="ignore"):
        y_ref = ref.fbs_conv_reference(x, w, *params, 0.5)
    assert np.isnan(y_ref[:, 3]).all() and (y_ref[:, 2] == 0).all()
    assert_nonfinite_match(y, y_ref)
    assert normwise_error(y, y_ref) <= RTOL


def test_fbs_parameters_fed_at_run_time_are_checked_on_every_run():
    """FBSConv scans its saliency and epilogue parameters for non-finite values once when they
    are constant initializers (fbs_conv.cc, ParamsFinite); fed as graph inputs they can change
    from run to run: one session, first a finite bn_shift, then one with inf on a channel the
    top-k switches off, must follow the reference both times (0 * inf is NaN there)."""
    w, _, _ = _cg_inputs()
    x = np.random.default_rng(1).standard_normal((2, 8, 5, 5)).astype(np.float32)
    fc_w = np.zeros((4, 8), np.float32)
    fc_b = np.array([4, 3, 2, 1], np.float32)  # channels 0, 1 active at density 0.5
    scale, beta = np.ones(4, np.float32), np.zeros(4, np.float32)
    model = single_node_model("FBSConv", x.shape, [w, fc_w, fc_b, scale], {"density": 0.5})
    model.graph.node[0].input.extend(["shift_in", "beta_in"])
    for name in ("shift_in", "beta_in"):
        model.graph.input.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, [4]))
    sess = open_session(model)
    for shift in (np.full(4, 0.25, np.float32), np.array([0, 0, 0, np.inf], np.float32)):
        y = sess.run(None, {"x": x, "shift_in": shift, "beta_in": beta})[0]
        with np.errstate(invalid="ignore"):
            y_ref = ref.fbs_conv_reference(x, w, fc_w, fc_b, scale, shift, beta, 0.5)
        assert_nonfinite_match(y, y_ref)
        assert normwise_error(y, y_ref) <= RTOL
    assert np.isnan(y_ref[:, 3]).all()  # the second run's case is not vacuous


@pytest.mark.parametrize("op", ["CGConv", "SparseInputConv"])
def test_cg_and_sparse_nonfinite_input_follow_the_reference(op):
    w, mask, thr = _cg_inputs()
    x = _with_nonfinite(np.nan, SPOTS[1])
    x[1, 2, 2, 2] = np.inf
    if op == "CGConv":
        y = run_node(op, x, [w, mask, thr], {"pads": [1, 1, 1, 1]})
        y_ref = ref.cg_conv_reference(x, w, mask, thr, pads=(1, 1, 1, 1))
    else:
        b = np.linspace(-1, 1, 4).astype(np.float32)
        y = run_node(op, x, [w, b], {"pads": [1, 1, 1, 1]})
        y_ref = ref.sparse_input_conv_reference(x, w, b, pads=(1, 1, 1, 1))
    assert_nonfinite_match(y, y_ref)
    assert np.isnan(y_ref).any()
    assert normwise_error(y, y_ref) <= RTOL


@pytest.mark.parametrize("strides", [(1, 1), (2, 2), (3, 3), (5, 5)])
@pytest.mark.parametrize("block_diagonal", [False, True])
def test_cg_nonfinite_anywhere_in_x_follows_the_reference(strides, block_diagonal):
    """A NaN or inf anywhere in X, for each way CGConv reads X (stride 1: padded rows; 2:
    phase planes; 3: the generic phase loop; 5: im2col panels) and both base-mask kinds (one
    base set: stage 2's channels copied only when a span needs them; block-diagonal: the joint
    second stage), with the fused affine epilogue. Sample n holds one NaN (two: inf) in channel
    n, at a different place per sample (first / last row and column included). Expected:
    runtimes/reference.py (cg_conv_reference: Yf * d + Yp * (1 - d), NaN where 0 * inf)."""
    rng = np.random.default_rng(5)
    o, c, h, wd = 8, 8, 13, 15
    w = rng.standard_normal((o, c, 3, 3)).astype(np.float32)
    mask = cg_base_mask(o, c, 4, block_diagonal)
    thr = np.zeros(o, np.float32)
    post = [rng.uniform(0.5, 2, o).astype(np.float32), rng.standard_normal(o).astype(np.float32)]
    x = rng.standard_normal((c, c, h, wd)).astype(np.float32)
    spots = [(0, 0), (h - 1, wd - 1), (0, wd - 1), (h - 1, 0), (6, 7), (1, wd - 2), (h - 2, 1), (5, 12)]
    for n in range(c):
        x[n, n, spots[n][0], spots[n][1]] = np.inf if n in (1, 5) else np.nan
    attrs = conv_attrs(strides, (1, 1, 1, 1), (1, 1))  # no Relu: it would clip a -inf
    y = run_node("CGConv", x, [w, mask, thr, *post], attrs)
    with np.errstate(invalid="ignore", over="ignore"):
        y_ref = ref.cg_conv_reference(x, w, mask, thr, strides, (1, 1, 1, 1), (1, 1),
                                      post_scale=post[0], post_shift=post[1])
    # Some samples' values reach their output (at strides 2-5 some spots lie in no
    # receptive field: the output stays finite, and must stay so).
    assert sum(not np.isfinite(y_ref[n]).all() for n in range(c)) >= 2
    assert_nonfinite_match(y, y_ref)
    assert normwise_error(y, y_ref) <= RTOL


@pytest.mark.parametrize("value", [np.nan, np.inf])
@pytest.mark.parametrize("op", ["CGConv", "PGConv", "SparseInputConv"])
def test_nonfinite_weight_follows_the_reference(op, value):
    """A NaN / inf weight on a masked-out (CG) or otherwise skipped input channel: the
    reference multiplies it by 0 or by the zero padding, which is NaN."""
    w, mask, thr = _cg_inputs()
    w = w.copy()
    w[1, 6, 0, 0] = value  # channel 6: outside output 1's CG base path (the first 4)
    x = np.random.default_rng(4).standard_normal((2, 8, 5, 5)).astype(np.float32)
    x[0, 6] = 0  # an all-zero channel, which SparseInputConv would skip
    pads = {"pads": [1, 1, 1, 1]}
    with np.errstate(invalid="ignore", over="ignore"):
        if op == "CGConv":
            y, y_ref = run_node(op, x, [w, mask, thr], pads), ref.cg_conv_reference(x, w, mask, thr, pads=(1, 1, 1, 1))
        elif op == "PGConv":
            y = run_node(op, x, [w, thr], {"abits": 4, "pred_bits": 2, **pads})
            y_ref = ref.pg_conv_reference(x, w, thr, 4, 2, pads=(1, 1, 1, 1))
        else:
            y, y_ref = run_node(op, x, [w, thr], pads), ref.sparse_input_conv_reference(x, w, thr, pads=(1, 1, 1, 1))
    assert not np.isfinite(y_ref[:, 1]).all()
    assert_nonfinite_match(y, y_ref)
    assert normwise_error(y, y_ref) <= RTOL


# Attributes: overflowing geometry and mistyped or unknown attributes are errors through ONNX
# Runtime (never a crash, never a silently wrong shape). Before: pads / dilations near 2^62
# wrapped int64 (a [1, 4, 5, 3] output from a 5x5 input, or a crash), and a float group, a
# wrong kernel_shape or auto_pad were ignored.

def raw_session(model: onnx.ModelProto):
    """A session with the library registered but WITHOUT runtimes/ort.py's graph-level
    attribute check: what the kernels alone do when another tool opens the model."""
    import onnxruntime as ort
    from gate2deploy.runtimes.ort import session_options

    return ort.InferenceSession(model.SerializeToString(), session_options(threads=2),
                                providers=["CPUExecutionProvider"])


OVERFLOW_ATTRS = {
    "pads_2^62": {"pads": [2**62, 0, 2**62, 0]},
    "pads_max": {"pads": [2**63 - 1, 2**63 - 1, 2**63 - 1, 2**63 - 1]},
    "dilation_2^62": {"dilations": [2**62, 1], "pads": [2**62, 0, 2**62, 0]},
    "dilation_max": {"dilations": [2**63 - 1, 2**63 - 1]},
    "stride_max": {"strides": [2**63 - 1, 1]},
    "pads_2^31": {"pads": [2**31, 0, 0, 0]},
    "pads_huge_output": {"pads": [0, 0, 0, 2**31 - 1]},
    "pads_huge_padded_input": {"pads": [2**30, 2**30, 2**30, 2**30], "dilations": [2**30, 2**30]},
    "negative_pad": {"pads": [-(2**63), 0, 0, 0]},
}


@pytest.mark.parametrize("op", ["CGConv", "PGConv", "FBSConv", "SparseInputConv"])
@pytest.mark.parametrize("case", sorted(OVERFLOW_ATTRS))
def test_overflowing_conv_attributes_are_errors(op, case):
    w, mask, thr = _cg_inputs()
    inits = {"CGConv": [w, mask, thr], "PGConv": [w, thr],
             "FBSConv": [w, np.ones((4, 8), np.float32)] + [np.ones(4, np.float32)] * 4,
             "SparseInputConv": [w, thr]}[op]
    attrs = dict(OVERFLOW_ATTRS[case])
    attrs.update({"PGConv": {"abits": 4, "pred_bits": 2}, "FBSConv": {"density": 0.5}}.get(op, {}))
    x = np.ones((1, 8, 5, 5), np.float32)
    with pytest.raises(Exception, match=op):
        raw_session(single_node_model(op, x.shape, inits, attrs)).run(None, {"x": x})


MISTYPED = {
    "group_float": ({"group": 1.0}, "group must be an int"),
    "pads_floats": ({"pads": [1.0, 1.0, 1.0, 1.0]}, "pads must be a list of ints"),
    "strides_int": ({"strides": 1}, "strides must be a list of ints"),
    "kernel_shape_wrong": ({"kernel_shape": [5, 5]}, "kernel_shape"),
    "auto_pad": ({"auto_pad": "SAME_UPPER"}, "auto_pad"),
    "activation_int": ({"activation": 1}, "activation must be a string"),
}


@pytest.mark.parametrize("case", sorted(MISTYPED))
def test_kernels_refuse_mistyped_attributes(case):
    attrs, message = MISTYPED[case]
    x = np.ones((1, 8, 5, 5), np.float32)
    with pytest.raises(Exception, match=message):
        raw_session(single_node_model("CGConv", x.shape, list(_cg_inputs()), attrs)).run(None, {"x": x})


def test_kernels_refuse_mistyped_op_attributes():
    w, _, thr = _cg_inputs()
    x = np.ones((1, 8, 5, 5), np.float32)
    for op, inits, attrs, message in [
            ("PGConv", [w, thr], {"abits": 4.0, "pred_bits": 2}, "abits must be an int"),
            ("PGConv", [w, thr], {"pred_bits": 2}, "abits and pred_bits are required"),
            ("FBSConv", [w, np.ones((4, 8), np.float32)] + [np.ones(4, np.float32)] * 4,
             {"density": "0.5"}, "density must be a float")]:
        with pytest.raises(Exception, match=message):
            raw_session(single_node_model(op, x.shape, inits, attrs)).run(None, {"x": x})


def test_kernel_shape_equal_to_w_is_accepted_by_the_kernel():
    w, mask, thr = _cg_inputs()
    x = np.random.default_rng(0).standard_normal((1, 8, 5, 5)).astype(np.float32)
    y = raw_session(single_node_model("CGConv", x.shape, [w, mask, thr], {"kernel_shape": [3, 3]})
                    ).run(None, {"x": x})[0]
    np.testing.assert_allclose(y, ref.cg_conv_reference(x, w, mask, thr), rtol=0, atol=1e-5)


@pytest.mark.parametrize("attrs, message", [
    ({"kernel_shape": [3, 3]}, "unknown attribute 'kernel_shape'"),
    ({"auto_pad": "NOTSET"}, "unknown attribute 'auto_pad'"),
    ({"padz": [1, 1, 1, 1]}, "unknown attribute 'padz'"),
    ({"group": 1.0}, "attribute 'group' must be INT, not FLOAT"),
    ({"pads": [1.0, 1.0, 1.0, 1.0]}, "attribute 'pads' must be INTS, not FLOATS"),
])
def test_open_session_checks_attributes_against_the_schema(attrs, message):
    """Unknown names can only be caught at graph level (the C API cannot list attributes)."""
    x = np.ones((1, 8, 5, 5), np.float32)
    with pytest.raises(UserError, match=message):
        open_session(single_node_model("CGConv", x.shape, list(_cg_inputs()), attrs))


def test_open_session_allows_the_tensorrt_parser_attributes():
    w, mask, thr = _cg_inputs()
    x = np.random.default_rng(0).standard_normal((1, 8, 5, 5)).astype(np.float32)
    model = single_node_model("CGConv", x.shape, [w, mask, thr],
                              {"plugin_namespace": "gate2deploy", "plugin_version": "1"})
    np.testing.assert_allclose(open_session(model).run(None, {"x": x})[0],
                               ref.cg_conv_reference(x, w, mask, thr), rtol=0, atol=1e-5)


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_inputs_raise_runtime_error_not_crash(case):
    op, x_shape, inits, attrs = BAD_CASES[case]
    x = np.ones(x_shape, np.float32)
    with pytest.raises(Exception) as info:
        run_node(op, x, inits, attrs, dynamic_x=True)
    assert op in str(info.value) or "Invalid" in str(info.value) or "INVALID" in str(info.value)


# ----------------------------------------------------------------------------- CLI

def test_cli_run_and_bench_custom_op_model(cli, tmp_path):
    w, mask, thr = _cg_inputs()
    path = tmp_path / "cg.onnx"
    onnx.save(single_node_model("CGConv", None, [w, mask, thr], {"pads": [1, 1, 1, 1]},
                                dynamic_x=True), str(path))
    out = tmp_path / "out.npz"
    code, stdout, stderr = cli("run", path, "--input-shape", "2x8x6x6", "--bench", "3",
                               "--save-outputs", out)
    assert code == 0, stderr
    assert "output y: float32 [2, 4, 6, 6]" in stdout and "median" in stdout
    x = np.random.default_rng(0).standard_normal((2, 8, 6, 6)).astype(np.float32)
    np.testing.assert_allclose(np.load(out)["y"], ref.cg_conv_reference(x, w, mask, thr, pads=(1, 1, 1, 1)),
                               rtol=0, atol=1e-4 * 30)


@pytest.mark.parametrize("args, message", [
    (["--input-shape", "2x5x6x6"], "X has 5 channels"),
    ([], "symbolic shape"),
    (["--input-shape", "2xAx6"], "expected dimensions"),
])
def test_cli_run_errors_are_one_line(cli, tmp_path, args, message):
    w, mask, thr = _cg_inputs()
    path = tmp_path / "cg.onnx"
    onnx.save(single_node_model("CGConv", None, [w, mask, thr], {}, dynamic_x=True), str(path))
    code, stdout, stderr = cli("run", path, *args)
    assert code == 2
    assert message in stderr and len(stderr.strip().splitlines()) == 1, stderr


def test_cli_run_missing_file(cli, tmp_path):
    code, _, stderr = cli("run", tmp_path / "nope.onnx")
    assert code == 2 and "does not exist" in stderr


# ----------------------------------------------------------------------------- QuantizeActivation

@pytest.mark.parametrize("abits", [2, 3, 8])
@pytest.mark.parametrize("static", [False, True])
def test_quantize_activation_is_the_seeds_quantizer_bit_for_bit(abits, static):
    """The fused quantizer equals, bit for bit, the PyTorch module's quantizer
    (gate2deploy.gated.quantize_sign_magnitude, the seed's TorchQuantize operation order) and
    the reference, on data with zeros, negative zeros and values whose |x| / s * levels is
    k + 0.5 exactly under the static scale s = 2 (round half to even, as torch.round in the
    seed's TorchRoundToBits: the level is the even neighbour), dynamic scale over the whole
    batch or a static one; a tensor large enough to be split over the thread pool."""
    import torch

    from gate2deploy.gated import quantize_sign_magnitude

    rng = np.random.default_rng(abits)
    levels = np.float32(2 ** abits - 1)
    x = rng.standard_normal((3, 16, 40, 40)).astype(np.float32)
    x.flat[:50] = 0.0
    x.flat[50:100] = -0.0
    # ties: m = (k + 0.5) / levels in float32 where m * levels is k + 0.5 exactly; x = 2 m
    k = np.arange(200) % int(levels)
    m = ((k + 0.5) / levels).astype(np.float32)
    exact = (m * levels) == (k + 0.5)
    assert exact.sum() >= 20
    ties = (2 * m[exact] * np.where(np.arange(exact.sum()) % 2, 1, -1)).astype(np.float32)
    x.flat[100:100 + ties.size] = ties
    attrs = {"levels": float(levels), **({"scale": 2.0} if static else {})}
    model = single_node_model("QuantizeActivation", x.shape, [], attrs)
    y = open_session(model, threads=2).run(None, {"x": x})[0]
    expected = quantize_sign_magnitude(torch.from_numpy(x), abits, 2.0 if static else None).numpy()
    np.testing.assert_array_equal(y, expected)
    np.testing.assert_array_equal(y, ref.quantize_activation_reference(x, float(levels), 2.0 if static else 0.0))
    assert len(np.unique(np.abs(y))) <= levels + 1  # on the grid
    if static:  # each tie took its even level
        got_level = np.rint(np.abs(y.flat[100:100 + ties.size]) / 2 * levels)
        kt = k[exact]
        np.testing.assert_array_equal(got_level, kt + kt % 2)


def quantizer_boundary_values(levels: float, s: float) -> np.ndarray:
    """Inputs at and around every level boundary of the quantizer with scale s: for each level
    k, the float nearest (k + 0.5) / levels * s and 24 floats on either side (where the kernel's
    division-free levels (isa_kernels.h QuantLevels) must switch exactly where the division
    does), both signs; plus 0, -0, s, values past s, the largest float, inf, NaN and
    subnormals."""
    f32 = np.float32
    centers = ((np.arange(int(np.rint(levels)) + 1) + f32(0.5)) / f32(levels) * f32(s)).astype(f32)
    around = [centers]
    for direction in (np.inf, -np.inf):
        v = centers.copy()
        for _ in range(24):
            v = np.nextafter(v, f32(direction))
            around.append(v.copy())
    special = np.array([0.0, -0.0, s, s * 1.5, 3.4e38, np.inf, -np.inf, np.nan, 1e-45, 1e-39, 1e-30],
                       dtype=f32)
    v = np.concatenate([*around, special])
    return np.concatenate([v, -v]).astype(f32)


def check_quantizer_at_level_boundaries() -> None:
    """QuantizeActivation against the reference (an IEEE division per element), bit for bit,
    on quantizer_boundary_values: levels 1, 3, 7 and 15 (one vector's lanes: the kernels' level
    table), 7.5 (levels not an integer) and 255 (past the table: the division path), static
    scales 2, 0.37, 3e-3 and 1e5, and a dynamic scale (max |x| + eps). Also run by
    test_kernel_paths.py under each forced ISA tier."""
    for levels in (1.0, 3.0, 7.0, 7.5, 15.0, 255.0):
        for scale in (2.0, 0.37, 3e-3, 1e5, 0.0):
            x = quantizer_boundary_values(levels, scale if scale else 1.0)
            if not scale:
                x = x[np.isfinite(x)]  # the dynamic scale: max |x| + eps, finite
            x = x.reshape(1, 1, 1, -1)
            attrs = {"levels": levels, **({"scale": scale} if scale else {})}
            y = open_session(single_node_model("QuantizeActivation", x.shape, [], attrs)).run(None, {"x": x})[0]
            np.testing.assert_array_equal(y, ref.quantize_activation_reference(x, levels, scale),
                                          err_msg=f"levels {levels}, scale {scale}")


def check_pg_split_at_level_boundaries() -> None:
    """PGConv's split of X into MSB and LSB counts (on the int8 kernels: isa_kernels.cc
    pg_split_words) against runtimes/reference.py pg_split_activations (the seed's quantizer
    and truncation, dnn-gating utils/pg_utils.py TorchQuantize / TorchTruncate, in float32: an
    IEEE division per element, numpy's half-to-even round), at every level boundary of the
    quantizer (quantizer_boundary_values: each boundary +-24 ulps, both signs, 0, -0, inf,
    subnormals): abits 3 / pred 2, 8 / 4, 8 / 1 and 8 / 7, static scales and a dynamic one.
    A 1x1 convolution with identity weights passes each channel through: with every gate off
    Y = X's MSB part, with every gate on its MSB + LSB parts, so a count one level off is off by
    s / levels, far above the stages' float rounding (the tolerance). Planes 32 wide (split row
    by row) and 19 wide (a whole plane, a partial last vector), 6 channels (a last group of four
    half past C). Also run by test_kernel_paths.py under each forced ISA tier."""
    for abits, pred in ((3, 2), (8, 4), (8, 1), (8, 7)):
        levels = float(2 ** abits - 1)
        for scale in (2.0, 0.37, 1e5, 0.0):
            if scale:
                v = quantizer_boundary_values(levels, scale)
                v = v[~np.isnan(v)]  # NaN takes the fp32 path (PGConv's nan_planes)
            else:  # the dynamic scale max |X| + 1e-7: boundaries of that s, |X| <= 1
                s = np.float32(1.0) + np.float32(1e-7)
                v = quantizer_boundary_values(levels, float(s))
                v = np.concatenate([v[np.isfinite(v) & (np.abs(v) <= 1.0)], np.float32([1.0])])
            for channels, width in ((8, 32), (6, 19)):
                per_plane = 4 * width
                planes = -(-v.size // per_plane)
                flat = np.zeros(planes * per_plane, np.float32)
                flat[:v.size] = v
                flat = np.concatenate([flat, np.zeros((-planes) % channels * per_plane, np.float32)])
                x = flat.reshape(-1, channels, 4, width)
                w = np.eye(channels, dtype=np.float32).reshape(channels, channels, 1, 1)
                attrs = dict(conv_attrs((1, 1), (0, 0, 0, 0), (1, 1)), abits=abits, pred_bits=pred,
                             static_scale=scale)
                for gates_on in (False, True):
                    thr = np.full(channels, -np.inf if gates_on else np.inf, np.float32)
                    before = pg_int8_runs()
                    y = run_node("PGConv", x, [w, thr], attrs)
                    if INT8_EXPECTED:
                        assert pg_int8_runs() == before + x.shape[0], (abits, pred, scale)
                    x_hb, x_lb, s = ref.pg_split_activations(x, abits, pred, scale)
                    y_ref = x_hb + x_lb if gates_on else x_hb
                    assert_nonfinite_match(y, y_ref)
                    np.testing.assert_allclose(y, y_ref, rtol=0, atol=1e-4 * s / levels,
                                               err_msg=f"abits {abits}, pred {pred}, scale {scale}, "
                                                       f"{width} wide, gates {'on' if gates_on else 'off'}")


def test_pg_split_counts_switch_where_the_division_does():
    check_pg_split_at_level_boundaries()


def test_quantize_activation_levels_switch_where_the_division_does():
    check_quantizer_at_level_boundaries()


def test_quantize_activation_nan_follows_the_chain():
    """A NaN makes the dynamic scale NaN, hence every output (the chain's max is NaN); with a
    static scale only that element is NaN."""
    x = np.linspace(-2, 2, 60, dtype=np.float32).reshape(1, 3, 4, 5)
    x[0, 1, 2, 3] = np.nan
    y = open_session(single_node_model("QuantizeActivation", x.shape, [], {"levels": 7.0})).run(None, {"x": x})[0]
    assert np.isnan(y).all()
    y = open_session(single_node_model("QuantizeActivation", x.shape, [], {"levels": 7.0, "scale": 2.0})).run(
        None, {"x": x})[0]
    assert np.isnan(y).sum() == 1 and np.isnan(y[0, 1, 2, 3])
    np.testing.assert_array_equal(y, ref.quantize_activation_reference(x, 7.0, 2.0))


@pytest.mark.parametrize("attrs, message", [({}, "missing attribute .levels."), ({"levels": 0.5}, "levels must be"),
                                            ({"levels": 7.0, "scale": -1.0}, "scale must be"),
                                            ({"levels": 7.0, "eps": float("nan")}, "eps must be")])
def test_quantize_activation_attributes_are_checked(attrs, message):
    x = np.ones((1, 2, 3, 3), np.float32)
    model = single_node_model("QuantizeActivation", x.shape, [], attrs)
    with pytest.raises(Exception, match=message):
        open_session(model, threads=1).run(None, {"x": x})


# ----------------------------------------------------------------------------- blocked layout
# FBSConv and SparseInputConv in ONNX Runtime's NCHWc layout (input_block / output_block, set
# by runtimes/ort_layout.py at session creation): the same function as in NCHW, bit for bit
# (the kernels compute the same float operations in either layout), and the reference's.

LAYOUT_BLOCK = nchwc_block(custom_ops_library_path())  # 16 with AVX-512F, 8 with AVX2, 0 none
needs_layout = pytest.mark.skipif(LAYOUT_BLOCK == 0, reason="no NCHWc layout on this CPU")
# (N, C, O, H, W, k, strides, pads, dilations): whole blocks (ONNX Runtime's conv reads X and
# writes Y in place), a partial last block of outputs with a stride (still delegated: padding
# adds <= 25%), channel counts whose padding would add more (our own GEMM, through NCHW
# planes), and a 3-channel stem (its input stays NCHW: fewer than a block)
LAYOUT_GEOMETRIES = [
    (2, 32, 32, 9, 7, 3, (1, 1), (1, 1, 1, 1), (1, 1)),
    (1, 48, 40, 8, 8, 3, (2, 2), (1, 1, 1, 1), (1, 1)),
    (2, 24, 20, 9, 7, 3, (1, 1), (1, 1, 1, 1), (1, 1)),
    (1, 3, 32, 12, 12, 5, (2, 2), (2, 2, 2, 2), (1, 1)),
]


def blocked_model(op, x_shape, initializers, attrs, in_block, out_block, out_channels, r_shape=None):
    """x -> [ReorderInput] -> op with input_block / output_block -> [ReorderOutput] -> y, as
    the layout pass leaves an op between ONNX Runtime's blocked nodes (NCHW at both ends)."""
    nchwc = "com.microsoft.nchwc"
    names = [f"in{i}" for i in range(len(initializers))]
    nodes, x_in = [], "x"
    if in_block:
        nodes.append(helper.make_node("ReorderInput", ["x"], ["xb"], domain=nchwc, channels_last=0))
        x_in = "xb"
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))]
    op_inputs = [x_in, *names]
    if r_shape is not None:
        inputs.append(helper.make_tensor_value_info("r", TensorProto.FLOAT, list(r_shape)))
        if out_block:
            nodes.append(helper.make_node("ReorderInput", ["r"], ["rb"], domain=nchwc, channels_last=0))
        op_inputs.append("rb" if out_block else "r")
    nodes.append(helper.make_node(op, op_inputs, ["yb" if out_block else "y"], domain="gate2deploy",
                                  input_block=in_block, output_block=out_block, **attrs))
    if out_block:
        nodes.append(helper.make_node("ReorderOutput", ["yb"], ["y"], domain=nchwc,
                                      channels=out_channels, channels_last=0))
    graph = helper.make_graph(
        nodes, op, inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [helper.make_tensor(n, TensorProto.FLOAT, a.shape, a.ravel()) for n, a in zip(names, initializers)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("gate2deploy", 1),
                                                    helper.make_opsetid(nchwc, 1)])
    model.ir_version = IR_VERSION
    return model


def run_blocked(op, feeds, initializers, attrs, in_block, out_block, out_channels):
    model = blocked_model(op, feeds["x"].shape, initializers, attrs, in_block, out_block, out_channels,
                          feeds["r"].shape if "r" in feeds else None)
    return open_session(model, threads=2, optimization="disable", layout="nchw").run(None, feeds)[0]


def layout_cases(geom):
    """The layouts a layer can get: NCHW in and blocked out, blocked both (not for a stem)."""
    return [(0, LAYOUT_BLOCK)] + ([(LAYOUT_BLOCK, LAYOUT_BLOCK)] if geom[1] >= LAYOUT_BLOCK else [])


@needs_layout
@pytest.mark.parametrize("pool", ["avg", "max", "l1", "l2"])
@pytest.mark.parametrize("density", [0.1, 0.5, 1.0])
@pytest.mark.parametrize("gi", range(len(LAYOUT_GEOMETRIES)))
def test_fbs_conv_blocked_layout_computes_the_nchw_result_bit_for_bit(gi, density, pool):
    """Blocked X and / or Y: every output bit as the NCHW op (whose agreement with the
    reference the tests above check), switched-off input channels included (density 0.1: few
    active outputs, the own-GEMM path; 1.0: the delegate reads X and writes Y in place); at
    density 1 (no top-k ties) also within tolerance of the reference itself."""
    geom = LAYOUT_GEOMETRIES[gi]
    rng, x, w, s, p, d = random_case(geom, seed=700 + gi)
    o, c = w.shape[:2]
    if c > 3:
        x[:, rng.permutation(c)[: c // 3]] = 0.0  # a previous FBS layer switched them off
    fc_w = rng.standard_normal((o, c)).astype(np.float32)
    fc_b = (rng.standard_normal(o) + 0.5).astype(np.float32)
    bn_scale, bn_shift, beta = (rng.standard_normal(o).astype(np.float32) for _ in range(3))
    inits = [w, fc_w, fc_b, bn_scale, bn_shift, beta]
    attrs = dict(conv_attrs(s, p, d), density=float(np.float32(density)), pool=pool)
    y_nchw = run_node("FBSConv", x, inits, attrs)
    for in_block, out_block in layout_cases(geom):
        y = run_blocked("FBSConv", {"x": x}, inits, attrs, in_block, out_block, o)
        np.testing.assert_array_equal(y, y_nchw, err_msg=f"layout in {in_block} out {out_block}")
    if density == 1.0:
        y_ref = ref.fbs_conv_reference(x, w, *inits[1:], 1.0, pool, s, p, d)
        assert np.abs(y_nchw - y_ref).max() <= RTOL * max(float(np.abs(y_ref).max()), 1e-30)


@needs_layout
def test_fbs_conv_blocked_layout_keeps_the_reference_nan():
    """A sample holding NaN takes the reference path in either layout: the same NaNs, the
    other sample unchanged."""
    geom = LAYOUT_GEOMETRIES[0]
    rng, x, w, s, p, d = random_case(geom, seed=710)
    o, c = w.shape[:2]
    x[1, 5, 2, 3] = np.nan
    inits = [w, rng.standard_normal((o, c)).astype(np.float32), (rng.standard_normal(o) + 0.5).astype(np.float32),
             *(rng.standard_normal(o).astype(np.float32) for _ in range(3))]
    attrs = dict(conv_attrs(s, p, d), density=0.5, pool="max")
    y_nchw = run_node("FBSConv", x, inits, attrs)
    assert np.isnan(y_nchw[1]).any() and not np.isnan(y_nchw[0]).any()
    for in_block, out_block in layout_cases(geom):
        np.testing.assert_array_equal(run_blocked("FBSConv", {"x": x}, inits, attrs, in_block, out_block, o), y_nchw)


@needs_layout
@pytest.mark.parametrize("case", ["plain", "residual_relu", "nan_weight"])
@pytest.mark.parametrize("zero_fraction", [0.0, 0.5])
@pytest.mark.parametrize("gi", range(len(LAYOUT_GEOMETRIES)))
def test_sparse_input_conv_blocked_layout_computes_the_nchw_result_bit_for_bit(gi, zero_fraction, case):
    """SparseInputConv with blocked X / R / Y: bit for bit the NCHW op, and within tolerance
    of the reference (act(Conv(X, W, B) + R)); an inf weight (the plain dense path) keeps
    the reference's NaN where a zero channel meets it."""
    geom = LAYOUT_GEOMETRIES[gi]
    rng, x, w, s, p, d = random_case(geom, seed=720 + gi)
    o, c = w.shape[:2]
    x[:, rng.permutation(c)[: int(round(zero_fraction * c))]] = 0.0
    if case == "nan_weight":
        w[1, 0, 0, 0] = np.inf
    b = rng.standard_normal(o).astype(np.float32)
    y_shape = ref.sparse_input_conv_reference(x, w, b, s, p, d).shape
    feeds = {"x": x}
    attrs = conv_attrs(s, p, d)
    attrs.pop("group")
    residual = None
    if case == "residual_relu":
        residual = rng.standard_normal(y_shape).astype(np.float32)
        feeds["r"] = residual
        attrs["activation"] = "Relu"
    model = single_node_model("SparseInputConv", x.shape, [w, b], attrs)
    if residual is not None:
        model.graph.input.append(helper.make_tensor_value_info("r", TensorProto.FLOAT, list(y_shape)))
        model.graph.node[0].input.append("r")
    y_nchw = open_session(model, threads=2, layout="nchw").run(None, feeds)[0]
    y_ref = ref.sparse_input_conv_reference(x, w, b, s, p, d, residual=residual, activation=attrs.get("activation"))
    assert_nonfinite_match(y_nchw, y_ref)
    finite = np.isfinite(y_ref)
    assert np.abs(y_nchw[finite] - y_ref[finite]).max() <= RTOL * float(np.abs(y_ref[finite]).max())
    for in_block, out_block in layout_cases(geom):
        y = run_blocked("SparseInputConv", feeds, [w, b], attrs, in_block, out_block, o)
        np.testing.assert_array_equal(y, y_nchw, err_msg=f"layout in {in_block} out {out_block}")


@needs_layout
@pytest.mark.parametrize("in_block, out_block, message", [
    (0, "other", "not this CPU's NCHWc block"),
    ("block", 0, "input_block needs output_block"),
])
def test_blocked_layout_attributes_are_checked(in_block, out_block, message):
    """A layout the kernels cannot read (another machine's block size; a blocked input with an
    NCHW output, which the pass never writes) is an error naming the attribute, not a crash."""
    geom = LAYOUT_GEOMETRIES[0]
    rng, x, w, s, p, d = random_case(geom, seed=730)
    o = w.shape[0]
    block = {"other": 2 * LAYOUT_BLOCK, "block": LAYOUT_BLOCK, 0: 0}
    model = single_node_model("SparseInputConv", x.shape, [w, np.zeros(o, np.float32)],
                              dict(input_block=block[in_block], output_block=block[out_block]))
    with pytest.raises(Exception, match=message):
        open_session(model, threads=1, optimization="disable", layout="nchw").run(None, {"x": x})


# ----------------------------------------------------------------------------- reruns

def _rerun_small_cases(env_extra: dict[str, str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, G2D_NATIVE_SUBPROCESS="1", **env_extra)
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", __file__,
           "-k", "not rerun and not sanitizer and not cli"]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)


@pytest.mark.sanitizer
@pytest.mark.skipif(IN_SUBPROCESS, reason="already a rerun")
def test_sanitizer_build_runs_kernel_tests_clean():
    """The small cases under -fsanitize=address,undefined (ASan runtime preloaded)."""
    from gate2deploy.runtimes.native_build import asan_preload, build_library

    lib = build_library("asan")
    proc = _rerun_small_cases({
        "GATE2DEPLOY_OPS_LIBRARY": str(lib),
        "LD_PRELOAD": asan_preload(),
        "ASAN_OPTIONS": "detect_leaks=0:abort_on_error=1",
        "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1",
    })
    report = proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.returncode == 0, report
    assert "ERROR: AddressSanitizer" not in proc.stderr and "runtime error:" not in proc.stderr, report
    assert " passed" in proc.stdout, report


@pytest.mark.parametrize("isa", ["generic", "avx2"])
@pytest.mark.skipif(IN_SUBPROCESS, reason="already a rerun")
def test_rerun_with_narrower_isa(isa):
    """The generic and AVX2 inner loops (picked by cpuid on other machines) on this machine,
    with the dense sub-convolutions on our own GEMM instead of ONNX Runtime's NCHWc conv, and
    PG's stages off AMX."""
    proc = _rerun_small_cases({"G2D_ISA": isa, "G2D_ORT_CONV": "0", "G2D_AMX": "0"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
