"""Layer-by-layer verification of dynamically gated layers (CG, PG, FBS) in an exported model.

Why not compare only the network outputs: the gates are discontinuous. A float rounding
difference of 1e-7 in a partial sum that sits on its threshold flips a gate, and (for PG) a
rounding difference of an activation that sits half-way between two quantization levels moves
it by a whole level; later layers amplify that, so the network outputs of two correct
implementations can differ visibly. What must hold is: every gated layer, fed the SAME input,
computes what the PyTorch layer computes, except at ties.

`verify_gated_layers` runs the compiled model with each gated layer's input and output exposed,
runs each PyTorch gated module (eval) on the exported model's own input of that layer, and
checks per layer:
- where gates agree, |y_onnx - y_torch| <= rtol * max|y_torch| (default rtol 1e-4);
- every element (CG, PG) or (sample, channel) (FBS) that differs more is a flipped gate at a
  tie: its decision value (CG: the partial sum against rm + delta*sqrt(rv+eps); PG: out_msb
  against delta; FBS: the saliency against the per-sample (k+1)-th largest) is within
  tie_eps * max|decision| (default 1e-5) of its threshold; with a fused quantizer in the
  layer's epilogue (passes/fuse_gated_epilogue.py), an element whose quantizer input lies
  within tie_eps * levels of half-way between two levels is at a tie too;
- flipped gates are rare: at most max(2, 0.1% of the layer's gates);
- non-finite values match: an element NaN or inf on one side only (or NaN against inf, or
  infs of opposite sign) fails the layer outright (counted as a flip off any tie); NaN in
  both, or the same inf in both, agrees (compare.nonfinite_mismatch). Errors and scales are
  taken over the finite elements, so a NaN never disappears into a maximum.
The result lists, per layer, the number of gates, flips, and the largest error where gates
agree; `passed` is the conjunction.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from torch import nn

from . import ops
from .gated import (CGConv2d, FBSConv2d, PGConv2d, _cg_seed_eval, _fbs_active, _pg_seed_eval,
                    truncate_msb)
from .passes.fuse_gated_epilogue import EPILOGUE_INPUTS_AT, OUTPUT_STEP_ATTRS, activation_name
from .runtimes.reference import gated_post_epilogue
from .compare import compare_outputs, nonfinite_agree, nonfinite_mismatch

OPS = {CGConv2d: "CGConv", PGConv2d: "PGConv", FBSConv2d: "FBSConv"}


@dataclass
class GatedLayerCheck:
    module: str
    node: str
    op: str
    gates: int
    flipped: int
    flipped_off_tie: int          # flips NOT at a tie (must be 0)
    max_abs_err_agreeing: float   # largest |diff| where the gates agree
    scale: float                  # max|y_torch|
    passed: bool
    note: str = ""


@dataclass
class GatedVerifyResult:
    layers: list[GatedLayerCheck] = field(default_factory=list)
    output_max_abs_err: float = 0.0
    output_max_rel_err: float = 0.0

    @property
    def passed(self) -> bool:
        return all(layer.passed for layer in self.layers)

    @property
    def flipped(self) -> int:
        return sum(layer.flipped for layer in self.layers)

    def as_dict(self) -> dict:
        return {"passed": self.passed, "flipped_gates": self.flipped,
                "output_max_abs_err": self.output_max_abs_err,
                "output_max_rel_err": self.output_max_rel_err,
                "layers": [vars(layer) for layer in self.layers]}


def _execution_order(model: nn.Module, example: torch.Tensor) -> list[tuple[str, nn.Module]]:
    order: list[tuple[str, nn.Module]] = []
    handles = [m.register_forward_pre_hook(lambda mod, inp, name=name: order.append((name, mod)) and None)
               for name, m in model.named_modules() if isinstance(m, tuple(OPS))]
    try:
        with torch.no_grad():
            model.eval()(example)
    finally:
        for h in handles:
            h.remove()
    return order


def _layer_eval(module: nn.Module, x: torch.Tensor):
    """(y, gate, decision, threshold) of a gated module on the input its exported node sees
    (for CG that is after the channel shuffle, which is a separate node)."""
    with torch.no_grad():
        if isinstance(module, CGConv2d):
            args = (module.stride, module.padding, module.dilation, module.groups)
            y = _cg_seed_eval(x, module.weight, module.mask, module.threshold, module.bn.running_mean,
                              module.bn.running_var, module.bn.eps, module.alpha, *args)
            yp = F.conv2d(x, module.weight * module.mask, None, *args)
            _, thr = module.export_constants()
            bn = F.batch_norm(yp, module.bn.running_mean, module.bn.running_var, None, None, False, 0.0, module.bn.eps)
            gate = torch.sigmoid(module.alpha * (bn - module.threshold)) - 0.5 > 0
            return y, gate, yp, thr.view(1, -1, 1, 1)
        if isinstance(module, PGConv2d):
            args = (module.stride, module.padding, module.dilation, module.groups)
            scale = module._scale()
            wq = module.quantized_weight()
            y = _pg_seed_eval(x, wq, module.threshold, module.abits, module.pred_bits, module.alpha, scale, *args)
            msb = F.conv2d(truncate_msb(x, module.abits, module.pred_bits, scale), wq, None, *args)
            gate = torch.sigmoid(module.alpha * (msb - module.threshold)) > 0.5
            return y, gate, msb, module.threshold
        y = module(x)
        g = module.saliency_of(x)
        o = g.shape[1]
        active = _fbs_active(g, module.density, module.threshold).bool()
        if module.threshold is not None:  # a fixed threshold (Mayo's local / global)
            return y, active, g, torch.full_like(g[:, :1], module.threshold)
        k = min(o - 1, module.top_k())
        kth = torch.sort(g, dim=1).values[:, o - k - 1:o - k] if module.top_k() < o else torch.full_like(g[:, :1], -np.inf)
        return y, active, g, kth


def _unfolded_input(module: nn.Module, x: np.ndarray, compiled: onnx.ModelProto, captured_node) -> np.ndarray:
    """The gated layer's input at the module's width and channel order. The fold may have
    removed input channels of an FBS layer (passes/channel_analysis.py `_fbs_conv`: only
    channels known to be exactly zero) and the width choice may have appended zero channels;
    the compiled weight's columns are then a subset of the module's (plus zero columns),
    which names where each compiled channel came from; removed channels were zeros."""
    if not isinstance(module, FBSConv2d):
        return x
    twin = next((n for n in compiled.graph.node if n.name == captured_node.name and n.domain == ops.DOMAIN), None)
    inits = {t.name: t for t in compiled.graph.initializer}
    full_w = module.conv.weight.detach().numpy()
    if twin is None:  # the portable lowering: its Conv reads the same input with the same weight
        twin = next((n for n in compiled.graph.node if n.op_type == "Conv" and n.input[0] == captured_node.input[0]
                     and n.input[1] in inits and inits[n.input[1]].dims[0] == full_w.shape[0]), None)
    if twin is None or twin.input[1] not in inits:
        return x
    kept_w = onnx.numpy_helper.to_array(inits[twin.input[1]])
    if kept_w.shape == full_w.shape and np.array_equal(kept_w, full_w):
        return x
    full = np.zeros((x.shape[0], full_w.shape[1], *x.shape[2:]), x.dtype)
    used: set[int] = set()
    for c in range(min(kept_w.shape[1], x.shape[1])):
        match = next((i for i in range(full_w.shape[1]) if i not in used
                      and np.array_equal(full_w[:, i], kept_w[:, c])), None)
        if match is None:
            if kept_w[:, c].any():
                return x  # not a slice of the module's weight: left to the checks as it is
            continue  # a zero padding column: its channel carries nothing
        used.add(match)
        full[:, match] = x[:, c]
    return full


@dataclass
class _Epilogue:
    output: str
    scale: np.ndarray | None
    shift: np.ndarray | None
    activation: str
    steps: dict  # clip_max, quantize_* (OPS.md), as the node has them

    def apply(self, y: np.ndarray, quantize: bool = True) -> np.ndarray:
        steps = self.steps if quantize else {k: v for k, v in self.steps.items() if not k.startswith("quantize_")}
        return gated_post_epilogue(y, self.scale, self.shift, self.activation, **steps)

    def quantizer_ties(self, y: np.ndarray, band: float) -> np.ndarray | None:
        """Where the fused quantizer's input (the epilogue before it, of the PyTorch layer's
        y) lies within `band` of half-way between two levels: a rounding difference there
        moves the output by a whole level (this module's docstring), so a difference there is
        a tie, like a gate's. None without a quantizer."""
        levels = self.steps.get("quantize_levels")
        if levels is None:
            return None
        pre = self.apply(y, quantize=False)
        finite = np.abs(pre[np.isfinite(pre)])
        scale = float(self.steps.get("quantize_scale", 0.0)) or (
            float(finite.max()) if finite.size else 0.0) + float(self.steps.get("quantize_eps", 1e-7))
        r = np.clip(np.abs(pre) / np.float32(scale), 0, 1) * np.float32(levels)
        return np.abs(r - np.floor(r) - 0.5) <= band * max(1.0, float(levels))


def _fused_epilogue(compiled: onnx.ModelProto, captured_node) -> _Epilogue | None:
    """The epilogue passes/fuse_gated_epilogue.py gave the compiled twin of a captured CG/PG
    node (same name), or None: the compiled node then writes the BatchNorm (+ Relu) output,
    and the check compares it with the PyTorch layer's output put through the same epilogue."""
    twin = next((n for n in compiled.graph.node if n.name == captured_node.name
                 and n.domain == ops.DOMAIN), None)
    if twin is None or twin.op_type not in EPILOGUE_INPUTS_AT:
        return None
    plain = EPILOGUE_INPUTS_AT[twin.op_type]
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in twin.attribute}
    activation = activation_name(attrs.get("activation"))
    steps = {k: float(attrs[k]) for k in OUTPUT_STEP_ATTRS if k in attrs}
    if len(twin.input) <= plain and not activation and not steps:
        return None
    scale = shift = None
    if len(twin.input) > plain:
        names = twin.input[plain:plain + 2]
        found = {t.name: t for t in compiled.graph.initializer if t.name in names}
        if len(found) != 2:
            return None
        scale, shift = (onnx.numpy_helper.to_array(found[name]) for name in names)
    return _Epilogue(twin.output[0], scale, shift, activation, steps)


