"""CG / PG / FBS: module forward == the seed's formula; reference (runtimes/reference.py) ==
module; capture gives one custom node per gated layer; the portable lowering run by stock
onnxruntime == module.

Tolerances: values are compared with atol = rtol = 1e-5 (float32 convolutions summed in a
different order). Gates are discontinuous: a gate may differ between two implementations only
at a tie, i.e. where its decision value is within TIE_EPS * max|decision| of the threshold
(float rounding of the convolution), and such flips must be rare (at most 0.1% of gates, and
at most 2 in absolute count when that is fewer); outputs are compared only where the gate agrees.
"""
from __future__ import annotations

import math

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F

from gate2deploy.capture import capture
from gate2deploy.gated import (CGConv2d, FBSConv2d, PGConv2d, QuantizedConv2d, channel_shuffle,
                               fbs_density_attribute)
from gate2deploy.gate_stats import (calibrate_pg_scales, describe_gated_nodes, gate_statistics,
                                    onnx_gate_statistics, pg_scale_modes)
from gate2deploy.passes import ir
from gate2deploy.passes.lower_portable import LoweringResult, lower_portable
from gate2deploy.runtimes import reference as R

ATOL = RTOL = 1e-5
TIE_EPS = 1e-5


# --------------------------------------------------------------------------- seed formulas
# Written independently from gating-semantics.md §3-§5 (not from gate2deploy.gated).

def seed_cg(m: CGConv2d, x):
    if m.shuffle:
        n, c, h, w = x.shape
        x = x.view(n, m.p, c // m.p, h, w).transpose(1, 2).contiguous().view(n, -1, h, w)
    args = (None, m.stride, m.padding, m.dilation, m.groups)
    yp = F.conv2d(x, m.weight * m.mask, *args)
    bn = (yp - m.bn.running_mean.view(1, -1, 1, 1)) / torch.sqrt(m.bn.running_var.view(1, -1, 1, 1) + m.bn.eps)
    d = (torch.sigmoid(m.alpha * (bn - m.threshold)) - 0.5 > 0).float()
    return F.conv2d(x, m.weight, *args) * d + yp * (1 - d)


def _seed_quant(x, b, s=None):
    sign, mag = torch.sign(x), torch.abs(x)
    s = mag.max() + 1e-7 if s is None else s
    return torch.round(torch.clamp(mag / s, 0, 1) * (2.0 ** b - 1)) / (2.0 ** b - 1) * s * sign


def _seed_trunc(x, b, bh, s=None):
    sign, mag = torch.sign(x), torch.abs(x)
    s = mag.max() + 1e-7 if s is None else s
    q = torch.round(torch.clamp(mag / s, 0, 1) * (2.0 ** b - 1))
    q = torch.floor(q / 2 ** (b - bh)) * 2 ** (b - bh)
    return q / (2.0 ** b - 1) * s * sign


def seed_pg(m: PGConv2d, x):
    if m.wbits == 1:  # binarize to +-1, rescaled by sqrt(1 / (k^2 * C)) (McDonnell 2018)
        w = (torch.round((torch.clamp(m.weight, -1, 1) + 1) / 2) * 2 - 1) * math.sqrt(
            1.0 / (m.kernel_size[0] ** 2 * m.in_channels))
    else:
        w = _seed_quant(m.weight, m.wbits) if m.wbits > 1 else m.weight
    args = (None, m.stride, m.padding, m.dilation, m.groups)
    x_hb = _seed_trunc(x, m.abits, m.pred_bits)
    out_msb = F.conv2d(x_hb, w, *args)
    gate = (torch.sigmoid(m.alpha * (out_msb - m.threshold)) > 0.5).float()
    return out_msb + gate * F.conv2d(_seed_quant(x, m.abits) - x_hb, w, *args)


def seed_fbs(m: FBSConv2d, x):
    pooled = x.mean(dim=(2, 3)) if m.pool == "avg" else x.amax(dim=(2, 3))
    g = torch.relu(pooled @ m.gate.weight.T + m.gate.bias)
    o = g.shape[1]
    k = math.ceil(o * m.density)
    active = torch.ones_like(g) if k >= o else (g > torch.sort(g, dim=1).values[:, -k - 1:-k]).float()
    y = F.batch_norm(m.conv(x), m.bn.running_mean, m.bn.running_var, None, None, False, 0.0, m.bn.eps)
    return torch.relu(active[:, :, None, None] * g[:, :, None, None] * y + active[:, :, None, None] * m.beta[None, :, None, None])


# --------------------------------------------------------------------------- configurations

CONV_CONFIGS = [  # (C, O, k, stride, padding, dilation, groups, N, H)
    (8, 8, 3, 1, 1, 1, 1, 2, 9),
    (16, 12, 3, 2, 1, 1, 1, 3, 10),
    (8, 16, 1, 1, 0, 1, 1, 2, 7),
    (12, 8, 3, 1, 2, 2, 1, 2, 11),
    (16, 16, 5, 2, 2, 1, 1, 1, 13),
    (8, 8, 3, 1, 1, 1, 2, 2, 8),  # groups: PG only
]


def _randomize_bn(bn):
    with torch.no_grad():
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)


