"""Gate statistics, PG scale calibration and a description of the gated layers, for the export
report and `gate2deploy info`.

Gate-on fraction r of a layer, measured on sample inputs:
- CG: the fraction of output elements (N, O, H, W) whose gate is on (full sum computed);
- PG: the fraction of output elements whose LSB part is computed;
- FBS: the fraction of (sample, output channel) pairs that are active.

MACs per sample, from the layer's dense conv MACs F = O * Ho * Wo * (C / group) * kh * kw:
- CG (semantics §3): F * (b + (1 - b) * r), b = fraction of the weights in the base path (1/p);
- PG (§4): the MSB pass F, the LSB pass F * r: `expected_macs` = F * (1 + r) multiply-adds,
  and `bit_weighted_macs` = F * (Bh + (B - Bh) * r) / B, the cost in B-bit MAC equivalents
  (the paper's measure, what an integer kernel saves);
- FBS (§5, Mayo's estimate): F * mean over samples of (in_density * out_density) + the
  predictor's C * O, where in_density is the fraction of the layer's input channels that are
  not all zero in that sample (a preceding FBS layer's inactive channels).

Two ways to measure: `gate_statistics(model, samples)` runs the PyTorch model (the gated
modules of `gate2deploy.gated` count their gates), `onnx_gate_statistics(proto, samples)`
runs an exported model (custom nodes lowered with their gates exposed) in ONNX Runtime.
"""
from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx
import torch
from torch import nn

from . import ops
from .gated import CGConv2d, FBSConv2d, GateCounter, PGConv2d, QuantizedConv2d

__all__ = ["GateLayerStats", "gate_statistics", "onnx_gate_statistics", "calibrate_pg_scales",
           "pg_scale_modes", "describe_gated_nodes", "summarize", "gate_report",
           "load_sample_inputs"]


@dataclass
class GateLayerStats:
    name: str
    op: str                      # "CGConv" | "PGConv" | "FBSConv"
    gate_on_fraction: float
    dense_macs: int              # per sample
    expected_macs: float         # per sample, at the measured gate-on fraction
    samples: int
    details: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


def _batches(samples) -> Iterable[torch.Tensor]:
    if isinstance(samples, (torch.Tensor, np.ndarray)):
        yield torch.as_tensor(samples)
        return
    for batch in samples:
        yield torch.as_tensor(batch)


def run_with_hooks(model: nn.Module, samples, handles: list) -> None:
    """Run `model` (eval, no grad) over `samples` (one tensor or batches), then remove the
    hooks in `handles` and restore the model's train/eval mode, even on error."""
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            for batch in _batches(samples):
                model(batch)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)


def conv_macs(out_shape, weight_shape, group: int = 1) -> int:
    """Dense MACs per sample (the op catalog's count, for one sample of the batch)."""
    return ops.conv_macs((1, *out_shape[1:]), weight_shape)


def _cg_stats(name, dense, r, base_fraction, samples):
    expected = dense * (base_fraction + (1.0 - base_fraction) * r)
    return GateLayerStats(name, "CGConv", r, dense, expected, samples,
                          {"base_fraction": base_fraction})


def _pg_stats(name, dense, r, bits, pred_bits, scale, samples):
    bit_weighted = dense * (pred_bits + (bits - pred_bits) * r) / bits
    return GateLayerStats(name, "PGConv", r, dense, dense * (1.0 + r), samples, {
        "macs_msb": dense, "macs_lsb": dense * r, "bit_weighted_macs": bit_weighted,
        "abits": bits, "pred_bits": pred_bits,
        "scale": f"static {scale:.6g}" if scale > 0 else "dynamic (per batch, max|x|)"})


def _fbs_stats(name, dense, r, density_product, predictor_macs, samples, density):
    expected = dense * density_product + predictor_macs
    return GateLayerStats(name, "FBSConv", r, dense, expected, samples, {
        "mean_in_x_out_density": density_product, "predictor_macs": predictor_macs,
        "density": density})


def gate_statistics(model: nn.Module, samples) -> list[GateLayerStats]:
    """Run `model` (eval, no grad) on `samples` (a tensor or an iterable of batches) and return
    the statistics of every CGConv2d / PGConv2d / FBSConv2d, in module order."""
    gated = [(n, m) for n, m in model.named_modules() if isinstance(m, (CGConv2d, PGConv2d, FBSConv2d))]
    shapes: dict[str, tuple] = {}
    handles = []

    def record_shape(name):
        def hook(module, inputs, output):  # returns None: the output is left unchanged
            shapes.setdefault(name, tuple(output.shape))
        return hook

    for name, module in gated:
        module.gate_counter = GateCounter()
        handles.append(module.register_forward_hook(record_shape(name)))
    run_with_hooks(model, samples, handles)
    stats = []
    for name, module in gated:
        counter, module.gate_counter = module.gate_counter, None
        if name not in shapes:
            continue  # not reached by the forward
        r = counter.fraction_on()
        if isinstance(module, FBSConv2d):
            w = module.conv.weight
            dense = conv_macs(shapes[name], w.shape)
            predictor = module.gate.weight.numel() + (
                module.gate_hidden.weight.numel() if module.gate_hidden is not None else 0)
            stats.append(_fbs_stats(name, dense, r, counter.in_density_x_out_density / counter.samples,
                                    predictor, counter.samples, module.density))
        elif isinstance(module, CGConv2d):
            dense = conv_macs(shapes[name], module.weight.shape, module.groups)
            stats.append(_cg_stats(name, dense, r, float(module.mask.detach().float().mean()), counter.samples))
        else:
            dense = conv_macs(shapes[name], module.weight.shape, module.groups)
            stats.append(_pg_stats(name, dense, r, module.abits, module.pred_bits,
                                   float(module.static_scale or 0.0), counter.samples))
    return stats


