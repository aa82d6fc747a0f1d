"""Mayo (seed 000) TensorFlow checkpoints: exported models against an independent forward.

The checkpoints are written with tf.compat.v1's Saver in Mayo's layout (mayo_helpers.py cites
Mayo's code for every name); the expected outputs come from mayo_helpers' TensorFlow NHWC
forward on the raw arrays, never from gate2deploy's model.
"""
from __future__ import annotations

import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import triton  # noqa: E402,F401 - before TensorFlow, or loading it later crashes (importers/mayo.py _tensorflow)

pytest.importorskip("tensorflow")
import tensorflow as tf  # noqa: E402

from mayo_helpers import (Arrays, add_conv, add_gated, ref_conv, ref_gated, write_checkpoint,  # noqa: E402
                          write_mayo_root)

# narrow widths through Mayo's own `key=value` overrides (the YAML's num_outputs / depth)
CIFAR_WIDTHS = [8, 8, 16, 16, 16, 24, 24, 24]
CIFAR_SET = [f"model.layers.conv{i}.num_outputs={w}" for i, w in enumerate(CIFAR_WIDTHS)]
R18_DEPTHS = {"b11": 8, "b12": 8, "b21": 16, "b22": 16, "b31": 16, "b32": 16, "b41": 32, "b42": 32}
R18_DOWNSAMPLE = ("b21", "b31", "b41")  # shortcut: downsample, stride 2 (models/resnet18.yaml)
R18_SET = ["model.layers.conv1.num_outputs=8"] + [f"model.layers.{b}.depth={d}" for b, d in R18_DEPTHS.items()]


def _run_onnx(path, x_nchw):
    from gate2deploy.targets import get_target

    sess = get_target("ort").session(onnx.load(str(path)), 1)
    return sess.run(None, {sess.get_inputs()[0].name: x_nchw})[0]


def _rel(got, expected):
    return float(np.abs(np.asarray(got, np.float64) - expected).max() / np.abs(expected).max())


def _compare(got, expected, fp32_reference=None):
    """got within 1e-5 of expected's range; with `fp32_reference` (the same reference run in
    TensorFlow's float32, `expected` in float64), within max(1e-5, 4x TensorFlow's own fp32
    error): deep gated nets in fp32 drift by ~1e-5 of their range whoever computes them."""
    assert np.isfinite(got).all() and np.isfinite(expected).all()
    bound = 1e-5 if fp32_reference is None else max(1e-5, 4 * _rel(fp32_reference, expected))
    assert _rel(got, expected) <= bound, (_rel(got, expected), bound)


def _inputs(batch, seed=0):
    return np.random.default_rng(seed).normal(0, 1, (batch, 3, 32, 32)).astype(np.float32)


# ---- netslim CIFAR net ---------------------------------------------------------------

def cifarnet_arrays(seed, slimmed=range(8), gated=(), keep_fraction=0.6, factor=0):
    a = Arrays(seed)
    cin = 3
    for i, w in enumerate(CIFAR_WIDTHS):
        scope = f"cifarnet/conv{i}"
        if i in gated:
            add_gated(a, scope, 3, cin, w, hidden=math.ceil(w / factor) if factor > 0 else 0)
        else:
            keep = a.rng.random(w) < keep_fraction
            keep[0] = True
            add_conv(a, scope, 3, cin, w, slim=i in slimmed, slim_keep=keep)
        cin = w
    add_conv(a, "cifarnet/logits", 1, cin, 10, bn=None)
    return a


def cifarnet_reference(a, x_nchw, gated=(), density=0.5, pool="avg", threshold=False, dtype=np.float64):
    """models/cifarnet.yaml: conv0 valid, others SAME (conv2/conv5 stride 2), dropout off,
    avg pool 8 (VALID), logits 1x1 conv with biases, squeeze [1, 2].

    In float64 by default (the checkpoint's float32 values, exactly widened), so that the
    comparison measures the export's fp32 error, not that plus TensorFlow's: on an AVX-512
    machine (AMD EPYC Zen 4) the two fp32 implementations' rounding added up to 1.06e-5 of the
    range of the 8-layer gated CifarNet with l2 pooling, for each of the native ops' ISA tables."""
    a = {k: (v.astype(dtype) if isinstance(v, np.ndarray) and v.dtype == np.float32 else v)
         for k, v in a.items()}
    x = tf.transpose(np.asarray(x_nchw, dtype), [0, 2, 3, 1])
    for i in range(8):
        scope, stride = f"cifarnet/conv{i}", 2 if i in (2, 5) else 1
        padding = "VALID" if i == 0 else "SAME"
        if i in gated:
            thr = float(a[f"{scope}/gate/threshold"]) if threshold else None
            x = ref_gated(a, scope, x, stride, padding, 0.001, density, pool=pool, threshold=thr)
        else:
            x = ref_conv(a, scope, x, stride, padding, 0.001, slim=f"{scope}/activations/NetworkSlimmer.mask" in a)
    x = tf.nn.avg_pool2d(x, 8, 2, "VALID")
    x = ref_conv(a, "cifarnet/logits", x, 1, "SAME", 0.001, act=False)
    return tf.squeeze(x, [1, 2]).numpy()