def make_cg(cfg, use_group=False, shuffle=False, p=4):
    c, o, k, s, pad, dil, groups, n, h = cfg
    m = CGConv2d(c, o, k, stride=s, padding=pad, dilation=dil, p=p, use_group=use_group, shuffle=shuffle)
    _randomize_bn(m.bn)
    with torch.no_grad():
        m.threshold.uniform_(-0.5, 0.8)
    return m.eval(), torch.randn(n, c, h, h)


def make_pg(cfg, abits=3, pred_bits=2, wbits=8):
    c, o, k, s, pad, dil, groups, n, h = cfg
    m = PGConv2d(c, o, k, stride=s, padding=pad, dilation=dil, groups=groups, wbits=wbits,
                 abits=abits, pred_bits=pred_bits)
    with torch.no_grad():
        m.threshold.uniform_(-0.5, 1.0)
    return m.eval(), torch.relu(torch.randn(n, c, h, h))  # PG inputs are PACT-clamped (>= 0)


def make_fbs(cfg, density=0.5, pool="avg"):
    c, o, k, s, pad, dil, groups, n, h = cfg
    m = FBSConv2d(c, o, k, s, pad, dil, density=density, pool=pool)
    _randomize_bn(m.bn)
    with torch.no_grad():
        m.gate.weight.normal_()
        m.gate.bias.normal_()
        m.beta.normal_(0, 0.3)
    return m.eval(), torch.randn(n, c, h, h)


def reference_of(m, x, return_gate=True):
    """Run runtimes/reference.py on the module's exported constants."""
    xn = x.detach().numpy()
    if isinstance(m, CGConv2d):
        if m.shuffle:
            xn = channel_shuffle(x, m.p).numpy()
        base, thr = m.export_constants()
        conv = dict(strides=m.stride, pads=[*m.padding, *m.padding], dilations=m.dilation)
        y, gate = R.cg_conv_reference(xn, m.weight.detach().numpy(), base.numpy(), thr.numpy(),
                                      return_gate=True, **conv)
        yp = R.conv2d(xn, (m.weight * m.mask).detach().numpy(), m.stride, [*m.padding, *m.padding], m.dilation)
        return y, gate, yp, thr.numpy().reshape(1, -1, 1, 1)
    if isinstance(m, PGConv2d):
        wq = m.quantized_weight().detach().numpy()
        conv = dict(strides=m.stride, pads=[*m.padding, *m.padding], dilations=m.dilation, group=m.groups)
        y, gate = R.pg_conv_reference(xn, wq, m.threshold.detach().numpy().reshape(-1), m.abits,
                                      m.pred_bits, float(m.static_scale), return_gate=True, **conv)
        x_hb, _, _ = R.pg_split_activations(xn, m.abits, m.pred_bits, float(m.static_scale))
        msb = R.conv2d(x_hb, wq, m.stride, [*m.padding, *m.padding], m.dilation, m.groups)
        return y, gate, msb, m.threshold.detach().numpy().reshape(1, -1, 1, 1)
    scale, shift = m.bn_scale_shift()
    c = m.conv
    y, active = R.fbs_conv_reference(
        xn, c.weight.detach().numpy(), m.gate.weight.detach().numpy(), m.gate.bias.detach().numpy(),
        scale.numpy(), shift.numpy(), m.beta.detach().numpy(), fbs_density_attribute(m.density, c.out_channels),
        m.pool, c.stride, [*c.padding, *c.padding], c.dilation, return_gate=True)
    pooled = xn.mean(axis=(2, 3)) if m.pool == "avg" else xn.max(axis=(2, 3))
    g = np.maximum(pooled @ m.gate.weight.detach().numpy().T + m.gate.bias.detach().numpy(), 0)
    o = g.shape[1]
    k = math.ceil(o * m.density)
    kth = np.sort(g, axis=1)[:, [max(o - k - 1, 0)]] if k < o else np.full((g.shape[0], 1), -np.inf)
    return y, active, g, kth


