"""The op catalog: every custom op of the `gate2deploy` ONNX domain, declared once.

Each `OpSpec` states what the rest of the project reads about an op: its inputs (optional
ones end in "?"), attributes with types and whether they are required, ONNX shape inference,
how the channel analysis sees it (`channel_rule`), how its MACs are counted (`macs`), where
it has a kernel (`runtimes`: "ort" the native ONNX Runtime library, runtimes/native; "trt"
the TensorRT plugins, runtimes/tensorrt_plugins.py; "portable" a lowering to standard ONNX
ops, passes/lower_portable.py), and its reference implementation (`reference`, a function of
runtimes/reference.py, named here so that this module imports nothing above it). The
semantics are in runtimes/OPS.md.

Adding an op: one entry in CATALOG plus its kernels; tests/test_op_catalog.py checks that
every entry's runtimes really have it (the native library's registration, the TensorRT
plugin declarations) and that a single-node model built from the entry runs on the native
library and matches the reference.

This module is the bottom layer (with errors.py and fileio.py): it imports nothing from
gate2deploy. The domain string `DOMAIN` is defined here only.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import onnx
from onnx import defs

DOMAIN = "gate2deploy"
OPSET_VERSION = 1
# The attributes TensorRT's ONNX parser reads to find a plugin (toolchain-facts.md).
PLUGIN_NAMESPACE = DOMAIN
PLUGIN_VERSION = "1"
PLUGIN_ATTRIBUTES = ("plugin_namespace", "plugin_version")

_FLOAT_TYPES = ["tensor(float)", "tensor(float16)", "tensor(double)"]
_ATTR_TYPES = {"int": defs.OpSchema.AttrType.INT, "ints": defs.OpSchema.AttrType.INTS,
               "float": defs.OpSchema.AttrType.FLOAT, "string": defs.OpSchema.AttrType.STRING}
_PROTO_TYPES = {"int": onnx.AttributeProto.INT, "ints": onnx.AttributeProto.INTS,
                "float": onnx.AttributeProto.FLOAT, "string": onnx.AttributeProto.STRING}


@dataclass(frozen=True)
class Attr:
    name: str
    type: str  # "int" | "ints" | "float" | "string"
    required: bool = False


@dataclass(frozen=True)
class OpSpec:
    name: str
    inputs: tuple[str, ...]
    attributes: tuple[Attr, ...]
    doc: str
    infer: Callable | None
    channel_rule: str  # "conv": out channels = W.shape[0]; "elementwise": channels pass through
    macs: str  # "conv": N * O * Ho * Wo * (C / group) * kh * kw (the dense count); "none"
    runtimes: frozenset[str] = field(default_factory=frozenset)
    reference: str | None = None  # function name in gate2deploy.runtimes.reference

    def schema(self) -> defs.OpSchema:
        params = [defs.OpSchema.FormalParameter(
            name.rstrip("?"), "T",
            param_option=(defs.OpSchema.FormalParameterOption.Optional if name.endswith("?")
                          else defs.OpSchema.FormalParameterOption.Single)) for name in self.inputs]
        s = defs.OpSchema(self.name, DOMAIN, OPSET_VERSION, self.doc, inputs=params,
                          outputs=[defs.OpSchema.FormalParameter("Y", "T")],
                          type_constraints=[("T", _FLOAT_TYPES, "float tensors")],
                          attributes=[defs.OpSchema.Attribute(a.name, _ATTR_TYPES[a.type], "", required=a.required)
                                      for a in self.attributes])
        if self.infer is not None:
            s.set_type_and_shape_inference_function(self.infer)
        return s

    def check_node(self, node: onnx.NodeProto, plugin_attributes: bool = False) -> list[str]:
        """Problems with a node of this op: unknown, mistyped or missing attributes, input
        count. `plugin_attributes` allows TensorRT's plugin_namespace / plugin_version."""
        problems = []
        known = {a.name: a for a in self.attributes}
        for attr in node.attribute:
            spec = known.get(attr.name)
            if spec is None:
                if not (plugin_attributes and attr.name in PLUGIN_ATTRIBUTES):
                    problems.append(f"unknown attribute {attr.name!r}")
            elif attr.type != _PROTO_TYPES[spec.type]:
                want, got = (onnx.AttributeProto.AttributeType.Name(t) for t in (_PROTO_TYPES[spec.type], attr.type))
                problems.append(f"attribute {attr.name!r} must be {want}, not {got}")
        given = {a.name for a in node.attribute}
        problems += [f"missing attribute {a.name!r}" for a in self.attributes if a.required and a.name not in given]
        required = sum(not i.endswith("?") for i in self.inputs)
        if not required <= len(node.input) <= len(self.inputs):
            problems.append(f"takes {required}..{len(self.inputs)} inputs, not {len(node.input)}")
        return problems


def same_as_input0(ctx) -> None:
    ctx.set_output_type(0, ctx.get_input_type(0))


