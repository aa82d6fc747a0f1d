"""Slimmable networks (Joslim, seed 003): a checkpoint in Joslim's layout exported at one width,
compared with the network as the seed computes it at that width.

The reference below is this test's own re-implementation of the seed, not gate2deploy's code:
- the forward of a width (`resnet20_forward`, `mbv2_forward`) follows model/dyn_model.py
  (SlimConv2d.forward: `W[:out, :in]`, groups = active width for depthwise, bias None;
  SlimBN.forward: weight/bias/statistics `[:k]`), model/slim_resnet.py (SlimResNet: 1x1
  stem without BN, SlimBasicBlock, SlimDownsample = AvgPool2d(1, 2) + zero channels, the
  classifier a 1x1 SlimConv2d) and model/slim_mbv2.py (SlimConvBN without activation,
  SlimDWSConv, SlimInvertedResidual, Dropout + Linear);
- the decode (`decode_resnet20`, `decode_mbv2`) follows SlimResNet.decode_wm / decode_ch and
  SlimMobileNetV2.decode_wm / decode_ch;
- the FLOPs count follows DynModel.get_flops_from_wm (every SlimConv2d,
  k*k*in*out*H_out*W_out/groups, batch 1);
- the BN recalibration follows eval_checkpoints.py Joslim.eval (reset_running_stats,
  momentum None: cumulative average of the batch mean and unbiased variance over train-mode
  passes, which normalise with the batch's own statistics).
Checkpoints are written as joslim.py Joslim.train saves them (model_state_dict with DDP's
`module.` prefix, optim_state_dict, epoch, population_data, X, Y, ratio_visited).
"""
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F

from gate2deploy.models import slimmable as built_in

