"""Triton kernels (runtimes/triton_kernels.py) vs the reference, on the CPU interpreter.

TRITON_INTERPRET=1 is set before the kernels module is imported (fp32 only: bfloat16 gives
NaN under the interpreter). Tolerance and gate-tie accounting as in test_native_ops.py:
|Y - Y_ref| <= 1e-4 * max|Y_ref|, except flipped gates that sit at a tie.
Also: the TensorRT plugin path fails cleanly (one-line UserError) where TensorRT or a GPU is
missing, which is always the case on this project's machines.
"""
from __future__ import annotations

import importlib
import os
import sys

import numpy as np
import pytest
import torch

from gate2deploy.errors import UserError
from gate2deploy.runtimes import reference as ref

from test_native_ops import (assert_close_with_ties, cg_base_mask, quantize_weights,
                             thresholds_for_fraction)


@pytest.fixture(scope="module")
def tk():
    """runtimes.triton_kernels imported and run under the interpreter (the decoration and the
    launches both read TRITON_INTERPRET), restoring the environment afterwards."""
    pytest.importorskip("triton")
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    sys.modules.pop("gate2deploy.runtimes.triton_kernels", None)
    try:
        module = importlib.import_module("gate2deploy.runtimes.triton_kernels")
        assert module.INTERPRETED
        yield module
    finally:
        sys.modules.pop("gate2deploy.runtimes.triton_kernels", None)
        if old is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = old


# (N, C, O, H, W, k, strides, pads, dilations): kept small, the interpreter is slow
GEOMS = [
    (2, 4, 6, 5, 6, 3, (1, 1), (1, 1, 1, 1), (1, 1)),
    (1, 6, 4, 7, 7, 3, (2, 1), (0, 1, 2, 0), (1, 2)),
]


def T(a):
    return torch.from_numpy(np.ascontiguousarray(a))


@pytest.mark.parametrize("frac", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("gi", range(len(GEOMS)))
def test_triton_cg_conv(tk, gi, frac):
    n, c, o, h, w, k, s, p, d = GEOMS[gi]
    rng = np.random.default_rng(gi)
    x = rng.standard_normal((n, c, h, w)).astype(np.float32)
    wt = rng.standard_normal((o, c, k, k)).astype(np.float32)
    mask = cg_base_mask(o, c, 2, block_diagonal=gi == 1)
    yp = ref.conv2d(x, wt * mask[:, :, None, None], s, p, d)
    thr = thresholds_for_fraction(yp, frac)
    y = tk.cg_conv(T(x), T(wt), T(mask), T(thr), s, p, d).numpy()
    assert_close_with_ties(y, ref.cg_conv_reference(x, wt, mask, thr, s, p, d), yp, thr)


@pytest.mark.parametrize("bits", [(3, 2), (8, 4)])
@pytest.mark.parametrize("frac", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("gi", range(len(GEOMS)))
def test_triton_pg_conv(tk, gi, frac, bits):
    n, c, o, h, w, k, s, p, d = GEOMS[gi]
    group = 2 if gi == 0 else 1
    rng = np.random.default_rng(gi)
    x = rng.standard_normal((n, c, h, w)).astype(np.float32)  # signs too
    wt = quantize_weights(rng.standard_normal((o, c // group, k, k)).astype(np.float32), 8)
    x_hb, _, _ = ref.pg_split_activations(x, *bits)
    msb = ref.conv2d(x_hb, wt, s, p, d, group)
    thr = thresholds_for_fraction(msb, frac)
    y = tk.pg_conv(T(x), T(wt), T(thr), *bits, 0.0, s, p, d, group).numpy()
    assert_close_with_ties(y, ref.pg_conv_reference(x, wt, thr, *bits, 0.0, s, p, d, group), msb, thr)


@pytest.mark.parametrize("density", [0.5, 1.0])
@pytest.mark.parametrize("gi", range(len(GEOMS)))
def test_triton_fbs_conv(tk, gi, density):
    n, c, o, h, w, k, s, p, d = GEOMS[gi]
    rng = np.random.default_rng(gi)
    x = rng.standard_normal((n, c, h, w)).astype(np.float32)
    x[:, 1] = 0.0  # a channel switched off by a previous layer
    wt = rng.standard_normal((o, c, k, k)).astype(np.float32)
    fc_w = rng.standard_normal((o, c)).astype(np.float32)
    fc_b = (rng.standard_normal(o) + 1).astype(np.float32)
    sc, sh, be = (rng.standard_normal(o).astype(np.float32) for _ in range(3))
    y = tk.fbs_conv(T(x), T(wt), T(fc_w), T(fc_b), T(sc), T(sh), T(be), density, "avg", s, p, d).numpy()
    y_ref, active = ref.fbs_conv_reference(x, wt, fc_w, fc_b, sc, sh, be, density, "avg", s, p, d,
                                           return_gate=True)
    np.testing.assert_allclose(y, y_ref, rtol=0, atol=1e-4 * np.abs(y_ref).max())
    assert (y[~active] == 0).all()


def test_triton_rejects_bad_input(tk):
    x = torch.zeros((1, 4, 5, 5))
    with pytest.raises(UserError, match="do not fit"):
        tk.cg_conv(x, torch.zeros((2, 3, 3, 3)), torch.zeros((2, 3)), torch.zeros(2))
    with pytest.raises(UserError, match="float32"):
        tk.cg_conv(x.double(), torch.zeros((2, 4, 3, 3)), torch.zeros((2, 4)), torch.zeros(2))


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
