"""TensorRT AOT plugins (runtimes/tensorrt_aot.py) without TensorRT: the lowered model.trt.onnx
run with every plugin node launched as TensorRT's AOT path would launch it, the kernels
compiled the way the AOT implementation compiles them, and the CLI's `--plugins`.

Expected values: the PyTorch model (tests/models/gated_tiny.py, at the batch that is run) for
the whole lowered graph, and runtimes/reference.py (the op specification, written separately
from the kernels and from the lowering) for single gated nodes with the attributes the tiny
model does not reach (a base mask with channels base for some outputs only, a static PG scale
and groups, FBS with every channel on, max / l2 pools with pool padding, no ReLU). The plugin
nodes run through `tensorrt_aot.launch`: the kernel, grid and (inputs, int32 extras, outputs)
argument order of `aot_launch`, which is what the AOT implementation hands TensorRT, on
Triton's CPU interpreter. The order TensorRT uses (input pointers, extra scalars, output
pointers) is TensorRT's AOT plugin convention (NVIDIA/TensorRT samples/python/
quickly_deployable_plugins/qdp_defs.py: circ_pad_plugin_aot_impl's kernel signature).
No TensorRT ran here: what TensorRT does with the PTX is unchecked.
"""
from __future__ import annotations

import importlib
import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from gate2deploy.errors import UserError
from gate2deploy.runtimes import reference as ref
from gate2deploy.runtimes import tensorrt_aot as aot

from test_tensorrt_export import TINY, run_cli, tiny_ckpt, tiny_model  # noqa: F401 - tiny_ckpt: a fixture

HERE = Path(__file__).parent


def run_lowered(model: onnx.ModelProto, feeds: dict) -> list:
    """The lowered model with every AOT plugin node launched through tensorrt_aot.launch (the
    AOT launch: kernel, grid, argument order) and the standard ops on onnx's evaluator."""
    return aot.evaluate_lowered(model, feeds)


@pytest.fixture(scope="module")
def tiny_trt(tmp_path_factory):
    out = tmp_path_factory.mktemp("aot")
    ckpt = out / "tiny.pth"
    torch.save(tiny_model().state_dict(), ckpt)
    code, _, err = run_cli("export", ckpt, "--model", TINY, "--input-shape", "1,3,8,8", "--target", "trt",
                           "-o", out / "model.engine", "--physical-widths", "exact", "--plugins", "jit")
    assert code in (0, 3), err
    return out


def test_lowering_replaces_every_gated_node_by_one_kernel_plugins(tiny_trt):
    model = onnx.load(str(tiny_trt / "model.trt.onnx"))
    lowered = aot.lower_for_aot(model)
    ops = [n.op_type for n in lowered.graph.node if n.domain == aot.PLUGIN_NAMESPACE]
    assert sorted(ops) == ["CGConvPlanned", "FBSConvSlots", "PGConvParts", "PGSplit"]
    for node in lowered.graph.node:
        if node.domain == aot.PLUGIN_NAMESPACE:
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            assert attrs["aot"] == 1 and attrs["plugin_namespace"] == b"gate2deploy"
            declared = {name for name, _, _ in aot.AOT_PLUGINS[node.op_type].attributes}
            assert set(attrs) - {"aot", "plugin_namespace", "plugin_version"} <= declared
            assert len(node.input) == len(aot.AOT_PLUGINS[node.op_type].inputs)
    onnx.checker.check_model(lowered)  # every tensor defined, no dangling constant
    used = {i for n in lowered.graph.node for i in n.input}
    assert all(t.name in used for t in lowered.graph.initializer)


@pytest.mark.parametrize("batch", [1, 8])
def test_lowered_model_equals_pytorch(triton_interpreted, tiny_trt, batch):
    """The whole lowered graph (standard ops + AOT plugins as launched for TensorRT) against the
    PyTorch model on the same batch (PG's scale is over the whole batch, as in the seed)."""
    lowered = aot.lower_for_aot(onnx.load(str(tiny_trt / "model.trt.onnx")))
    x = np.random.default_rng(batch).standard_normal((batch, 3, 8, 8)).astype(np.float32)
    (y,) = run_lowered(lowered, {lowered.graph.input[0].name: x})
    with torch.no_grad():
        y_ref = tiny_model()(torch.from_numpy(x)).numpy()
    assert y.shape == y_ref.shape
    assert np.max(np.abs(y - y_ref)) <= 1e-4 * np.max(np.abs(y_ref))