def module_gate(m, x) -> np.ndarray:
    """The module's own gate decisions, by the seed's rule."""
    with torch.no_grad():
        if isinstance(m, CGConv2d):
            xs = channel_shuffle(x, m.p) if m.shuffle else x
            yp = F.conv2d(xs, m.weight * m.mask, None, m.stride, m.padding, m.dilation, m.groups)
            bn = F.batch_norm(yp, m.bn.running_mean, m.bn.running_var, None, None, False, 0.0, m.bn.eps)
            return (torch.sigmoid(m.alpha * (bn - m.threshold)) - 0.5 > 0).numpy()
        if isinstance(m, PGConv2d):
            from gate2deploy.gated import truncate_msb
            s = float(m.static_scale) if m.static_scale > 0 else None
            msb = F.conv2d(truncate_msb(x, m.abits, m.pred_bits, s), m.quantized_weight(), None,
                           m.stride, m.padding, m.dilation, m.groups)
            return (torch.sigmoid(m.alpha * (msb - m.threshold)) > 0.5).numpy()
        pooled = x.mean(dim=(2, 3)) if m.pool == "avg" else x.amax(dim=(2, 3))
        g = torch.relu(F.linear(pooled, m.gate.weight, m.gate.bias))
        from gate2deploy.gated import _fbs_active
        return _fbs_active(g, m.density).bool().numpy()


def assert_equal_up_to_ties(actual, expected, gate_a, gate_e, decision, threshold, what):
    """Values equal where gates agree; gates differ only at ties, and rarely. Returns #flips."""
    flips = gate_a != gate_e
    n_flips = int(flips.sum())
    if n_flips:
        dec = np.broadcast_to(decision, flips.shape)[flips]
        thr = np.broadcast_to(threshold, flips.shape)[flips]
        band = TIE_EPS * max(1.0, float(np.abs(decision).max()))
        assert np.all(np.abs(dec - thr) <= band), (
            f"{what}: {n_flips} gates differ away from a tie (|decision - threshold| up to "
            f"{np.abs(dec - thr).max():.3g}, tie band {band:.3g})")
        assert n_flips <= max(2, 1e-3 * flips.size), f"{what}: {n_flips} of {flips.size} gates flipped"
    if flips.ndim == 2:  # FBS: a flipped gate is a whole output channel
        flips = flips[:, :, None, None]
    ok = np.isclose(actual, expected, atol=ATOL, rtol=RTOL) | np.broadcast_to(flips, actual.shape)
    assert ok.all(), f"{what}: max |diff| {np.abs(actual - expected)[~ok].max():.3g} where the gates agree"
    return n_flips


def lowered_session(m, x, expose=True):
    proto = capture(m, x)
    result = LoweringResult()
    graph = lower_portable(ir.import_graph(proto), result, expose_gates=expose)
    model = ir.export_model(graph)
    assert not [n for n in model.graph.node if n.domain == "gate2deploy"]
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return proto, sess, result


def _cases():
    for i, cfg in enumerate(CONV_CONFIGS):
        if cfg[6] == 1:
            yield pytest.param("cg", cfg, {}, id=f"cg-{i}")
            yield pytest.param("fbs", cfg, {"density": 0.5, "pool": "avg" if i % 2 else "max"}, id=f"fbs-{i}")
        yield pytest.param("pg", cfg, {"abits": 3, "pred_bits": 2}, id=f"pg32-{i}")
        yield pytest.param("pg", cfg, {"abits": 8, "pred_bits": 4, "wbits": 4}, id=f"pg84-{i}")
    yield pytest.param("cg", CONV_CONFIGS[1], {"use_group": True, "shuffle": True}, id="cg-group-shuffle")
    yield pytest.param("cg", CONV_CONFIGS[0], {"use_group": True, "p": 2}, id="cg-group-p2")
    yield pytest.param("fbs", CONV_CONFIGS[1], {"density": 1.0}, id="fbs-dense")
    yield pytest.param("fbs", CONV_CONFIGS[1], {"density": 0.3}, id="fbs-0.3")
    yield pytest.param("pg", CONV_CONFIGS[0], {"wbits": 1}, id="pg-binary-weights")
    yield pytest.param("pg", CONV_CONFIGS[0], {"wbits": 0}, id="pg-float-weights")


