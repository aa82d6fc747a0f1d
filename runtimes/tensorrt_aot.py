"""TensorRT AOT plugins: the gated ops as Triton kernels compiled into the engine, so that an
engine runs without Python (TensorRT >= 10.9, `tensorrt.plugin.aot_impl`).

A TensorRT AOT plugin is ONE kernel, launched by TensorRT with (input pointers, int32 extra
arguments, output pointers) on a grid it computes from shape expressions. CGConv, PGConv and
FBSConv each need more than that (CG a channel plan, PG a scale reduction and X's parts, FBS
a saliency and a top-k), so `lower_for_aot` rewrites each gated node of a model.trt.onnx into
standard ONNX ops plus one-kernel plugin nodes (`AOT_PLUGINS`):

Contract of `lower_for_aot(model)`:
Expects: a model as `prepare_for_tensorrt` writes it (export --target trt's model.trt.onnx):
  CGConv / PGConv / FBSConv nodes of the gate2deploy domain with every plugin field written
  out; CGConv's W and base_mask, PGConv's and FBSConv's W and FBSConv's fc_W initializers
  (constants: the plan is computed here); opset 17 (the export's).
Guarantees: the same function (OPS.md semantics), every gated node replaced by:
  CGConv(X, W, base_mask, thr)  -> CGConvPlanned(X, W1, W2, chans, counts, thr)
        W1, W2, chans, counts: triton_kernels.cg_plan(W, base_mask) as initializers (the
        layout _cg_conv_kernel reads; the JIT plugin builds the same on the device per call)
  PGConv(X, W, thr)             -> scale = static_scale, or ReduceMax(Abs(X)) + 1e-7 as [1]
        (msb, lsb) = PGSplit(X, scale); Y = PGConvParts(msb, lsb, W channels-last, thr, scale)
  FBSConv(X, W, fc_W, fc_b, bn_scale, bn_shift, beta)
        -> g = act(MatMul(pool(Pad(X, pool_pads)), fc_W^T) + fc_b)   (standard ops, [N, O])
           (values, slots) = TopK(g, O): every channel once, by saliency descending
           valid = values > values[:, k] (k = ceil(O * density): the reference's rule, ties at
           the cut excluded); all valid when k >= O
           Y = FBSConvSlots(X, W channels-last, slots, valid, g, bn_scale, bn_shift, beta)
        FBSConvSlots writes invalid slots as 0 (_fbs_conv_kernel's ZERO_INVALID): an AOT
        plugin's output is not zero-initialised and there is no second kernel to clear it.
  Plugin nodes carry `plugin_namespace`, `plugin_version` and `aot` = 1 (TensorRT's ONNX
  parser: use the plugin's AOT implementation). The added tensors a plugin's launch depends
  on (PG's parts, FBS's slots) get value_info where X's shape is recorded (for `preflight`).
What it does not prove: that TensorRT launches the kernels as `aot_launch` describes. The
tests run the lowered graph with every plugin node launched through `launch` (the same
kernels, argument order and grid as `aot_launch` gives TensorRT) on Triton's interpreter and
compare with the PyTorch model; no TensorRT has ever run here.

`aot_launch(op, shapes, attrs)`: the kernel, its Triton signature, grid and int32 extra
arguments for one plugin node, from its input shapes: ints here, TensorRT's shape
expressions in `aot_impl` (only the batch may be symbolic; tile sizes are chosen for batch 1).
Triton >= 3.3 appends two scratch-pointer parameters to every kernel; TensorRT passes only
(inputs, extras, outputs), so `compile_for_aot` removes them from the PTX when the kernel
uses no scratch memory (checked), and lowers num_stages until the kernel's static shared
memory fits the 48 KiB a launch gets without an opt-in attribute.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from gate2deploy.errors import UserError
from gate2deploy.ops import PLUGIN_NAMESPACE, PLUGIN_VERSION

from .tensorrt_plugins import CONV_ATTRIBUTES, conv_out_dim, dim_value

SHARED_LIMIT = 48 * 1024  # bytes of static shared memory a kernel launch gets by default
TOPK_LIMIT = 3840  # TensorRT's TopK takes K <= 3840: FBS layers wider than that stay JIT plugins
FP32_MARK = "/aot_fp32/"  # in the names of the standard nodes the lowering adds: pinned to fp32 in an
# --fp16 build (tensorrt_plugins.build_engine), as the reference and the JIT plugins compute them


@dataclass(frozen=True)
class AotSpec:
    op: str
    inputs: tuple  # tensor inputs, in order (the kernel's first pointers)
    outputs: tuple  # tensor outputs, in order (the kernel's pointers after its int32 scalars)
    attributes: tuple  # (name, "ints" | "int" | "string", default)
    kernel: str  # runtimes.triton_kernels kernel
    shaped: tuple  # the inputs whose shapes aot_launch reads
    int32: tuple = ()  # the int32 tensors (autotune); every other tensor is fp32


AOT_PLUGINS = {
    "CGConvPlanned": AotSpec("CGConvPlanned", ("X", "W1", "W2", "chans", "counts", "threshold"), ("Y",),
                             CONV_ATTRIBUTES, "_cg_conv_kernel", ("X", "W1"), int32=("chans", "counts")),
    "PGSplit": AotSpec("PGSplit", ("X", "scale"), ("MSB", "LSB"),
                       (("abits", "int", 8), ("pred_bits", "int", 4)), "_pg_split_kernel", ("X",)),
    "PGConvParts": AotSpec("PGConvParts", ("MSB", "LSB", "W", "threshold", "scale"), ("Y",),
                           (("abits", "int", 8), ("pred_bits", "int", 4), ("group", "int", 1), *CONV_ATTRIBUTES),
                           "_pg_conv_kernel", ("MSB", "W")),
    "FBSConvSlots": AotSpec("FBSConvSlots", ("X", "W", "slots", "valid", "gamma", "bn_scale", "bn_shift", "beta"),
                            ("Y",), (("activation", "string", "Relu"), *CONV_ATTRIBUTES), "_fbs_conv_kernel",
                            ("X", "W", "slots"), int32=("slots", "valid")),
}


@dataclass
class AotLaunch:
    kernel: str
    signature: list  # [(argument, Triton type or constexpr value)] (triton_kernels.kernel_signatures)
    grid: tuple  # (x, y, z): ints or shape expressions
    values: dict  # the kernel's int32 scalars by name (ints or shape expressions)

    @property
    def extras(self) -> list:
        """The int32 scalars in the kernel's order (after its input pointers)."""
        return [self.values[name] for name, t in self.signature if t == "i32"]

    @property
    def constexprs(self) -> dict:
        return {a: v for a, v in self.signature if not isinstance(v, str)}