def single_node_model(op: str, x_shape, inputs: dict, **attrs) -> onnx.ModelProto:
    """A model.trt.onnx-like graph of one gated node: X an input, the rest initializers."""
    names = ["X", *inputs]
    node = helper.make_node(op, names, ["Y"], domain="gate2deploy", name=f"{op}_0", **attrs)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT, x_shape)],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in inputs.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("gate2deploy", 1)])


def close(y, y_ref):
    return np.max(np.abs(y - y_ref)) <= 1e-4 * max(np.max(np.abs(y_ref)), 1e-30)


GEOMETRY = {"strides": [2, 1], "pads": [1, 0, 0, 1], "dilations": [1, 2]}


def test_cg_node_with_a_ragged_mask_equals_the_reference(triton_interpreted):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 6, 7, 9)).astype(np.float32)
    w = rng.standard_normal((5, 6, 3, 3)).astype(np.float32)
    mask = (rng.random((5, 6)) < 0.4).astype(np.float32)  # a channel is base for some outputs only
    mask[:, 0] = 1
    yp = ref.conv2d(x, w * mask[:, :, None, None], GEOMETRY["strides"], GEOMETRY["pads"], GEOMETRY["dilations"])
    thr = np.quantile(yp, 0.7, axis=(0, 2, 3)).astype(np.float32)
    model = single_node_model("CGConv", x.shape, {"W": w, "base_mask": mask, "threshold": thr}, **GEOMETRY)
    lowered = aot.lower_for_aot(model)
    (y,) = run_lowered(lowered, {"X": x})
    assert close(y, ref.cg_conv_reference(x, w, mask, thr, **GEOMETRY))


@pytest.mark.parametrize("static_scale", [0.0, 1.7])
def test_pg_node_with_groups_and_static_scale_equals_the_reference(triton_interpreted, static_scale):
    rng = np.random.default_rng(1)
    x = np.abs(rng.standard_normal((3, 4, 6, 6))).astype(np.float32)
    w = np.round(rng.standard_normal((6, 2, 3, 3)) * 8).astype(np.float32) / 8
    parts = ref.pg_split_activations(x, 6, 3, static_scale)
    msb = ref.conv2d(parts[0], w, (1, 1), (1, 1, 1, 1), (1, 1), 2)
    thr = (np.quantile(msb, 0.6, axis=(0, 2, 3)) + 1e-3).astype(np.float32)
    model = single_node_model("PGConv", x.shape, {"W": w, "threshold": thr}, abits=6, pred_bits=3,
                              static_scale=static_scale, group=2, strides=[1, 1], pads=[1, 1, 1, 1], dilations=[1, 1])
    (y,) = run_lowered(aot.lower_for_aot(model), {"X": x})
    y_ref = ref.pg_conv_reference(x, w, thr, 6, 3, static_scale, (1, 1), (1, 1, 1, 1), (1, 1), 2)
    assert close(y, y_ref)


@pytest.mark.parametrize("density,pool,activation", [(1.0, "max", "Identity"), (0.4, "l2", "Relu"),
                                                     (0.25, "avg", "Relu")])
def test_fbs_node_equals_the_reference(triton_interpreted, density, pool, activation):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((3, 5, 6, 6)).astype(np.float32)
    o = 9
    w = rng.standard_normal((o, 5, 3, 3)).astype(np.float32)
    fc_w, fc_b = rng.standard_normal((o, 5)).astype(np.float32), rng.standard_normal(o).astype(np.float32)
    sc, sh, be = (rng.standard_normal(o).astype(np.float32) for _ in range(3))
    pool_pads = [1, 0, 2, 1]
    model = single_node_model("FBSConv", x.shape, {"W": w, "fc_W": fc_w, "fc_b": fc_b, "bn_scale": sc,
                                                   "bn_shift": sh, "beta": be},
                              density=density, pool=pool, activation=activation, pool_pads=pool_pads,
                              strides=[1, 1], pads=[1, 1, 1, 1], dilations=[1, 1])
    (y,) = run_lowered(aot.lower_for_aot(model), {"X": x})
    y_ref, active = ref.fbs_conv_reference(x, w, fc_w, fc_b, sc, sh, be, density, pool, (1, 1), (1, 1, 1, 1),
                                           (1, 1), True, activation, pool_pads)
    assert 0 < active.sum() and (density == 1.0) == active.all()
    assert close(y, y_ref)
    assert np.all(y[~active] == 0)  # inactive channels written as zeros by the one kernel


