"""FBSConv's Mayo options (runtimes/OPS.md): activation Relu|Identity, pools avg/max/l1/l2,
pool_pads, the fixed threshold; the native kernel, the Triton kernel (interpreter), the export
of FBSConv2d in all four gated positions of Mayo's ResNet block, and bad attributes.

Expected values come from `mayo_gated_conv` below, a float64 numpy re-statement of Mayo's
gated convolution written from Mayo's code (deep-fry/mayo), not from gate2deploy's code:
- mayo/net/tf/gate/base.py `GatedConvolutionBase.subsample`: avg_pool of x, |x| (l1) or
  square(x) (l2) over the whole H x W of the gated conv's input, or max_pool (max); no root;
- `_predictor`: a 1x1 conv (our fc) with the layer's activation_fn (relu, or none);
- `_find_threshold` / `bool_actives`: online: the min of tf.nn.top_k(gamma, k + 1),
  k = ceil(C * density), everything active when k == C; local/global: the stored variable;
  active = gamma > threshold (strict);
- parametric.py `normalize` (slim batch_norm, scale=False, center=False: (y - mean) /
  sqrt(var + eps)) and `activate`: y * active * gamma + active * beta, then activation_fn.
Mayo pads before the gated conv, so its pool sees the padding zeros; here the conv pads
itself and `pool_pads` gives the pool those zeros.
"""
from __future__ import annotations

import math
import zlib

import numpy as np
import pytest
import torch
from torch import nn

import gate2deploy
from gate2deploy.errors import UserError
from gate2deploy.gated import FBSConv2d

from test_native_ops import raw_session, run_node, single_node_model
from test_triton_ops import tk  # noqa: F401 - the interpreter fixture


def numpy_conv(x, w, stride, pads):
    """Plain float64 cross-correlation, NCHW / OIHW, pads (top, left, bottom, right)."""
    t, l, b, r = pads
    xp = np.pad(x, ((0, 0), (0, 0), (t, b), (l, r)))
    o, c, kh, kw = w.shape
    oh = (xp.shape[2] - kh) // stride[0] + 1
    ow = (xp.shape[3] - kw) // stride[1] + 1
    y = np.zeros((x.shape[0], o, oh, ow))
    for i in range(kh):
        for j in range(kw):
            patch = xp[:, :, i:i + stride[0] * oh:stride[0], j:j + stride[1] * ow:stride[1]]
            y += np.einsum("nchw,oc->nohw", patch, w[:, :, i, j])
    return y


def mayo_gamma(x, fc_w, fc_b, pool, pool_pads, relu):
    """Mayo's saliency gamma [N, O] in float64: subsample then _predictor (module doc)."""
    nhwc = x.astype(np.float64).transpose(0, 2, 3, 1)  # Mayo's layout
    t, l, b, r = pool_pads
    padded = np.pad(nhwc, ((0, 0), (t, b), (l, r), (0, 0)))  # Mayo's pad before the conv
    if pool == "max":
        pooled = padded.max(axis=(1, 2))
    else:
        source = {"avg": padded, "l1": np.abs(padded), "l2": np.square(padded)}[pool]
        pooled = source.mean(axis=(1, 2))
    gamma = pooled @ fc_w.T.astype(np.float64) + fc_b
    return np.maximum(gamma, 0.0) if relu else gamma


def mayo_gated_conv(x, w, stride, pads, fc_w, fc_b, mean, var, eps, beta, pool, pool_pads,
                    relu, density, threshold=None):
    """(output, active) of one Mayo parametric gated conv, in float64 (see the module doc)."""
    gamma = mayo_gamma(x, fc_w, fc_b, pool, pool_pads, relu)
    channels = gamma.shape[1]
    if threshold is not None:
        active = gamma > threshold
    else:
        k = math.ceil(channels * density)
        if k == channels:
            active = np.ones_like(gamma, dtype=bool)
        else:
            top = -np.sort(-gamma, axis=1)[:, :k + 1]  # tf.nn.top_k(gamma, k + 1)
            active = gamma > top.min(axis=1, keepdims=True)
    y = numpy_conv(x.astype(np.float64), w.astype(np.float64), stride, pads)
    y = (y - mean[None, :, None, None]) / np.sqrt(var[None, :, None, None].astype(np.float64) + eps)
    a = active[:, :, None, None].astype(np.float64)
    y = y * a * gamma[:, :, None, None] + a * beta[None, :, None, None]
    return (np.maximum(y, 0.0) if relu else y), active


