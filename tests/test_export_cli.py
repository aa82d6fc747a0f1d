"""`gate2deploy export` / `info` as a user runs them: Gator and network-slimming checkpoints,
verified equality with PyTorch (normwise relative error <= 1e-4), MACs that match the masks."""
import json
import math

import numpy as np
import onnx
import pytest
import torch
import torchvision
import yaml

from gate2deploy.capture import module_path
from gate2deploy.importers.gator import hyper_edges, make_gator_checkpoint

CIFAR = "tests/models/cifar_nets.py"


def _conv_of(bn: str) -> str:
    """The conv a ResNet BN follows: layer1.0.bn2 -> layer1.0.conv2, downsample.1 -> .0"""
    if bn.endswith("downsample.1"):
        return bn[:-1] + "0"
    head, _, tail = bn.rpartition(".")
    return f"{head}.conv{tail[2:]}" if head else f"conv{tail[2:]}"


def expected_resnet_macs(model, masks, hw):
    """MACs of the ResNet with every conv physically cut to its gates' kept counts,
    computed from the masks alone (independently of the compiler)."""
    edges = hyper_edges(model)
    kept_out, kept_in = {}, {}
    for edge, mask in zip(edges, masks):
        for bn in edge.out_modules:
            kept_out[_conv_of(bn)] = int(mask.sum())
        for m in edge.in_modules:
            kept_in[m] = int(mask.sum())
    # the output sizes per conv: trace once
    sizes = {}
    hooks = [m.register_forward_hook(lambda mod, i, o, n=n: sizes.__setitem__(n, o.shape))
             for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)]
    model(torch.zeros(1, 3, hw, hw))
    for h in hooks:
        h.remove()
    total, per_layer = 0, {}
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Conv2d):
            cin = kept_in.get(name, m.in_channels)
            cout = kept_out.get(name, m.out_channels)
            macs = cin * cout * m.kernel_size[0] * m.kernel_size[1] * sizes[name][2] * sizes[name][3]
            per_layer[name] = (cin, cout)
            total += macs
    total += kept_in["fc"] * model.fc.out_features
    per_layer["fc"] = (kept_in["fc"], model.fc.out_features)
    return total, per_layer


@pytest.mark.parametrize("ddp", [False, True])
def test_gator_resnet50_exports_exactly_with_macs_of_the_masks(tmp_path, cli, ddp):
    ckpt = tmp_path / "gator_r50.pth"
    masks = make_gator_checkpoint(ckpt, keep=0.5, seed=3 + ddp, arch="resnet50", ddp_prefix=ddp)
    assert len(masks) == 37
    out, report = tmp_path / "r50.onnx", tmp_path / "r50.json"
    code, stdout, err = cli("export", ckpt, "--model", "torchvision.models:resnet50", "--target", "onnx",
                            "-o", out, "--input-shape", "1,3,64,64", "--report", report,
                            "--physical-widths", "exact")
    assert code == 0, err
    r = json.loads(report.read_text())
    assert r["mask_sources"]["gator"]["edges"] == 37
    assert r["max_rel_err"] <= 1e-4 and r["tolerance"] == 1e-4
    expected, per_layer = expected_resnet_macs(torchvision.models.resnet50().eval(), masks, 64)
    assert r["macs_after"] == expected
    assert r["macs_after"] < 0.5 * r["macs_before"]
    rows = {module_path(row["layer"]): row for row in r["layers"]}
    for name, (cin, cout) in per_layer.items():
        assert (rows[name]["in_after"], rows[name]["out_after"]) == (cin, cout), name
    model = onnx.load(str(out))
    assert not any(n.op_type == "ChannelMask" for n in model.graph.node)
    assert "max rel err" in stdout


def _mayo_kept(model, names, density):
    values = np.concatenate([dict(model.named_modules())[n].weight.detach().numpy() for n in names])
    k = math.ceil(len(values) * density)
    threshold = np.sort(values)[-k - 1]
    return int((values > threshold).sum())


