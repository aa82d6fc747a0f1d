"""The op catalog (gate2deploy/ops.py) against the runtimes that implement it: the native
library's registration (runtimes/native/register_ops.cc), the TensorRT plugin declarations
(runtimes/tensorrt_plugins.py, read as source: TensorRT is not installable here), and, for
every entry with an "ort" kernel, a single-node model built from the entry alone that runs
on the native library and matches the entry's reference implementation."""
import re
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper

from gate2deploy import ops
from gate2deploy.runtimes import reference

RUNTIMES = Path(ops.__file__).resolve().parent.parent / "runtimes"
if not (RUNTIMES / "native").is_dir():  # installed layout: gate2deploy/runtimes
    RUNTIMES = Path(ops.__file__).resolve().parent / "runtimes"


def test_native_registration_matches_the_catalog():
    source = (RUNTIMES / "native" / "register_ops.cc").read_text()
    assert re.findall(r'CustomOpDomain domain\{"(\w+)"\}', source) == [ops.DOMAIN]
    registered = set(re.findall(r'CreateLiteCustomOp<[\w:]+>\(\s*"(\w+)"', source))
    assert registered == {name for name, spec in ops.CATALOG.items() if "ort" in spec.runtimes}


def test_tensorrt_plugins_match_the_catalog():
    from gate2deploy.runtimes import tensorrt_plugins as trt  # plain Python: no TensorRT needed
    assert trt.NAMESPACE == ops.PLUGIN_NAMESPACE == ops.DOMAIN and trt.VERSION == ops.PLUGIN_VERSION
    assert set(trt.PLUGINS) == {name for name, spec in ops.CATALOG.items() if "trt" in spec.runtimes}
    for name, plugin in trt.PLUGINS.items():
        spec = ops.CATALOG[name]
        assert list(plugin.inputs) == [i for i in spec.inputs if not i.endswith("?")], name
        types = {a.name: a.type for a in spec.attributes}
        for attr, kind, _default in plugin.attributes:
            assert types.get(attr) == kind, (name, attr, kind, types.get(attr))
        required = {a.name for a in spec.attributes if a.required}
        assert required <= {a for a, _, d in plugin.attributes if d is trt.REQUIRED}, name


# One example per entry with an "ort" kernel: input shapes and attributes. A new catalog
# entry without one fails test_every_ort_entry_has_an_example.
EXAMPLES = {
    "CGConv": ([(1, 8, 6, 6), (4, 8, 3, 3), (4, 8), (4,)], {"pads": [1, 1, 1, 1]}),
    "PGConv": ([(1, 8, 6, 6), (4, 8, 3, 3), (4,)], {"abits": 4, "pred_bits": 2, "pads": [1, 1, 1, 1]}),
    "FBSConv": ([(1, 8, 6, 6), (4, 8, 3, 3), (4, 8), (4,), (4,), (4,), (4,)], {"density": 0.5}),
    "SparseInputConv": ([(1, 8, 6, 6), (4, 8, 1, 1), (4,)], {}),
    "StreamConv": ([(1, 8, 3, 3), (6, 4, 3, 3), (6,)], {"group": 2, "pads": [1, 1, 1, 1], "activation": "Relu"}),
    "QuantizeActivation": ([(2, 3, 5, 4)], {"levels": 7.0}),
}


def test_every_ort_entry_has_an_example():
    assert set(EXAMPLES) == {n for n, s in ops.CATALOG.items() if "ort" in s.runtimes}


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_single_node_from_the_catalog_runs_natively_and_matches_the_reference(name):
    from gate2deploy.runtimes.ort import open_session
    spec = ops.CATALOG[name]
    shapes, attrs = EXAMPLES[name]
    assert not spec.check_node(helper.make_node(name, [f"i{k}" for k in range(len(shapes))], ["y"], **attrs))
    rng = np.random.default_rng(0)
    arrays = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    if name == "CGConv":
        arrays[2] = (np.arange(8) < 2).astype(np.float32)[None].repeat(4, 0)  # base path: first 2 channels
    inputs = [i.rstrip("?") for i in spec.inputs][:len(shapes)]
    node = helper.make_node(name, inputs, ["Y"], domain=ops.DOMAIN, **attrs)
    graph = helper.make_graph([node], name, [helper.make_tensor_value_info(inputs[0], TensorProto.FLOAT, shapes[0])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
                              [helper.make_tensor(n, TensorProto.FLOAT, a.shape, a.ravel())
                               for n, a in zip(inputs[1:], arrays[1:])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), *ops.opset_imports()])
    model.ir_version = ops.IR_VERSION
    got = open_session(model).run(None, {inputs[0]: arrays[0]})[0]
    expected = getattr(reference, spec.reference)(*arrays, **attrs)
    assert np.isfinite(got).all() and got.shape == expected.shape
    assert np.abs(got - expected).max() <= 1e-5 * max(np.abs(expected).max(), 1.0)


def test_check_node_reports_unknown_and_mistyped_attributes():
    spec = ops.CATALOG["PGConv"]
    node = helper.make_node("PGConv", ["x", "w", "t"], ["y"], abits=4.0, kernel_shape=[3, 3])
    problems = spec.check_node(node)
    assert "unknown attribute 'kernel_shape'" in problems
    assert "attribute 'abits' must be INT, not FLOAT" in problems and "missing attribute 'pred_bits'" in problems