MAKERS = {"cg": make_cg, "pg": make_pg, "fbs": make_fbs}
SEEDS = {"cg": seed_cg, "pg": seed_pg, "fbs": seed_fbs}


@pytest.mark.parametrize("kind,cfg,kw", list(_cases()))
def test_module_reference_and_lowering_agree(kind, cfg, kw):
    m, x = MAKERS[kind](cfg, **kw)
    with torch.no_grad():
        y_module = m(x).numpy()
        # 1. The module's eval forward is the seed's formula (same float ops: bit-identical).
        y_seed = SEEDS[kind](m, x).numpy()
    np.testing.assert_array_equal(y_module, y_seed)
    # 2. The reference implementation agrees with the module up to ties.
    y_ref, gate_ref, decision, threshold = reference_of(m, x)
    gate_mod = module_gate(m, x)
    assert gate_ref.any() and (not gate_ref.all() or kind == "fbs" and kw.get("density") == 1.0), \
        "the test data must switch some gates on and (except dense FBS) some off"
    assert_equal_up_to_ties(y_module, y_ref, gate_mod, gate_ref, decision, threshold, "module vs reference")
    # 3. One custom node per layer; the portable lowering in stock onnxruntime agrees.
    proto, sess, result = lowered_session(m, x)
    custom = [n.op_type for n in proto.graph.node if n.domain == "gate2deploy"]
    assert custom == [{"cg": "CGConv", "pg": "PGConv", "fbs": "FBSConv"}[kind]]
    outs = sess.run(None, {"input": x.numpy()})
    y_ort, gate_ort = outs[0], outs[1]
    assert y_ort.shape == y_module.shape
    assert_equal_up_to_ties(y_ort, y_ref, gate_ort, gate_ref, decision, threshold, "onnx lowering vs reference")


@pytest.mark.parametrize("use_group,p,expect", [(False, 4, "Slice"), (True, 4, 4), (True, 2, 2)])
def test_portable_cg_base_path_is_a_smaller_conv(use_group, p, expect):
    """The base path Yp = conv(x, W * mask) is lowered without the mask's zeros: a Slice of the
    base channels (first C/p) or a grouped conv (block-diagonal), 1/p of the MACs."""
    m, x = make_cg(CONV_CONFIGS[1], use_group=use_group, p=p)
    proto, sess, _ = lowered_session(m, x)
    model = ir.export_model(lower_portable(ir.import_graph(proto)))
    inits = {i.name: i for i in model.graph.initializer}
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    assert len(convs) == 2
    gate_inputs = {name for n in model.graph.node if n.op_type == "Greater" for name in n.input}
    base = next(n for n in convs if n.output[0] in gate_inputs)
    c = CONV_CONFIGS[1][0]
    group = next((a.i for a in base.attribute if a.name == "group"), 1)
    assert list(inits[base.input[1]].dims)[1] * group == (c // p if expect == "Slice" else c)
    if expect == "Slice":
        assert group == 1 and any(n.op_type == "Slice" for n in model.graph.node)
    else:
        assert group == expect
    y_ref, gate_ref, decision, threshold = reference_of(m, x)
    y_ort, gate_ort = sess.run(None, {"input": x.numpy()})[:2]
    assert_equal_up_to_ties(y_ort, y_ref, gate_ort, gate_ref, decision, threshold, "onnx lowering vs reference")


def test_portable_cg_scattered_base_channels_are_gathered():
    """A base path of scattered channels shared by all outputs (a CGConv node written by
    hand: the seed's modules only make the first C/p or block-diagonal) is lowered to a Gather
    of those channels and a smaller conv, the full path to base + a conv of the complement
    channels (one dense conv's weights in all, not 1 + 1/p), equal to the reference."""
    from onnx import TensorProto, helper
    rng = np.random.default_rng(3)
    c, o = 12, 10
    x = rng.standard_normal((2, c, 9, 9)).astype(np.float32)
    w = (rng.standard_normal((o, c, 3, 3)) / math.sqrt(c * 9)).astype(np.float32)
    mask = np.tile(np.isin(np.arange(c), [1, 4, 5, 10]), (o, 1)).astype(np.float32)
    yp = R.conv2d(x, w * mask[:, :, None, None], (1, 1), (1, 1, 1, 1), (1, 1))
    thr = np.quantile(yp.transpose(1, 0, 2, 3).reshape(o, -1), 0.7, axis=1).astype(np.float32)
    inits = [helper.make_tensor(n, TensorProto.FLOAT, a.shape, a.ravel())
             for n, a in (("W", w), ("mask", mask), ("thr", thr))]
    node = helper.make_node("CGConv", ["input", "W", "mask", "thr"], ["y"], domain="gate2deploy",
                            name="cg", pads=[1, 1, 1, 1], strides=[1, 1], dilations=[1, 1])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, x.shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("gate2deploy", 1)])
    model.ir_version = 10
    lowered = ir.export_model(lower_portable(ir.import_graph(model)))
    assert [n.op_type for n in lowered.graph.node].count("Gather") == 2
    init_shapes = {i.name: tuple(i.dims) for i in lowered.graph.initializer}
    conv_in_channels = sorted(init_shapes[n.input[1]][1] for n in lowered.graph.node if n.op_type == "Conv")
    assert conv_in_channels == [4, c - 4]
    sess = ort.InferenceSession(lowered.SerializeToString(), providers=["CPUExecutionProvider"])
    y = sess.run(None, {"input": x})[0]
    y_ref = R.cg_conv_reference(x, w, mask, thr, (1, 1), (1, 1, 1, 1), (1, 1))
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5 * np.abs(y_ref).max())