def gap_threshold(gamma: np.ndarray) -> float:
    """A threshold midway in the widest gap among the middle half of gamma's sorted values,
    so that float rounding cannot move a gate across it."""
    v = np.unique(gamma.ravel())
    lo, hi = len(v) // 4, max(len(v) * 3 // 4, len(v) // 4 + 2)
    gaps = np.diff(v[lo:hi])
    i = lo + int(np.argmax(gaps))
    return float(np.float32((v[i] + v[i + 1]) / 2))


def random_layer(rng, n, c, o, size, k, relu):
    x = rng.standard_normal((n, c, size, size)).astype(np.float32)
    x[:, 1] = 0.0  # an input channel a previous FBS layer switched off
    w = (rng.standard_normal((o, c, k, k)) / math.sqrt(c * k * k)).astype(np.float32)
    fc_w = rng.standard_normal((o, c)).astype(np.float32)
    fc_b = (rng.standard_normal(o) + (0.5 if relu else 0.0)).astype(np.float32)
    mean = rng.standard_normal(o).astype(np.float32)
    var = rng.uniform(0.5, 2.0, o).astype(np.float32)
    beta = rng.standard_normal(o).astype(np.float32)
    return x, w, fc_w, fc_b, mean, var, beta


def op_inputs(w, fc_w, fc_b, mean, var, beta, eps):
    scale = (1.0 / np.sqrt(var.astype(np.float64) + eps)).astype(np.float32)
    shift = (-mean * scale).astype(np.float32)
    return [w, fc_w, fc_b, scale, shift, beta]


EPS = 1e-3  # Mayo's YAMLs use slim's 0.001


def assert_matches_mayo(y, expected, active_expected):
    scale = max(float(np.abs(expected).max()), 1e-30)
    assert np.isfinite(y).all()
    assert np.abs(y - expected).max() <= 1e-5 * scale
    zero_rows = (y == 0).all(axis=(2, 3))
    assert zero_rows[~active_expected].all()  # inactive channels are exact zeros


POOL_PADS = [(0, 0, 0, 0), (1, 2, 0, 1)]


@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("mode", ["online", "fixed"])
@pytest.mark.parametrize("activation", ["Relu", "Identity"])
@pytest.mark.parametrize("pool_pads", POOL_PADS)
@pytest.mark.parametrize("pool", ["avg", "max", "l1", "l2"])
def test_native_fbs_conv_follows_mayo(pool, pool_pads, activation, mode, batch):
    relu = activation == "Relu"
    rng = np.random.default_rng(zlib.crc32(repr((pool, pool_pads, activation, mode, batch)).encode()))
    c, o, size, k, stride, pads = 8, 16, 7, 3, (2, 1), (1, 1, 1, 1)
    x, w, fc_w, fc_b, mean, var, beta = random_layer(rng, batch, c, o, size, k, relu)
    density = 0.5
    threshold = None
    gamma = mayo_gamma(x, fc_w, fc_b, pool, pool_pads, relu)
    if mode == "fixed":
        threshold = gap_threshold(gamma)
    expected, active = mayo_gated_conv(x, w, stride, pads, fc_w, fc_b, mean, var, EPS, beta, pool,
                                       pool_pads, relu, density, threshold)
    if mode == "online":
        assert online_margin_ok(gamma, active, math.ceil(o * density))
    else:
        assert 0 < active.mean() < 1
    attrs = {"density": density, "pool": pool, "strides": list(stride), "pads": list(pads),
             "activation": activation}
    if any(pool_pads):
        attrs["pool_pads"] = list(pool_pads)
    if threshold is not None:
        attrs["threshold"] = threshold
    y = run_node("FBSConv", x, op_inputs(w, fc_w, fc_b, mean, var, beta, EPS), attrs)
    assert_matches_mayo(y, expected, active)
    if not relu:
        assert (y < 0).any()  # no ReLU after gating


def online_margin_ok(gamma, active, k):
    """The (k+1)-th largest gamma is not within rounding of a kept one (no tie to flip)."""
    kth = -np.sort(-gamma, axis=1)[:, k]
    kept = np.where(active, gamma, np.inf).min(axis=1)
    return bool((kept - kth > 1e-4 * np.abs(gamma).max()).all())