@pytest.fixture
def root(tmp_path):
    return write_mayo_root(tmp_path / "mayo")


def test_netslim_cifarnet_matches_mayo_and_removes_channels(root, tmp_path, cli):
    a = cifarnet_arrays(1)
    prefix = write_checkpoint(tmp_path / "ckpt" / "checkpoint-3", a, a.trainable)
    out = tmp_path / "m.onnx"
    args = ["--mayo-model", root / "models/override/cifarnet.yaml",
            "--mayo-model", root / "models/override/prune/netslim.yaml",
            "--mayo-dataset", root / "datasets/cifar10.yaml", *sum((["--mayo-set", s] for s in CIFAR_SET), [])]
    code, _, err = cli("export", prefix, *args, "--input-shape", "1,3,32,32", "-o", out,
                       "--physical-widths", "exact")
    assert code == 0, err
    for batch in (1, 8):
        x = _inputs(batch)
        _compare(_run_onnx(out, x), cifarnet_reference(a, x))
    # the slimmed channels are gone: each conv is exactly as wide as its stored mask keeps
    convs = [n for n in onnx.load(str(out)).graph.node if n.op_type == "Conv"]
    inits = {i.name: i for i in onnx.load(str(out)).graph.initializer}
    widths = [inits[c.input[1]].dims[0] for c in convs]
    kept = [int(a[f"cifarnet/conv{i}/activations/NetworkSlimmer.mask"].sum()) for i in range(8)]
    assert widths[:8] == kept and sum(kept) < sum(CIFAR_WIDTHS)


def test_netslim_overriders_update_follows_mayos_rule(root, tmp_path, cli):
    """--mayo-overriders-update: masks from the gammas by NetworkSlimmer._threshold (global,
    k = ceil(n * density), keep gamma > the (k+1)-th largest), written out here again."""
    a = cifarnet_arrays(2, keep_fraction=1.0)
    prefix = write_checkpoint(tmp_path / "ckpt" / "checkpoint-1", a, a.trainable)
    gammas = np.concatenate([a[f"cifarnet/conv{i}/BatchNorm/gamma"] for i in range(8)]).tolist()
    density = 0.5
    k = math.ceil(len(gammas) * density)
    threshold = sorted(gammas)[-k - 1]
    for i in range(8):
        a[f"cifarnet/conv{i}/activations/NetworkSlimmer.mask"] = a[f"cifarnet/conv{i}/BatchNorm/gamma"] > threshold
    out = tmp_path / "m.onnx"
    code, _, err = cli("export", prefix, "--mayo-model", root / "models/override/cifarnet.yaml",
                       "--mayo-model", root / "models/override/prune/netslim.yaml",
                       "--mayo-set", "_overrider.conv.activation.netslim.density=0.5",
                       *sum((["--mayo-set", s] for s in CIFAR_SET), []),
                       "--mayo-overriders-update", "--input-shape", "2,3,32,32", "-o", out)
    assert code == 0, err
    x = _inputs(2, seed=5)
    _compare(_run_onnx(out, x), cifarnet_reference(a, x))


# ---- gated ResNet-18 -----------------------------------------------------------------

def resnet18_arrays(seed):
    a = Arrays(seed)
    add_gated(a, "resnet18/conv1", 7, 3, 8)
    cin = 8
    for b, d in R18_DEPTHS.items():
        add_gated(a, f"resnet18/{b}/conv1", 3, cin, d)
        add_gated(a, f"resnet18/{b}/conv2", 3, d, d)
        if b in R18_DOWNSAMPLE:
            add_gated(a, f"resnet18/{b}/downsample_shortcut", 1, cin, d)
        cin = d
    a.add("resnet18/fc5/weights", (cin, 10))
    a.add("resnet18/fc5/biases", (10,))
    return a