def test_portable_cg_base_structure_of_masks():
    from gate2deploy.passes.lower_portable import _base_structure
    rng = np.random.default_rng(0)
    kind, chans = _base_structure(np.tile(rng.random(12) < 0.5, (8, 1)).astype(np.float32))
    assert kind == "columns" and 0 < len(chans) < 12
    assert _base_structure(np.kron(np.eye(3), np.ones((2, 4))))[0:2] == ("blocks", 3)
    ragged = np.kron(np.eye(3), np.ones((2, 4)))
    ragged[0, 5] = 1  # one extra channel: no structure, the full-size masked conv
    assert _base_structure(ragged)[0] == "dense"


def test_fbs_inactive_channels_are_exact_zeros_and_k_per_sample():
    m, x = make_fbs(CONV_CONFIGS[1], density=0.25)
    with torch.no_grad():
        y = m(x)
    o = y.shape[1]
    k = math.ceil(o * 0.25)
    nonzero_channels = (y.abs().amax(dim=(2, 3)) > 0).sum(dim=1)
    assert (nonzero_channels <= k).all() and (nonzero_channels > 0).all()


def test_fbs_density_attribute_keeps_k():
    for o in range(1, 300):
        for density in (0.1, 0.3, 1 / 3, 0.7, 0.55):
            k = math.ceil(o * density)
            attr = float(np.float32(fbs_density_attribute(density, o)))
            assert math.ceil(o * attr) == k, (o, density)


def test_pg_static_scale_makes_outputs_batch_independent_and_is_exported():
    m, x = make_pg(CONV_CONFIGS[0])
    with torch.no_grad():
        dynamic_single = m(x[:1]).numpy()
        dynamic_batch = m(x).numpy()[:1]
    assert not np.allclose(dynamic_single, dynamic_batch), "the dynamic scale depends on the batch"
    scales = calibrate_pg_scales(m, [x[:1], x[1:]])
    assert scales[""] == pytest.approx(float(x.abs().max()) + 1e-7, rel=1e-6)
    assert pg_scale_modes(m)[""].startswith("static")
    with torch.no_grad():
        # (equal up to the conv's float summation, which differs between batch sizes)
        np.testing.assert_allclose(m(x[:1]).numpy(), m(x).numpy()[:1], atol=ATOL, rtol=RTOL)
    proto, sess, _ = lowered_session(m, x)
    (desc,) = describe_gated_nodes(proto)
    assert desc["scale"].startswith("static") and desc["attributes"]["static_scale"] == pytest.approx(scales[""], rel=1e-6)
    y_ref, gate_ref, decision, threshold = reference_of(m, x)
    y_ort, gate_ort = sess.run(None, {"input": x.numpy()})
    assert_equal_up_to_ties(y_ort, y_ref, gate_ort, gate_ref, decision, threshold, "static-scale lowering")