def _int_cdiv(a, b):
    return -(-a // b)


def _static(v, what: str) -> int:
    try:
        return dim_value(v)
    except UserError:
        raise UserError(f"AOT plugin: {what} must be static (only the batch may be dynamic)") from None


def aot_launch(op: str, shapes: dict, attrs: dict, cdiv=_int_cdiv) -> AotLaunch:
    """The launch of plugin `op` (AOT_PLUGINS) for input shapes {input name: shape} (ints,
    or TensorRT shape expressions whose batch may be symbolic) and attributes {name: value}
    (defaults filled in from the spec). fp32 I/O (the plugins declare FP32 only)."""
    from . import triton_kernels as tk
    spec = AOT_PLUGINS[op]
    a = {name: default for name, _, default in spec.attributes}
    a.update(attrs)
    if op == "PGSplit":
        x = shapes["X"]
        # the batch (maybe symbolic) times the static rest: ShapeExpr * int only (no __rmul__)
        numel = x[0] * math.prod(_static(d, f"PGSplit input dimension {i + 1}") for i, d in enumerate(x[1:]))
        sig = tk.kernel_signatures("fp32", abits=int(a["abits"]), pred_bits=int(a["pred_bits"]))[spec.kernel]
        return AotLaunch(spec.kernel, sig, (cdiv(numel, tk.SPLIT_BLOCK), 1, 1), {"NUMEL": numel})
    x, w = shapes["MSB" if op == "PGConvParts" else "X"], shapes["W" if op != "CGConvPlanned" else "W1"]
    n = x[0]
    c, h, wd = (_static(v, f"{op} input dimension {i + 1}") for i, v in enumerate(x[1:4]))
    o, kh, kw, cw = (_static(v, f"{op} weight dimension {i}") for i, v in enumerate(w))
    sh, sw = (int(v) for v in a["strides"])
    pt, pl, pb, pr = (int(v) for v in a["pads"])
    dh, dw = (int(v) for v in a["dilations"])
    oh, ow = conv_out_dim(h, kh, sh, pt, pb, dh), conv_out_dim(wd, kw, sw, pl, pr, dw)
    if oh <= 0 or ow <= 0:
        raise UserError(f"AOT plugin {op}: empty output ({oh}x{ow})")
    values = {"C": c, "H": h, "W": wd, "O": o, "OH": oh, "OW": ow, "M": n * (oh * ow),
              "sh": sh, "sw": sw, "pt": pt, "pl": pl, "dh": dh, "dw": dw}
    if op == "CGConvPlanned":
        bm, bn = tk.tile_sizes(oh * ow, o)
        grid = (cdiv(values["M"], bm), _int_cdiv(o, bn), 1)
        sig = tk.kernel_signatures("fp32", kh, kw, bm, bn)[spec.kernel]
    elif op == "PGConvParts":
        group = int(a["group"])
        if group < 1 or o % group or c != cw * group:
            raise UserError(f"AOT plugin PGConvParts: group {group} does not fit W {tuple(w)} and {c} channels")
        og = o // group
        values.update(CW=cw, OG=og)
        bm, bn = tk.tile_sizes(oh * ow, og, group)
        grid = (cdiv(values["M"], bm), group * _int_cdiv(og, bn), 1)
        sig = tk.kernel_signatures("fp32", kh, kw, bm, bn, int(a["abits"]), int(a["pred_bits"]))[spec.kernel]
    else:  # FBSConvSlots
        if a["activation"] not in ("Relu", "Identity"):
            raise UserError(f"AOT plugin FBSConvSlots: activation must be 'Relu' or 'Identity', not {a['activation']!r}")
        s = _static(shapes["slots"][1], "FBSConvSlots' slot count")
        values["S"] = s
        bm, bn = tk.tile_sizes(oh * ow, s, 1)
        grid = (_int_cdiv(oh * ow, bm), _int_cdiv(s, bn), n)
        sig = tk.kernel_signatures("fp32", kh, kw, bm, bn, relu=a["activation"] == "Relu",
                                   zero_invalid=True)[spec.kernel]
    return AotLaunch(spec.kernel, sig, grid, values)


def launch(op: str, inputs: list, attrs: dict):
    """Run plugin `op` with Triton as TensorRT's AOT launch would: the kernel of `aot_launch`
    on its grid with (inputs, extras, outputs); torch tensors in, the output tensors out.
    The tests run lowered graphs through this (on the interpreter); the plugins' JIT
    implementation (tensorrt_plugins._aot_plugin_functions) too."""
    from . import triton_kernels as tk

    inputs, plan, outputs = prepare_launch(op, inputs, attrs)
    constexprs = plan.constexprs
    if "RINT_ASM" in constexprs:  # PTX inline asm: not on the interpreter (pg_parts does the same)
        constexprs["RINT_ASM"] = int(not tk.INTERPRETED)
    if all(g > 0 for g in plan.grid):
        getattr(tk, plan.kernel)[plan.grid](*inputs, *plan.extras, *outputs, **constexprs, num_warps=tk.NUM_WARPS)
    return outputs


def preflight(model: onnx.ModelProto, target=None) -> int:
    """Compile, before TensorRT builds anything, the kernel of every AOT plugin node of `model`
    (lowered by lower_for_aot) for the GPU of this build: a refusal of compile_for_aot (shared
    memory, scratch) inside TensorRT's build would only fail the build, while here `--plugins
    auto` can still keep the JIT plugins. Triton caches the compiled kernels, so TensorRT's own
    calls of the AOT implementation reuse them. The shapes aot_launch reads (AotSpec.shaped)
    come from the initializers and the value_info (lower_for_aot records its own tensors'),
    at batch 1 (tiles and kernels do not depend on the batch); a node with a shape not
    recorded is left to the build. Returns the number of kernels compiled; raises UserError
    naming the node."""
    recorded = _recorded_dims(model.graph)
    weights = {t.name: list(t.dims) for t in model.graph.initializer}
    compiled = 0
    for node in model.graph.node:
        spec = AOT_PLUGINS.get(node.op_type) if node.domain == PLUGIN_NAMESPACE else None
        if spec is None:
            continue
        tensors = dict(zip(spec.inputs, node.input))
        shapes = {}
        for name in spec.shaped:
            tensor = tensors[name]
            if tensor in weights:
                shapes[name] = weights[tensor]
            elif recorded.get(tensor) and all(isinstance(d, int) for d in recorded[tensor][1:]):
                shapes[name] = [1, *recorded[tensor][1:]]
        if len(shapes) < len(spec.shaped):
            continue
        a = _attrs(node)
        try:
            compile_for_aot(aot_launch(spec.op, shapes, {k: a[k] for k, _, _ in spec.attributes if k in a}), target)
        except UserError as exc:
            raise UserError(f"node {node.name or node.op_type}: {exc}") from None
        compiled += 1
    return compiled


def evaluate_lowered(model: onnx.ModelProto, feeds: dict, launcher=None, device: str = "cpu") -> list:
    """Run a lowered model without TensorRT: onnx's reference evaluator for the standard ops,
    every AOT plugin node by `launcher(op, torch inputs on `device`, attributes)` (default
    `launch`: the AOT launch through Triton). The tests run it on Triton's interpreter;
    tools/gpu_check.py on a GPU with the PTX launched as TensorRT launches it."""
    import torch
    from onnx.reference import ReferenceEvaluator
    from onnx.reference.op_run import OpRun

    from .tensorrt_plugins import attribute_values

    launcher = launcher or launch

    def plugin_class(spec):
        def _run(self, *inputs, **_):
            present = {k: getattr(self, k) for k, _, _ in spec.attributes if getattr(self, k, None) is not None}
            defaults = {k: d for k, _, d in spec.attributes}
            attrs = attribute_values(spec, {**defaults, **present})
            outs = launcher(spec.op, [torch.from_numpy(np.array(i)).to(device) for i in inputs], attrs)
            return tuple(o.cpu().numpy() for o in outs)

        return type(spec.op, (OpRun,), {"op_domain": PLUGIN_NAMESPACE, "_run": _run})

    session = ReferenceEvaluator(model, new_ops=[plugin_class(s) for s in AOT_PLUGINS.values()])
    return session.run(None, feeds)


def prepare_launch(op: str, inputs: list, attrs: dict) -> tuple[list, AotLaunch, list]:
    """(contiguous inputs, aot_launch's plan, uninitialised float32 outputs) of plugin `op` on
    torch `inputs`: what `launch` and tools/gpu_check.py's driver launch both start from."""
    inputs = [t.contiguous() for t in inputs]
    plan = aot_launch(op, dict(zip(AOT_PLUGINS[op].inputs, (tuple(t.shape) for t in inputs))), attrs)
    return inputs, plan, _output_tensors(op, plan, inputs)


def _output_tensors(op: str, plan: AotLaunch, inputs: list) -> list:
    """Uninitialised float32 outputs of plugin `op` for torch `inputs` (its shape function)."""
    import torch

    if op == "PGSplit":
        return [torch.empty_like(inputs[0], dtype=torch.float32) for _ in range(2)]
    v = plan.values
    return [torch.empty((inputs[0].shape[0], v["O"], v["OH"], v["OW"]), dtype=torch.float32, device=inputs[0].device)]


def compile_for_aot(launch_plan: AotLaunch, target=None) -> tuple[str, str, int, int]:
    """(kernel name, PTX, threads per block, static shared memory) for TensorRT's AOT plugin:
    compiled with num_stages lowered until the shared memory fits SHARED_LIMIT, and the two
    scratch-pointer parameters Triton >= 3.3 appends removed (TensorRT does not pass them);
    refused where the kernel uses scratch memory."""
    import triton

    from . import triton_kernels as tk

    fn = getattr(tk, launch_plan.kernel)
    sig = {a: v if isinstance(v, str) else "constexpr" for a, v in launch_plan.signature}
    src = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=launch_plan.constexprs)
    ptx_version = aot_ptx_version(target)
    for stages in range(tk.NUM_STAGES, 0, -1):
        options = {"num_warps": tk.NUM_WARPS, "num_stages": stages}
        if ptx_version is not None:
            options["ptx_version"] = ptx_version
        kernel = triton.compile(src, target=target, options=options) if target else triton.compile(src, options=options)
        if kernel.metadata.shared <= SHARED_LIMIT:
            break
    else:
        raise UserError(f"{launch_plan.kernel}: {kernel.metadata.shared} bytes of shared memory even with one "
                        f"stage (an AOT launch gets {SHARED_LIMIT}); build with --plugins jit")
    for what in ("global_scratch_size", "profile_scratch_size"):
        if getattr(kernel.metadata, what, 0):
            raise UserError(f"{launch_plan.kernel} needs Triton {what.split('_')[0]} scratch memory, which a TensorRT "
                            f"AOT plugin cannot pass; build with --plugins jit")
    declared = sum(isinstance(t, str) for _, t in launch_plan.signature)  # pointers and i32s, no constexprs
    ptx = strip_scratch_params(kernel.asm["ptx"], kernel.metadata.name, declared)
    return kernel.metadata.name, ptx, tk.NUM_WARPS * 32, kernel.metadata.shared