R20 = "gate2deploy.models.slimmable:resnet20"
MBV2 = "gate2deploy.models.slimmable:mobilenetv2"
MBV2_SETTING = [(6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]


# --- the seed's decode -------------------------------------------------------------------

def _expand_stages(stages, prev=0):
    """decode_ch: residual width (first entry) raised to the previous stage's, then
    [inner, residual] per block."""
    out = []
    for stage in stages:
        res = max(stage[0], prev)
        out.append([c for inner in stage[1:] for c in (inner, res)])
        prev = res
    return out


def decode_resnet20(wm):
    space = [[16] * 4, [32] * 4, [64] * 4]
    flat = [int(w * c) for w, c in zip(wm, sum(space, []))]
    stem = int(wm[0] * 16)
    return [stem] + _expand_stages([flat[0:4], flat[4:8], flat[8:12]])


def decode_mbv2(wm):
    """SlimMobileNetV2.decode_wm reads wm[0] for the stem without advancing its index, so the
    separable block's width also reads wm[0] and the stages start at wm[1]."""
    space = [[16]]
    cin = 16
    for t, c, n, s in MBV2_SETTING:
        space.append([c, cin * t] + [c * t] * (n - 1))
        cin = c
    counts = [int(w * c) for w, c in zip(wm, sum(space, []))]
    stages, i = [], 1
    for entry in space[1:]:
        stages.append(counts[i:i + len(entry)])
        i += len(entry)
    return [int(wm[0] * 32), [counts[0]]] + _expand_stages(stages)


# --- the seed's forward at one width -----------------------------------------------------

class Seed:
    """Functional forward over a state dict; `mode` "eval" uses the running statistics,
    "train" normalises with batch statistics and records them (for recalibration)."""

    def __init__(self, sd, stats=None):
        self.sd, self.stats, self.mode = sd, stats, "eval"
        self.recorded, self.flops = {}, 0

    def conv(self, x, key, out, stride=1, pad=0, groups=1):
        w = self.sd[key][:out, :x.shape[1] // groups]
        y = F.conv2d(x, w, None, stride, pad, 1, groups)
        k = w.shape[2] * w.shape[3]
        self.flops += k * x.shape[1] * out * y.shape[2] * y.shape[3] / groups
        return y

    def bn(self, x, prefix):
        k = x.shape[1]
        w, b = self.sd[prefix + ".weight"][:k], self.sd[prefix + ".bias"][:k]
        if self.mode == "train":
            mean = x.mean(dim=(0, 2, 3))
            n = x.numel() / k
            var_b = ((x - mean.view(1, -1, 1, 1)) ** 2).mean(dim=(0, 2, 3))
            self.recorded.setdefault(prefix, []).append((mean, var_b * n / (n - 1)))
        else:
            mean, var_b = self.stats[prefix]["running_mean"][:k], self.stats[prefix]["running_var"][:k]
        return (x - mean.view(1, -1, 1, 1)) / torch.sqrt(var_b.view(1, -1, 1, 1) + 1e-5) * w.view(1, -1, 1, 1) \
            + b.view(1, -1, 1, 1)


def checkpoint_stats(sd):
    return {k[:-len(".running_mean")]: {"running_mean": v, "running_var": sd[k[:-len("mean")] + "var"]}
            for k, v in sd.items() if k.endswith(".running_mean")}


def resnet20_forward(seed: Seed, x, real):
    x = seed.conv(x, "features.0.weight", real[0])
    for s in range(1, 4):
        for b, prefix in enumerate(["head", "tail.0", "tail.1"]):
            p = f"features.{s}.{prefix}.conv"
            inner, res = real[s][2 * b], real[s][2 * b + 1]
            stride = 2 if (s > 1 and b == 0) else 1
            y = torch.relu(seed.bn(seed.conv(x, p + ".0.weight", inner, stride, 1), p + ".1"))
            y = seed.bn(seed.conv(y, p + ".3.weight", res, 1, 1), p + ".4")
            shortcut = x
            if stride == 2:
                sub = x[:, :, ::2, ::2]
                shortcut = torch.cat([sub, sub.new_zeros(sub.shape[0], res - sub.shape[1], *sub.shape[2:])], 1)
            x = torch.relu(y + shortcut)
    x = x.mean(dim=(2, 3), keepdim=True)
    return seed.conv(x, "classifier.0.weight", seed.sd["classifier.0.weight"].shape[0]).flatten(1)


def mbv2_forward(seed: Seed, x, real):
    relu6 = lambda t: t.clamp(0, 6)  # noqa: E731
    x = seed.bn(seed.conv(x, "features.0.conv.weight", real[0], 2, 1), "features.0.norm")
    c = real[0]
    y = relu6(seed.bn(seed.conv(x, "features.1.conv.0.weight", c, 1, 1, groups=c), "features.1.conv.1"))
    x = seed.bn(seed.conv(y, "features.1.conv.3.weight", real[1][0]), "features.1.conv.4")
    for si, (t, ch, n, s) in enumerate(MBV2_SETTING):
        for b in range(n):
            p = f"features.{si + 2}.{'head' if b == 0 else f'tail.{b - 1}'}.conv"
            mid, out = real[si + 2][2 * b], real[si + 2][2 * b + 1]
            y = relu6(seed.bn(seed.conv(x, p + ".0.weight", mid), p + ".1"))
            y = relu6(seed.bn(seed.conv(y, p + ".3.weight", mid, s if b == 0 else 1, 1, groups=mid), p + ".4"))
            y = seed.bn(seed.conv(y, p + ".7.weight", out), p + ".8")
            x = x + y if b > 0 else y
    x = seed.bn(seed.conv(x, "features.8.conv.weight", 1280), "features.8.norm")
    x = x.mean(dim=(2, 3))
    return x @ seed.sd["classifier.1.weight"].T + seed.sd["classifier.1.bias"]


def seed_output(forward, sd, real, x, recal_batches=None):
    """The seed's output at width `real`: with recalibrated statistics when batches are given,
    else the checkpoint's (sliced). In float64, so that the reference's own rounding does not
    count against the export (BN over few values amplifies it)."""
    sd = {k: v.double() if v.dtype.is_floating_point else v for k, v in sd.items()}
    x = x.double()
    recal_batches = None if recal_batches is None else [b.double() for b in recal_batches]
    stats = checkpoint_stats(sd)
    if recal_batches is not None:
        seed = Seed(sd)
        seed.mode = "train"
        with torch.no_grad():
            for batch in recal_batches:
                forward(seed, batch, real)
        stats = {p: {"running_mean": torch.stack([m for m, _ in rec]).mean(0),
                     "running_var": torch.stack([v for _, v in rec]).mean(0)}
                 for p, rec in seed.recorded.items()}
    with torch.no_grad():
        return forward(Seed(sd, stats), x, real)


def seed_flops(forward, sd, real, shape):
    seed = Seed(sd, checkpoint_stats(sd))
    with torch.no_grad():
        forward(seed, torch.zeros(1, *shape[1:]), real)
    return seed.flops


# --- checkpoints in Joslim's layout ------------------------------------------------------

def random_state_dict(builder, **kwargs):
    g = torch.Generator().manual_seed(7)
    sd = {}
    for k, v in builder(**kwargs).state_dict().items():
        if not v.dtype.is_floating_point:
            sd[k] = v
        elif k.endswith("running_var"):
            sd[k] = torch.rand(v.shape, generator=g) + 0.5
        elif k.endswith("running_mean"):
            sd[k] = torch.randn(v.shape, generator=g) * 0.2
        elif k.endswith(".bias"):
            # positive BN shifts keep most channels alive after ReLU6: a random MobileNetV2
            # otherwise has near-constant channels whose BN (variance ~1e-8) turns float32
            # rounding into 1e-4 output differences, in PyTorch as in the export
            sd[k] = torch.rand(v.shape, generator=g) + 0.5
        elif v.dim() == 1:  # BN weight
            sd[k] = torch.rand(v.shape, generator=g) + 0.5
        else:
            fan_in = int(np.prod(v.shape[1:]))
            sd[k] = torch.randn(v.shape, generator=g) * (2.0 / fan_in) ** 0.5
    return sd


def write_checkpoint(path, sd, vectors, decode, forward, shape, numpy_arrays=False):
    full = seed_flops(forward, sd, decode([1.0] * len(vectors[0])), shape)
    population = []
    for i, wm in enumerate(vectors):
        flops = seed_flops(forward, sd, decode(wm), shape)
        population.append({"loss": 2.0 - 0.1 * i, "flops": flops, "ratio": flops / full, "filters": decode(wm)})
    X = np.array(vectors) if numpy_arrays else [[float(v) for v in wm] for wm in vectors]
    torch.save({"model_state_dict": {"module." + k: v for k, v in sd.items()}, "optim_state_dict": {"state": {}},
                "epoch": 3, "population_data": population, "X": X,
                "Y": [[p["loss"], p["ratio"]] for p in population], "ratio_visited": [p["ratio"] for p in population]},
               path)
    return population


R20_VECTORS = [[0.5] * 12,
               # stage 2 and 3 residual widths below stage 1's: decode_ch raises them to 12
               [0.75, 0.5, 1.0, 0.25, 0.25, 0.5, 0.75, 1.0, 0.1, 0.3, 0.6, 0.9]]


@pytest.fixture(scope="module")
def r20(tmp_path_factory):
    folder = tmp_path_factory.mktemp("r20")
    sd = random_state_dict(built_in.resnet20)
    shape = (1, 3, 32, 32)
    population = write_checkpoint(folder / "ckpt.pt", sd, R20_VECTORS, decode_resnet20, resnet20_forward, shape)
    samples = torch.randn(24, 3, 32, 32, generator=torch.Generator().manual_seed(11))
    np.save(folder / "calib.npy", samples.numpy())
    return {"folder": folder, "ckpt": folder / "ckpt.pt", "sd": sd, "shape": shape, "population": population,
            "samples": samples, "calib": folder / "calib.npy"}


def export(cli, case, out, *flags, model=R20):
    code, stdout, err = cli("export", case["ckpt"], "--model", model, "--input-shape",
                            ",".join(map(str, case["shape"])), "-o", out, "--report", str(out) + ".json", *flags)
    assert code == 0, err
    return json.loads(Path(str(out) + ".json").read_text()), stdout, err


def onnx_output(path, x):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]


def conv_out_widths(path):
    model = onnx.load(str(path))
    inits = {i.name: i for i in model.graph.initializer}
    return [inits[n.input[1]].dims[0] for n in model.graph.node if n.op_type == "Conv"]


def assert_close(got, expected, rtol=1e-5):
    assert np.all(np.isfinite(got))
    err = np.abs(got - expected.numpy()).max() / np.abs(expected.numpy()).max()
    assert err <= rtol, err


def _r20_widths(real):
    return [real[0]] + sum((stage for stage in real[1:]), []) + [10]


def test_resnet20_width_half_recalibrated(cli, r20, tmp_path):
    out = tmp_path / "m.onnx"
    report, stdout, err = export(cli, r20, out, "--width", "0.5", "--sample-inputs", r20["calib"],
                                 "--recalibration-batch-size", "8")
    real = decode_resnet20([0.5] * 12)
    assert real == [8, [8] * 6, [16] * 6, [32] * 6]  # the statement of the seed's decode
    assert conv_out_widths(out) == _r20_widths(real)
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    batches = list(r20["samples"].split(8))
    expected = seed_output(resnet20_forward, r20["sd"], real, x, batches)
    assert_close(onnx_output(out, x), expected)
    # the checkpoint's sliced statistics give another output: recalibration is not a no-op
    stale = seed_output(resnet20_forward, r20["sd"], real, x)
    assert float((stale - expected).abs().max()) > 1e-3 * float(expected.abs().max())
    flops = seed_flops(resnet20_forward, r20["sd"], real, r20["shape"])
    assert report["macs_after"] == flops == r20["population"][0]["flops"]
    sl = report["mask_sources"]["slimmable"]
    assert sl["conv_macs"] == flops and sl["recalibration"] == {"batches": 3, "batch_size": 8,
                                                                "sample_inputs": str(r20["calib"])}
    assert "warning" not in err


def test_resnet20_width_vector(cli, r20, tmp_path):
    wm_path = tmp_path / "wm.json"
    wm_path.write_text(json.dumps(R20_VECTORS[1]))
    out = tmp_path / "m.onnx"
    report, _, _ = export(cli, r20, out, "--width-vector", wm_path, "--sample-inputs", r20["calib"],
                          "--recalibration-batch-size", "12", "--recalibration-batches", "1")
    real = decode_resnet20(R20_VECTORS[1])
    assert real[2][1] == real[3][1] == 12  # the raised residual widths
    assert conv_out_widths(out) == _r20_widths(real)
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    expected = seed_output(resnet20_forward, r20["sd"], real, x, [r20["samples"][:12]])
    assert_close(onnx_output(out, x), expected)
    assert report["macs_after"] == r20["population"][1]["flops"]


def test_resnet20_population_entry_without_samples_warns(cli, r20, tmp_path):
    out = tmp_path / "m.onnx"
    report, _, err = export(cli, r20, out, "--population", "1")
    entry = r20["population"][1]
    assert conv_out_widths(out) == _r20_widths(entry["filters"])
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(8))
    assert_close(onnx_output(out, x), seed_output(resnet20_forward, r20["sd"], entry["filters"], x))
    sl = report["mask_sources"]["slimmable"]
    assert report["macs_after"] == sl["conv_macs"] == sl["selection"]["checkpoint_flops"] == entry["flops"]
    assert sl["selection"]["loss"] == pytest.approx(entry["loss"])
    assert err.count("\n") == 1 and "warning" in err and "sample-inputs" in err
    assert sl["bn_statistics"].startswith("checkpoint") and sl["warnings"]