def test_quantized_conv_exports_as_standard_ops_with_constant_weights():
    m = QuantizedConv2d(8, 8, 3, padding=1, bias=False, wbits=8, abits=3).eval()
    x = torch.relu(torch.randn(2, 8, 6, 6))
    proto = capture(m, x)
    ops = [n.op_type for n in proto.graph.node]
    assert "Conv" in ops and not [n for n in proto.graph.node if n.domain]
    conv = next(n for n in proto.graph.node if n.op_type == "Conv")
    graph = ir.import_graph(proto)
    w = next(n for n in graph.nodes if n.op == "Conv").inputs[1]
    assert ir.const_value(w) is not None, f"quantized weight {conv.input[1]} is not a constant"
    y = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})[0]
    np.testing.assert_allclose(y, m(x).detach().numpy(), atol=ATOL, rtol=RTOL)


def test_gate_statistics_torch_and_onnx_agree_and_imply_macs():
    torch.manual_seed(1)
    layers = torch.nn.Sequential(make_cg(CONV_CONFIGS[0])[0], make_fbs(CONV_CONFIGS[0])[0],
                                 torch.nn.ReLU(), make_pg(CONV_CONFIGS[0])[0]).eval()
    x = torch.randn(2, 8, 9, 9)
    stats = gate_statistics(layers, [x, x * 0.5])
    assert [s.op for s in stats] == ["CGConv", "FBSConv", "PGConv"]
    dense = 8 * 9 * 9 * 8 * 9
    for s in stats:
        assert s.dense_macs == dense and 0 < s.gate_on_fraction < 1 and s.samples == 4
    cg, fbs, pg = stats
    assert cg.expected_macs == pytest.approx(dense * (0.25 + 0.75 * cg.gate_on_fraction))
    assert pg.expected_macs == pytest.approx(dense * (1 + pg.gate_on_fraction))
    assert pg.details["bit_weighted_macs"] == pytest.approx(dense * (2 + pg.gate_on_fraction) / 3)
    assert fbs.gate_on_fraction == pytest.approx(0.5)
    # The FBS layer's input is the CG output (all channels non-zero): in_density 1.
    assert fbs.expected_macs == pytest.approx(dense * 0.5 + 64)
    onnx_stats = onnx_gate_statistics(capture(layers, x), [x, x * 0.5])
    for a, b in zip(stats, onnx_stats):
        assert a.op == b.op and a.dense_macs == b.dense_macs
        assert abs(a.gate_on_fraction - b.gate_on_fraction) <= 1e-3, (a, b)


@pytest.mark.parametrize("kind", ["cg", "pg", "fbs"])
def test_training_mode_trains_like_the_seed(kind):
    """Drop-in use for new models: gradients reach the weights and thresholds (straight-through
    gates, as the seed), BatchNorm running statistics update in training mode only."""
    m, x = MAKERS[kind](CONV_CONFIGS[0])
    m.train()
    bn = getattr(m, "bn", None)
    before = bn.running_mean.clone() if bn is not None else None
    m(x).square().mean().backward()
    weight = m.conv.weight if kind == "fbs" else m.weight
    assert weight.grad is not None and weight.grad.abs().sum() > 0
    if kind != "fbs":
        assert m.threshold.grad is not None and m.threshold.grad.abs().sum() > 0
    else:
        assert m.gate.weight.grad.abs().sum() > 0 and m.beta.grad.abs().sum() > 0
    if bn is not None:
        assert not torch.equal(bn.running_mean, before) and int(bn.num_batches_tracked) == 1
        m.eval()
        frozen = bn.running_mean.clone()
        with torch.no_grad():
            m(x)
        assert torch.equal(bn.running_mean, frozen)


def test_unexportable_variants_are_refused_with_a_clear_error():
    from gate2deploy.errors import UserError
    fbs = FBSConv2d(8, 8, 3, padding=1, density=0.5, hidden=4).eval()
    with pytest.raises(UserError, match="hidden layer"):
        capture(fbs, torch.randn(1, 8, 6, 6))
    cg = CGConv2d(8, 8, 3, padding=1).eval()
    with torch.no_grad():
        cg.mask[:, :, 0, 0] = 1 - cg.mask[:, :, 0, 0]  # not constant over the kernel window
    with pytest.raises(UserError, match="varies over the kernel window"):
        capture(cg, torch.randn(1, 8, 6, 6))


