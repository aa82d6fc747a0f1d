"""Pass: what follows a CGConv or PGConv elementwise (its BatchNormalization, Relu, PACT's
clamp and the next quantized conv's activation quantizer) becomes the gated op's optional
epilogue (the `--target ort` path).

Why: in the seed's ResNet-20 every gated conv is followed by its block's BatchNorm and ReLU,
and in the PG ResNet-20 then by PACT's clamp (Min) and the activation quantizer of the
block's quantized conv2 (QuantizeActivation). ONNX Runtime folds BatchNorm and Relu into its
own convolutions, but nothing into a custom op: unfused each is one more node and one more
pass over the tensor per gated layer. Measured: BatchNormalization and the extra Relu were
about 8% of the PG ResNet-20's time (ONNX Runtime's profiler), as much as the gated convs
saved; Min and QuantizeActivation, with BatchNorm and Relu fused, 8% more (the network with
those nodes removed, AMD EPYC Zen 4, 1 thread, 2026-12-06: 1.075 against 1.174 ms).

Expects: a graph after the fold pipeline and after fuse_activation_quantizer (so that the
quantizer is one QuantizeActivation node); may contain `gate2deploy::CGConv` / `PGConv`.

Guarantees: for every gated node without an epilogue, the longest prefix of the chain below
that matches is fused (OPS.md's epilogue steps): the BatchNormalization into the inputs
post_scale, post_shift, the Relu into activation="Relu", the Min into clip_max, the
QuantizeActivation's levels / scale / eps into quantize_levels / quantize_scale /
quantize_eps; the node then writes the last fused node's output tensor and the fused nodes
are removed. The function computed is unchanged up to float32 rounding: the folded affine is
ONNX Runtime's own BatchNormalization arithmetic (Y = X * s + b with s = scale / sqrt(var +
eps), b = B - mean * s); the clamp and the quantizer are the same float operations as the
nodes' (the quantizer's dynamic scale still spans the whole tensor). The gates are decided
before the epilogue, so no gate changes. Every other node is untouched. Returns the fused
gated nodes' names.

Pattern (declared as data), each step optional, in this order, each node the only reader of
the tensor before it, which is not a graph output:
    BatchNormalization(X, scale, B, mean, var: constant float32 [O]), inference mode, one output
    Relu
    Min(X, c) or Min(c, X), c a constant float32 of one element (rank <= 4), not NaN
    gate2deploy::QuantizeActivation
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from gate2deploy.ops import DOMAIN, EPILOGUE_ATTRIBUTES

from .ir import const_value, remove_fused, sole_consumer

# Where CGConv / PGConv's optional epilogue inputs (post_scale, post_shift) start (OPS.md):
# the op's input count without an epilogue. Read also by the portable lowering and gated_verify.
EPILOGUE_INPUTS_AT = {"CGConv": 4, "PGConv": 3}
# The epilogue's attributes after the channel part (OPS.md): the clamp's and the quantizer's.
OUTPUT_STEP_ATTRS = tuple(a for a in EPILOGUE_ATTRIBUTES if a != "activation")
PATTERN = {
    "producers": {(DOMAIN, op): at for op, at in EPILOGUE_INPUTS_AT.items()},
    "steps": [("", "BatchNormalization"), ("", "Relu"), ("", "Min"), (DOMAIN, "QuantizeActivation")],
}


def activation_name(value) -> str:
    """The `activation` attribute as a str ("" when absent); ONNX string attributes may arrive
    as bytes."""
    return value.decode() if isinstance(value, bytes) else (value or "")


def _folded_batchnorm(bn: gs.Node, channels: int) -> tuple[np.ndarray, np.ndarray] | None:
    """(post_scale, post_shift) of an inference-mode BatchNormalization with constant
    parameters of `channels` values, else None."""
    if bn.attrs.get("training_mode", 0) or len(bn.outputs) != 1 or len(bn.inputs) != 5:
        return None
    params = [const_value(t) for t in bn.inputs[1:]]
    if any(p is None or p.dtype != np.float32 or p.shape != (channels,) for p in params):
        return None
    scale, bias, mean, var = params
    eps = np.float32(bn.attrs.get("epsilon", 1e-5))
    inv_std = np.float32(1) / np.sqrt(var + eps)
    post_scale = (inv_std * scale).astype(np.float32)
    post_shift = (bias - mean * post_scale).astype(np.float32)
    return post_scale, post_shift


def _channels(node: gs.Node) -> int | None:
    w = node.inputs[1]
    shape = w.shape if w.shape is not None else getattr(const_value(w), "shape", None)
    return int(shape[0]) if shape is not None and isinstance(shape[0], int) else None


def _clip_bound(node: gs.Node, x: gs.Tensor) -> float | None:
    """c of Min(x, c) / Min(c, x) with a constant one-element c that keeps x's shape, else None."""
    if len(node.inputs) != 2 or len(node.outputs) != 1:
        return None
    other = node.inputs[1] if node.inputs[0] is x else node.inputs[0]
    c = const_value(other)
    if other is x or c is None or c.dtype != np.float32 or c.size != 1 or c.ndim > 4:
        return None
    value = float(c.reshape(()))
    return None if np.isnan(value) else value