def test_info_lists_population(cli, r20):
    code, out, err = cli("info", r20["ckpt"], "--model", R20, "--input-shape", "1,3,32,32", "--width", "1")
    assert code == 0, err
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("population: 2 configurations"))
    row = lines[start + 3].split()
    assert row[0] == "1" and float(row[1]) == pytest.approx(r20["population"][1]["loss"])
    assert float(row[2]) == pytest.approx(r20["population"][1]["flops"] / 1e6, abs=1e-3)
    assert float(row[3]) == pytest.approx(r20["population"][1]["ratio"], abs=1e-3)


MBV2_VECTORS = [[0.5] * 24, [float(v) for v in np.linspace(0.35, 1.0, 24)]]


@pytest.fixture(scope="module")
def mbv2(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mbv2")
    sd = random_state_dict(built_in.mobilenetv2, num_classes=10)
    population = write_checkpoint(folder / "mb.pt", sd, MBV2_VECTORS, decode_mbv2, mbv2_forward, (1, 3, 32, 32))
    samples = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(12))
    np.save(folder / "calib.npy", samples.numpy())
    # batch 4: 4 verification runs over the 16 samples, not 16
    return {"ckpt": folder / "mb.pt", "shape": (4, 3, 32, 32), "sd": sd, "population": population,
            "samples": samples, "calib": folder / "calib.npy"}