def test_gate_report_summarizes_layers_and_scale_modes():
    from gate2deploy.gate_stats import gate_report
    layers = torch.nn.Sequential(make_cg(CONV_CONFIGS[0])[0], torch.nn.ReLU(), make_pg(CONV_CONFIGS[0])[0]).eval()
    x = torch.randn(2, 8, 9, 9)
    report = gate_report(layers, x)
    assert [entry["op"] for entry in report["layers"]] == ["CGConv", "PGConv"]
    assert report["pg_scales"] == {"2": "dynamic"}
    cg, pg = report["layers"]
    s = report["summary"]
    assert s["dense_macs"] == cg["dense_macs"] + pg["dense_macs"]
    assert s["expected_macs"] == pytest.approx(cg["expected_macs"] + pg["expected_macs"])
    assert s["bit_weighted_macs"] == pytest.approx(cg["expected_macs"] + pg["details"]["bit_weighted_macs"])


@pytest.mark.parametrize("op", ["CGConv", "PGConv", "FBSConv"])
def test_schema_shape_inference_matches_onnx_conv(op):
    import onnx
    from onnx import TensorProto, helper

    from gate2deploy import ops
    ops.register_all()
    conv_attrs = dict(strides=[2, 1], pads=[1, 0, 2, 1], dilations=[1, 2])
    extra = {"CGConv": (["base_mask", "threshold"], {}),
             "PGConv": (["threshold"], {"abits": 3, "pred_bits": 2}),
             "FBSConv": (["fc_W", "fc_b", "bn_scale", "bn_shift", "beta"], {"density": 0.5})}[op]
    node = helper.make_node(op, ["X", "W", *extra[0]], ["Y"], domain="gate2deploy", **conv_attrs, **extra[1])
    ref = helper.make_node("Conv", ["X", "W"], ["Yref"], **conv_attrs)
    inputs = [helper.make_tensor_value_info("X", TensorProto.FLOAT, [3, 8, 11, 13]),
              helper.make_tensor_value_info("W", TensorProto.FLOAT, [6, 8, 3, 3])]
    inputs += [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in extra[0]]
    graph = helper.make_graph([node, ref], "g", inputs, [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None),
                                                           helper.make_tensor_value_info("Yref", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), *ops.opset_imports()])
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    dims = {o.name: [d.dim_value for d in o.type.tensor_type.shape.dim] for o in inferred.graph.output}
    assert dims["Y"] == dims["Yref"] == [3, 6, 6, 10]  # (11+1+2-3)//2+1, (13+0+1-5)//1+1


def _single_node_model(op, arrays, attrs, x_shape):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from gate2deploy import ops
    ops.register_all()
    names = list(arrays)
    node = helper.make_node(op, ["input", *names], ["output"], name=op, domain="gate2deploy", **attrs)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, x_shape)],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, None)],
                              initializer=[numpy_helper.from_array(a, n) for n, a in arrays.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), *ops.opset_imports()])
    model.ir_version = 10
    return onnx.shape_inference.infer_shapes(model, strict_mode=True)


