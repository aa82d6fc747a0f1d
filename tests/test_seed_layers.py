"""The seeds' own layer classes in a user's model are recognised and lowered (issue 12, 2-3).

The models are built from tests/models/seed_layers.py: the test's own re-implementation of
dnn-gating's utils/cg_utils.py CGConv2d, utils/pg_utils.py PGConv2d / QuantizedConv2d /
PactReLU / TorchQuantize / TorchTruncate, the model/{cg,pg}_cifar10_resnet.py ResNet-20, and
PyTorch-FBS's models/custom.py ChannelPruning (same attribute, parameter and buffer names and
the same eval forward, nothing from gate2deploy). Checkpoints are written as the seeds' scripts
write them: cg-cifar10.py / pg-cifar10.py `util.save_models(net.state_dict(), ...)` with `net`
under nn.DataParallel (`module.` prefixes) on multi-GPU hosts; PyTorch-FBS main.py
`torch.save(net.state_dict(), 'ckpts/<rate>-best.pth')`.

Expected values are the seed-semantics forward of that user model, run by PyTorch here; the
exported model (ONNX Runtime with gate2deploy's kernels) must match it within 1e-5 relative.
The inputs are fixed and the test asserts that no gate decision sits within 1e-6 of its
threshold on them (a tie, which float rounding may decide either way; the existing tests
handle those layer by layer in gated_verify, here the inputs simply have none).
"""
from __future__ import annotations

import json
from collections import Counter

import numpy as np
import onnx
import pytest
import torch
from models import seed_layers as seed
from test_dnn_gating_import import seed_resnet20_state_dict

from gate2deploy.runtimes.ort import open_session

MODELS = "tests/models/seed_layers.py"
TIE = 1e-6


def _randomize(net: torch.nn.Module, seed_value: int) -> None:
    """Non-trivial weights, BN statistics and thresholds (the thresholds inside the range of
    the gates' decision values, so that some gates are on and some off)."""
    g = torch.Generator().manual_seed(seed_value)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.Conv2d):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2.0 / m.weight[0].numel()) ** 0.5)
                if hasattr(m, "trunc_a"):  # PG: threshold on the MSB partial sum
                    m.threshold.uniform_(-0.2, 0.5, generator=g)
                elif hasattr(m, "mask"):  # CG: threshold on the normalised partial sum
                    m.threshold.uniform_(-0.3, 0.6, generator=g)
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2, generator=g)
                m.running_var.uniform_(0.5, 2.0, generator=g)
                m.num_batches_tracked.fill_(100)
                if m.affine:
                    m.weight.uniform_(0.6, 1.4, generator=g)
                    m.bias.uniform_(-0.2, 0.2, generator=g)
            if isinstance(m, torch.nn.Linear):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * m.in_features ** -0.5)
                m.bias.uniform_(-0.1, 0.5, generator=g)
            if isinstance(m, seed.PactReLU):
                m.upper_bound.fill_(float(torch.empty(()).uniform_(2.0, 4.0, generator=g)))


def _export(cli, tmp_path, builder, kwargs, *flags, ddp=False, shape=(1, 3, 32, 32)):
    """Build the user's model, randomize, save it as the seed saves it, export with --target ort."""
    net = getattr(seed, builder)(**kwargs)
    _randomize(net, 1)
    sd = net.state_dict()
    ckpt = tmp_path / "model_resnet-20.pt"
    torch.save({f"module.{k}": v for k, v in sd.items()} if ddp else sd, ckpt)
    out, report = tmp_path / "m.onnx", tmp_path / "m.json"
    result = cli("export", ckpt, "--model", f"{MODELS}:{builder}", "--model-kwargs", json.dumps(kwargs),
                 "--target", "ort", "-o", out, "--input-shape", ",".join(map(str, shape)), "--report", report,
                 *flags)
    return net.eval(), out, report, result


def _ort_vs_seed(net, out, shape, seed_value=7):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed_value))
    with torch.no_grad():
        expected = net(x).numpy()
    session = open_session(str(out))
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    return float(np.abs(got - expected).max() / np.abs(expected).max())


def _gated_nodes(out):
    from gate2deploy.ops import GATED_OPS

    return Counter(n.op_type for n in onnx.load(str(out)).graph.node if n.op_type in GATED_OPS)