def resnet18_reference(a, x_nchw, density):
    """models/resnet18.yaml + models/gate/resnet18.yaml: every conv gated (stem, conv1, conv2,
    downsample_shortcut); numeric paddings pad before the gated conv; pool1 pads zeros."""
    eps = 1e-5
    x = tf.transpose(x_nchw, [0, 2, 3, 1])
    x = ref_gated(a, "resnet18/conv1", x, 2, 3, eps, density)
    x = tf.nn.max_pool2d(tf.pad(x, [[0, 0], [1, 1], [1, 1], [0, 0]]), 3, 2, "VALID")
    cin = 8
    for b, d in R18_DEPTHS.items():
        stride = 2 if b in R18_DOWNSAMPLE else 1
        y = ref_gated(a, f"resnet18/{b}/conv1", x, stride, 1, eps, density)
        y = ref_gated(a, f"resnet18/{b}/conv2", y, 1, 1, eps, density, act=False)
        s = ref_gated(a, f"resnet18/{b}/downsample_shortcut", x, stride, "VALID", eps, density, act=False) \
            if b in R18_DOWNSAMPLE else x
        x = tf.nn.relu(y + s)
        cin = d
    h = x.shape[1]
    x = tf.nn.avg_pool2d(x, min(7, h), 2, "VALID")  # kernel clipped to the input
    x = tf.reshape(x, [x.shape[0], -1])
    return (tf.matmul(x, a["resnet18/fc5/weights"]) + a["resnet18/fc5/biases"]).numpy()


@pytest.mark.parametrize("density", [0.5])
def test_gated_resnet18_matches_mayo(root, tmp_path, cli, density):
    a = resnet18_arrays(3)
    prefix = write_checkpoint(tmp_path / "ckpt" / "checkpoint-9", a, a.trainable)
    out = tmp_path / "r18.onnx"
    code, _, err = cli("export", tmp_path / "ckpt", "--mayo-model", "models/gate/resnet18.yaml",
                       "--mayo-root", root, f"--mayo-set=_gate.density={density}",
                       *sum((["--mayo-set", s] for s in R18_SET), []), "--input-shape", "1,3,32,32", "--target", "ort",
                       "-o", out)
    assert code == 0, err
    assert prefix
    for batch in (1, 8):
        x = _inputs(batch, seed=batch)
        _compare(_run_onnx(out, x), resnet18_reference(a, x, density))
    ops = [n.op_type for n in onnx.load(str(out)).graph.node]
    # stem + 2 per block + 3 downsample shortcuts, all on the custom op
    assert ops.count("FBSConv") == 1 + 2 * 8 + 3, sorted(set(ops))


def test_mayo_export_in_a_fresh_process(root, tmp_path):
    """The command as a user runs it: a new interpreter that reads the checkpoint with
    TensorFlow and then imports triton through torch (the memory check's fake-tensor trace).
    Triton loaded after TensorFlow crashed the process with SIGSEGV (exit -11), which an
    in-process test, where pytest had loaded triton long before, could not see."""
    import subprocess
    import sys

    a = resnet18_arrays(5)
    write_checkpoint(tmp_path / "ckpt" / "checkpoint-1", a, a.trainable)
    out = tmp_path / "r18.onnx"
    proc = subprocess.run([sys.executable, "-m", "gate2deploy", "export", str(tmp_path / "ckpt"),
                           "--mayo-model", "models/gate/resnet18.yaml", "--mayo-root", str(root),
                           "--mayo-set=_gate.density=0.5", *sum((["--mayo-set", s] for s in R18_SET), []),
                           "--input-shape", "1,3,32,32", "--target", "ort", "-o", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])
    x = _inputs(2, seed=4)
    _compare(_run_onnx(out, x), resnet18_reference(a, x, 0.5))