def driver_cuda_version() -> str | None:
    """The CUDA version of the installed driver ("12.4"), or None where there is none."""
    import ctypes

    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    v = ctypes.c_int(0)
    if lib.cuDriverGetVersion(ctypes.byref(v)) != 0 or v.value <= 0:
        return None
    return f"{v.value // 1000}.{v.value % 1000 // 10}"


def aot_ptx_version(target=None, driver: str | None = None) -> int | None:
    """The PTX ISA version to compile an AOT kernel to: TensorRT hands an AOT plugin's PTX to the
    CUDA driver, which JIT-compiles only PTX up to its own CUDA version (Triton's default
    follows its bundled ptxas, e.g. PTX 8.8 for CUDA 12.9, which a CUDA 12.4 driver refuses).
    The lower of the driver's and the bundled ptxas's versions (Triton's own mapping,
    ptx_get_version); None (Triton's default) where no driver is installed."""
    from triton.backends.nvidia.compiler import get_ptxas, ptx_get_version

    driver = driver or driver_cuda_version()
    if driver is None:
        return None
    if target is None:  # the GPU this build runs on, as triton.compile picks it
        import triton

        target = triton.runtime.driver.active.get_current_target()
    arch = target.arch if isinstance(target.arch, int) else 90
    return min(ptx_get_version(driver), ptx_get_version(get_ptxas(arch).version))