def test_non_constant_weights_are_refused_by_name():
    model = single_node_model("CGConv", (1, 2, 4, 4), {"base_mask": np.ones((2, 2)), "threshold": np.zeros(2)})
    model.graph.node[0].input.insert(1, "W_runtime")
    model.graph.input.append(helper.make_tensor_value_info("W_runtime", TensorProto.FLOAT, (2, 2, 3, 3)))
    with pytest.raises(UserError, match="W .*not a constant"):
        aot.lower_for_aot(model)


def test_launch_order_is_inputs_then_int32_extras_then_outputs():
    """Every AOT kernel's signature: the plugin's inputs as its first pointers (in order), then
    int32 scalars only, then the outputs' pointers (TensorRT's AOT launch order)."""
    pytest.importorskip("triton")
    shapes = {"CGConvPlanned": {"X": (2, 6, 7, 9), "W1": (5, 3, 3, 6)},
              "PGSplit": {"X": (2, 4, 6, 6)},
              "PGConvParts": {"MSB": (2, 4, 6, 6), "W": (6, 3, 3, 2)},
              "FBSConvSlots": {"X": (2, 5, 6, 6), "W": (9, 3, 3, 5), "slots": (2, 9)}}
    attrs = {"PGConvParts": {"group": 2, "pads": (1, 1, 1, 1)}, "FBSConvSlots": {"pads": (1, 1, 1, 1)}}
    for op, spec in aot.AOT_PLUGINS.items():
        plan = aot.aot_launch(op, shapes[op], attrs.get(op, {}))
        args = [(a, t) for a, t in plan.signature if isinstance(t, str)]
        kinds = ["ptr" if t.startswith("*") else t for _, t in args]
        n_in, n_out = len(spec.inputs), len(spec.outputs)
        assert kinds[:n_in] == ["ptr"] * n_in and kinds[-n_out:] == ["ptr"] * n_out
        assert set(kinds[n_in:-n_out]) == {"i32"} and len(plan.extras) == len(kinds) - n_in - n_out
        assert all(int(g) >= 1 for g in plan.grid)
    # the FBS kernel zero-fills invalid slots in this launch (no memset before an AOT kernel)
    assert aot.aot_launch("FBSConvSlots", shapes["FBSConvSlots"], {}).constexprs["ZERO_INVALID"] == 1


