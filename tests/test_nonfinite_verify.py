"""Verification never certifies NaN (issue 17, finding 3).

Before: error maxima were folded with Python's max, and max(0.0, nan) is 0.0, so an exported
model whose output was NaN where PyTorch's was finite "verified, max rel err 0"; a PyTorch model
that itself output NaN was certified too. Now: non-finite values must match element for element
(NaN with NaN, inf with the same inf), anything else fails; a PyTorch model with non-finite
outputs on the verification inputs is refused unless `--allow-nonfinite`.
Expected values here are written out by hand from that rule.
"""
from __future__ import annotations

import copy
import math
import os

import numpy as np
import pytest
import torch
from torch import nn

from gate2deploy.capture import capture
from gate2deploy.gated import CGConv2d
from gate2deploy.pipeline import PassContext, run_pipeline
from gate2deploy import verify as verify_mod
from gate2deploy.verify import NonFiniteReference, check_export, compare_outputs, verify
from nan_compare import normwise_error

CIFAR = "tests/models/cifar_nets.py"


def _conv_pair():
    torch.manual_seed(0)
    good = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 1)).eval()
    bad = copy.deepcopy(good)
    with torch.no_grad():
        bad[2].weight[1, 3, 0, 0] = float("nan")  # output channel 1 becomes NaN everywhere
    return good, bad


def test_verify_fails_on_nan_where_pytorch_is_finite():
    good, bad = _conv_pair()
    x = np.random.default_rng(0).standard_normal((1, 3, 6, 6)).astype(np.float32)
    result = verify(good, capture(bad, torch.from_numpy(x)), [x])
    assert result.nonfinite_mismatches == 36  # channel 1: 6 x 6 NaN where PyTorch is finite
    assert math.isinf(result.max_rel_err)
    assert not result.passed


def test_verify_fails_on_finite_where_pytorch_is_nan():
    good, bad = _conv_pair()
    x = np.random.default_rng(0).standard_normal((1, 3, 6, 6)).astype(np.float32)
    result = verify(bad, capture(good, torch.from_numpy(x)), [x])
    assert result.reference_nonfinite == 36 and result.nonfinite_mismatches == 36
    assert not result.passed


def test_compare_outputs_by_hand():
    nan, inf = np.nan, np.inf
    ref = np.array([1.0, nan, inf, -inf, -2.0], np.float32)
    same = compare_outputs(ref, np.array([1.0, nan, inf, -inf, -2.0005], np.float32))
    assert same.nonfinite_mismatches == 0 and same.reference_nonfinite == 3
    assert same.scale == 2.0  # max |ref| over its finite elements
    assert same.max_abs_err == pytest.approx(0.0005, rel=1e-3)
    for got in ([1.0, 0.0, inf, -inf, -2.0],    # finite where NaN
                [1.0, nan, -inf, -inf, -2.0],   # inf of the other sign
                [1.0, nan, nan, -inf, -2.0],    # NaN where inf
                [nan, nan, inf, -inf, -2.0]):   # NaN where finite
        c = compare_outputs(ref, np.array(got, np.float32))
        assert c.nonfinite_mismatches == 1 and math.isinf(c.max_abs_err), got


def test_test_helpers_are_nan_aware():
    """tests/nan_compare.py (used by fold_helpers.max_rel_err and the native-op tests)."""
    ref = np.array([1.0, 2.0, np.nan], np.float32)
    assert normwise_error(np.array([1.0, 2.0, np.nan], np.float32), ref) == 0.0
    assert math.isinf(normwise_error(np.array([1.0, np.nan, np.nan], np.float32), ref))
    assert math.isinf(normwise_error(np.array([1.0, 2.0, 0.0], np.float32), ref))


def test_check_export_refuses_a_pytorch_model_with_nonfinite_outputs():
    _, bad = _conv_pair()
    x = torch.randn(1, 3, 6, 6)
    proto = capture(bad, x)
    with pytest.raises(NonFiniteReference, match="--allow-nonfinite"):
        check_export(bad, proto, proto, (1, 3, 6, 6))
    check = check_export(bad, proto, proto, (1, 3, 6, 6), allow_nonfinite=True)
    assert check.passed and check.output.reference_nonfinite > 0
    assert check.output.nonfinite_mismatches == 0


def _cg_model():
    torch.manual_seed(1)
    cg = CGConv2d(8, 8, 3, padding=1, p=4)
    with torch.no_grad():
        cg.bn.running_mean.uniform_(-0.5, 0.5)
        cg.bn.running_var.uniform_(0.5, 2.0)
        cg.threshold.uniform_(-0.5, 0.8)
    model = nn.Sequential(cg, nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()
    x = torch.randn(1, 8, 6, 6)
    captured = capture(model, x)
    return model, captured, run_pipeline(captured, "ort", PassContext())


def test_gated_export_with_nan_output_fails(monkeypatch):
    """The gated layers agree but the network output is NaN (a fault after the last gated
    layer): the layer-wise check alone would pass it."""
    model, captured, compiled = _cg_model()
    real = verify_mod.make_session

    class NanOutput:
        def __init__(self, session):
            self.session = session

        def __getattr__(self, name):
            return getattr(self.session, name)

        def run(self, names, feeds, *args):
            outs = self.session.run(names, feeds, *args)
            for i, meta in enumerate(self.session.get_outputs()):
                if meta.name == compiled.graph.output[0].name:
                    outs[i] = outs[i].copy()
                    outs[i].flat[0] = np.nan
            return outs

    monkeypatch.setattr(verify_mod, "make_session", lambda m, *a, **k: NanOutput(real(m, *a, **k)))
    check = check_export(model, captured, compiled, (1, 8, 6, 6))
    assert check.gated["passed"]  # every gated layer itself agrees
    assert check.output.nonfinite_mismatches == 3  # one per verification input
    assert not check.passed


def test_gated_export_matching_nan_passes_with_allow_nonfinite():
    """NaN in the input: PyTorch and the native CGConv give NaN at the same elements, which
    agree (before: "non-finite values; not comparable" failed the layer)."""
    model, captured, compiled = _cg_model()
    x = np.random.default_rng(2).standard_normal((1, 8, 6, 6)).astype(np.float32)
    x[0, 5, 2, 2] = np.nan  # a channel outside the base path of some outputs
    with pytest.raises(NonFiniteReference):
        check_export(model, captured, compiled, (1, 8, 6, 6), samples=[x])
    check = check_export(model, captured, compiled, (1, 8, 6, 6), samples=[x], allow_nonfinite=True)
    assert check.output.reference_nonfinite > 0
    assert check.passed, check.summary()


@pytest.fixture
def nan_resnet_ckpt(tmp_path):
    from models.cifar_nets import resnet20
    model = resnet20()
    with torch.no_grad():
        model.fc.weight[3, 0] = float("nan")  # PyTorch's own logit 3 is NaN
    path = tmp_path / "r20_nan.pt"
    torch.save(model.state_dict(), path)
    return path


def test_cli_export_refuses_nonfinite_pytorch_outputs_unless_allowed(cli, tmp_path, nan_resnet_ckpt):
    out = tmp_path / "m.onnx"
    args = ["export", nan_resnet_ckpt, "-o", out, "--input-shape", "1,3,32,32",
            "--model", f"{CIFAR}:resnet20"]
    code, _, err = cli(*args)
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and "--allow-nonfinite" in err, err
    assert not out.exists()
    code, stdout, err = cli(*args, "--allow-nonfinite")
    assert code == 0, err
    assert out.exists() and "NaN/inf" in stdout
