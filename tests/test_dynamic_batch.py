"""passes/dynamic_batch.py on small hand-built graphs: which shape constants it rewrites, that
the result computes the same function at other batch sizes (numpy written here is the
reference), and that a batch it cannot relax exactly is refused with the node named (and the
pipeline then keeps the static batch, saying why)."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from gate2deploy.capture import IR_VERSION
from gate2deploy.passes.dynamic_batch import BATCH, BatchAxisError, pin_batch, relax_batch


def model(nodes, x_shape, initializers, y_shape=None):
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)],
        [numpy_helper.from_array(v, k) for k, v in initializers.items()])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = IR_VERSION
    return onnx.shape_inference.infer_shapes(m)


def run(m, x):
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


def dim0(vi):
    d = vi.type.tensor_type.shape.dim[0]
    return d.dim_param or d.dim_value


def shape_const(m, node_index):
    name = m.graph.node[node_index].input[1]
    return next(numpy_helper.to_array(i) for i in m.graph.initializer if i.name == name).tolist()


@pytest.mark.parametrize("shape", [[2, -1], [-1, 48]])
def test_flatten_reshape_gets_the_batch_from_its_input(shape):
    w = np.random.default_rng(0).standard_normal((48, 5)).astype(np.float32)
    m = model([helper.make_node("Reshape", ["x", "s"], ["f"]), helper.make_node("MatMul", ["f", "w"], ["y"])],
              [2, 3, 4, 4], {"s": np.array(shape, np.int64), "w": w})
    relaxed = relax_batch(m)
    assert shape_const(relaxed, 0) == [0, shape[1]]  # [N, ...] and [-1, per-sample size] -> 0
    assert dim0(relaxed.graph.input[0]) == BATCH and dim0(relaxed.graph.output[0]) == BATCH
    for b in (1, 2, 5):
        x = np.random.default_rng(b).standard_normal((b, 3, 4, 4)).astype(np.float32)
        np.testing.assert_allclose(run(relaxed, x), x.reshape(b, 48) @ w, rtol=1e-5, atol=1e-5)
    assert [d.dim_value for d in pin_batch(relaxed, 7).graph.output[0].type.tensor_type.shape.dim] == [7, 5]


def test_a_shape_constant_shared_with_another_node_is_copied_not_changed():
    # "s" is the flatten's shape and also an input the graph computes with (its values
    # are added to the output): rewriting it in place would change that sum.
    m = model([helper.make_node("Reshape", ["x", "s"], ["f"]),
               helper.make_node("Cast", ["s"], ["sf"], to=TensorProto.FLOAT),
               helper.make_node("ReduceSum", ["sf"], ["t"], keepdims=0),
               helper.make_node("Add", ["f", "t"], ["y"])],
              [3, 2, 2], {"s": np.array([3, 4], np.int64)})
    relaxed = relax_batch(m)
    x = np.ones((6, 2, 2), np.float32)
    np.testing.assert_array_equal(run(relaxed, x), x.reshape(6, 4) + 7.0)


def test_expand_to_the_captured_batch_becomes_a_broadcast():
    m = model([helper.make_node("Expand", ["x", "s"], ["y"])], [2, 1, 3], {"s": np.array([2, 4, 3], np.int64)})
    relaxed = relax_batch(m)
    assert shape_const(relaxed, 0) == [1, 4, 3]
    x = np.arange(15, dtype=np.float32).reshape(5, 1, 3)
    np.testing.assert_array_equal(run(relaxed, x), np.broadcast_to(x, (5, 4, 3)))


def test_a_constant_with_the_batch_baked_in_is_refused_with_the_node_named():
    c = np.arange(6, dtype=np.float32).reshape(2, 3)  # one row per sample of the captured batch
    m = model([helper.make_node("Add", ["x", "c"], ["y"], name="add_rows")], [2, 3], {"c": c})
    with pytest.raises(BatchAxisError, match="add_rows"):
        relax_batch(m)


def test_pipeline_keeps_the_static_batch_and_says_why():
    from gate2deploy.pipeline import PassContext, _dynamic_batch

    c = np.arange(6, dtype=np.float32).reshape(2, 3)
    m = model([helper.make_node("Add", ["x", "c"], ["y"], name="add_rows")], [2, 3], {"c": c})
    ctx = PassContext(batch_axis=True)
    out = _dynamic_batch(m, ctx)
    assert dim0(out.graph.input[0]) == 2 and "add_rows" in ctx.batch_note