@pytest.mark.parametrize("flags", [("--width", "0.5"), ("--width-vector", "VECTOR"), ("--population", "1")])
def test_mobilenetv2(cli, mbv2, tmp_path, flags):
    sd, population = mbv2["sd"], mbv2["population"]
    real, entry = {"--width": (decode_mbv2([0.5] * 24), population[0]),
                   "--width-vector": (decode_mbv2(MBV2_VECTORS[1]), population[1]),
                   "--population": (population[1]["filters"], population[1])}[flags[0]]
    if flags[1] == "VECTOR":
        (tmp_path / "wm.json").write_text(json.dumps(MBV2_VECTORS[1]))
        flags = (flags[0], tmp_path / "wm.json")
    out = tmp_path / "m.onnx"
    report, _, _ = export(cli, mbv2, out, *flags, "--sample-inputs", mbv2["calib"],
                          "--model-kwargs", '{"num_classes": 10}', model=MBV2)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(9))
    expected = seed_output(mbv2_forward, sd, real, x, [mbv2["samples"]])
    assert_close(onnx_output(out, x), expected)
    sl = report["mask_sources"]["slimmable"]
    # the seed's FLOPs count only convolutions, per sample; the report's MACs are per batch
    # of 4 and add the Linear classifier
    assert sl["conv_macs"] == entry["flops"] == seed_flops(mbv2_forward, sd, real, (1, 3, 32, 32))
    assert report["macs_after"] == 4 * (entry["flops"] + 1280 * 10)
    widths = conv_out_widths(out)
    assert widths[0] == real[0] and widths[-1] == 1280 and real[2][0] in widths