def test_netslim_vgg_mayo_rule(tmp_path, cli):
    from models.cifar_nets import randomize_batchnorm, vgg16_bn
    model = randomize_batchnorm(vgg16_bn(width=0.25), seed=1)
    ckpt = tmp_path / "vgg.pt"
    torch.save({"model_state_dict": model.state_dict(), "epoch": 3}, ckpt)
    out, report = tmp_path / "vgg.onnx", tmp_path / "vgg.json"
    code, _, err = cli("export", ckpt, "--model", f"{CIFAR}:vgg16_bn", "--model-kwargs", '{"width": 0.25}',
                       "--netslim-density", "0.5", "-o", out, "--input-shape", "2,3,32,32", "--report", report,
                       "--physical-widths", "exact")
    assert code == 0, err
    r = json.loads(report.read_text())
    ns = r["mask_sources"]["netslim"]
    assert ns["rule"] == "mayo" and ns["scope"] == "global"
    bns = [n for n, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert ns["participating_layers"] == len(bns)  # a plain chain: every BN is independent
    assert ns["kept_channels"] == _mayo_kept(model, bns, 0.5)
    conv_out_after = sum(row["out_after"] for row in r["layers"] if row["op"] == "Conv")
    assert conv_out_after == ns["kept_channels"]
    assert r["max_rel_err"] <= 1e-4
    assert r["macs_after"] < 0.5 * r["macs_before"]


def test_netslim_resnet_slims_only_uncoupled_layers(tmp_path, cli):
    from models.cifar_nets import randomize_batchnorm, resnet20
    model = randomize_batchnorm(resnet20(), seed=2)
    ckpt = tmp_path / "r20.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, ckpt)
    out, report = tmp_path / "r20.onnx", tmp_path / "r20.json"
    code, _, err = cli("export", ckpt, "--model", f"{CIFAR}:resnet20", "--netslim-density", "0.4",
                       "--netslim-rule", "abs", "--netslim-scope", "layer",
                       "-o", out, "--input-shape", "1,3,32,32", "--report", report)
    assert code == 0, err
    r = json.loads(report.read_text())
    ns = r["mask_sources"]["netslim"]
    assert ns["participating_layers"] == 9  # the first BN of each of the 9 blocks
    all_bns = {n for n, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}
    block_first = {n for n in all_bns if n.startswith("layers.") and n.endswith(".bn1")}
    # the stem BN, every block's last BN and the shortcut BNs feed residual adds
    assert set(ns["excluded"]) == all_bns - block_first
    # Liu et al.'s rule per layer: keep |gamma| > sorted(|gamma|)[int(n * 0.6)]
    expected = 0
    for name, m in model.named_modules():
        if name.endswith(".bn1") and name.startswith("layers"):
            g = np.sort(np.abs(m.weight.detach().numpy()))
            expected += int((np.abs(m.weight.detach().numpy()) > g[int(len(g) * 0.6)]).sum())
    assert ns["kept_channels"] == expected
    assert r["max_rel_err"] <= 1e-4


def test_info_yaml_and_json(tmp_path, cli):
    ckpt = tmp_path / "g.pth"
    make_gator_checkpoint(ckpt, keep=0.5, seed=5)
    for suffix in ("yaml", "json"):
        out = tmp_path / f"info.{suffix}"
        code, stdout, err = cli("info", ckpt, "--model", "torchvision.models:resnet18",
                                "--input-shape", "1,3,64,64", "--out", out)
        assert code == 0, err
        data = yaml.safe_load(out.read_text()) if suffix == "yaml" else json.loads(out.read_text())
        assert data["effective"]["macs"] < 0.6 * data["dense"]["macs"]
        layer = next(row for row in data["layers"] if row["layer"] == "/layer1/layer1.0/conv1/Conv")
        assert layer["in_after"] < layer["in_before"] == 64
        assert layer["params_after"] < layer["params_before"]
        assert "effective" in stdout


def test_fast_physical_widths_round_up_to_blocks_and_stay_exact(tmp_path, cli):
    """The default rounds each folded layer up to a kernel-friendly width (never below the
    kept channels, never above the dense width) and still verifies."""
    from gate2deploy.passes.choose_widths import BLOCK
    ckpt = tmp_path / "g.pth"
    masks = make_gator_checkpoint(ckpt, keep=0.5, seed=7, arch="resnet18")
    exact_json, fast_json = tmp_path / "exact.json", tmp_path / "fast.json"
    for mode, report in (("exact", exact_json), ("fast", fast_json)):
        code, _, err = cli("export", ckpt, "--model", "torchvision.models:resnet18", "-o", tmp_path / f"{mode}.onnx",
                           "--input-shape", "1,3,64,64", "--report", report, "--physical-widths", mode)
        assert code == 0, err
    exact, fast = json.loads(exact_json.read_text()), json.loads(fast_json.read_text())
    assert exact["macs_after"] <= fast["macs_after"] < fast["macs_before"]
    assert fast["max_rel_err"] <= 1e-4
    rows = {r["layer"]: r for r in exact["layers"]}
    for row in fast["layers"]:
        if row["op"] != "Conv":
            continue
        kept, wide, dense = rows[row["layer"]]["out_after"], row["out_after"], row["out_before"]
        assert kept <= wide <= dense
        assert wide == dense or wide % (BLOCK if dense >= BLOCK else 4) == 0, row
    assert any(r["out_after"] > rows[r["layer"]]["out_after"] for r in fast["layers"]), "nothing was padded"
    assert len(masks) == 12