def strip_scratch_params(ptx: str, name: str, declared: int) -> str:
    """`ptx` with the kernel's parameters after the first `declared` removed, provided there are
    at most two (Triton's global and profile scratch pointers) and the body never reads them."""
    entry = re.search(rf"\.entry\s+{re.escape(name)}\s*\((.*?)\)", ptx, re.S)
    if entry is None:
        raise UserError(f"{name}: no .entry in its PTX")
    params = [p.strip() for p in entry.group(1).split(",") if p.strip()]
    extra = params[declared:]
    if len(params) < declared or len(extra) > 2:
        raise UserError(f"{name}: its PTX has {len(params)} parameters for {declared} declared arguments")
    for p in extra:
        param_name = p.split()[-1]
        if ptx.count(param_name) != 1:  # the declaration only
            raise UserError(f"{name}: its PTX reads the hidden parameter {param_name}")
    kept = ",\n\t".join(params[:declared])
    return ptx[:entry.start(1)] + "\n\t" + kept + "\n" + ptx[entry.end(1):]


# ------------------------------------------------------------------------------------------
# The rewrite of model.trt.onnx
# ------------------------------------------------------------------------------------------
def _recorded_dims(graph: onnx.GraphProto) -> dict:
    """{tensor: [dimension: int, its symbolic name, or None]} of the graph's inputs and value_info."""
    return {v.name: [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                     for d in v.type.tensor_type.shape.dim] for v in (*graph.value_info, *graph.input)}


