"""passes/fuse_gated_epilogue.py: a BatchNormalization (+ Relu) after CGConv / PGConv becomes
the gated node's epilogue.

Small graphs check the pattern's edges and that the fused graph computes what the unfused one
does under the native kernels; the whole seed ResNet-20s (every gated conv fused, each layer
verified against PyTorch) are in test_dnn_gating_import.py.
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs
import pytest

from gate2deploy.capture import IR_VERSION
from gate2deploy.passes import ir
from gate2deploy.passes.fuse_gated_epilogue import fuse_gated_epilogue
from gate2deploy.passes.lower_portable import lower_portable
from gate2deploy.runtimes.ort import open_session


def gated_then_bn(op: str, case: str = "bn_relu"):
    """x -> CGConv|PGConv -> BatchNormalization -> [Relu ->] y; returns the graph."""
    rng = np.random.default_rng(0)
    o, c = 16, 8
    x = gs.Variable("x", np.float32, (2, c, 7, 7))
    w = rng.standard_normal((o, c, 3, 3)).astype(np.float32)
    if op == "PGConv":  # on the 8-bit grid, as the exporter leaves it
        s = np.abs(w).max()
        w = (np.round(np.abs(w) / s * 255) / 255 * s * np.sign(w)).astype(np.float32)
        inputs = [x, gs.Constant("w", w), gs.Constant("thr", np.full(o, 0.5, np.float32))]
        attrs = {"abits": 8, "pred_bits": 4, "pads": [1, 1, 1, 1]}
    else:
        mask = np.zeros((o, c), np.float32)
        mask[:, :2] = 1
        inputs = [x, gs.Constant("w", w), gs.Constant("mask", mask),
                  gs.Constant("thr", np.full(o, 0.2, np.float32))]
        attrs = {"pads": [1, 1, 1, 1]}
    h = gs.Variable("h", np.float32, (2, o, 7, 7))
    nodes = [gs.Node(op, "gated", attrs, inputs=inputs, outputs=[h], domain="gate2deploy")]
    params = [rng.uniform(0.5, 2, o), rng.standard_normal(o), rng.standard_normal(o) * 0.1,
              rng.uniform(0.5, 2, o)]
    bn_params = ([gs.Variable("bn_scale", np.float32, (o,))] if case == "params_not_constant"
                 else [gs.Constant("bn_scale", params[0].astype(np.float32))])
    bn_params += [gs.Constant(n, p.astype(np.float32)) for n, p in zip(("bn_b", "bn_mean", "bn_var"), params[1:])]
    b = gs.Variable("b", np.float32, (2, o, 7, 7))
    bn_attrs = {"epsilon": 1e-3, **({"training_mode": 1} if case == "training_mode" else {})}
    nodes.append(gs.Node("BatchNormalization", "bn", bn_attrs, inputs=[h, *bn_params], outputs=[b]))
    outputs = [b]
    if case in ("bn_relu", "gated_output_also_read", "gated_output_is_graph_output"):
        y = gs.Variable("y", np.float32, (2, o, 7, 7))
        nodes.append(gs.Node("Relu", "relu", inputs=[b], outputs=[y]))
        outputs = [y]
    if case == "gated_output_also_read":
        z = gs.Variable("z", np.float32, (2, o, 7, 7))
        nodes.append(gs.Node("Neg", "neg", inputs=[h], outputs=[z]))
        outputs.append(z)
    if case == "gated_output_is_graph_output":
        outputs.append(h)
    graph_inputs = [x] + ([bn_params[0]] if case == "params_not_constant" else [])
    return gs.Graph(nodes=nodes, inputs=graph_inputs, outputs=outputs, opset=17)


def run(graph: gs.Graph, x: np.ndarray) -> np.ndarray:
    model = ir.export_model(graph)
    model.ir_version = IR_VERSION
    return open_session(model, threads=2).run(None, {"x": x})[0]


@pytest.mark.parametrize("op", ["CGConv", "PGConv"])
@pytest.mark.parametrize("case", ["bn_relu", "bn_only"])
def test_batchnorm_and_relu_become_the_epilogue(op, case):
    graph = gated_then_bn(op, case)
    x = np.random.default_rng(1).standard_normal((2, 8, 7, 7)).astype(np.float32)
    expected = run(gated_then_bn(op, case), x)
    assert fuse_gated_epilogue(graph) == ["gated"]
    (node,) = graph.nodes
    assert node.op == op and node.outputs[0].name == ("y" if case == "bn_relu" else "b")
    assert node.attrs.get("activation", "") == ("Relu" if case == "bn_relu" else "")
    assert [t.name for t in node.inputs[-2:]] == ["gated/post_scale", "gated/post_shift"]
    got = run(graph, x)
    scale = np.abs(expected).max()
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5 * scale)
    # The portable lowering expands the epilogue again: same function without the library.
    lowered = lower_portable(graph.copy())
    assert not [n for n in lowered.nodes if n.domain == "gate2deploy"]
    model = ir.export_model(lowered)
    model.ir_version = IR_VERSION
    import onnxruntime as ort
    plain = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(plain.run(None, {"x": x})[0], expected, rtol=0, atol=1e-4 * scale)


@pytest.mark.parametrize("case", ["gated_output_also_read", "gated_output_is_graph_output",
                                  "params_not_constant", "training_mode"])
def test_batchnorm_that_cannot_be_folded_is_left_alone(case):
    graph = gated_then_bn("PGConv", case)
    before = [(n.op, [t.name for t in n.inputs], [t.name for t in n.outputs]) for n in graph.nodes]
    assert fuse_gated_epilogue(graph) == []
    assert [(n.op, [t.name for t in n.inputs], [t.name for t in n.outputs]) for n in graph.nodes] == before


# --- The clamp and the quantizer (the PG ResNet-20's PACT Min and the next conv's quantizer) ---

def gated_then_chain(op: str, chain: tuple[str, ...], batch_scales=(1.0, 3.0), clip=6.0, min_first=False,
                     levels=7.0, scale=0.0):
    """x -> CGConv|PGConv -> the steps of `chain` ("bn", "relu", "min", "quantize") -> y, as
    the seed's PG ResNet-20 exports them (a Relu then Min(., 6) then the fused quantizer of the
    next conv). Returns (graph, x): x's samples scaled by batch_scales, so that a quantizer
    scale taken per sample, not over the batch, changes the output."""
    graph = gated_then_bn(op, "bn_only")
    gated, bn = graph.nodes
    v = gated.outputs[0]
    nodes = [gated]
    if "bn" in chain:
        nodes.append(bn)
        v = bn.outputs[0]
    else:
        bn.inputs.clear()
        bn.outputs.clear()

    def add(op_type, inputs, attrs=None, domain=None):
        out = gs.Variable(f"{op_type}_out", np.float32, v.shape)
        nodes.append(gs.Node(op_type, op_type.lower(), attrs or {}, inputs=inputs, outputs=[out], domain=domain))
        return out
    if "relu" in chain:
        v = add("Relu", [v])
    if "min" in chain:
        c = gs.Constant("clip", np.array([clip], np.float32))
        v = add("Min", [c, v] if min_first else [v, c])
    if "quantize" in chain:
        v = add("QuantizeActivation", [v], {"levels": levels, "eps": 1e-7, **({"scale": scale} if scale else {})},
                domain="gate2deploy")
    x = np.random.default_rng(1).standard_normal((len(batch_scales), 8, 7, 7)).astype(np.float32)
    x *= np.asarray(batch_scales, np.float32)[:, None, None, None]
    return gs.Graph(nodes=nodes, inputs=[graph.inputs[0]], outputs=[v], opset=17), x


FULL_CHAIN = ("bn", "relu", "min", "quantize")


@pytest.mark.parametrize("op", ["CGConv", "PGConv"])
@pytest.mark.parametrize("chain,min_first,scale", [(FULL_CHAIN, False, 0.0), (FULL_CHAIN, True, 2.5),
                                                   (("relu", "min"), False, 0.0), (("min", "quantize"), False, 0.0),
                                                   (("quantize",), False, 0.0)])
def test_clamp_and_quantizer_join_the_epilogue(op, chain, min_first, scale):
    """Fused, the node computes bit for bit what the separate nodes compute (ONNX Runtime's
    Min, the QuantizeActivation kernel whose own tests hold it to the seed's chain), with the
    quantizer's dynamic scale over the whole batch; the portable lowering expands it again."""
    graph, x = gated_then_chain(op, chain, min_first=min_first, scale=scale)
    expected = run(gated_then_chain(op, chain, min_first=min_first, scale=scale)[0], x)
    assert fuse_gated_epilogue(graph) == ["gated"]
    (node,) = graph.nodes
    assert node.op == op and node.outputs[0].name == graph.outputs[0].name
    assert node.attrs.get("clip_max") == (6.0 if "min" in chain else None)
    assert node.attrs.get("quantize_levels") == (7.0 if "quantize" in chain else None)
    assert node.attrs.get("quantize_scale") == (scale if scale else None)
    got = run(graph, x)
    np.testing.assert_array_equal(got, expected)
    if "quantize" in chain:  # a whole-batch scale: the small sample keeps levels below the top
        assert len(np.unique(got[0])) > 2
    lowered = lower_portable(graph.copy())
    assert not [n for n in lowered.nodes if n.domain == "gate2deploy"]
    model = ir.export_model(lowered)
    model.ir_version = IR_VERSION
    import onnxruntime as ort
    plain = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    lowered_y = plain.run(None, {"x": x})[0]
    # Same function up to the convs' summation order: a quantized element may move by one
    # level where its input sits half-way between two; few do.
    step = np.abs(expected).max() / 7 if "quantize" in chain else 0.0
    far = np.abs(lowered_y - expected) > 1e-4 * np.abs(expected).max()
    assert far.mean() <= 0.002 and np.abs(lowered_y - expected).max() <= step + 1e-4 * np.abs(expected).max()


@pytest.mark.parametrize("op", ["CGConv", "PGConv"])
def test_fused_epilogue_matches_the_reference(op):
    """The native fused epilogue against runtimes/reference.py (numpy) on a single node with
    every step, at batch 2: equal up to float rounding of the convs, a quantized element off
    by one level only where the reference's quantizer input is at a rounding tie."""
    from gate2deploy.runtimes import reference
    graph, x = gated_then_chain(op, FULL_CHAIN)
    assert fuse_gated_epilogue(graph) == ["gated"]
    (node,) = graph.nodes
    got = run(graph, x)
    consts = [ir.const_value(t) for t in node.inputs[1:]]
    attrs = {k: v for k, v in node.attrs.items() if k != "pads"}
    kw = dict(pads=node.attrs["pads"], post_scale=consts[-2], post_shift=consts[-1], **attrs)
    if op == "CGConv":
        expected = reference.cg_conv_reference(x, *consts[:3], **kw)
        pre = reference.cg_conv_reference(x, *consts[:3], **{**kw, "quantize_levels": None})
    else:
        kw.pop("abits"), kw.pop("pred_bits")
        expected = reference.pg_conv_reference(x, *consts[:2], node.attrs["abits"], node.attrs["pred_bits"], **kw)
        pre = reference.pg_conv_reference(x, *consts[:2], node.attrs["abits"], node.attrs["pred_bits"],
                                          **{**kw, "quantize_levels": None})
    s = np.abs(pre).max() + np.float32(1e-7)
    r = np.clip(np.abs(pre) / s, 0, 1) * 7
    at_tie = np.abs(r - np.floor(r) - 0.5) < 1e-4
    differs = np.abs(got - expected) > 1e-5 * np.abs(expected).max()
    assert not (differs & ~at_tie).any() and np.abs(got - expected).max() <= s / 7 * 1.001


def test_clamp_propagates_nan_as_onnx_min():
    """A NaN in X: the fused node's NaN positions are those of the separate nodes (ONNX Min
    keeps NaN; a clamp written min(c, v) would replace it by c)."""
    graph, x = gated_then_chain("CGConv", ("bn", "relu", "min"))
    x[0, 3, 2, 2] = np.nan
    expected = run(gated_then_chain("CGConv", ("bn", "relu", "min"))[0], x)
    assert np.isnan(expected).any()
    assert fuse_gated_epilogue(graph) == ["gated"]
    np.testing.assert_array_equal(run(graph, x), expected)


@pytest.mark.parametrize("case", ["nan_bound", "bound_widens_the_shape", "bound_not_constant", "min_read_elsewhere"])
def test_clamp_that_cannot_be_fused_stops_the_chain(case):
    graph, _ = gated_then_chain("PGConv", FULL_CHAIN, clip=np.nan if case == "nan_bound" else 6.0)
    (minimum,) = [n for n in graph.nodes if n.op == "Min"]
    if case == "bound_widens_the_shape":
        minimum.inputs[1] = gs.Constant("clip5", np.full((1, 1, 1, 1, 1), 6.0, np.float32))
    if case == "bound_not_constant":
        bound = gs.Variable("bound", np.float32, (1,))
        minimum.inputs[1] = bound
        graph.inputs.append(bound)
    if case == "min_read_elsewhere":
        graph.outputs.append(minimum.inputs[0])
    assert fuse_gated_epilogue(graph) == ["gated"]
    fused = graph.nodes[0]
    assert fused.attrs["activation"] == "Relu" and "clip_max" not in fused.attrs
    assert "quantize_levels" not in fused.attrs
    assert [n.op for n in graph.nodes] == ["PGConv", "Min", "QuantizeActivation"]


def test_quantizer_whose_input_is_read_elsewhere_stays():
    graph, _ = gated_then_chain("PGConv", FULL_CHAIN)
    (minimum,) = [n for n in graph.nodes if n.op == "Min"]
    graph.outputs.append(minimum.outputs[0])
    assert fuse_gated_epilogue(graph) == ["gated"]
    assert graph.nodes[0].attrs["clip_max"] == 6.0 and "quantize_levels" not in graph.nodes[0].attrs
    assert [n.op for n in graph.nodes] == ["PGConv", "QuantizeActivation"]


@pytest.mark.parametrize("attrs,message", [({"clip_max": float("nan")}, "clip_max must not be NaN"),
                                           ({"quantize_scale": 1.0}, "need quantize_levels"),
                                           ({"quantize_levels": 0.5}, "quantize_levels must be finite and >= 1"),
                                           ({"quantize_levels": 7.0, "quantize_eps": -1.0},
                                            "quantize_eps must be finite and >= 0")])
def test_bad_epilogue_attributes_are_refused_by_name(attrs, message):
    graph, x = gated_then_chain("PGConv", ())
    graph.nodes[0].attrs.update(attrs)
    with pytest.raises(Exception, match=message):
        run(graph, x)


def test_dense_twin_runs_the_epilogue_as_nodes():
    """gate2deploy.kernel_choice.dense_twin: the fused epilogue back as nodes after a plain
    Conv; with every CG gate on (Y = conv(X, W)) the twin computes the gated node's function."""
    from gate2deploy.kernel_choice import dense_twin
    graph, x = gated_then_chain("CGConv", ("bn", "relu", "min"))
    graph.nodes[0].inputs[3] = gs.Constant("thr_low", np.full(16, -1e9, np.float32))  # all on
    assert fuse_gated_epilogue(graph) == ["gated"]
    model = ir.export_model(graph)
    model.ir_version = IR_VERSION
    twin = dense_twin(model)
    assert [n.op_type for n in twin.graph.node] == ["Conv", "Mul", "Add", "Relu", "Min"]
    import onnxruntime as ort
    y_twin = ort.InferenceSession(twin.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    y_gated = run(graph, x)
    np.testing.assert_allclose(y_twin, y_gated, rtol=0, atol=1e-5 * np.abs(y_gated).max())


def test_verification_takes_a_quantizer_rounding_tie_for_a_tie():
    """gate2deploy.gated_verify: with a fused quantizer, an element whose quantizer input sits
    half-way between two levels may round either way under a different summation order (a
    whole level apart), so the layer check excuses it like a gate at its threshold; elsewhere
    it does not. Levels 7, static scale 7: the quantizer input v is at level v exactly."""
    from gate2deploy.gated_verify import _Epilogue
    epilogue = _Epilogue("y", None, None, "", {"quantize_levels": 7.0, "quantize_scale": 7.0})
    y = np.array([2.5, 2.5 + 4e-6, 2.5 + 1e-3, 3.0, -4.5, 0.2], np.float32).reshape(1, 1, 1, 6)
    ties = epilogue.quantizer_ties(y, band=1e-6)
    np.testing.assert_array_equal(ties.ravel(), [True, True, False, False, True, False])
    assert epilogue.quantizer_ties(y, band=0.0).ravel().tolist() == [True, False, False, False, True, False]
    assert _Epilogue("y", None, None, "Relu", {}).quantizer_ties(y, 1e-6) is None