def summarize(stats: list[GateLayerStats]) -> dict:
    """Totals over the gated layers, per sample: dense MACs, expected multiply-adds, and the
    bit-weighted MACs (PG's MSB+LSB cost in full-precision MAC equivalents; equal to the
    expected MACs for CG and FBS), with their ratios to dense."""
    dense = sum(s.dense_macs for s in stats)
    expected = sum(s.expected_macs for s in stats)
    weighted = sum(s.details.get("bit_weighted_macs", s.expected_macs) for s in stats)
    ratio = (lambda v: v / dense) if dense else (lambda v: float("nan"))
    return {"gated_layers": len(stats), "dense_macs": dense, "expected_macs": expected,
            "expected_over_dense": ratio(expected), "bit_weighted_macs": weighted,
            "bit_weighted_over_dense": ratio(weighted)}


def gate_report(model: nn.Module, samples) -> dict:
    """Everything the export report needs about the gated layers, from sample inputs:
    {"layers": [per-layer statistics], "summary": summarize(...), "pg_scales": pg_scale_modes}."""
    stats = gate_statistics(model, samples)
    return {"layers": [s.as_dict() for s in stats], "summary": summarize(stats),
            "pg_scales": pg_scale_modes(model)}


def load_sample_inputs(path, input_shape) -> list[np.ndarray]:
    """Sample inputs for gate statistics and PG calibration from a file: .npy, .npz (its first
    array) or .pt/.pth (a tensor, loaded with weights_only=True), holding M samples of shape
    input_shape[1:] (or exactly one sample without the batch axis). Returns float32 batches of
    the export's batch size input_shape[0] (a remainder of fewer samples is dropped, so that
    the same batches also run through the exported model)."""
    from .errors import UserError
    from .fileio import cast_values, read_array
    data = read_array(path, "sample inputs")
    sample_shape = tuple(input_shape[1:])
    if tuple(data.shape) == sample_shape:
        data = data[None]
    if data.ndim != len(input_shape) or tuple(data.shape[1:]) != sample_shape:
        raise UserError(f"sample inputs {path} have shape {tuple(data.shape)}; expected (M, {', '.join(map(str, sample_shape))})")
    batch = int(input_shape[0])
    if data.shape[0] < batch:
        raise UserError(f"sample inputs {path} hold {data.shape[0]} samples, fewer than one batch of {batch}")
    data = cast_values(data, np.float32, f"sample inputs {path}")
    return [data[i:i + batch] for i in range(0, data.shape[0] - batch + 1, batch)]


# --------------------------------------------------------------------------- PG scales

def calibrate_pg_scales(model: nn.Module, samples, include_quantized_convs: bool = True) -> dict[str, float]:
    """Replace PG's per-batch dynamic activation scale by a calibrated static one.

    Runs `model` (eval) on `samples` with the dynamic scales and records max|x| of each
    PGConv2d's input (and, with `include_quantized_convs`, each QuantizedConv2d's with
    abits > 1, whose activation quantizer is also per-batch) over all samples; then sets
    `module.static_scale = max + 1e-7` (the seed's formula over the calibration set). Inputs
    larger than the calibrated max are clamped to the top level, as the seed's quantizer does
    within a batch. Returns {module name: scale}. The exported PGConv carries it as the
    `static_scale` attribute, which makes the model's outputs independent of the batch.
    """
    kinds = (PGConv2d, QuantizedConv2d) if include_quantized_convs else (PGConv2d,)
    targets = {n: m for n, m in model.named_modules()
               if isinstance(m, kinds) and (isinstance(m, PGConv2d) or m.abits > 1)}
    maxima = dict.fromkeys(targets, 0.0)
    handles = []

    def record_max(name):
        def hook(module, inputs):  # returns None: the input is left unchanged
            maxima[name] = max(maxima[name], float(inputs[0].detach().abs().max()))
        return hook

    for name, module in targets.items():
        module.static_scale = 0.0
        handles.append(module.register_forward_pre_hook(record_max(name)))
    run_with_hooks(model, samples, handles)
    scales = {}
    for name, module in targets.items():
        s = float(np.float32(maxima[name]) + np.float32(1e-7))
        module.static_scale = s
        scales[name] = s
    return scales