@pytest.mark.parametrize("op", ["CGConv", "PGConv", "FBSConv"])
def test_lowering_of_a_bare_node_with_asymmetric_pads_equals_the_reference(op):
    rng = np.random.default_rng(3)
    n, c, o, h = 3, 8, 6, 10
    x = rng.standard_normal((n, c, h, h), dtype=np.float32)
    w = rng.standard_normal((o, c, 3, 3), dtype=np.float32)
    conv = dict(strides=[2, 1], pads=[1, 0, 2, 1], dilations=[1, 2])
    if op == "CGConv":
        base = np.zeros((o, c), np.float32)
        base[:, :2] = 1
        arrays = {"W": w, "base_mask": base, "threshold": rng.uniform(-1, 1, o).astype(np.float32)}
        attrs = conv
        y_ref, gate_ref = R.cg_conv_reference(x, w, base, arrays["threshold"], return_gate=True, **conv)
        decision, thr = R.conv2d(x, w * base[:, :, None, None], conv["strides"], conv["pads"], conv["dilations"]), arrays["threshold"].reshape(1, -1, 1, 1)
    elif op == "PGConv":
        x = np.abs(x)
        arrays = {"W": w, "threshold": rng.uniform(-1, 1, o).astype(np.float32)}
        attrs = dict(conv, abits=4, pred_bits=2, static_scale=0.0, group=1)
        y_ref, gate_ref = R.pg_conv_reference(x, w, arrays["threshold"], 4, 2, 0.0, return_gate=True, **conv)
        x_hb, _, _ = R.pg_split_activations(x, 4, 2)
        decision, thr = R.conv2d(x_hb, w, conv["strides"], conv["pads"], conv["dilations"]), arrays["threshold"].reshape(1, -1, 1, 1)
    else:
        arrays = {"W": w, "fc_W": rng.standard_normal((o, c), dtype=np.float32),
                  "fc_b": rng.standard_normal(o, dtype=np.float32), "bn_scale": rng.uniform(0.5, 2, o).astype(np.float32),
                  "bn_shift": rng.standard_normal(o, dtype=np.float32), "beta": rng.standard_normal(o, dtype=np.float32)}
        attrs = dict(conv, density=0.5, pool="max")
        y_ref, gate_ref = R.fbs_conv_reference(x, *arrays.values(), 0.5, "max", return_gate=True, **conv)
        g = np.maximum(x.max(axis=(2, 3)) @ arrays["fc_W"].T + arrays["fc_b"], 0)
        decision, thr = g, np.sort(g, axis=1)[:, [o - 3 - 1]]
    model = _single_node_model(op, arrays, attrs, list(x.shape))
    lowered = ir.export_model(lower_portable(ir.import_graph(model), expose_gates=True))
    sess = ort.InferenceSession(lowered.SerializeToString(), providers=["CPUExecutionProvider"])
    y, gate = sess.run(None, {"input": x})
    assert y.shape == y_ref.shape
    assert_equal_up_to_ties(y, y_ref, gate, gate_ref, decision, thr, f"{op} bare node")


def test_sample_inputs_rounded_to_float32_say_so(tmp_path, capsys):
    """float64 samples that float32 cannot hold are rounded (the model computes in float32),
    with one warning line giving the count and the largest relative change; samples float32
    holds exactly (small integers, float64 copies of float32 values) convert silently."""
    from gate2deploy.gate_stats import load_sample_inputs
    exact = np.arange(2 * 3 * 4 * 4, dtype=np.int64).reshape(2, 3, 4, 4)
    np.save(tmp_path / "ints.npy", exact)
    np.save(tmp_path / "f32.npy", exact.astype(np.float32).astype(np.float64) / 8)
    for name in ("ints.npy", "f32.npy"):
        load_sample_inputs(tmp_path / name, (1, 3, 4, 4))
        assert capsys.readouterr().err == ""
    data = np.full((1, 3, 4, 4), 1.0, np.float64)
    data[0, 0, 0, :2] = 1.0 + 2.0 ** -30  # between float32's 1 and its next value
    np.save(tmp_path / "f64.npy", data)
    out = load_sample_inputs(tmp_path / "f64.npy", (1, 3, 4, 4))[0]
    assert out[0, 0, 0, 0] == np.float32(1.0)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning: sample inputs") and "2 of 48 float64" in err[0]
    assert "9.3e-10" in err[0]  # 2^-30 / (1 + 2^-30), computed by hand


def test_load_sample_inputs_batches_and_refuses_bad_files(tmp_path):
    from gate2deploy.errors import UserError
    from gate2deploy.gate_stats import load_sample_inputs
    data = np.random.default_rng(0).standard_normal((5, 3, 4, 4)).astype(np.float64)
    np.save(tmp_path / "s.npy", data)
    batches = load_sample_inputs(tmp_path / "s.npy", (2, 3, 4, 4))
    assert [b.shape for b in batches] == [(2, 3, 4, 4)] * 2 and batches[0].dtype == np.float32
    np.testing.assert_array_equal(batches[1], data[2:4].astype(np.float32))
    torch.save(torch.from_numpy(data[0]).float(), tmp_path / "one.pt")
    assert load_sample_inputs(tmp_path / "one.pt", (1, 3, 4, 4))[0].shape == (1, 3, 4, 4)
    with pytest.raises(UserError, match="expected"):
        load_sample_inputs(tmp_path / "s.npy", (1, 3, 8, 8))
    with pytest.raises(UserError, match="fewer than one batch"):
        load_sample_inputs(tmp_path / "s.npy", (8, 3, 4, 4))
    (tmp_path / "bad.npy").write_bytes(b"not numpy")
    with pytest.raises(UserError, match="cannot be read"):
        load_sample_inputs(tmp_path / "bad.npy", (1, 3, 4, 4))