def _ints_attr(ctx, name, default):
    attr = ctx.get_attribute(name)
    return list(attr.ints) if attr is not None and len(attr.ints) else list(default)


def conv_like_output(ctx) -> None:
    """Y: [N, O, Ho, Wo] as ONNX Conv, from X [N, C, H, W] (input 0) and W [O, C/g, kh, kw]
    (input 1) and the attributes strides, pads (top, left, bottom, right), dilations."""
    x_type, w_type = ctx.get_input_type(0), ctx.get_input_type(1)
    out = onnx.TypeProto()
    out.tensor_type.elem_type = x_type.tensor_type.elem_type
    if not (x_type.tensor_type.HasField("shape") and w_type.tensor_type.HasField("shape")):
        ctx.set_output_type(0, out)
        return
    xd, wd = x_type.tensor_type.shape.dim, w_type.tensor_type.shape.dim
    if len(xd) != 4 or len(wd) != 4:
        raise onnx.shape_inference.InferenceError(
            f"{ctx.get_display_name()}: X and W must be 4-D, not {len(xd)}-D and {len(wd)}-D")
    strides = _ints_attr(ctx, "strides", [1, 1])
    pads = _ints_attr(ctx, "pads", [0, 0, 0, 0])
    dilations = _ints_attr(ctx, "dilations", [1, 1])
    dims = out.tensor_type.shape.dim
    dims.add().CopyFrom(xd[0])
    dims.add().CopyFrom(wd[0])
    for i in range(2):
        d = dims.add()
        size, k = xd[2 + i], wd[2 + i]
        if size.HasField("dim_value") and k.HasField("dim_value"):
            span = dilations[i] * (k.dim_value - 1) + 1
            d.dim_value = (size.dim_value + pads[i] + pads[i + 2] - span) // strides[i] + 1
    ctx.set_output_type(0, out)


# OPS.md's common conv attributes include `group`; CGConv, FBSConv and SparseInputConv accept
# only 1 (the kernels check the value), PGConv and StreamConv any divisor.
_CONV_ATTRS = (Attr("strides", "ints"), Attr("pads", "ints"), Attr("dilations", "ints"), Attr("group", "int"))
# CGConv / PGConv's optional epilogue (a following BatchNormalization, Relu, Min and
# QuantizeActivation, fused for --target ort by passes/fuse_gated_epilogue.py): per-channel
# [O] vectors, "Relu" or none, the clamp's bound, the quantizer's attributes (OPS.md).
_POST_INPUTS = ("post_scale?", "post_shift?")
_POST_ATTRS = (Attr("activation", "string"), Attr("clip_max", "float"), Attr("quantize_levels", "float"),
               Attr("quantize_scale", "float"), Attr("quantize_eps", "float"))
EPILOGUE_INPUTS = tuple(i.rstrip("?") for i in _POST_INPUTS)  # CPU only: not TensorRT
EPILOGUE_ATTRIBUTES = tuple(a.name for a in _POST_ATTRS)      # plugin fields
_GATED_RUNTIMES = frozenset({"ort", "trt", "portable"})
# FBSConv's Mayo options (OPS.md), each optional with the behaviour before they existed as
# its default: `activation` "Relu" (default) | "Identity", `pool_pads` 4 ints (default
# zeros), `threshold` float (absent: the online top-k by `density`).
FBS_GATE_ATTRS = (Attr("activation", "string"), Attr("pool_pads", "ints"), Attr("threshold", "float"))
# Set only by the session-time layout pass (runtimes/ort_layout.py), never in an export: X / Y
# in ONNX Runtime's blocked NCHWc layout of this CPU's block size (0: NCHW).
_LAYOUT_ATTRS = (Attr("input_block", "int"), Attr("output_block", "int"))
LAYOUT_ATTRIBUTES = tuple(a.name for a in _LAYOUT_ATTRS)  # not TensorRT plugin fields
FBS_POOLS = ("avg", "max", "l1", "l2")
FBS_ACTIVATIONS = ("Relu", "Identity")