DNN_GATING = {
    # cg-cifar10.py generate_model kwargs (train_cg.sh: -pt 4 --use_group; here with -shuffle)
    "cg_resnet20": ("resnet20_cg", {"partitions": 4, "ginit": 0.0, "use_group": True, "sparse_bp": True,
                                    "shuffle": True, "alpha": 2.0}, "CGConv", 9),
    "cg_vgg": ("vgg_cg", {"partitions": 2, "shuffle": False, "use_group": False}, "CGConv", 3),
    # pg-cifar10.py generate_model kwargs (train_pg_pact.sh: -w 8 -a 3 -pb 2 -pact)
    "pg_resnet20": ("resnet20_pg", {"wbits": 8, "abits": 3, "pred_bits": 2, "sparse_bp": True, "pact": True},
                    "PGConv", 9),
    "pg_vgg": ("vgg_pg", {"wbits": 4, "abits": 4, "pred_bits": 2}, "PGConv", 3),
}


@pytest.mark.parametrize("case", list(DNN_GATING))
def test_dnn_gating_seed_layers_lower_to_gated_ops_exactly(tmp_path, cli, case):
    builder, kwargs, op, count = DNN_GATING[case]
    net, out, report, (code, _, err) = _export(cli, tmp_path, builder, kwargs, ddp=builder.startswith("resnet"))
    assert code == 0, err
    assert "warning" not in err
    assert _gated_nodes(out) == {op: count}
    r = json.loads(report.read_text())
    assert r["unlowered_gated_layers"] == []
    assert r["mask_sources"]["seed_layers"]["max_rel_err_vs_seed_layers_on_example"] <= 1e-6
    lowered = [e for e in r["mask_sources"]["seed_layers"]["lowered"] if e["as"] == op.replace("Conv", "Conv2d")]
    assert len(lowered) == count
    # the hyper-parameters were read from the user's objects, not defaulted
    for e in lowered:
        if op == "CGConv":
            assert (e["p"], e["shuffle"], e["use_group (from mask)"]) == (
                kwargs["partitions"], kwargs["shuffle"], kwargs["use_group"])
        else:
            assert (e["wbits"], e["abits"], e["pred_bits"]) == (kwargs["wbits"], kwargs["abits"], kwargs["pred_bits"])
    assert _ort_vs_seed(net, out, (1, 3, 32, 32)) <= 1e-5
    gated = [m for m in net.modules() if hasattr(m, "min_margin")]
    assert len(gated) == count and min(m.min_margin for m in gated) > TIE, "a gate at a tie on the test input"


def test_seed_layer_lookalike_whose_forward_differs_is_not_lowered(tmp_path, cli):
    """A CGConv2d look-alike (shuffle=True) whose forward does not shuffle: lowering it by its
    attributes would change the output, so the example-input check refuses it, names it."""
    net, out, report, (code, _, err) = _export(cli, tmp_path, "vgg_cg_noshuffle", {})
    assert code == 0, err
    r = json.loads(report.read_text())
    names = [e["name"] for e in r["unlowered_gated_layers"]]
    assert names == ["4", "7", "11"]
    assert all("differs from the seed rule" in e["reason"] for e in r["unlowered_gated_layers"])
    assert all(f"gated layer {n} (CGConv2dNoShuffle) is not lowered" in err for n in names)
    assert _gated_nodes(out) == {}
    assert _ort_vs_seed(net, out, (1, 3, 32, 32)) <= 1e-5


@pytest.mark.parametrize("how", ["object", "flag"])
def test_pytorch_fbs_blocks_are_named_as_unlowered_and_export_exactly(tmp_path, cli, how):
    """PyTorch-FBS ChannelPruning at rate 0.5 (from the user's object as main.py sets it, or
    from --fbs-rate): the FBSConv op cannot express its renormalisation, so each block is
    named in a warning and in the report, and the export is its own forward, exactly."""
    flags = ("--fbs-rate", "0.5") if how == "flag" else ()
    kwargs = {"rate": 0.5} if how == "object" else {}  # the user's model code sets the rate
    net, out, report, (code, _, err) = _export(cli, tmp_path, "vgg_fbs", kwargs, *flags, shape=(2, 3, 16, 16))
    assert code == 0, err
    for m in net.modules():  # the seed-semantics reference at the trained rate
        if hasattr(m, "rate"):
            m.rate = 0.5
    r = json.loads(report.read_text())
    names = [e["name"] for e in r["unlowered_gated_layers"]]
    assert names == ["3", "5", "6"]
    assert all(f"gated layer {n} (ChannelPruning) is not lowered" in err for n in names)
    assert all("rate 0.5" in e["reason"] for e in r["unlowered_gated_layers"])
    assert _ort_vs_seed(net, out, (2, 3, 16, 16)) <= 1e-5