def test_gated_and_slimmed_cifarnet(root, tmp_path, cli):
    gated = (1, 3, 5, 7)
    a = cifarnet_arrays(4, slimmed=(0, 2, 4, 6), gated=gated)
    prefix = write_checkpoint(tmp_path / "ckpt" / "checkpoint-2", a, a.trainable)
    out = tmp_path / "mix.onnx"
    code, _, err = cli("export", prefix, "--mayo-model", root / "models/gate/cifarnet_slim_mix.yaml",
                       "--mayo-model", root / "models/override/prune/netslim.yaml",
                       *sum((["--mayo-set", s] for s in CIFAR_SET), []), "--input-shape", "1,3,32,32",
                       "--target", "ort", "-o", out)
    assert code == 0, err
    for batch in (1, 8):
        x = _inputs(batch, seed=10 + batch)
        _compare(_run_onnx(out, x), cifarnet_reference(a, x, gated=gated, density=0.5))
    model = onnx.load(str(out))
    assert [n.op_type for n in model.graph.node].count("FBSConv") == 4
    # the slimmed convs' masked channels are gone, and the gated convs reading them are narrower
    exact = tmp_path / "exact.onnx"
    code, _, err = cli("export", prefix, "--mayo-model", root / "models/gate/cifarnet_slim_mix.yaml",
                       "--mayo-model", root / "models/override/prune/netslim.yaml",
                       *sum((["--mayo-set", s] for s in CIFAR_SET), []), "--input-shape", "1,3,32,32",
                       "--target", "ort", "--physical-widths", "exact", "-o", exact)
    assert code == 0, err
    model = onnx.load(str(exact))
    inits = {i.name: i for i in model.graph.initializer}
    weights = [inits[n.input[1]].dims for n in model.graph.node if n.op_type in ("Conv", "FBSConv", "SparseInputConv")]
    for i in range(8):
        if i in gated:  # input channels = what the slimmed conv before it keeps
            assert weights[i][1] == int(a[f"cifarnet/conv{i - 1}/activations/NetworkSlimmer.mask"].sum()), i
        else:
            assert weights[i][0] == int(a[f"cifarnet/conv{i}/activations/NetworkSlimmer.mask"].sum()), i
    _compare(_run_onnx(exact, _inputs(2)), cifarnet_reference(a, _inputs(2), gated=gated, density=0.5))


@pytest.mark.parametrize("pool, threshold", [("l1", "online"), ("l2", "local")])
def test_gated_cifarnet_pools_thresholds_and_asymmetric_same(root, tmp_path, cli, pool, threshold):
    """models/gate/cifarnet.yaml: every conv gated; conv2 is stride 2 SAME on 30x30, TensorFlow's
    asymmetric padding (0 before, 1 after), which the saliency does not see."""
    a = cifarnet_arrays(8, slimmed=(), gated=range(8))
    if threshold == "local":  # <layer>/gate/threshold (gate/base.py _threshold_variable)
        for i in range(8):
            a[f"cifarnet/conv{i}/gate/threshold"] = np.array(0.9, np.float32)
    prefix = write_checkpoint(tmp_path / "ckpt" / "checkpoint-4", a, a.trainable)
    out = tmp_path / "g.onnx"
    code, _, err = cli("export", prefix, "--mayo-model", root / "models/gate/cifarnet.yaml",
                       "--mayo-set", "_gate.density=0.5", "--mayo-set", f"_gate.pool={pool}",
                       "--mayo-set", f"_gate.threshold={threshold}",
                       *sum((["--mayo-set", s] for s in CIFAR_SET), []), "--input-shape", "1,3,32,32",
                       "--target", "ort", "-o", out)
    assert code == 0, err
    x = _inputs(8, seed=20)
    ref = dict(gated=range(8), density=0.5, pool=pool, threshold=threshold == "local")
    _compare(_run_onnx(out, x), cifarnet_reference(a, x, **ref),
             fp32_reference=cifarnet_reference(a, x, **ref, dtype=np.float32))
    assert [n.op_type for n in onnx.load(str(out)).graph.node].count("FBSConv") == 8


@pytest.mark.parametrize("factor", [1.5, 2])
def test_gated_cifarnet_with_a_predictor_factor(root, tmp_path, cli, factor):
    """gate_params.factor > 0: a hidden FC of ceil(C / factor) outputs before the gate's
    (gate/base.py _predictor: `math.ceil(self.num_outputs / self.factor)`, any number, 1.5
    included). The model builds as Mayo computes it; the export refuses it by name (an
    FBSConv has one gate layer)."""
    a = cifarnet_arrays(9, slimmed=(), gated=range(8), factor=factor)
    prefix = write_checkpoint(tmp_path / "ckpt" / "checkpoint-6", a, a.trainable)
    sets = ["_gate.density=0.5", f"_gate.factor={factor}", *CIFAR_SET]
    args = sum((["--mayo-set", v] for v in sets), [])
    from gate2deploy.importers import mayo as importer

    built = importer.build(prefix, [str(root / "models/gate/cifarnet.yaml")], sets, None, torch.zeros(1, 3, 32, 32))
    x = _inputs(4, seed=21)
    with torch.no_grad():
        got = built.model(torch.from_numpy(x)).numpy()
    ref = dict(gated=range(8), density=0.5)
    _compare(got, cifarnet_reference(a, x, **ref), fp32_reference=cifarnet_reference(a, x, **ref, dtype=np.float32))
    code, _, err = cli("export", prefix, "--mayo-model", root / "models/gate/cifarnet.yaml", *args,
                       "--input-shape", "1,3,32,32", "--target", "ort", "-o", tmp_path / "f.onnx")
    assert code == 2 and "hidden layer (Mayo `factor` > 0)" in err, err


