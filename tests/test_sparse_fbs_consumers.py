"""passes/sparse_fbs_consumers.py: which convs after an FBS layer become SparseInputConv.

The positive case on a whole network (FBS ResNet-18, 8 rewritten convs, outputs equal to
PyTorch under the native kernels) is in test_dnn_gating_import.py; here, small graphs check
the pattern's edges: what must not be rewritten, and that a bias-less conv gets a zero bias.
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs
import pytest

from gate2deploy.passes.sparse_fbs_consumers import sparse_fbs_consumers


def fbs_then(consumer: str, group: int = 1, bias: bool = True, weight_is_input: bool = False):
    """x -> FBSConv -> [MaxPool ->] Conv -> y; returns (graph, the Conv node)."""
    rng = np.random.default_rng(0)
    x = gs.Variable("x", np.float32, (1, 8, 6, 6))
    w1 = gs.Constant("w1", rng.standard_normal((8, 8, 3, 3)).astype(np.float32))
    fbs_params = [gs.Constant(n, rng.standard_normal(s).astype(np.float32))
                  for n, s in [("fc_w", (8, 8)), ("fc_b", (8,)), ("bs", (8,)), ("bh", (8,)), ("be", (8,))]]
    h = gs.Variable("h", np.float32)
    nodes = [gs.Node("FBSConv", "fbs", {"density": 0.5, "pads": [1, 1, 1, 1]},
                     inputs=[x, w1, *fbs_params], outputs=[h], domain="gate2deploy")]
    if consumer == "through_maxpool":
        pooled = gs.Variable("pooled", np.float32)
        nodes.append(gs.Node("MaxPool", "pool", {"kernel_shape": [2, 2]}, inputs=[h], outputs=[pooled]))
        h = pooled
    w2 = (gs.Variable("w2", np.float32, (8, 8 // group, 3, 3)) if weight_is_input else
          gs.Constant("w2", rng.standard_normal((8, 8 // group, 3, 3)).astype(np.float32)))
    inputs = [h, w2] + ([gs.Constant("b2", rng.standard_normal(8).astype(np.float32))] if bias else [])
    y = gs.Variable("y", np.float32)
    conv = gs.Node("Conv", "conv", {"group": group, "pads": [1, 1, 1, 1], "kernel_shape": [3, 3]},
                   inputs=inputs, outputs=[y])
    nodes.append(conv)
    graph_inputs = [x] + ([w2] if weight_is_input else [])
    return gs.Graph(nodes=nodes, inputs=graph_inputs, outputs=[y]), conv


def test_residual_add_and_relu_after_the_conv_are_fused():
    graph, conv = fbs_then("direct")
    y = conv.outputs[0]
    graph.outputs = []
    shortcut = gs.Variable("shortcut", np.float32, (1, 8, 6, 6))
    y.shape = (1, 8, 6, 6)
    s, out = gs.Variable("s", np.float32, (1, 8, 6, 6)), gs.Variable("out", np.float32, (1, 8, 6, 6))
    graph.inputs.append(shortcut)
    graph.nodes += [gs.Node("Add", "add", inputs=[shortcut, y], outputs=[s]),
                    gs.Node("Relu", "relu", inputs=[s], outputs=[out])]
    graph.outputs = [out]
    assert sparse_fbs_consumers(graph) == ["conv"]
    assert conv.attrs["activation"] == "Relu" and conv.inputs[3] is shortcut and conv.outputs == [out]
    assert [n.op for n in graph.nodes] == ["FBSConv", "SparseInputConv"]


def test_add_with_a_second_reader_or_a_broadcast_operand_is_not_fused():
    for case in ("two_readers", "broadcast"):
        graph, conv = fbs_then("direct")
        y = conv.outputs[0]
        y.shape = (1, 8, 6, 6)
        other = gs.Variable("other", np.float32, (1, 8, 1, 1) if case == "broadcast" else (1, 8, 6, 6))
        s = gs.Variable("s", np.float32, (1, 8, 6, 6))
        graph.inputs.append(other)
        graph.nodes.append(gs.Node("Add", "add", inputs=[y, other], outputs=[s]))
        graph.outputs = [s] + ([y] if case == "two_readers" else [])
        assert sparse_fbs_consumers(graph) == ["conv"]
        assert "activation" not in conv.attrs and len(conv.inputs) == 3 and conv.outputs == [y]


def test_direct_consumer_is_rewritten_with_the_same_tensors_and_attributes():
    graph, conv = fbs_then("direct")
    x, w, b, y = conv.inputs[0], conv.inputs[1], conv.inputs[2], conv.outputs[0]
    assert sparse_fbs_consumers(graph) == ["conv"]
    assert (conv.op, conv.domain) == ("SparseInputConv", "gate2deploy")
    assert conv.inputs == [x, w, b] and conv.outputs == [y]
    assert conv.attrs == {"pads": [1, 1, 1, 1]}


def test_bias_less_conv_gets_a_zero_bias():
    graph, conv = fbs_then("direct", bias=False)
    assert sparse_fbs_consumers(graph) == ["conv"]
    assert conv.inputs[2].values.shape == (8,) and not conv.inputs[2].values.any()


@pytest.mark.parametrize("case", ["through_maxpool", "grouped", "weight_is_a_graph_input"])
def test_other_convs_are_left_alone(case):
    graph, conv = fbs_then("through_maxpool" if case == "through_maxpool" else "direct",
                           group=2 if case == "grouped" else 1,
                           weight_is_input=case == "weight_is_a_graph_input")
    assert sparse_fbs_consumers(graph) == []
    assert (conv.op, conv.domain) in {("Conv", ""), ("Conv", None)}


@pytest.mark.parametrize("residual,activation", [(False, ""), (True, ""), (True, "Relu"), (False, "Relu")])
def test_lowering_back_to_standard_ops_is_the_reference(residual, activation):
    """passes/lower_portable.py lowers SparseInputConv (the measured kernel choice keeps the
    plain Conv where it is faster) to Conv [+ Add R] [+ Relu]; on stock ONNX Runtime it matches
    runtimes/reference.py's sparse_input_conv_reference (written from OPS.md) on an input with
    zero channels, stride 2 and asymmetric pads, and no gate2deploy node is left."""
    from gate2deploy.capture import IR_VERSION
    from gate2deploy.passes import ir
    from gate2deploy.passes.lower_portable import lower_portable
    from gate2deploy.runtimes import reference as ref
    from gate2deploy.runtimes.ort import open_session

    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 6, 9, 8)).astype(np.float32)
    x[:, [1, 4]] = 0.0  # channels an FBS layer switched off
    w = rng.standard_normal((5, 6, 3, 3)).astype(np.float32)
    b = rng.standard_normal(5).astype(np.float32)
    attrs = {"strides": [2, 1], "pads": [1, 0, 0, 1], "dilations": [1, 1]}
    y_ref = ref.sparse_input_conv_reference(x, w, b, attrs["strides"], attrs["pads"], attrs["dilations"])
    r = rng.standard_normal(y_ref.shape).astype(np.float32)
    expected = ref.sparse_input_conv_reference(x, w, b, attrs["strides"], attrs["pads"], attrs["dilations"],
                                               residual=r if residual else None,
                                               activation=activation or None)
    xv, rv, yv = gs.Variable("x", np.float32, x.shape), gs.Variable("r", np.float32, r.shape), gs.Variable("y", np.float32)
    inputs = [xv, gs.Constant("w", w), gs.Constant("b", b)] + ([rv] if residual else [])
    node = gs.Node("SparseInputConv", "sic", {**attrs, "activation": activation}, inputs=inputs,
                   outputs=[yv], domain="gate2deploy")
    graph = gs.Graph(nodes=[node], inputs=[xv] + ([rv] if residual else []), outputs=[yv], opset=17)
    lowered = lower_portable(graph, only={"sic"})
    assert not [n for n in lowered.nodes if n.domain == "gate2deploy"]
    model = ir.export_model(lowered)
    model.ir_version = IR_VERSION
    feeds = {"x": x, **({"r": r} if residual else {})}
    got = open_session(model, custom_ops=False).run(None, feeds)[0]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
