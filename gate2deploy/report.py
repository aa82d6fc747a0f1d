"""Cost accounting and reports: MACs and parameters per layer, read off an ONNX graph.

MACs count multiply-accumulates of Conv, ConvTranspose, Gemm and MatMul nodes (the layers
that dominate and that the fold changes), per inference of the graph's batch. Params count
every float initializer element. Layers are keyed by ONNX node name, which the passes keep,
so a dense and a folded graph can be compared layer by layer.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from . import ops

LAYER_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


@dataclass
class LayerCost:
    name: str
    op: str
    in_channels: int
    out_channels: int
    macs: int
    params: int


@dataclass
class ModelCost:
    macs: int
    params: int
    layers: dict[str, LayerCost] = field(default_factory=dict)


def _shapes(model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    out = {}
    for vi in list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output):
        dims = vi.type.tensor_type.shape.dim
        if all(d.HasField("dim_value") for d in dims):
            out[vi.name] = tuple(d.dim_value for d in dims)
    return out


def model_cost(model: onnx.ModelProto) -> ModelCost:
    inits = {i.name: i for i in model.graph.initializer}
    consts = {n.output[0]: n.attribute[0].t for n in model.graph.node
              if n.op_type == "Constant" and n.attribute and n.attribute[0].type == onnx.AttributeProto.TENSOR}
    tensors = {**consts, **inits}
    shapes = _shapes(model)
    for name, t in tensors.items():
        shapes.setdefault(name, tuple(t.dims))
    # Weights may be initializers or Constant nodes (the exporter emits quantized weights so);
    # static masks are not parameters of the deployed model.
    masks = {n.input[1] for n in model.graph.node if n.op_type == "ChannelMask"}
    params = int(sum(np.prod(t.dims) for name, t in tensors.items()
                     if name not in masks and t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE)))
    layers = {}
    for node in model.graph.node:
        if node.domain == ops.DOMAIN:
            if ops.CATALOG[node.op_type].macs == "none":  # e.g. ChannelMask
                continue
        elif node.op_type not in LAYER_OPS:
            continue
        w = shapes.get(node.input[1]) if len(node.input) > 1 else None
        y = shapes.get(node.output[0])
        if w is None or y is None:
            continue
        n_params = int(sum(np.prod(shapes.get(i, (0,))) for i in node.input[1:] if i in tensors))
        if node.op_type == "Gemm":
            trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
            c_in, c_out = (w[1], w[0]) if trans_b else (w[0], w[1])
            macs = int(np.prod(y)) * c_in
        elif node.op_type == "MatMul":
            c_in, c_out = w[0], w[-1]
            macs = int(np.prod(y)) * c_in
        else:  # Conv and conv-shaped custom ops: weight [O, I/g, k...]
            group = next((a.i for a in node.attribute if a.name == "group"), 1)
            c_in, c_out = w[1] * group, w[0]
            macs = ops.conv_macs(y, w)
        layers[node.name] = LayerCost(node.name, node.op_type, int(c_in), int(c_out), macs, n_params)
    return ModelCost(sum(lc.macs for lc in layers.values()), params, layers)


def compare(before: ModelCost, after: ModelCost) -> list[dict]:
    """Per-layer channels and MACs before/after; a layer absent after was removed."""
    rows = []
    for name, b in before.layers.items():
        a = after.layers.get(name)
        rows.append({
            "layer": name, "op": b.op,
            "in_before": b.in_channels, "in_after": a.in_channels if a else 0,
            "out_before": b.out_channels, "out_after": a.out_channels if a else 0,
            "macs_before": b.macs, "macs_after": a.macs if a else 0,
        })
    return rows


def format_table(rows: list[dict], limit: int | None = None) -> str:
    head = f"{'layer':48} {'in':>11} {'out':>11} {'MACs kept':>9}"
    lines = [head, "-" * len(head)]
    for r in rows[:limit] if limit else rows:
        kept = r["macs_after"] / r["macs_before"] if r["macs_before"] else 1.0
        lines.append(f"{r['layer'][-48:]:48} {r['in_before']:>5}>{r['in_after']:<5} "
                     f"{r['out_before']:>5}>{r['out_after']:<5} {kept:>9.3f}")
    if limit and len(rows) > limit:
        lines.append(f"... {len(rows) - limit} more layers (see --report)")
    return "\n".join(lines)


def to_json(obj) -> str:
    def default(o):
        if hasattr(o, "__dataclass_fields__"):
            return asdict(o)
        if isinstance(o, (np.integer,)):
            return int(o)
        if isinstance(o, (np.floating,)):
            return float(o)
        raise TypeError(type(o).__name__)
    return json.dumps(obj, indent=2, default=default)