def test_disabled_local_gates_with_a_stored_threshold(root, tmp_path, cli):
    """gate_params.enable: false with threshold local: Mayo's forward uses no actives (gamma
    scales every channel; parametric.py `if self.enable`), but its sparsity regularizer calls
    actives(), which creates `<layer>/gate/threshold` (gate/sparse.py regularize,
    gate/base.py _threshold_variable): the checkpoint holds it, and it is not an unknown
    variable. Reference: the gated forward with every channel active (density 1)."""
    a = cifarnet_arrays(10, slimmed=(), gated=range(8))
    for i in range(8):
        a[f"cifarnet/conv{i}/gate/threshold"] = np.array(0.9, np.float32)
    prefix = write_checkpoint(tmp_path / "ckpt" / "checkpoint-7", a, a.trainable)
    out = tmp_path / "off.onnx"
    code, _, err = cli("export", prefix, "--mayo-model", root / "models/gate/cifarnet.yaml",
                       "--mayo-set", "_gate.density=0.5", "--mayo-set", "_gate.threshold=local",
                       "--mayo-set", "_gate.enable=false", *sum((["--mayo-set", s] for s in CIFAR_SET), []),
                       "--input-shape", "1,3,32,32", "--target", "onnx", "-o", out)
    assert code == 0, err
    x = _inputs(2, seed=22)
    ref = dict(gated=range(8), density=1.0)
    _compare(_run_onnx(out, x), cifarnet_reference(a, x, **ref),
             fp32_reference=cifarnet_reference(a, x, **ref, dtype=np.float32))


# ---- bad input -----------------------------------------------------------------------

def _small_cifarnet(tmp_path, mutate=None):
    a = cifarnet_arrays(5)
    if mutate:
        mutate(a)
    return write_checkpoint(tmp_path / "ckpt" / "checkpoint-1", a, a.trainable)


def _slim_args(root):
    return ["--mayo-model", root / "models/override/cifarnet.yaml",
            "--mayo-model", root / "models/override/prune/netslim.yaml",
            *sum((["--mayo-set", s] for s in CIFAR_SET), []), "--input-shape", "1,3,32,32"]


@pytest.mark.parametrize("mutate, message", [
    (lambda a: a.pop("cifarnet/conv3/BatchNorm/gamma"), "lacks variable cifarnet/conv3/BatchNorm/gamma"),
    (lambda a: a.__setitem__("cifarnet/conv4/weights", np.zeros((3, 3, 16, 17), np.float32)),
     "cifarnet/conv4/weights has shape [3, 3, 16, 17]"),
    (lambda a: a.__setitem__("cifarnet/conv9/weights", np.zeros((3, 3, 1, 1), np.float32)),
     "cifarnet/conv9/weights [3, 3, 1, 1] is not used"),
])
def test_checkpoint_yaml_mismatch_is_one_line(root, tmp_path, cli, mutate, message):
    prefix = _small_cifarnet(tmp_path, mutate)
    out = tmp_path / "m.onnx"
    code, _, err = cli("export", prefix, *_slim_args(root), "-o", out)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


def test_unknown_layer_overrider_and_quantizer_are_named(root, tmp_path, cli):
    prefix = _small_cifarnet(tmp_path)
    out = tmp_path / "m.onnx"
    for extra, message in [
        (["--mayo-set", "model.layers.dropout3.type=funky_layer"], "layer type 'funky_layer'"),
        (["--mayo-set", "_overrider.conv.activation.netslim.type=mayo.override.FixedPointQuantizer"],
         "quantization overrider mayo.override.FixedPointQuantizer"),
        (["--mayo-set", "_overrider.conv.weights={dns: {type: mayo.override.DynamicNetworkSurgeryPruner}}"],
         "overrider 'mayo.override.DynamicNetworkSurgeryPruner' on weights"),
    ]:
        code, _, err = cli("export", prefix, *_slim_args(root), *extra, "-o", out)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
        assert not out.exists()