CATALOG: dict[str, OpSpec] = {spec.name: spec for spec in [
    OpSpec("ChannelMask", ("X", "mask"), (Attr("source", "string"),),
           "Y = X * mask broadcast over axis 1. A static mask; the fold pass removes it.",
           same_as_input0, channel_rule="elementwise", macs="none", runtimes=frozenset({"portable"})),
    OpSpec("CGConv", ("X", "W", "base_mask", "threshold", *_POST_INPUTS), (*_POST_ATTRS, *_CONV_ATTRS),
           "Channel Gating: Yp = conv(X, W*base_mask); Y = where(Yp > threshold, conv(X, W), Yp); "
           "then its optional epilogue (OPS.md).",
           conv_like_output, channel_rule="conv", macs="conv", runtimes=_GATED_RUNTIMES,
           reference="cg_conv_reference"),
    OpSpec("PGConv", ("X", "W", "threshold", *_POST_INPUTS),
           (Attr("abits", "int", True), Attr("pred_bits", "int", True), Attr("static_scale", "float"),
            *_POST_ATTRS, *_CONV_ATTRS),
           "Precision Gating: Y = conv(x_msb, W) + [conv(x_msb, W) > threshold] * conv(x_lsb, W); "
           "then its optional epilogue (OPS.md).",
           conv_like_output, channel_rule="conv", macs="conv", runtimes=_GATED_RUNTIMES,
           reference="pg_conv_reference"),
    OpSpec("FBSConv", ("X", "W", "fc_W", "fc_b", "bn_scale", "bn_shift", "beta"),
           (Attr("density", "float", True), Attr("pool", "string"), *FBS_GATE_ATTRS, *_CONV_ATTRS,
            *_LAYOUT_ATTRS),
           "FBS: per-sample top-k (or fixed-threshold) output channels by a pooled saliency; "
           "others exactly 0 (OPS.md).",
           conv_like_output, channel_rule="conv", macs="conv", runtimes=_GATED_RUNTIMES,
           reference="fbs_conv_reference"),
    OpSpec("SparseInputConv", ("X", "W", "B", "R?"), (Attr("activation", "string"), *_CONV_ATTRS, *_LAYOUT_ATTRS),
           "Y = act(Conv(X, W, B) + R): ONNX Conv (group 1, bias B), optional residual R, activation "
           "'Relu' or none; the kernel reads only each sample's non-zero input channels (the consumer "
           "of an FBS layer).",
           conv_like_output, channel_rule="conv", macs="conv", runtimes=frozenset({"ort", "portable"}),
           reference="sparse_input_conv_reference"),
    OpSpec("StreamConv", ("X", "W", "B"), (Attr("activation", "string"), *_CONV_ATTRS),
           "Y = act(Conv(X, W, B)): ONNX Conv (any group, bias B), activation 'Relu' or none; the kernel "
           "reads each weight once per call and multiplies it into up to 16 output pixels (layers whose "
           "weights dwarf their few output pixels; 3x3 same-padded convs on maps 8-32 wide a band of "
           "16 pixels at a time: passes/stream_weight_convs.py).",
           conv_like_output, channel_rule="conv", macs="conv", runtimes=frozenset({"ort", "portable"}),
           reference="stream_conv_reference"),
    OpSpec("QuantizeActivation", ("X",), (Attr("levels", "float", True), Attr("scale", "float"), Attr("eps", "float")),
           "Y = sign(X) * (round(clip(|X| / s, 0, 1) * levels) / levels) * s, s = scale if > 0 else "
           "max|X| + eps over the whole tensor: the seed's sign-magnitude activation quantizer, fused "
           "from its chain of standard ops for --target ort (OPS.md).",
           same_as_input0, channel_rule="elementwise", macs="none", runtimes=frozenset({"ort", "portable"}),
           reference="quantize_activation_reference"),
]}

GATED_OPS = ("CGConv", "PGConv", "FBSConv")  # the dynamic gates


def conv_macs(out_shape, weight_shape) -> int:
    """Dense MACs of a conv-shaped node (the "conv" MACs kind; ONNX Conv too): every output
    element [N, O, Ho, Wo] takes C/group * kh * kw multiply-accumulates (weight [O, C/g, kh, kw])."""
    total = 1
    for d in list(out_shape) + list(weight_shape[1:]):
        total *= int(d)
    return total


def is_custom(node) -> bool:
    """A node of the gate2deploy domain (onnx NodeProto or onnx-graphsurgeon Node)."""
    return getattr(node, "domain", "") == DOMAIN


_registered = False


def register_all() -> None:
    """Register every catalog schema with onnx (idempotent), so onnx.checker and shape
    inference understand graphs with gate2deploy nodes."""
    global _registered
    if _registered:
        return
    for spec in CATALOG.values():
        if not defs.has(spec.name, DOMAIN):
            defs.register_schema(spec.schema())
    _registered = True


def opset_imports() -> list[onnx.OperatorSetIdProto]:
    return [onnx.helper.make_opsetid(DOMAIN, OPSET_VERSION)]


IR_VERSION = 10  # onnx 1.23 writes 14 by default; onnxruntime 1.31 accepts at most 13


def finalize(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Set the IR version ONNX Runtime accepts, add our opset import where our ops are used,
    infer shapes (every graph the compiler writes goes through here)."""
    register_all()
    proto.ir_version = IR_VERSION
    if not any(o.domain == DOMAIN for o in proto.opset_import):
        if any(n.domain == DOMAIN for n in proto.graph.node):
            proto.opset_import.extend(opset_imports())
    del proto.graph.value_info[:]
    return onnx.shape_inference.infer_shapes(proto, strict_mode=True, data_prop=True)
