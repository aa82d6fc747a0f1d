"""`gate2deploy export` / `info` on dynamic-gate checkpoints (PG, CG) as a user runs them."""
import json

import numpy as np
import onnx
import pytest
import torch
import yaml
from test_dnn_gating_import import seed_resnet20_state_dict

PG = "gate2deploy.models.dnn_gating:resnet20_pg"
CG = "gate2deploy.models.dnn_gating:resnet20_cg"
# the hyper-parameters seed_resnet20_state_dict's checkpoints were "trained" with (not stored in them)
PG_KWARGS = '{"wbits": 8, "abits": 3, "pred_bits": 2}'
CG_KWARGS = '{"partitions": 4, "shuffle": false}'


@pytest.fixture
def samples(tmp_path):
    path = tmp_path / "samples.npy"
    np.save(path, np.random.default_rng(0).standard_normal((8, 3, 32, 32)).astype(np.float32))
    return path


@pytest.mark.parametrize("target,custom_nodes", [("ort", 9), ("onnx", 0)])
def test_pg_checkpoint_with_calibrated_static_scale(tmp_path, cli, samples, target, custom_nodes):
    ckpt = tmp_path / "pg.pth"
    torch.save(seed_resnet20_state_dict("pg"), ckpt)
    out, report = tmp_path / "pg.onnx", tmp_path / "pg.json"
    code, stdout, err = cli("export", ckpt, "--model", PG, "--model-kwargs", PG_KWARGS, "--target", target,
                            "-o", out,
                            "--input-shape", "2,3,32,32", "--sample-inputs", samples, "--pg-static-scale",
                            "--report", report)
    assert code == 0, err
    r = json.loads(report.read_text())
    assert len(r["gated_layers"]) == 9
    assert all(mode.startswith("static ") for mode in r["pg_scales"].values())
    assert r["gated_layer_check"]["passed"] and r["gated_layer_check"]["flipped_gates"] == 0
    stats = r["gate_statistics"]["summary"]
    assert stats["gated_layers"] == 9 and stats["expected_macs"] > stats["dense_macs"] * 1.0  # MSB pass + some LSB
    assert stats["bit_weighted_over_dense"] < 1.0
    nodes = [n for n in onnx.load(str(out)).graph.node if n.op_type == "PGConv"]
    assert len(nodes) == custom_nodes
    # --target ort fuses each quantized conv's input quantizer (calibrated: a static scale)
    # into one node, and each PG layer's BatchNorm, ReLU, PACT clamp and that quantizer (which
    # follows it) into the PG node (and still verifies above).
    assert len(r["fused_epilogues"]) == custom_nodes
    quantizers = [n for n in onnx.load(str(out)).graph.node if n.op_type == "QuantizeActivation"
                  or any(a.name == "quantize_levels" for a in n.attribute)]
    assert len(r.get("fused_quantizers", [])) == len(quantizers) == custom_nodes
    assert all(any(a.name in ("scale", "quantize_scale") and a.f > 0 for a in n.attribute) for n in quantizers)
    assert all(n.attribute and len(n.input) == 5 for n in nodes)
    assert "gated layers: 9" in stdout


def test_pg_static_scale_without_samples_is_refused_early(tmp_path, cli):
    ckpt = tmp_path / "pg.pth"
    torch.save(seed_resnet20_state_dict("pg"), ckpt)
    code, _, err = cli("export", ckpt, "--model", PG, "--model-kwargs", PG_KWARGS, "-o", tmp_path / "x.onnx",
                       "--input-shape", "1,3,32,32",
                       "--pg-static-scale")
    assert code == 2 and "--sample-inputs" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x.onnx").exists()


def test_cg_info_reports_gate_on_fractions(tmp_path, cli, samples):
    ckpt = tmp_path / "cg.pth"
    torch.save(seed_resnet20_state_dict("cg"), ckpt)
    out = tmp_path / "info.yaml"
    code, stdout, err = cli("info", ckpt, "--model", CG, "--model-kwargs", CG_KWARGS, "--input-shape", "2,3,32,32",
                            "--sample-inputs", samples, "--out", out)
    assert code == 0, err
    info = yaml.safe_load(out.read_text())
    layers = info["gate_statistics"]["layers"]
    assert len(layers) == 9
    for layer in layers:
        assert 0 < layer["gate_on_fraction"] < 1
        assert layer["expected_macs"] < layer["dense_macs"]
    assert "gate-on" in stdout