def test_numpy_checkpoint_loads(cli, tmp_path):
    """Joslim's own X is a numpy array (the other tests store it as lists for now)."""
    sd = random_state_dict(built_in.resnet20)
    write_checkpoint(tmp_path / "np.pt", sd, R20_VECTORS, decode_resnet20, resnet20_forward, (1, 3, 32, 32),
                     numpy_arrays=True)
    code, _, err = cli("export", tmp_path / "np.pt", "--model", R20, "--input-shape", "1,3,32,32",
                       "--population", "0", "-o", tmp_path / "m.onnx")
    assert code == 0, err
    assert (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize("flags, message", [
    (("--width", "0"), "outside (0, 1]"),
    (("--width", "1.5"), "outside (0, 1]"),
    (("--width", "nan"), "outside (0, 1]"),
    (("--width", "half"), "not a number"),
    (("--width", "0.05"), "decodes to 0 channels"),
    (("--width-vector", "SHORT"), "has 3 entries; the model has 12"),
    (("--width-vector", "ZERO"), "outside (0, 1]"),
    (("--population", "2"), "out of range"),
    (("--population", "-1"), "out of range"),
    (("--width", "0.5", "--population", "0"), "give one"),
    (("--sample-inputs", "BADSHAPE", "--width", "0.5"), "expected (M, 3, 32, 32)"),
    (("--sample-inputs", "CALIB", "--recalibration-batches", "9"), "make only"),
    (("--recalibration-batches", "2"), "need --sample-inputs"),
])
def test_bad_input(cli, r20, tmp_path, flags, message):
    files = {"SHORT": [0.5] * 3, "ZERO": [0.5] * 11 + [0.0]}
    args = []
    for f in flags:
        if f in files:
            (tmp_path / f"{f}.json").write_text(json.dumps(files[f]))
            f = tmp_path / f"{f}.json"
        elif f == "BADSHAPE":
            np.save(tmp_path / "bad.npy", np.zeros((4, 3, 16, 16), np.float32))
            f = tmp_path / "bad.npy"
        elif f == "CALIB":
            f = r20["calib"]
        args.append(f)
    out = tmp_path / "m.onnx"
    code, stdout, err = cli("export", r20["ckpt"], "--model", R20, "--input-shape", "1,3,32,32", "-o", out, *args)
    assert code == 2
    assert err.count("\n") == 1 and message in err, err
    assert not out.exists()


def test_population_all_sweep(cli, r20, tmp_path):
    code, out, err = cli("export", r20["ckpt"], "--model", R20, "--input-shape", "1,3,32,32",
                         "--population", "all", "-o", tmp_path / "r20.onnx")
    assert code == 0, err
    sweep = json.loads((tmp_path / "r20_sweep.json").read_text())
    assert [p["point"] for p in sweep["points"]] == ["pop0", "pop1"]
    for point, entry in zip(sweep["points"], r20["population"]):
        assert point["macs"] == point["checkpoint_flops"] == entry["flops"]
        assert point["latency_ms_median"] > 0
        assert conv_out_widths(point["file"]) == _r20_widths(entry["filters"])
    assert (tmp_path / "r20_sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "pop1" in out


@pytest.mark.parametrize("flags, message", [
    (("--width-sweep", "0.5,2"), "outside (0, 1]"),
    (("--width-sweep", "0.5,0.05"), "decodes to 0 channels"),
    (("--width-sweep", "0.5", "--width", "0.5"), "drop --width"),
])
def test_bad_sweep_writes_nothing(cli, r20, tmp_path, flags, message):
    code, _, err = cli("export", r20["ckpt"], "--model", R20, "--input-shape", "1,3,32,32", *flags,
                       "-o", tmp_path / "r20.onnx")
    assert code == 2 and err.count("\n") == 1 and message in err, err
    assert list(tmp_path.iterdir()) == []


def test_width_sweep_finds_the_model_on_model_path(cli, r20, tmp_path):
    """--model-path holds for a sweep as for one export (the sweep checks every width on the
    architecture before compiling: that build had left --model-path out)."""
    lib = tmp_path / "lib" / "slimnets"
    lib.mkdir(parents=True)
    (lib / "__init__.py").write_text("")
    (lib / "cifar.py").write_text("from gate2deploy.models.slimmable import resnet20  # noqa: F401\n")
    out = tmp_path / "out" / "r20.onnx"
    out.parent.mkdir()
    code, _, err = cli("export", r20["ckpt"], "--model", "slimnets.cifar:resnet20", "--model-path", tmp_path / "lib",
                       "--input-shape", "1,3,32,32", "--width-sweep", "0.5,1.0", "-o", out)
    assert code == 0, err
    sweep = json.loads((tmp_path / "out" / "r20_sweep.json").read_text())
    assert len(sweep["points"]) == 2


def test_python_api_width_on_a_model_object():
    """gate2deploy.compile with a slimmable module in hand: the same options by name."""
    import gate2deploy

    net = built_in.resnet20()
    net.load_state_dict(random_state_dict(built_in.resnet20))
    compiled = gate2deploy.compile(net.eval(), torch.randn(1, 3, 32, 32), target="onnx", width=0.25)
    sl = compiled.report["mask_sources"]["slimmable"]
    assert sl["channels"] == decode_resnet20([0.25] * 12) == [4, [4] * 6, [8] * 6, [16] * 6]
    x = torch.randn(1, 3, 32, 32)
    assert_close(compiled.run(x)[0], seed_output(resnet20_forward, net.state_dict(), sl["channels"], x))


def test_width_on_a_model_that_is_not_slimmable(cli, tmp_path):
    from models.cifar_nets import resnet20

    torch.save(resnet20().state_dict(), tmp_path / "plain.pt")
    code, _, err = cli("export", tmp_path / "plain.pt", "--model", Path(__file__).parent / "models" / "cifar_nets.py:resnet20",
                       "--input-shape", "1,3,32,32", "--width", "0.5", "-o", tmp_path / "m.onnx")
    assert code == 2 and err.count("\n") == 1 and "need a slimmable model" in err, err
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize("filters, message", [
    ([8, [8] * 5, [16] * 6, [32] * 6], "group 1 should list 6 counts"),
    ([8, [8] * 6, [16] * 6, [32] * 5 + [99]], "not a channel count in 1..64"),
    ([8, [16] * 6, [8] * 6, [32] * 6], "decrease from a stage to the next"),
])
def test_population_filters_that_do_not_fit(cli, r20, tmp_path, filters, message):
    torch.save({"model_state_dict": r20["sd"], "population_data": [{"loss": 1.0, "flops": 1.0, "ratio": 0.1,
                                                                     "filters": filters}]}, tmp_path / "c.pt")
    code, _, err = cli("export", tmp_path / "c.pt", "--model", R20, "--input-shape", "1,3,32,32",
                       "--population", "0", "-o", tmp_path / "m.onnx")
    assert code == 2 and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "m.onnx").exists()


def test_the_smallest_width_hint_keeps_a_channel():
    """The 0-channel refusal names the smallest width that keeps one: decoded by the seed's
    rule (decode_wm: int(w * c)) it must give a channel, and it is 1 / c to 4 digits."""
    from gate2deploy.importers.slimmable import _smallest_width_text

    for channels in range(1, 2049):
        shown = float(_smallest_width_text(channels))
        assert int(shown * channels) >= 1, channels
        assert shown == pytest.approx(1 / channels, rel=2e-3)
