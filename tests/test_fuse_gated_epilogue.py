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