class Expr:
    """A stand-in for tensorrt.plugin's ShapeExpr (TensorRT 10.9+, tensorrt/plugin/_tensor.py):
    constant or symbolic, arithmetic with an int or expression on the right only (no __rmul__),
    `is_constant` and `constant_value()`, no __int__ / __index__ (int() of a real ShapeExpr
    raises); `fake`: the placeholder TensorRT first calls shape functions with, whose
    `is_constant` raises RuntimeError. `value` is what the stand-in tracks for the test."""

    def __init__(self, value, constant=True, fake=False):
        self.value, self._constant, self.fake = value, constant, fake

    @property
    def is_constant(self):
        if self.fake:
            raise RuntimeError("Not accessible for fake 'ShapeExpr's")
        return self._constant

    def constant_value(self):
        assert self.is_constant, "constant_value() of a symbolic expression"
        return self.value

    def _op(self, other, f):
        if isinstance(other, Expr):
            return Expr(f(self.value, other.value), self._constant and other._constant, self.fake or other.fake)
        assert isinstance(other, (int, np.integer)), type(other)
        return Expr(f(self.value, int(other)), self._constant, self.fake)

    def __add__(self, o):
        return self._op(o, lambda a, b: a + b)

    def __sub__(self, o):
        return self._op(o, lambda a, b: a - b)

    def __mul__(self, o):
        return self._op(o, lambda a, b: a * b)

    def __floordiv__(self, o):
        return self._op(o, lambda a, b: a // b)


class Desc:
    """A stand-in for tensorrt.plugin.TensorDesc: shape_expr of Exprs (dimension 0 symbolic;
    every dimension a placeholder with `fake`)."""

    def __init__(self, shape, batch_symbolic=True, fake=False):
        self.shape_expr = [Expr(v, not (i == 0 and batch_symbolic), fake) for i, v in enumerate(shape)]
        self.ndim = len(shape)

    def like(self):
        copy = Desc(())
        copy.shape_expr, copy.ndim = list(self.shape_expr), self.ndim
        return copy


class Trtp:
    """Stand-ins for the tensorrt.plugin names the AOT implementation uses; cdiv, like the real
    one, takes an expression (not two ints)."""

    class KernelLaunchParams:
        pass

    AutoTuneCombination = staticmethod(lambda text: ("combination", text))
    SymInt32 = staticmethod(lambda v: ("i32", v))

    @staticmethod
    def cdiv(a, b):
        assert isinstance(a, Expr) and isinstance(b, int)
        return Expr(-(-a.value // b), a.is_constant)

    class SymIntExprs:
        from_tuple = staticmethod(list)


TYPE_KEYS = ("desc", "tensor", "ints", "int", "float", "string", "outputs", "stream", "return", "returns",
             "desc_outputs", "tactic", "aot_return", "autotune_return")


def test_plugin_function_signatures_are_what_tensorrt_validates():
    """tensorrt.plugin checks each registered function's parameter names (tensorrt/plugin/
    _validate.py): shape function (inputs, attributes), impl (inputs, attributes, outputs,
    stream), aot_impl (inputs, attributes, outputs, tactic), autotune (inputs, outputs)."""
    from gate2deploy.runtimes import tensorrt_plugins as tp

    for spec in aot.AOT_PLUGINS.values():
        attrs = [name for name, _, _ in spec.attributes]
        desc, autotune, impl, aot_impl = tp._aot_plugin_functions(spec, {k: k for k in TYPE_KEYS}, Trtp, None, None)
        names = lambda f: list(inspect.signature(f).parameters)  # noqa: E731
        assert names(desc) == [*spec.inputs, *attrs]
        assert names(impl) == [*spec.inputs, *attrs, "outputs", "stream"]
        assert names(aot_impl) == [*spec.inputs, *attrs, "outputs", "tactic"]
        assert names(autotune) == [*spec.inputs, "outputs"]
        assert inspect.signature(desc).return_annotation == ("returns" if len(spec.outputs) > 1 else "return")


@pytest.mark.parametrize("fake", [False, True])
def test_shape_functions_take_tensorrt_shape_expressions(fake):
    """The shape functions (JIT CGConv and AOT CGConvPlanned) on ShapeExpr stand-ins without
    __int__, and on the placeholder shapes TensorRT calls them with first (reading a
    dimension's value raises): output [N, O, OH, OW] with the batch kept symbolic and OH, OW
    by the ONNX Conv formula floor((H + pad_begin + pad_end - dilation * (K - 1) - 1) / stride) + 1."""
    from gate2deploy.runtimes import tensorrt_plugins as tp

    geometry = (np.array([2, 1]), np.array([1, 0, 0, 1]), np.array([1, 2]))
    kernels = type("Kernels", (), {"cg_conv": None})  # the shape function never calls the kernel
    jit_desc, _ = tp._plugin_functions(tp.PLUGINS["CGConv"], {k: k for k in TYPE_KEYS}, kernels, None, None)
    y = jit_desc(Desc((3, 6, 7, 9), fake=fake), Desc((5, 6, 3, 3), False, fake), Desc((5, 6), False, fake),
                 Desc((5,), False, fake), *geometry)
    aot_desc, *_ = tp._aot_plugin_functions(aot.AOT_PLUGINS["CGConvPlanned"], {k: k for k in TYPE_KEYS}, Trtp,
                                            None, None)
    y_aot = aot_desc(Desc((3, 6, 7, 9), fake=fake),
                     *(Desc(s, False, fake) for s in ((5, 3, 3, 6), (5, 3, 3, 6), (2, 6), (2,), (5,))), *geometry)
    for out in (y, y_aot):
        assert [e.value for e in out.shape_expr] == [3, 5, (7 + 1 + 0 - 2 - 1) // 2 + 1, (9 + 0 + 1 - 4 - 1) + 1]
        if not fake:
            assert [e.is_constant for e in out.shape_expr] == [False, True, True, True]


def test_attributes_as_tensorrt_passes_them():
    """tensorrt.plugin passes ints arrays as numpy arrays, the scalar fields (declared as
    1-element arrays: int(array) of a 1-element array fails with NumPy >= 2.4) as arrays, and
    strings as TensorRT's ONNX parser wrote them, with a trailing NUL (onnx-tensorrt's
    copyField counts it in the field's length)."""
    from gate2deploy.runtimes import tensorrt_plugins as tp

    got = tp.attribute_values(tp.PLUGINS["FBSConv"], {
        "density": np.array([0.5], np.float32), "pool": "avg\0", "activation": b"Relu\0",
        "pool_pads": np.array([0, 1, 0, 1], np.int64), "strides": np.array([1, 1]), "pads": np.array([1, 1, 1, 1]),
        "dilations": np.array([1, 1])})
    assert got == {"density": 0.5, "pool": "avg", "activation": "Relu", "pool_pads": (0, 1, 0, 1),
                   "strides": (1, 1), "pads": (1, 1, 1, 1), "dilations": (1, 1)}
    pg = tp.attribute_values(tp.PLUGINS["PGConv"], {"abits": np.array([8], np.int32), "pred_bits": 4,
                                                    "static_scale": np.array([0.0], np.float32), "group": 2,
                                                    "strides": (1, 1), "pads": (0, 0, 0, 0), "dilations": (1, 1)})
    assert (pg["abits"], pg["pred_bits"], pg["group"]) == (8, 4, 2) and type(pg["abits"]) is int


def test_aot_implementation_hands_tensorrt_the_launch(monkeypatch):
    """The registered AOT implementation on ShapeExpr stand-ins (batch symbolic): the kernel
    name and PTX of compile_for_aot, grid and block, and the int32 extras in the order of the
    kernel's own i32 parameters (written out here from _cg_conv_kernel's definition)."""
    pytest.importorskip("triton")
    from gate2deploy.runtimes import tensorrt_plugins as tp
    from gate2deploy.runtimes import triton_kernels as tk

    monkeypatch.setattr(aot, "compile_for_aot", lambda plan: (plan.kernel, "PTX", 128, 4096))
    spec = aot.AOT_PLUGINS["CGConvPlanned"]
    _, autotune, _, aot_impl = tp._aot_plugin_functions(spec, {k: k for k in TYPE_KEYS}, Trtp, None, None)
    name, ptx, params, extras = aot_impl(Desc((3, 6, 7, 9)), *(Desc(s, False) for s in ((5, 3, 3, 6), (5, 3, 3, 6),
                                                                                     (2, 6), (2,), (5,))),
                                         np.array([2, 1]), np.array([1, 0, 0, 1]), np.array([1, 2]),
                                         (Desc((3, 5, 3, 6)),), 0)
    assert (name, ptx, params.block_x, params.shared_mem) == (b"_cg_conv_kernel", b"PTX", 128, 4096)
    oh, ow = 3, 6  # as in test_shape_functions_take_tensorrt_shape_expressions
    bm, bn = tk.tile_sizes(oh * ow, 5)  # the tile policy (batch 1)
    assert isinstance(params.grid_x, Expr) and not params.grid_x.is_constant  # follows the runtime batch
    assert params.grid_x.value == -(-3 * oh * ow // bm) and (params.grid_y, params.grid_z) == (-(-5 // bn), 1)
    # _cg_conv_kernel(x, w1, w2, chan, count, thr, M, C, H, W, O, OH, OW, sh, sw, pt, pl, dh, dw, y, ...)
    expected = [3 * oh * ow, 6, 7, 9, 5, oh, ow, 2, 1, 1, 0, 1, 2]
    assert [v.value if isinstance(v, Expr) else v for _, v in extras] == expected
    assert not extras[0][1].is_constant  # M = N * OH * OW stays symbolic
    assert autotune(*(Desc(()) for _ in spec.inputs), ()) == [
        ("combination", "FP32, FP32, FP32, INT32, INT32, FP32, FP32")]


def test_lowering_pins_its_standard_ops_and_refuses_what_it_cannot_take():
    rng = np.random.default_rng(3)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    fbs = {"W": w, "fc_W": rng.standard_normal((4, 3)), "fc_b": np.zeros(4), "bn_scale": np.ones(4),
           "bn_shift": np.zeros(4), "beta": np.zeros(4)}
    lowered = aot.lower_for_aot(single_node_model("FBSConv", (1, 3, 5, 5), fbs, density=0.5))
    added = [n for n in lowered.graph.node if n.domain != aot.PLUGIN_NAMESPACE]
    assert added and all(aot.FP32_MARK in n.name for n in added)  # build_engine keeps these fp32 in --fp16
    with pytest.raises(UserError, match="pool 'median'"):
        aot.lower_for_aot(single_node_model("FBSConv", (1, 3, 5, 5), fbs, density=0.5, pool="median"))
    with pytest.raises(UserError, match="pred_bits < abits"):
        aot.lower_for_aot(single_node_model("PGConv", (1, 3, 5, 5), {"W": w, "threshold": np.zeros(4)},
                                            abits=4, pred_bits=4))
    model = single_node_model("CGConv", (1, 3, 5, 5), {"W": w, "base_mask": np.ones((4, 3)), "threshold": np.zeros(4)})
    model.opset_import[0].version = 18
    with pytest.raises(UserError, match="opset 18"):
        aot.lower_for_aot(model)


def test_strip_scratch_params_refuses_a_read_hidden_parameter():
    body = "\tld.param.u64 %rd1, [k_param_0];\n\tld.param.u32 %r1, [k_param_1];\n"
    ptx = (".visible .entry k(\n\t.param .u64 k_param_0,\n\t.param .u32 k_param_1,\n\t.param .u64 k_param_2,\n"
           "\t.param .u64 k_param_3\n)\n{\n" + body + "}\n")
    stripped = aot.strip_scratch_params(ptx, "k", 2)
    assert "k_param_2" not in stripped and "k_param_3" not in stripped and stripped.count("k_param_1") == 2
    with pytest.raises(UserError, match="reads the hidden parameter k_param_2"):
        aot.strip_scratch_params(ptx.replace(body, body + "\tld.param.u64 %rd2, [k_param_2];\n"), "k", 2)
    with pytest.raises(UserError, match="5 parameters for 2"):
        aot.strip_scratch_params(ptx.replace("k_param_3\n", "k_param_3,\n\t.param .u64 k_param_4\n"), "k", 2)


COMPILE = r"""
import json, subprocess, sys, tempfile
from pathlib import Path
import triton
from triton.backends.compiler import GPUTarget
from gate2deploy.runtimes import tensorrt_aot as aot

ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
shapes = {"CGConvPlanned": {"X": (1, 128, 28, 28), "W1": (128, 3, 3, 128)},
          "PGSplit": {"X": (1, 128, 28, 28)},
          "PGConvParts": {"MSB": (1, 128, 28, 28), "W": (128, 3, 3, 128)},
          "FBSConvSlots": {"X": (1, 128, 28, 28), "W": (128, 3, 3, 128), "slots": (1, 128)}}
out = {}
for op, shape in shapes.items():
    plan = aot.aot_launch(op, shape, {"pads": (1, 1, 1, 1)} if op != "PGSplit" else {})
    name, ptx, threads, shared = aot.compile_for_aot(plan, target=GPUTarget("cuda", 90, 32))
    declared = sum(isinstance(t, str) for _, t in plan.signature)
    entry = ptx.split(".entry", 1)[1].split(")", 1)[0]
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "k.ptx"
        src.write_text(ptx)
        run = subprocess.run([str(ptxas), "-arch=sm_90a", str(src), "-o", str(Path(d) / "k.cubin")],
                             capture_output=True, text=True)
    out[op] = {"name": name, "params": entry.count(".param"), "declared": declared, "threads": threads,
               "shared": shared, "ptxas_rc": run.returncode, "ptxas_err": run.stderr[-500:]}
# a host whose driver is CUDA 12.4: the PTX is written for it
aot.driver_cuda_version = lambda: "12.4"
plan = aot.aot_launch("PGSplit", shapes["PGSplit"], {})
name, ptx, _, _ = aot.compile_for_aot(plan, target=GPUTarget("cuda", 90, 32))
with tempfile.TemporaryDirectory() as d:
    src = Path(d) / "k.ptx"
    src.write_text(ptx)
    run = subprocess.run([str(ptxas), "-arch=sm_90a", str(src), "-o", str(Path(d) / "k.cubin")],
                         capture_output=True, text=True)
out["driver_12.4"] = {"version_line": next(l for l in ptx.splitlines() if l.startswith(".version")),
                      "ptxas_rc": run.returncode, "ptxas_err": run.stderr[-500:]}
print(json.dumps(out))
"""


def test_aot_kernels_compile_for_sm90_with_exactly_their_declared_parameters():
    """compile_for_aot for an H100/H200 without a GPU (Triton's bundled ptxas): the PTX entry
    keeps exactly the plugin's (inputs, extras, outputs) parameters (Triton's scratch pointers
    removed), assembles again with ptxas after the edit, and fits 48 KiB of shared memory
    (the conv kernels' 3-stage pipeline at 128 x 64 tiles does not: fewer stages)."""
    from test_triton_compile import _bundled_ptxas

    if _bundled_ptxas() is None:
        pytest.skip("Triton's bundled ptxas is absent: cannot compile for sm_90 here")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", COMPILE], capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    info = json.loads(run.stdout.strip().splitlines()[-1])
    for op, spec in aot.AOT_PLUGINS.items():
        got = info[op]
        assert got["name"] == spec.kernel
        assert got["params"] == got["declared"], got
        assert got["ptxas_rc"] == 0, got["ptxas_err"]
        assert 0 <= got["shared"] <= aot.SHARED_LIMIT and got["threads"] == 128
    # TensorRT hands the PTX to the driver, which JIT-compiles PTX ISA up to its CUDA version:
    # CUDA 12.4 <-> PTX ISA 8.4 (NVIDIA's PTX ISA release history table)
    assert info["driver_12.4"]["version_line"] == ".version 8.4"
    assert info["driver_12.4"]["ptxas_rc"] == 0, info["driver_12.4"]["ptxas_err"]


def test_plugins_flag_is_recorded_and_named_in_the_gpu_host_command(tiny_ckpt, tmp_path):
    from gate2deploy.runtimes import tensorrt_available

    if tensorrt_available() is None:
        pytest.skip("TensorRT and a GPU are present here: the exit-3 message is not printed")
    code, _, err = run_cli("export", tiny_ckpt, "--model", TINY, "--input-shape", "1,3,8,8", "--target", "trt",
                           "-o", tmp_path / "m.engine", "--plugins", "jit")
    assert code == 3 and "build-engine" in err and "--plugins jit" in err
    cfg = json.loads((tmp_path / "m.trt.json").read_text())
    assert cfg["plugins"]["implementation"] == "jit"
    code, _, err = run_cli("build-engine", tmp_path / "m.trt.onnx", "--plugins", "aot")
    assert code == 3 and "--plugins aot" in err
    with pytest.raises(SystemExit) as exc:
        run_cli("build-engine", tmp_path / "m.trt.onnx", "--plugins", "sometimes")
    assert exc.value.code == 2


def test_gpu_checks_aot_launch_scaffolding_runs_on_the_interpreter(triton_interpreted, capsys):
    """tools/gpu_check.py's TensorRT-AOT check (export, lowering, evaluation, comparison with
    PyTorch) with the CPU launcher: what the next GPU session runs, less the PTX launch itself
    (ptx_launcher), which needs the CUDA driver."""
    sys.path.insert(0, str(HERE.parent / "tools"))
    gpu_check = importlib.import_module("gpu_check")
    assert gpu_check.trt_aot_plugin_check(torch, "cpu")
    out = capsys.readouterr().out
    assert out.count("exact (max rel err") == 2 and "NOT EXACT" not in out


PREFLIGHT = r"""
import sys
import onnx
from triton.backends.compiler import GPUTarget
from gate2deploy.errors import UserError
from gate2deploy.runtimes import tensorrt_aot as aot

model = aot.lower_for_aot(onnx.load(sys.argv[1]))
print("compiled", aot.preflight(model, GPUTarget("cuda", 90, 32)))
aot.SHARED_LIMIT = 1  # no conv kernel fits: the refusal names its node
try:
    aot.preflight(model, GPUTarget("cuda", 90, 32))
except UserError as exc:
    print("refused", exc)
"""


def test_preflight_compiles_every_aot_kernel_and_names_a_refused_node(tiny_trt):
    """build_engine's preflight on the tiny model's lowered model.trt.onnx for sm_90: one kernel for CG,
    two for PG (split, conv), one for FBS; a kernel compile_for_aot refuses is reported with
    its node before TensorRT builds anything (so --plugins auto can keep the JIT plugins)."""
    from test_triton_compile import _bundled_ptxas

    if _bundled_ptxas() is None:
        pytest.skip("Triton's bundled ptxas is absent: cannot compile for sm_90 here")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", PREFLIGHT, str(tiny_trt / "model.trt.onnx")], capture_output=True,
                         text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = run.stdout.strip().splitlines()
    assert lines[0] == "compiled 4"
    assert lines[1].startswith("refused node /cg/CGConv: _cg_conv_kernel:") and "shared memory" in lines[1]