def verify_gated_layers(model: nn.Module, captured: onnx.ModelProto, compiled: onnx.ModelProto,
                        inputs: list[np.ndarray], make_session=None, rtol: float = 1e-4,
                        tie_eps: float = 1e-5, twins: onnx.ModelProto | None = None) -> GatedVerifyResult:
    """Check every gated layer of `compiled` (the pipeline's output, either target) against the
    PyTorch `model`, on `inputs` (arrays of the export's input shape). `captured` is the model
    as captured (before the passes): it names each gated node's input and output tensors.
    `make_session(proto)` opens a session (default: runtimes.ort.open_session, which
    registers the custom-op library when the model still has gate2deploy nodes). `twins`: the
    model the fused epilogues are read from, when `compiled` no longer has some of the custom
    nodes (gate2deploy.kernel_choice lowered them after the pipeline; the lowered form writes
    the same output tensor); default `compiled`."""
    if make_session is None:
        from .runtimes.ort import open_session as make_session
    nodes = [n for n in captured.graph.node if n.domain == ops.DOMAIN and n.op_type in OPS.values()]
    result = GatedVerifyResult()
    if not nodes:
        return result
    order = _execution_order(model, torch.from_numpy(np.asarray(inputs[0], np.float32)))
    if [OPS[type(m)] for _, m in order] != [n.op_type for n in nodes]:
        raise ValueError("the gated modules and the captured gate2deploy nodes do not correspond one to one")
    produced = {o for n in compiled.graph.node for o in n.output} | {i.name for i in compiled.graph.input}
    epilogues = [_fused_epilogue(twins if twins is not None else compiled, node) for node in nodes]
    probe = copy.deepcopy(compiled)
    existing = {o.name for o in probe.graph.output}
    wanted = []
    for node, epilogue in zip(nodes, epilogues):
        for name in (node.input[0], epilogue.output if epilogue else node.output[0]):
            if name in produced and name not in existing:
                probe.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
                existing.add(name)
            wanted.append(name)
    session = make_session(probe)
    out_names = [o.name for o in session.get_outputs()]
    main_output = compiled.graph.output[0].name
    per_layer: dict[int, dict] = {i: {"gates": 0, "flipped": 0, "off_tie": 0, "err": 0.0, "scale": 0.0}
                                  for i in range(len(nodes))}
    notes: dict[int, str] = {}
    for array in inputs:
        array = np.asarray(array, np.float32)
        values = dict(zip(out_names, session.run(None, {session.get_inputs()[0].name: array})))
        with torch.no_grad():
            reference = model.eval()(torch.from_numpy(array)).numpy()
        output = compare_outputs(reference, values[main_output])
        result.output_max_abs_err = max(result.output_max_abs_err, output.max_abs_err)
        result.output_max_rel_err = max(result.output_max_rel_err,
                                        output.max_abs_err / max(output.scale, 1e-30))
        for i, (node, (name, module)) in enumerate(zip(nodes, order)):
            epilogue = epilogues[i]
            x_name, y_name = node.input[0], epilogue.output if epilogue else node.output[0]
            if x_name not in values or y_name not in values:
                notes[i] = "input or output tensor not present in the compiled model; not checked"
                continue
            x_in = _unfolded_input(module, values[x_name], compiled, node)
            y, gate, decision, threshold = (t.detach().numpy() for t in _layer_eval(module, torch.from_numpy(x_in)))
            quantizer_ties = None
            if epilogue:  # the fused BatchNorm, Relu, ... after the layer, on the PyTorch side too
                quantizer_ties = epilogue.quantizer_ties(y, tie_eps)
                y = epilogue.apply(y)
            y_onnx = values[y_name]
            stats = per_layer[i]
            finite_y = np.abs(y[np.isfinite(y)])
            scale = float(finite_y.max()) if finite_y.size else 0.0
            stats["scale"] = max(stats["scale"], scale)
            broken = nonfinite_mismatch(y, y_onnx)  # never excused as a tie
            with np.errstate(invalid="ignore"):  # inf - inf where both agree: masked below
                differs = (np.abs(y_onnx - y) > rtol * max(scale, 1e-30)) | broken
            differs &= ~nonfinite_agree(y, y_onnx)
            if gate.ndim == 2:  # FBS: a gate is a (sample, channel)
                differs = differs.any(axis=(2, 3))
                broken = broken.any(axis=(2, 3))
            finite_decision = np.abs(decision[np.isfinite(decision)])
            band = tie_eps * max(1.0, float(finite_decision.max()) if finite_decision.size else 1.0)
            at_tie = (np.abs(decision - threshold) <= band) & ~broken
            if quantizer_ties is not None:
                at_tie |= quantizer_ties & ~broken
            stats["gates"] += gate.size
            stats["flipped"] += int(differs.sum())
            stats["off_tie"] += int((differs & ~at_tie).sum())
            agree = ~differs if gate.ndim == 4 else np.broadcast_to(~differs[:, :, None, None], y.shape)
            agree = agree & np.isfinite(y) & np.isfinite(y_onnx)
            if agree.any():
                stats["err"] = max(stats["err"], float(np.abs(y_onnx - y)[agree].max()))
    for i, (node, (name, _module)) in enumerate(zip(nodes, order)):
        s = per_layer[i]
        ok = s["off_tie"] == 0 and s["flipped"] <= max(2, 1e-3 * s["gates"]) and i not in notes
        result.layers.append(GatedLayerCheck(name, node.name, node.op_type, s["gates"], s["flipped"],
                                             s["off_tie"], s["err"], s["scale"], ok, notes.get(i, "")))
    return result