def test_not_a_checkpoint_and_missing_yaml(root, tmp_path, cli):
    code, _, err = cli("export", tmp_path / "nothing", *_slim_args(root), "-o", tmp_path / "m.onnx")
    assert code == 2 and "is not a TensorFlow checkpoint" in err, err
    prefix = _small_cifarnet(tmp_path)
    code, _, err = cli("export", prefix, "--mayo-model", "models/nope.yaml", "--mayo-root", root,
                       "--input-shape", "1,3,32,32", "-o", tmp_path / "m.onnx")
    assert code == 2 and "Mayo YAML models/nope.yaml does not exist" in err, err


def test_missing_tensorflow_names_the_extra(root, tmp_path, cli, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_tf(name, *args, **kwargs):
        if name == "tensorflow" or name.startswith("tensorflow."):
            raise ImportError("No module named 'tensorflow'")
        return real_import(name, *args, **kwargs)
    prefix = _small_cifarnet(tmp_path)
    monkeypatch.setattr(builtins, "__import__", no_tf)
    code, _, err = cli("export", prefix, *_slim_args(root), "-o", tmp_path / "m.onnx")
    assert code == 2 and "pip install gate2deploy[mayo]" in err, err


def test_info_follows_mayos_estimate_rules(root, tmp_path, cli):
    """Expected numbers written from mayo/net/tf/estimate.py (_estimate_convolution,
    apply_sparsity) and NetworkSlimmer.estimate: conv macs Ho*Wo*Cout*9*Cin scaled by the
    input's and its own slim density; weights 9*Cin*Cout + Cout scaled by the input's active
    fraction, then by its own kept fraction (slimmed: density = active = kept);
    dropout passes no density on (generic_estimate returns {})."""
    a = cifarnet_arrays(7)
    prefix = write_checkpoint(tmp_path / "ckpt" / "checkpoint-1", a, a.trainable)
    out = tmp_path / "info.yaml"
    code, stdout, err = cli("info", prefix, *_slim_args(root), "--out", out)
    assert code == 0, err
    import yaml

    table = yaml.safe_load(out.read_text())["mask_sources"]["mayo"]["info"]
    rows = {r["layer"]: r for r in table["items"]}
    kept = [float(a[f"cifarnet/conv{i}/activations/NetworkSlimmer.mask"].mean()) for i in range(8)]
    sizes = [30, 30, 15, 15, 15, 8, 8, 8]
    cin, d_in = 3, 1.0
    for i, w in enumerate(CIFAR_WIDTHS):
        macs = int(int(sizes[i] ** 2 * w * 9 * cin * d_in) * kept[i])
        weights = int(int((9 * cin * w + w) * d_in) * kept[i])  # apply_sparsity: x active(in), then own
        assert (rows[f"cifarnet/conv{i}"]["macs"], rows[f"cifarnet/conv{i}"]["weights"]) == (macs, weights), i
        cin, d_in = w, (1.0 if i in (3, 6) else kept[i])  # conv3 / conv6 feed a dropout
    assert "Mayo info" in stdout and "cifarnet/conv7" in stdout


def test_yaml_code_tags_are_refused(root, tmp_path, cli):
    prefix = _small_cifarnet(tmp_path)
    evil = root / "models" / "evil.yaml"
    evil.write_text("---\n_import: cifarnet.yaml\n_x: !exec \"import os\"\n")
    code, _, err = cli("export", prefix, "--mayo-model", evil, "--input-shape", "1,3,32,32", "-o", tmp_path / "m.onnx")
    assert code == 2 and "!exec runs Python code" in err and len(err.strip().splitlines()) == 1, err


def test_profile_takes_mayo_inputs(root, tmp_path, cli):
    prefix = _small_cifarnet(tmp_path)
    out = tmp_path / "prof"
    code, stdout, err = cli("profile", prefix, *_slim_args(root), "-o", out, "--repeats", "3", "--warmup", "1",
                            "--widths", "1,0.5", "--no-report", "--no-progress")
    assert code == 0, err
    import json

    lut = json.loads((out / "lut.json").read_text())
    assert "profiled 9 layers" in stdout and lut