@pytest.mark.parametrize("activation", ["Relu", "Identity"])
def test_native_wide_layer_follows_mayo(activation):
    """64 channels: whole NCHWc blocks, the path that hands the conv to ONNX Runtime's NCHWc
    conv; its epilogue must honour activation "Identity" too."""
    relu = activation == "Relu"
    rng = np.random.default_rng(5 if relu else 6)
    x, w, fc_w, fc_b, mean, var, beta = random_layer(rng, 2, 64, 64, 12, 3, relu)
    x[:, 32:] = 0.0
    pool_pads, pads = (1, 1, 1, 1), (1, 1, 1, 1)
    expected, active = mayo_gated_conv(x, w, (1, 1), pads, fc_w, fc_b, mean, var, EPS, beta, "l2",
                                       pool_pads, relu, 0.5)
    assert online_margin_ok(mayo_gamma(x, fc_w, fc_b, "l2", pool_pads, relu), active, 32)
    y = run_node("FBSConv", x, op_inputs(w, fc_w, fc_b, mean, var, beta, EPS),
                 {"density": 0.5, "pool": "l2", "pads": list(pads), "pool_pads": list(pool_pads),
                  "activation": activation})
    assert_matches_mayo(y, expected, active)


# ----------------------------------------------------------------------------- export

class MayoGatedBlockNet(nn.Module):
    """Every gated position of Mayo's gated ResNet-18 (models/gate/resnet18.yaml): the stem,
    a block's conv1 (ReLU), conv2 and the 1x1 stride-2 downsample shortcut (both
    activation_fn: null), relu(conv2 + shortcut), then a classifier. Every gated conv's input
    is padded for its pool as Mayo pads before the conv."""

    def __init__(self, shortcut_threshold: float | None = None):
        super().__init__()
        self.stem = FBSConv2d(3, 8, 3, 1, 1, density=0.5, pool_pads=(1, 1, 1, 1))
        self.conv1 = FBSConv2d(8, 16, 3, 2, 1, density=0.5, pool="l2", pool_pads=(1, 1, 1, 1))
        self.conv2 = FBSConv2d(16, 16, 3, 1, 1, density=0.75, pool="max", activation=None,
                               pool_pads=(1, 1, 1, 1))
        self.shortcut = FBSConv2d(8, 16, 1, 2, 0, density=0.5, pool="l1", activation=None,
                                  threshold=shortcut_threshold)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        h = self.stem(x)
        out = torch.relu(self.conv2(self.conv1(h)) + self.shortcut(h))
        return self.fc(out.mean(dim=(2, 3)))


def randomized_block_net(seed: int) -> tuple[MayoGatedBlockNet, torch.Tensor]:
    torch.manual_seed(seed)
    net = MayoGatedBlockNet()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, FBSConv2d):
                m.bn.running_mean.normal_()
                m.bn.running_var.uniform_(0.5, 2.0)
                m.beta.normal_()
                m.gate.weight.normal_()
                m.gate.bias.normal_()
    net.eval()
    x = torch.randn(2, 3, 12, 12)
    with torch.no_grad():  # a shortcut threshold midway in a gap of its gammas on x
        gamma = net.shortcut.saliency_of(net.stem(x)).numpy().astype(np.float64)
    net.shortcut.threshold = gap_threshold(gamma)
    return net, x


def fbs_nodes(model):
    from onnx import helper
    return {n.name: {a.name: helper.get_attribute_value(a) for a in n.attribute}
            for n in model.graph.node if n.op_type == "FBSConv" and n.domain == "gate2deploy"}


@pytest.mark.parametrize("target", ["ort", "onnx"])
def test_all_four_resnet_positions_export_and_match_pytorch(target):
    net, x = randomized_block_net(3)
    compiled = gate2deploy.compile(net, x, target=target)
    nodes = fbs_nodes(compiled.onnx_model)
    if target == "onnx":  # the portable lowering leaves no custom node
        assert nodes == {} and not any(n.domain == "gate2deploy" for n in compiled.onnx_model.graph.node)
    else:
        assert len(nodes) == 4
        by_pool = {a["pool"].decode() if isinstance(a["pool"], bytes) else a["pool"]: a for a in nodes.values()}
        assert set(by_pool) == {"avg", "l2", "max", "l1"}
        assert "activation" not in by_pool["avg"] and "activation" not in by_pool["l2"]
        assert by_pool["max"]["activation"] == b"Identity" and by_pool["l1"]["activation"] == b"Identity"
        assert list(by_pool["l2"]["pool_pads"]) == [1, 1, 1, 1] and "pool_pads" not in by_pool["l1"]
        assert by_pool["l1"]["threshold"] == pytest.approx(net.shortcut.threshold, rel=0, abs=0)
        assert "threshold" not in by_pool["avg"]
    for batch in (x, torch.randn(3, 3, 12, 12)):
        with torch.no_grad():
            expected = net(batch).numpy()
        got = compiled.run(batch)[0]
        assert np.abs(got - expected).max() <= 1e-5 * np.abs(expected).max()