def _attrs(node) -> dict:
    values = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    return {k: v.decode() if isinstance(v, bytes) else v for k, v in values.items()}  # STRING attributes


def lower_for_aot(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` (model.trt.onnx) with every gated node as standard ops + AOT plugin
    nodes (module docstring)."""
    import torch

    from . import triton_kernels as tk

    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for node in graph.node:  # Constant nodes: values too (the capture writes some weights so)
        if node.op_type == "Constant" and not node.domain and len(node.attribute) == 1 \
                and node.attribute[0].name == "value":
            inits[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    new_nodes, new_inits, new_infos = [], [], []
    taken = {n for node in graph.node for n in (*node.input, *node.output)} | set(inits)
    known = _recorded_dims(graph)

    def record(name: str, elem_type: int, like: str, channels: int | None = None) -> None:
        """value_info of a tensor the lowering adds: `like`'s shape, or [its batch, channels]
        (preflight reads the plugins' input shapes from it)."""
        if like in known:
            dims = known[like] if channels is None else [known[like][0], channels]
            new_infos.append(helper.make_tensor_value_info(name, elem_type, dims))

    def const(name: str, value: np.ndarray) -> str:
        name = fresh(name)
        new_inits.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name

    def fresh(name: str) -> str:
        base, i = name, 0
        while name in taken:
            i += 1
            name = f"{base}_{i}"
        taken.add(name)
        return name

    def weight(node, index: int, what: str) -> np.ndarray:
        name = node.input[index]
        if name not in inits:
            raise UserError(f"node {node.name or node.op_type}: its {what} ({name}) is not a constant; "
                            f"the AOT plugins need it at build time (use --plugins jit)")
        return inits[name].astype(np.float32)

    def plugin(op: str, inputs: list, outputs: list, a: dict, name: str):
        spec = AOT_PLUGINS[op]
        fields = {k: a[k] for k, _, _ in spec.attributes if k in a}
        new_nodes.append(helper.make_node(op, inputs, outputs, name=fresh(name), domain=PLUGIN_NAMESPACE,
                                          plugin_namespace=PLUGIN_NAMESPACE, plugin_version=PLUGIN_VERSION,
                                          aot=1, **fields))

    def std(op: str, inputs: list, n_out: int, prefix: str, **kw) -> list:
        outs = [fresh(f"{prefix}_{op.lower()}{i or ''}") for i in range(n_out)]
        new_nodes.append(helper.make_node(op, inputs, outs, name=fresh(f"{prefix}{FP32_MARK}{op}"), **kw))
        return outs

    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset >= 18:  # ReduceMean / ReduceMax take `axes` as an attribute only before opset 18
        raise UserError(f"the AOT lowering writes opset-17 reductions; this model is opset {opset} "
                        f"(export writes 17; use --plugins jit)")

    for node in graph.node:
        if node.domain != PLUGIN_NAMESPACE:
            new_nodes.append(node)
            continue
        a, p = _attrs(node), node.name or f"{node.op_type}_{len(new_nodes)}"
        conv = {k: a[k] for k in ("strides", "pads", "dilations") if k in a}
        if node.op_type == "CGConv":
            w, mask = weight(node, 1, "W"), weight(node, 2, "base_mask")
            w1, w2, chans, counts = (t.numpy() for t in tk.cg_plan(torch.from_numpy(w), torch.from_numpy(mask)))
            plugin("CGConvPlanned", [node.input[0], const(f"{p}_W1", w1), const(f"{p}_W2", w2),
                                     const(f"{p}_chans", chans), const(f"{p}_counts", counts), node.input[3]],
                   list(node.output), conv, p)
        elif node.op_type == "PGConv":
            w = weight(node, 1, "W")
            if not 0 < int(a["pred_bits"]) < int(a["abits"]):
                raise UserError(f"node {p}: need 0 < pred_bits < abits, not {a['pred_bits']}, {a['abits']}")
            if float(a.get("static_scale", 0.0)) > 0:
                scale = const(f"{p}_scale", np.array([a["static_scale"]], np.float32))
            else:  # max|X| + 1e-7 over the whole tensor, in float32 (reference.pg_split_activations)
                (mag,) = std("Abs", [node.input[0]], 1, p)
                (mx,) = std("ReduceMax", [mag], 1, p, keepdims=0)
                (s,) = std("Add", [mx, const(f"{p}_eps", np.array(1e-7, np.float32))], 1, p)
                (scale,) = std("Reshape", [s, const(f"{p}_one", np.array([1], np.int64))], 1, p)
            bits = {k: a[k] for k in ("abits", "pred_bits")}
            msb, lsb = fresh(f"{p}_msb"), fresh(f"{p}_lsb")
            for part in (msb, lsb):
                record(part, TensorProto.FLOAT, node.input[0])
            plugin("PGSplit", [node.input[0], scale], [msb, lsb], bits, f"{p}/split")
            plugin("PGConvParts", [msb, lsb, const(f"{p}_W_cl", w.transpose(0, 2, 3, 1)), node.input[2], scale],
                   list(node.output), {**bits, "group": a.get("group", 1), **conv}, p)
        elif node.op_type == "FBSConv":
            w, fc_w = weight(node, 1, "W"), weight(node, 2, "fc_W")
            o = w.shape[0]
            pool, density = a.get("pool", "avg"), float(a["density"])
            if pool not in ("avg", "max", "l1", "l2") or not 0.0 < density <= 1.0:
                raise UserError(f"node {p}: pool {pool!r} / density {density} is not an FBSConv's "
                                f"(avg, max, l1, l2; 0 < density <= 1)")
            if o > TOPK_LIMIT:
                raise UserError(f"node {p}: {o} output channels; TensorRT's TopK takes at most {TOPK_LIMIT} "
                                f"(use --plugins jit)")
            x = node.input[0]
            pool_pads = [int(v) for v in a.get("pool_pads", (0, 0, 0, 0))]
            if any(pool_pads):
                top, left, bottom, right = pool_pads
                (x,) = std("Pad", [x, const(f"{p}_pool_pads", np.array([0, 0, top, left, 0, 0, bottom, right],
                                                                        np.int64))], 1, p)
            if pool == "l1":
                (x,) = std("Abs", [x], 1, p)
            elif pool == "l2":
                (x,) = std("Mul", [x, x], 1, p)
            (pooled,) = std("ReduceMax" if pool == "max" else "ReduceMean", [x], 1, p, axes=[2, 3], keepdims=0)
            # MatMul + Add, not Gemm: TensorRT's parser names only a Gemm's matrix-multiply layer
            # after the node, so its bias add would escape the fp32 pinning (FP32_MARK)
            (g,) = std("MatMul", [pooled, const(f"{p}_fc_W_t", np.ascontiguousarray(fc_w.T))], 1, p)
            (g,) = std("Add", [g, node.input[3]], 1, p)
            if a.get("activation", "Relu") == "Relu":
                (g,) = std("Relu", [g], 1, p)
            k = math.ceil(o * density)
            values, order = std("TopK", [g, const(f"{p}_O", np.array([o], np.int64))], 2, p, axis=1)
            (slots,) = std("Cast", [order], 1, p, to=TensorProto.INT32)
            record(slots, TensorProto.INT32, node.input[0], o)
            if k >= o:  # every channel on: valid = 1 for each slot
                (valid,) = std("Cast", [std("GreaterOrEqual", [order, order], 1, p)[0]], 1, p, to=TensorProto.INT32)
            else:
                (cut,) = std("Slice", [values, const(f"{p}_k", np.array([k], np.int64)),
                                       const(f"{p}_k1", np.array([k + 1], np.int64)),
                                       const(f"{p}_axis1", np.array([1], np.int64))], 1, p)
                (valid,) = std("Cast", [std("Greater", [values, cut], 1, p)[0]], 1, p, to=TensorProto.INT32)
            plugin("FBSConvSlots", [node.input[0], const(f"{p}_W_cl", w.transpose(0, 2, 3, 1)), slots, valid, g,
                                    *node.input[4:7]], list(node.output),
                   {"activation": a.get("activation", "Relu"), **conv}, p)
        else:
            raise UserError(f"node {p}: {PLUGIN_NAMESPACE}::{node.op_type} has no TensorRT AOT plugin")
    # Constant nodes that only fed the replaced nodes (CG's mask, the raw weights) are dropped
    used = {name for node in new_nodes for name in node.input} | {o.name for o in graph.output}
    new_nodes = [node for node in new_nodes
                 if not (node.op_type == "Constant" and not node.domain and node.output[0] not in used)]
    del graph.node[:]
    graph.node.extend(new_nodes)
    graph.value_info.extend(new_infos)
    kept = [t for t in (*graph.initializer, *new_inits) if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    return out