def test_pytorch_fbs_without_its_rate_is_refused(tmp_path, cli):
    _, out, report, (code, _, err) = _export(cli, tmp_path, "vgg_fbs", {})
    assert code == 2 and "--fbs-rate" in err and len(err.strip().splitlines()) == 1
    assert not out.exists() and not report.exists()


def test_pytorch_fbs_at_rate_one_is_dense_and_not_warned(tmp_path, cli):
    net, out, report, (code, _, err) = _export(cli, tmp_path, "vgg_fbs", {}, "--fbs-rate", "1.0",
                                               shape=(1, 3, 16, 16))
    assert code == 0, err
    assert "warning" not in err
    r = json.loads(report.read_text())
    assert r["unlowered_gated_layers"] == []
    assert [e["suppressed_channels"] for e in r["mask_sources"]["seed_layers"]["dense"]] == [0, 0, 0]
    assert _ort_vs_seed(net, out, (1, 3, 16, 16)) <= 1e-5


def test_unrecognised_gate_like_layer_is_warned_and_reported(tmp_path, cli):
    net, out, report, (code, _, err) = _export(cli, tmp_path, "vgg_mygated", {})
    assert code == 0, err
    r = json.loads(report.read_text())
    names = [e["name"] for e in r["unlowered_gated_layers"]]
    assert names == ["4", "7", "11"]
    assert all("tensor 'threshold'" in e["reason"] for e in r["unlowered_gated_layers"])
    assert all(f"gated layer {n} (MyGatedConv) is not lowered" in err for n in names)
    assert _ort_vs_seed(net, out, (1, 3, 32, 32)) <= 1e-5


@pytest.mark.parametrize("builder,kind,kwargs,named", [
    ("dnn_gating:resnet20_cg", "cg", {}, "partitions, shuffle"),
    ("dnn_gating:resnet20_cg", "cg", {"partitions": 4}, "needs shuffle"),
    ("dnn_gating:resnet20_cg_postact", "cg", {"shuffle": False}, "needs partitions"),
    ("dnn_gating:resnet20_pg", "pg", {"wbits": 8}, "abits, pred_bits"),
    ("fbs:fbs_resnet18", "cg", {"num_classes": 10}, "needs density"),
])
def test_builtin_builder_without_numerics_deciding_kwargs_exits_2(tmp_path, cli, builder, kind, kwargs, named):
    ckpt = tmp_path / "seed.pth"
    torch.save(seed_resnet20_state_dict(kind), ckpt)
    out = tmp_path / "x.onnx"
    code, _, err = cli("export", ckpt, "--model", f"gate2deploy.models.{builder}", "--model-kwargs",
                       json.dumps(kwargs), "--target", "ort", "-o", out, "--input-shape", "1,3,32,32")
    assert code == 2 and named in err and "--model-kwargs" in err, err
    assert len(err.strip().splitlines()) == 1 and not out.exists()


@pytest.mark.parametrize("sparse", [False, True])
def test_gate_gradient_follows_the_seeds_sparse_bp(sparse):
    """Training: cg_utils.py / pg_utils.py GreaterThan passes the gate's gradient through
    unchanged; SparseGreaterThan (sparse_bp=True) zeroes it where the input is below the
    threshold (`grad_input[input < threshold] = 0`)."""
    from gate2deploy.gated import _gate_greater
    z = torch.tensor([-1.0, 0.25, 0.5, 2.0], requires_grad=True)
    hard = _gate_greater(z, 0.5, sparse)
    hard.backward(torch.ones(4))
    assert hard.tolist() == [0.0, 0.0, 0.0, 1.0]
    assert z.grad.tolist() == ([0.0, 0.0, 1.0, 1.0] if sparse else [1.0, 1.0, 1.0, 1.0])