def test_block_net_pytorch_forward_is_mayos():
    """The PyTorch module (the export's reference) against the numpy re-statement of Mayo."""
    net, x = randomized_block_net(4)
    xn = x.numpy()

    def layer(m: FBSConv2d, inp):
        p = [t.detach().numpy() for t in (m.conv.weight, m.gate.weight, m.gate.bias,
                                          m.bn.running_mean, m.bn.running_var, m.beta)]
        w, fc_w, fc_b, mean, var, beta = p
        ph, pw = m.conv.padding
        y, _ = mayo_gated_conv(inp, w, m.conv.stride, (ph, pw, ph, pw), fc_w, fc_b, mean, var,
                               m.bn.eps, beta, m.pool, m.pool_pads, m.activation == "relu",
                               m.density, m.threshold)
        return y.astype(np.float32)

    h = layer(net.stem, xn)
    out = np.maximum(layer(net.conv2, layer(net.conv1, h)) + layer(net.shortcut, h), 0)
    with torch.no_grad():
        expected = net.fc(torch.from_numpy(out).mean(dim=(2, 3))).numpy()
        got = net(x).numpy()
    assert np.abs(got - expected).max() <= 1e-5 * np.abs(expected).max()


# ----------------------------------------------------------------------------- Triton

TRITON_CASES = [  # (pool, pool_pads, activation, mode)
    ("l1", (1, 1, 1, 1), "Identity", "online"),
    ("l2", (0, 1, 2, 0), "Relu", "fixed"),
    ("max", (1, 1, 1, 1), "Identity", "fixed"),
    ("avg", (2, 0, 0, 1), "Relu", "online"),
]


@pytest.mark.parametrize("case", TRITON_CASES, ids=lambda c: "-".join(map(str, c)))
def test_triton_fbs_conv_follows_mayo(tk, case):
    pool, pool_pads, activation, mode = case
    relu = activation == "Relu"
    rng = np.random.default_rng(zlib.crc32(repr(case).encode()))
    x, w, fc_w, fc_b, mean, var, beta = random_layer(rng, 2, 4, 6, 5, 3, relu)
    gamma = mayo_gamma(x, fc_w, fc_b, pool, pool_pads, relu)
    threshold = gap_threshold(gamma) if mode == "fixed" else None
    expected, active = mayo_gated_conv(x, w, (1, 1), (1, 1, 1, 1), fc_w, fc_b, mean, var, EPS, beta,
                                       pool, pool_pads, relu, 0.5, threshold)
    if threshold is None:
        assert online_margin_ok(gamma, active, 3)
    inputs = [torch.from_numpy(a) for a in [x, *op_inputs(w, fc_w, fc_b, mean, var, beta, EPS)]]
    y = tk.fbs_conv(*inputs, 0.5, pool, (1, 1), (1, 1, 1, 1), (1, 1), activation=activation,
                    pool_pads=pool_pads, threshold=threshold).numpy()
    assert_matches_mayo(y, expected, active)


# ----------------------------------------------------------------------------- bad input

def _fbs_inits():
    rng = np.random.default_rng(0)
    return [rng.standard_normal((4, 8, 3, 3)).astype(np.float32), np.ones((4, 8), np.float32)] + \
        [np.ones(4, np.float32)] * 4