def pg_scale_modes(model: nn.Module) -> dict[str, str]:
    """{module name: "dynamic" | "static <scale>"} for every PG layer and quantized conv."""
    modes = {}
    for name, m in model.named_modules():
        if isinstance(m, PGConv2d) or (isinstance(m, QuantizedConv2d) and m.abits > 1):
            s = float(m.static_scale or 0.0)
            modes[name] = f"static {s:.6g}" if s > 0 else "dynamic"
    return modes


# --------------------------------------------------------------------------- ONNX side

def describe_gated_nodes(model: onnx.ModelProto) -> list[dict]:
    """The gate2deploy::CGConv/PGConv/FBSConv nodes of an ONNX model with their attributes;
    PG's `scale` says "dynamic" or "static <value>"."""
    out = []
    for node in model.graph.node:
        if node.domain != ops.DOMAIN or node.op_type not in ops.GATED_OPS:
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in attrs.items()}
        entry = {"name": node.name, "op": node.op_type, "attributes": attrs}
        if node.op_type == "PGConv":
            s = float(attrs.get("static_scale", 0.0))
            entry["scale"] = f"static {s:.6g}" if s > 0 else "dynamic"
        out.append(entry)
    return out


def _shape_map(model: onnx.ModelProto) -> dict[str, tuple]:
    shapes = {}
    for vi in list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output):
        dims = vi.type.tensor_type.shape.dim
        shapes[vi.name] = tuple(d.dim_value if d.HasField("dim_value") else None for d in dims)
    for init in model.graph.initializer:
        shapes[init.name] = tuple(init.dims)
    for node in model.graph.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    shapes[node.output[0]] = tuple(a.t.dims)
    return shapes


def _constant(model: onnx.ModelProto, name: str) -> np.ndarray | None:
    for init in model.graph.initializer:
        if init.name == name:
            return onnx.numpy_helper.to_array(init)
    for node in model.graph.node:
        if node.op_type == "Constant" and node.output[0] == name:
            return onnx.numpy_helper.to_array(node.attribute[0].t)
    return None


def onnx_gate_statistics(model: onnx.ModelProto, samples) -> list[GateLayerStats]:
    """Statistics of an exported model's gated nodes, measured by running it in ONNX Runtime on
    `samples` (a tensor/array or an iterable of batches, each of the model's input shape).
    The custom nodes are lowered (`lower_portable`) with their gates and FBS inputs exposed as
    extra outputs; the model given is not modified."""
    import onnx_graphsurgeon as gs

    from .passes import ir
    from .runtimes.ort import open_session
    from .passes.lower_portable import LoweringResult, lower_portable

    model = onnx.shape_inference.infer_shapes(copy.deepcopy(model))
    nodes = {n.name: n for n in model.graph.node
             if n.domain == ops.DOMAIN and n.op_type in ops.GATED_OPS}
    if not nodes:
        return []
    shapes = _shape_map(model)
    graph = ir.import_graph(model)
    fbs_inputs = {}
    for node in graph.nodes:
        if node.name in nodes and node.op == "FBSConv":
            fbs_inputs[node.name] = node.inputs[0].name
            if node.inputs[0] not in graph.outputs:
                graph.outputs.append(node.inputs[0])
    result = LoweringResult()
    graph = lower_portable(graph, result, expose_gates=True)
    for t in graph.outputs:
        if isinstance(t, gs.Variable) and t.dtype is None:
            t.dtype = np.float32
    lowered = ir.export_model(graph)
    session = open_session(lowered, threads=2)
    input_name = session.get_inputs()[0].name
    out_names = [o.name for o in session.get_outputs()]
    on = dict.fromkeys(nodes, 0.0)
    total = dict.fromkeys(nodes, 0.0)
    density_product = dict.fromkeys(nodes, 0.0)
    count = 0
    for batch in _batches(samples):
        arr = batch.detach().cpu().numpy().astype(np.float32) if isinstance(batch, torch.Tensor) else batch
        values = dict(zip(out_names, session.run(None, {input_name: arr})))
        count += arr.shape[0]
        for name, gate_name in result.gate_outputs.items():
            gate = values[gate_name]
            on[name] += float(gate.sum())
            total[name] += gate.size
            if name in fbs_inputs:
                x = values[fbs_inputs[name]]
                in_density = (np.abs(x).max(axis=(2, 3)) > 0).mean(axis=1)
                density_product[name] += float((in_density * gate.mean(axis=1)).sum())
    stats = []
    for name, node in nodes.items():
        r = on[name] / total[name] if total[name] else float("nan")
        w_shape = shapes.get(node.input[1])
        y_shape = shapes.get(node.output[0])
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        dense = conv_macs(y_shape, w_shape)
        if node.op_type == "CGConv":
            base = _constant(model, node.input[2])
            stats.append(_cg_stats(name, dense, r, float(base.mean()) if base is not None else float("nan"), count))
        elif node.op_type == "PGConv":
            stats.append(_pg_stats(name, dense, r, int(attrs["abits"]), int(attrs["pred_bits"]),
                                   float(attrs.get("static_scale", 0.0)), count))
        else:
            stats.append(_fbs_stats(name, dense, r, density_product[name] / max(count, 1),
                                    int(w_shape[0]) * int(w_shape[1]), count, float(attrs["density"])))
    return stats