def fuse_gated_epilogue(graph: gs.Graph) -> list[str]:
    fused = []
    bn_step, relu_step, min_step, quantize_step = PATTERN["steps"]
    for node in list(graph.nodes):
        plain_inputs = PATTERN["producers"].get((node.domain, node.op))
        if (plain_inputs is None or len(node.inputs) != plain_inputs or node.attrs.get("activation")
                or any(a in node.attrs for a in OUTPUT_STEP_ATTRS)):
            continue
        channels = _channels(node)
        removed: list[gs.Node] = []
        out = node.outputs[0]
        bn = sole_consumer(graph, out, bn_step[1], domain=bn_step[0])
        folded = _folded_batchnorm(bn, channels) if bn is not None and channels is not None else None
        if folded is not None:
            node.inputs.extend([gs.Constant(f"{node.name}/post_scale", folded[0]),
                                gs.Constant(f"{node.name}/post_shift", folded[1])])
            removed.append(bn)
            out = bn.outputs[0]
        relu = sole_consumer(graph, out, relu_step[1], domain=relu_step[0])
        if relu is not None:
            node.attrs["activation"] = "Relu"
            removed.append(relu)
            out = relu.outputs[0]
        clamp = sole_consumer(graph, out, min_step[1], domain=min_step[0])
        bound = _clip_bound(clamp, out) if clamp is not None else None
        if bound is not None:
            node.attrs["clip_max"] = bound
            removed.append(clamp)
            out = clamp.outputs[0]
        quantizer = sole_consumer(graph, out, quantize_step[1], domain=quantize_step[0])
        if quantizer is not None and "levels" in quantizer.attrs:
            node.attrs["quantize_levels"] = float(quantizer.attrs["levels"])
            for name in ("scale", "eps"):
                if name in quantizer.attrs:
                    node.attrs[f"quantize_{name}"] = float(quantizer.attrs[name])
            removed.append(quantizer)
        if not removed:
            continue
        node.outputs = [removed[-1].outputs[0]]
        remove_fused(graph, removed)
        fused.append(node.name)
    return fused


def split_gated_epilogue(graph: gs.Graph, node: gs.Node, output_steps_only: bool = False) -> list[gs.Node]:
    """The inverse of the fusion for one CGConv / PGConv node: its epilogue as separate nodes
    after it, in OPS.md's order (Mul and Add by [1, O, 1, 1] for the affine part, which ONNX
    Runtime folds into a Conv producing it; Relu; Min; QuantizeActivation), the node then
    writing a new tensor with no epilogue. The same function, rounding included (the kernels'
    affine is a product, rounded, plus the shift). Used where a fused node must become
    standard ops again: the portable lowering and the dense twin (gate2deploy.kernel_choice);
    with `output_steps_only` just the clamp and the quantizer (the BatchNorm and Relu stay
    fused: the export as it was before those two steps were fused, for comparisons).
    Returns the new nodes ([] without an epilogue); the caller toposorts."""
    at = EPILOGUE_INPUTS_AT[node.op]
    affine = len(node.inputs) > at and not output_steps_only
    relu = activation_name(node.attrs.get("activation")) == "Relu" and not output_steps_only
    steps = {k: node.attrs[k] for k in OUTPUT_STEP_ATTRS if k in node.attrs}
    if not (affine or relu or steps):
        return []
    name = node.name or node.op
    added: list[gs.Node] = []

    def step(op: str, inputs, attrs=None, domain=None) -> gs.Variable:
        out = gs.Variable(f"{name}/epilogue/{op}_{len(added)}", dtype=np.float32)
        added.append(gs.Node(op, f"{name}/epilogue/{op}_{len(added)}", attrs=attrs or {},
                             inputs=list(inputs), outputs=[out], domain=domain))
        return out

    def per_channel(what: str, tensor: gs.Tensor) -> gs.Tensor:
        value = const_value(tensor)
        if value is not None:
            return gs.Constant(f"{name}/epilogue/{what}", np.asarray(value, np.float32).reshape(1, -1, 1, 1))
        return step("Reshape", [tensor, gs.Constant(f"{name}/epilogue/{what}_shape",
                                                    np.array([1, -1, 1, 1], np.int64))])

    y = node.outputs[0]
    v = gs.Variable(f"{name}/pre_epilogue", dtype=np.float32)
    node.outputs = [v]
    if affine:
        scale, shift = node.inputs[at:at + 2]
        v = step("Add", [step("Mul", [v, per_channel("post_scale", scale)]), per_channel("post_shift", shift)])
        while len(node.inputs) > at:  # (graphsurgeon lists take no slice deletion)
            node.inputs.pop()
    if relu:
        v = step("Relu", [v])
    if "clip_max" in steps:
        v = step("Min", [v, gs.Constant(f"{name}/epilogue/clip_max", np.array(steps["clip_max"], np.float32))])
    if "quantize_levels" in steps:
        attrs = {"levels": float(steps["quantize_levels"])}
        attrs.update({k: float(steps[f"quantize_{k}"]) for k in ("scale", "eps") if f"quantize_{k}" in steps})
        v = step("QuantizeActivation", [v], attrs, domain=DOMAIN)
    for key in (*(["activation"] if relu else []), *OUTPUT_STEP_ATTRS):
        node.attrs.pop(key, None)
    added[-1].outputs = [y]
    graph.nodes.extend(added)
    return added


def split_gated_epilogues(graph: gs.Graph, output_steps_only: bool = False) -> list[gs.Node]:
    """split_gated_epilogue for every CGConv / PGConv node of the graph; the new nodes."""
    return [new for node in list(graph.nodes) if node.domain == DOMAIN and node.op in EPILOGUE_INPUTS_AT
            for new in split_gated_epilogue(graph, node, output_steps_only)]