@pytest.mark.parametrize("attrs, message", [
    ({"pool": "l3"}, 'pool must be "avg", "max", "l1" or "l2"'),
    ({"activation": "relu"}, 'activation must be "Relu" or "Identity"'),
    ({"activation": ""}, 'activation must be "Relu" or "Identity"'),
    ({"activation": 1}, "activation must be a string"),
    ({"pool_pads": [1, 1, 1]}, "pool_pads must be 4 ints"),
    ({"pool_pads": [0, -1, 0, 0]}, "pool_pads must be 4 ints"),
    ({"pool_pads": [0, 0, 2**31, 0]}, "pool_pads must be 4 ints"),
    ({"pool_pads": [1.0, 1.0, 1.0, 1.0]}, "pool_pads must be a list of ints"),
    ({"threshold": float("nan")}, "threshold must be finite"),
    ({"threshold": float("inf")}, "threshold must be finite"),
    ({"threshold": 1}, "threshold must be a float"),
    ({"threshold": "0.5"}, "threshold must be a float"),
])
def test_native_kernel_refuses_bad_mayo_attributes(attrs, message):
    x = np.ones((1, 8, 5, 5), np.float32)
    with pytest.raises(Exception, match=message):
        raw_session(single_node_model("FBSConv", x.shape, _fbs_inits(), {"density": 0.5, **attrs})
                    ).run(None, {"x": x})


def test_huge_pool_pads_area_is_checked_for_overflow():
    x = np.ones((1, 8, 5, 5), np.float32)
    attrs = {"density": 0.5, "pads": [1, 1, 1, 1]}
    with pytest.raises(Exception, match="pool_pads make the pooled area overflow int64"):
        run_node("FBSConv", x, _fbs_inits(), {**attrs, "pool_pads": [2**31 - 1] * 4})  # (2^32 + 3)^2
    y = run_node("FBSConv", x, _fbs_inits(), {**attrs, "pool_pads": [2**30] * 4})  # (2^31 + 5)^2 fits
    assert np.isfinite(y).all()


def test_module_refuses_bad_options():
    for kwargs, message in [({"activation": "sigmoid"}, "activation"), ({"pool_pads": (1, 1)}, "pool_pads"),
                            ({"pool_pads": (0, -1, 0, 0)}, "pool_pads"), ({"threshold": float("nan")}, "threshold"),
                            ({"pool": "l3"}, "pool")]:
        with pytest.raises(ValueError, match=message):
            FBSConv2d(4, 4, 3, **kwargs)


def test_tensorrt_takes_activation_and_pool_pads_and_refuses_the_fixed_threshold_by_name():
    from gate2deploy.runtimes.tensorrt_plugins import prepare_for_tensorrt
    x = np.ones((1, 8, 5, 5), np.float32)
    model = single_node_model("FBSConv", x.shape, _fbs_inits(),
                              {"density": 0.5, "pool": "l2", "activation": "Identity", "pool_pads": [1, 1, 1, 1]})
    node = prepare_for_tensorrt(model).graph.node[0]
    got = {a.name for a in node.attribute}
    assert {"activation", "pool_pads", "pool", "density", "plugin_namespace"} <= got
    with_threshold = single_node_model("FBSConv", x.shape, _fbs_inits(), {"density": 0.5, "threshold": 0.25})
    with pytest.raises(UserError, match="attribute threshold is not taken by its TensorRT plugin"):
        prepare_for_tensorrt(with_threshold)


def test_plain_conv_after_an_identity_fbs_layer_still_reads_only_active_channels():
    """passes/sparse_fbs_consumers.py relies on inactive channels being exact zeros, not on
    Y >= 0: with activation None the active channels go negative, the inactive stay 0, so the
    consumer conv becomes SparseInputConv and the result is unchanged."""
    torch.manual_seed(7)
    fbs = FBSConv2d(4, 8, 3, 1, 1, density=0.5, activation=None, pool="l1", pool_pads=(1, 1, 1, 1))
    with torch.no_grad():
        fbs.bn.running_mean.normal_()
        fbs.beta.normal_()
    net = nn.Sequential(fbs, nn.Conv2d(8, 6, 3, padding=1)).eval()
    x = torch.randn(2, 4, 9, 9)
    compiled = gate2deploy.compile(net, x, target="ort")
    ops = [n.op_type for n in compiled.onnx_model.graph.node]
    assert ops.count("FBSConv") == 1 and ops.count("SparseInputConv") == 1 and "Conv" not in ops
    with torch.no_grad():
        hidden = fbs(x)
        expected = net(x).numpy()
    assert (hidden < 0).any()
    got = compiled.run(x)[0]
    assert np.abs(got - expected).max() <= 1e-5 * np.abs(expected).max()
