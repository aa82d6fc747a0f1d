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
