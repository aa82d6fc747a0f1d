"""ONNX schemas of the `gate2deploy` custom domain.

Every custom op the compiler emits is declared here with its shape inference, so that
`onnx.shape_inference` and `onnx.checker` understand graphs containing them. Schemas are
registered once per process by `register_all()` (idempotent).
"""
from __future__ import annotations

from collections.abc import Callable

import onnx
from onnx import defs

DOMAIN = "gate2deploy"
OPSET_VERSION = 1

_FLOAT_TYPES = ["tensor(float)", "tensor(float16)", "tensor(double)"]
_registered = False
_SCHEMAS: list[Callable[[], defs.OpSchema]] = []


def schema(fn: Callable[[], defs.OpSchema]):
    """Decorator: add a schema factory to the registry."""
    _SCHEMAS.append(fn)
    return fn


def make_schema(name, inputs, outputs, attributes=(), infer=None, doc=""):
    """Small wrapper over OpSchema: inputs/outputs are (name, type-var) pairs, optional
    inputs end with '?'. Attributes are (name, AttrType, required) triples."""
    params = []
    for pname, tvar in inputs:
        opt = pname.endswith("?")
        params.append(defs.OpSchema.FormalParameter(
            pname.rstrip("?"), tvar,
            param_option=defs.OpSchema.FormalParameterOption.Optional if opt
            else defs.OpSchema.FormalParameterOption.Single))
    s = defs.OpSchema(
        name, DOMAIN, OPSET_VERSION, doc,
        inputs=params,
        outputs=[defs.OpSchema.FormalParameter(n, t) for n, t in outputs],
        type_constraints=[("T", _FLOAT_TYPES, "float tensors")],
        attributes=[defs.OpSchema.Attribute(n, t, "", required=r) for n, t, r in attributes],
    )
    if infer is not None:
        s.set_type_and_shape_inference_function(infer)
    return s


def same_as_input0(ctx) -> None:
    ctx.set_output_type(0, ctx.get_input_type(0))


@schema
def channel_mask_schema():
    return make_schema(
        "ChannelMask", [("X", "T"), ("mask", "T")], [("Y", "T")],
        [("source", defs.OpSchema.AttrType.STRING, False)],
        infer=same_as_input0,
        doc="Y = X * mask broadcast over axis 1. A static mask; the fold pass removes it.",
    )



# --- Dynamic gating ops (runtimes/OPS.md): conv-shaped output -----------------------------

_INT, _INTS, _FLOAT, _STRING = (defs.OpSchema.AttrType.INT, defs.OpSchema.AttrType.INTS,
                                defs.OpSchema.AttrType.FLOAT, defs.OpSchema.AttrType.STRING)
_CONV_ATTRS = [("strides", _INTS, False), ("pads", _INTS, False), ("dilations", _INTS, False)]
# OPS.md's common conv attributes include `group`; CGConv, FBSConv and SparseInputConv accept
# only 1 (the kernels check the value), PGConv any divisor.
_GROUP_ATTR = [("group", _INT, False)]
# CGConv / PGConv's optional epilogue (a following BatchNormalization and Relu, fused for
# --target ort by passes/fuse_gated_epilogue.py): per-channel [O] vectors and "Relu" or none.
_POST_INPUTS = [("post_scale?", "T"), ("post_shift?", "T")]
_POST_ATTRS = [("activation", _STRING, False)]


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


@schema
def cg_conv_schema():
    return make_schema(
        "CGConv", [("X", "T"), ("W", "T"), ("base_mask", "T"), ("threshold", "T"), *_POST_INPUTS],
        [("Y", "T")], [*_POST_ATTRS, *_CONV_ATTRS, *_GROUP_ATTR], infer=conv_like_output,
        doc="Channel Gating: Yp = conv(X, W*base_mask); Y = where(Yp > threshold, conv(X, W), Yp); "
            "then act(post_scale * Y + post_shift) when given (OPS.md).")


@schema
def pg_conv_schema():
    return make_schema(
        "PGConv", [("X", "T"), ("W", "T"), ("threshold", "T"), *_POST_INPUTS], [("Y", "T")],
        [("abits", _INT, True), ("pred_bits", _INT, True), ("static_scale", _FLOAT, False),
         *_GROUP_ATTR, *_POST_ATTRS, *_CONV_ATTRS], infer=conv_like_output,
        doc="Precision Gating: Y = conv(x_msb, W) + [conv(x_msb, W) > threshold] * conv(x_lsb, W); "
            "then act(post_scale * Y + post_shift) when given (OPS.md).")


@schema
def fbs_conv_schema():
    return make_schema(
        "FBSConv", [("X", "T"), ("W", "T"), ("fc_W", "T"), ("fc_b", "T"), ("bn_scale", "T"),
                    ("bn_shift", "T"), ("beta", "T")], [("Y", "T")],
        [("density", _FLOAT, True), ("pool", _STRING, False), *_CONV_ATTRS, *_GROUP_ATTR], infer=conv_like_output,
        doc="FBS: per-sample top-k output channels by a pooled saliency; others exactly 0.")


@schema
def sparse_input_conv_schema():
    return make_schema(
        "SparseInputConv", [("X", "T"), ("W", "T"), ("B", "T"), ("R?", "T")], [("Y", "T")],
        [("activation", _STRING, False), *_CONV_ATTRS, *_GROUP_ATTR], infer=conv_like_output,
        doc="Y = act(Conv(X, W, B) + R): ONNX Conv (group 1, bias B), optional residual R, "
            "activation 'Relu' or none; the kernel reads only each sample's non-zero input "
            "channels (the consumer of an FBS layer).")


def register_all() -> None:
    global _registered
    if _registered:
        return
    for factory in _SCHEMAS:
        s = factory()
        if not defs.has(s.name, s.domain):
            defs.register_schema(s)
    _registered = True


def opset_imports() -> list[onnx.OperatorSetIdProto]:
    return [onnx.helper.make_opsetid(DOMAIN, OPSET_VERSION)]
