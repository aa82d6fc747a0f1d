"""TensorRT path for the gate2deploy custom ops (import-guarded; needs TensorRT >= 10.6 and an
NVIDIA GPU, neither of which this project's machines have).

* `PLUGINS`: the declaration every other piece follows: per op, the plugin's tensor inputs
  (in order) and its attributes (ONNX type, default or required). `register_plugins` builds
  the plugins' Python signatures from it, `prepare_for_tensorrt` writes the ONNX nodes to it,
  and tests/test_tensorrt_export.py checks an exported `model.trt.onnx` against it.
* `prepare_for_tensorrt(model)`: TensorRT's ONNX parser turns an unknown node into a plugin
  named after its op_type, with version = attribute `plugin_version` (default "1") and
  namespace = attribute `plugin_namespace` (default ""); it then reads the plugin's declared
  fields from the node's attributes (fields a node lacks are not passed, so defaults are
  written out here). ONNX Runtime ignores the two extra attributes, so the same file runs
  on the native CPU library (the export verifies it there). Pure ONNX; works anywhere.
* `register_plugins()`: registers CGConv, PGConv, FBSConv as TensorRT "quickly deployable"
  Python plugins (`tensorrt.plugin`): shape functions from the ONNX Conv output-size formula,
  implementations that call the Triton kernels of runtimes/triton_kernels.py on the plugin's
  CUDA tensors. These are JIT plugins: the engine needs a Python process that imported this
  module (`REGISTRATION_MODULE`) to run. Where this TensorRT has AOT plugins (>= 10.9,
  `tensorrt.plugin.aot_impl`) it also registers the one-kernel plugins of
  runtimes/tensorrt_aot.py (AOT_PLUGINS: shape function, FP32/INT32 autotune, the AOT
  implementation returning the compiled kernel's PTX and launch, and a JIT implementation of
  the same launch).
* `build_engine(onnx_path, engine_path, profile, fp16, plugins)`: parse the file (lowered by
  tensorrt_aot.lower_for_aot for AOT plugins) + build with one optimisation profile + write
  the serialized engine atomically. `run_engine` runs one on
  numpy inputs; `profile_engine_layers` times its layers with TensorRT's IProfiler.

Where TensorRT or a GPU is missing every entry point that needs them raises
`TensorRTUnavailable` (a UserError with exit code 3; the reason comes from
`gate2deploy.runtimes.tensorrt_available`). These paths have never run with TensorRT: the
clean failure, `prepare_for_tensorrt`, the signatures built from `PLUGINS` / `AOT_PLUGINS`
and the AOT implementation's launch (with stand-ins for tensorrt.plugin's types) are tested.
"""
# No `from __future__ import annotations` here: tensorrt.plugin reads the plugin functions'
# annotations as objects (inspect.signature), and postponed (string) annotations would hide them.
import inspect
import os
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from gate2deploy.errors import UserError
from gate2deploy.ops import PLUGIN_NAMESPACE, PLUGIN_VERSION

from . import MIN_TENSORRT, MIN_TENSORRT_AOT, PLUGIN_KINDS, TensorRTUnavailable, tensorrt_available

NAMESPACE = PLUGIN_NAMESPACE  # the op catalog's (gate2deploy/ops.py)
VERSION = PLUGIN_VERSION
REGISTRATION_MODULE = __name__
REGISTER_FUNCTION = "register_plugins"
REQUIRED = object()  # attribute without a default
# the ONNX Conv geometry attributes every plugin takes, with ONNX's defaults
CONV_ATTRIBUTES = (("strides", "ints", (1, 1)), ("pads", "ints", (0, 0, 0, 0)), ("dilations", "ints", (1, 1)))


@dataclass(frozen=True)
class PluginSpec:
    op: str
    inputs: tuple  # tensor input names, in ONNX input order
    attributes: tuple  # (name, "ints" | "int" | "float" | "string", default or REQUIRED)
    kernel: str  # the runtimes.triton_kernels function; takes the inputs, then the attributes by name


# The ops as runtimes/OPS.md defines them, without the CPU-only epilogue inputs/attribute
# (passes/fuse_gated_epilogue.py runs for --target ort only): the subset of each op catalog
# entry (gate2deploy/ops.py) the plugins take, with TensorRT's defaults; tests/test_op_catalog.py
# checks these against the catalog. FBSConv's fixed `threshold` (Mayo's local / global) is
# not declared: a plugin field cannot be absent once prepare_for_tensorrt writes the defaults,
# and no finite default means "online top-k"; such a node is refused by name instead.
PLUGINS = {
    "CGConv": PluginSpec("CGConv", ("X", "W", "base_mask", "threshold"), CONV_ATTRIBUTES, "cg_conv"),
    "PGConv": PluginSpec("PGConv", ("X", "W", "threshold"),
                         (("abits", "int", REQUIRED), ("pred_bits", "int", REQUIRED),
                          ("static_scale", "float", 0.0), ("group", "int", 1), *CONV_ATTRIBUTES), "pg_conv"),
    "FBSConv": PluginSpec("FBSConv", ("X", "W", "fc_W", "fc_b", "bn_scale", "bn_shift", "beta"),
                          (("density", "float", REQUIRED), ("pool", "string", "avg"),
                           ("activation", "string", "Relu"), ("pool_pads", "ints", (0, 0, 0, 0)),
                           *CONV_ATTRIBUTES), "fbs_conv"),
}
OPS = tuple(PLUGINS)
_registered = False


def _attribute(name: str, kind: str, value) -> onnx.AttributeProto:
    if kind == "ints":
        return helper.make_attribute(name, [int(v) for v in value])
    if kind == "int":
        return helper.make_attribute(name, int(value))
    if kind == "float":
        return helper.make_attribute(name, float(value))
    return helper.make_attribute(name, str(value))


def prepare_for_tensorrt(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` whose gate2deploy nodes are what the TensorRT plugins declare: the
    plugin namespace/version attributes, every declared attribute written out (defaults
    filled in), and no input or attribute the plugin does not take."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for node in out.graph.node:
        if node.domain != NAMESPACE:
            continue
        where = f"node {node.name or node.op_type}: {NAMESPACE}::{node.op_type}"
        spec = PLUGINS.get(node.op_type)
        if spec is None:
            raise UserError(f"{where} has no TensorRT plugin")
        if len(node.input) != len(spec.inputs):
            raise UserError(f"{where} has {len(node.input)} inputs; its TensorRT plugin takes "
                            f"{len(spec.inputs)} ({', '.join(spec.inputs)})")
        have = {a.name: a for a in node.attribute}
        declared = {name for name, _, _ in spec.attributes} | {"plugin_namespace", "plugin_version"}
        extra = sorted(set(have) - declared)
        if extra:
            raise UserError(f"{where}: attribute {extra[0]} is not taken by its TensorRT plugin")
        for name, kind, default in spec.attributes:
            if name in have:
                continue
            if default is REQUIRED:
                raise UserError(f"{where} lacks its required attribute {name}")
            node.attribute.append(_attribute(name, kind, default))
        if "plugin_namespace" not in have:
            node.attribute.append(helper.make_attribute("plugin_namespace", NAMESPACE))
        if "plugin_version" not in have:
            node.attribute.append(helper.make_attribute("plugin_version", VERSION))
    return out


def plugin_signature(spec: PluginSpec, kind: str, types: dict) -> inspect.Signature:
    """The Python signature tensorrt.plugin reads for `spec`'s shape function (`kind`
    "desc"), implementation ("impl") or AOT implementation ("aot"; an AOT_PLUGINS spec).
    `types` maps "desc", "tensor", "ints", "int", "float", "string", "outputs", "stream",
    "return" (and for "aot" "desc_outputs", "tactic", "aot_return"; for "autotune"
    "desc_outputs", "autotune_return"; for an AOT spec with several outputs "returns") to
    the annotation objects (tensorrt.plugin's own types at registration; anything in a test)."""
    tensor = types["tensor"] if kind == "impl" else types["desc"]
    params = [inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=tensor)
              for name in spec.inputs]
    params += [inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=types[k])
               for name, k, _ in spec.attributes]
    if kind == "desc":
        several = len(getattr(spec, "outputs", ("Y",))) > 1
        return inspect.Signature(params, return_annotation=types["returns" if several else "return"])
    if kind == "autotune":  # (inputs..., outputs) -> List[AutoTuneCombination]; attributes optional
        return inspect.Signature(params[:len(spec.inputs)] + [inspect.Parameter(
            "outputs", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=types["desc_outputs"])],
            return_annotation=types["autotune_return"])
    if kind == "aot":
        params += [inspect.Parameter("outputs", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=types["desc_outputs"]),
                   inspect.Parameter("tactic", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=types["tactic"])]
        return inspect.Signature(params, return_annotation=types["aot_return"])
    params += [inspect.Parameter("outputs", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=types["outputs"]),
               inspect.Parameter("stream", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=types["stream"])]
    return inspect.Signature(params, return_annotation=None)


def _require_tensorrt():
    problem = tensorrt_available()
    if problem:
        raise TensorRTUnavailable(f"TensorRT path unavailable: {problem}")
    import tensorrt as trt

    try:
        import tensorrt.plugin  # noqa: F401 - TensorRT >= 10.6
    except ImportError:
        raise TensorRTUnavailable(f"TensorRT {trt.__version__} has no tensorrt.plugin "
                                  f"(need >= {MIN_TENSORRT})") from None
    return trt


def dim_value(v) -> int:
    """An int from a dimension: an int, or a constant TensorRT shape expression (ShapeExpr has
    `is_constant` / `constant_value()` and no __int__); a symbolic one is refused."""
    if isinstance(v, (int, np.integer)):
        return int(v)
    if getattr(v, "is_constant", False):
        return int(v.constant_value())
    raise UserError("a TensorRT plugin needs this dimension static (only the batch may be dynamic)")


def conv_out_dim(size, k, stride, pad_a, pad_b, dil):
    """ONNX Conv output size on TensorRT shape expressions (or ints); `size` and `k` may both be
    expressions (a shape function must not read a dimension's value: TensorRT first calls it
    on placeholder shapes whose `is_constant` raises), the rest ints."""
    return (size + (pad_a + pad_b) - ((k - 1) * dil + 1)) // stride + 1


def attribute_values(spec, a: dict) -> dict:
    """The plugin's attributes as the kernels take them, from what tensorrt.plugin passes:
    "ints" as a tuple of ints; "int" / "float" as a number (declared as 1-element numpy
    arrays: tensorrt.plugin converts a scalar field with int(array), which NumPy >= 2.4
    refuses for a 1-element array); "string" without the trailing NUL that TensorRT's ONNX
    parser writes into string fields (and decoded if bytes)."""
    out = {}
    for name, kind, _ in spec.attributes:
        v = a[name]
        if kind == "ints":
            out[name] = tuple(int(i) for i in np.asarray(v).reshape(-1))
        elif kind in ("int", "float"):
            scalar = np.asarray(v).reshape(-1)[0]
            out[name] = int(scalar) if kind == "int" else float(scalar)
        else:
            out[name] = (v.decode() if isinstance(v, bytes) else str(v)).rstrip("\0")
    return out


def _conv_shape(x, w, attrs: dict, kh_axis: int):
    """The shape function of a conv-like plugin: y like x with [N, O, OH, OW] from x's and w's
    shape expressions (O = w's dimension 0, KH / KW at kh_axis, kh_axis + 1)."""
    y = x.like()
    y.shape_expr[1] = w.shape_expr[0]
    for i in range(2):
        y.shape_expr[2 + i] = conv_out_dim(x.shape_expr[2 + i], w.shape_expr[kh_axis + i], attrs["strides"][i],
                                           attrs["pads"][i], attrs["pads"][i + 2], attrs["dilations"][i])
    return y


def _plugin_functions(spec: PluginSpec, types: dict, kernels, to_cuda, on_stream):
    """(shape function, implementation) for `spec`, with the signatures of `plugin_signature`.
    `on_stream(stream)`: a context in which work is queued on TensorRT's CUDA stream (the
    handle the implementation receives); the kernels and the copy into the output run in it,
    so they are ordered with the engine's other layers (torch's current stream is not)."""
    desc_sig, impl_sig = plugin_signature(spec, "desc", types), plugin_signature(spec, "impl", types)
    kernel = getattr(kernels, spec.kernel)

    def desc(*args, **kwargs):
        a = desc_sig.bind(*args, **kwargs).arguments
        return _conv_shape(a["X"], a["W"], attribute_values(spec, a), 2)

    def impl(*args, **kwargs):
        a = impl_sig.bind(*args, **kwargs).arguments
        tensors = [to_cuda(a[name]) for name in spec.inputs]
        attrs = attribute_values(spec, a)
        with on_stream(a["stream"]):
            y = kernel(*tensors, **attrs)
            to_cuda(a["outputs"][0]).copy_(y)

    desc.__signature__, impl.__signature__ = desc_sig, impl_sig
    desc.__name__, impl.__name__ = f"{spec.op}_desc", f"{spec.op}_impl"
    return desc, impl


def aot_type_combination(spec) -> str:
    """The AOT plugin's one I/O type combination (tensorrt.plugin.AutoTuneCombination, inputs
    then outputs): FP32 and INT32 only, so that TensorRT reformats at the plugin's boundary
    in an FP16 engine and every kernel runs in fp32."""
    return ", ".join("INT32" if name in spec.int32 else "FP32" for name in (*spec.inputs, *spec.outputs))


def _aot_plugin_functions(spec, types: dict, trtp, to_cuda, on_stream):
    """(shape function, autotune, JIT implementation, AOT implementation) of an AOT_PLUGINS
    spec (runtimes/tensorrt_aot.py). The AOT implementation compiles the kernel of
    `aot_launch` for the GPU TensorRT builds on and returns its PTX, grid and int32 extra
    arguments; the JIT implementation launches the same kernel with the same arguments from
    Python (tensorrt_aot.launch), for builds that do not take the AOT path."""
    from . import tensorrt_aot as aot

    desc_sig, impl_sig, aot_sig, tune_sig = (plugin_signature(spec, kind, types)
                                             for kind in ("desc", "impl", "aot", "autotune"))

    def desc(*args, **kwargs):
        a = desc_sig.bind(*args, **kwargs).arguments
        x = a[spec.inputs[0]]
        if spec.op == "PGSplit":
            return x.like(), x.like()
        w = a["W1" if spec.op == "CGConvPlanned" else "W"]  # channels-last [O, KH, KW, C]
        return _conv_shape(x, w, attribute_values(spec, a), 1)

    def autotune(*args, **kwargs):
        return [trtp.AutoTuneCombination(aot_type_combination(spec))]

    def impl(*args, **kwargs):
        a = impl_sig.bind(*args, **kwargs).arguments
        with on_stream(a["stream"]):
            results = aot.launch(spec.op, [to_cuda(a[name]) for name in spec.inputs], attribute_values(spec, a))
            for out, y in zip(a["outputs"], results):
                to_cuda(out).copy_(y)

    def aot_impl(*args, **kwargs):
        a = aot_sig.bind(*args, **kwargs).arguments
        shapes = {name: [a[name].shape_expr[i] for i in range(a[name].ndim)] for name in spec.inputs}
        plan = aot.aot_launch(spec.op, shapes, attribute_values(spec, a), cdiv=trtp.cdiv)
        name, ptx, threads, shared = aot.compile_for_aot(plan)
        params = trtp.KernelLaunchParams()
        params.grid_x, params.grid_y, params.grid_z = plan.grid
        params.block_x, params.shared_mem = threads, shared
        extras = trtp.SymIntExprs.from_tuple([trtp.SymInt32(v) for v in plan.extras])
        return name.encode(), ptx.encode(), params, extras

    desc.__signature__, impl.__signature__, aot_impl.__signature__ = desc_sig, impl_sig, aot_sig
    autotune.__signature__ = tune_sig  # tensorrt.plugin checks the names: the inputs, then `outputs`
    for f, what in ((desc, "desc"), (autotune, "autotune"), (impl, "impl"), (aot_impl, "aot_impl")):
        f.__name__ = f"{spec.op}_{what}"
    return desc, autotune, impl, aot_impl


def aot_plugins_available() -> str | None:
    """None where this TensorRT has AOT plugins (tensorrt.plugin.aot_impl), else the reason."""
    _require_tensorrt()
    import tensorrt as trt
    import tensorrt.plugin as trtp

    return None if hasattr(trtp, "aot_impl") else (
        f"TensorRT {trt.__version__} has no AOT plugins (tensorrt.plugin.aot_impl, TensorRT >= {MIN_TENSORRT_AOT})")


def register_plugins() -> None:
    """Register the three plugins with TensorRT, and the AOT plugins where this TensorRT has
    them (idempotent)."""
    global _registered
    _require_tensorrt()
    if _registered:
        return
    from typing import Tuple

    import numpy.typing as npt
    import tensorrt.plugin as trtp
    import torch

    from . import triton_kernels

    # scalar int / float fields as 1-element arrays (attribute_values says why)
    types = {"desc": trtp.TensorDesc, "tensor": trtp.Tensor, "ints": npt.NDArray[np.int64],
             "int": npt.NDArray[np.int32], "float": npt.NDArray[np.float32], "string": str,
             "outputs": Tuple[trtp.Tensor], "stream": int, "return": trtp.TensorDesc}

    def to_cuda(t):
        return torch.as_tensor(t, device="cuda")

    def on_stream(stream):
        return torch.cuda.stream(torch.cuda.ExternalStream(stream))

    for spec in PLUGINS.values():
        desc, impl = _plugin_functions(spec, types, triton_kernels, to_cuda, on_stream)
        trtp.register(f"{NAMESPACE}::{spec.op}")(desc)
        trtp.impl(f"{NAMESPACE}::{spec.op}")(impl)
    if hasattr(trtp, "aot_impl"):
        from typing import List, Union

        from .tensorrt_aot import AOT_PLUGINS

        types.update(returns=Tuple[trtp.TensorDesc, trtp.TensorDesc], desc_outputs=Tuple[trtp.TensorDesc],
                     autotune_return=List[trtp.AutoTuneCombination],
                     tactic=int, aot_return=Tuple[Union[str, bytes], Union[str, bytes], trtp.KernelLaunchParams,
                                                  trtp.SymExprs])
        for spec in AOT_PLUGINS.values():
            desc, autotune, impl, aot_impl = _aot_plugin_functions(spec, types, trtp, to_cuda, on_stream)
            plugin_id = f"{NAMESPACE}::{spec.op}"
            trtp.register(plugin_id)(desc)
            trtp.autotune(plugin_id)(autotune)
            trtp.impl(plugin_id)(impl)
            trtp.aot_impl(plugin_id)(aot_impl)
    _registered = True


def build_engine(onnx_path, engine_path, profile: dict | None = None, fp16: bool = False,
                 workspace_mib: int = 1024, plugins: str = "auto") -> str:
    """Parse the ONNX file `onnx_path` (gate2deploy nodes as plugins) and write a serialized
    engine to `engine_path`. `profile`: {input name: (min shape, opt shape, max shape)}, one
    optimisation profile (needed for a dynamic batch axis). `plugins`: "aot" (the gated
    nodes lowered to AOT plugins, tensorrt_aot.lower_for_aot: the engine runs without
    Python), "jit" (the Python plugins) or "auto" (AOT where this TensorRT has it). Returns
    the kind used."""
    trt = _require_tensorrt()
    from gate2deploy.fileio import atomic_path, check_writable

    if plugins not in PLUGIN_KINDS:
        raise UserError(f"plugins must be one of {', '.join(PLUGIN_KINDS)}, not {plugins!r}")
    if fp16 and not hasattr(trt.BuilderFlag, "FP16"):  # TensorRT 11 builds strongly typed networks only
        raise TensorRTUnavailable(f"TensorRT {trt.__version__} has no FP16 builder flag (strongly typed "
                                  f"networks only); build without --fp16")
    check_writable(engine_path)
    register_plugins()
    model = prepare_for_tensorrt(onnx.load(str(onnx_path)))  # idempotent on a model.trt.onnx
    no_aot = aot_plugins_available()
    if plugins == "aot" and no_aot:
        raise TensorRTUnavailable(f"{no_aot}; build with --plugins jit")
    kind = "jit" if plugins == "jit" or no_aot else "aot"
    if kind == "aot":
        from .tensorrt_aot import lower_for_aot, preflight

        try:
            model = lower_for_aot(model)
            preflight(model)  # kernel refusals surface here, not as a failed TensorRT build
        except UserError as exc:  # a node the AOT plugins cannot take: auto keeps the JIT plugins
            if plugins == "aot":
                raise
            kind = f"jit (AOT not possible: {exc})"
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(model.SerializeToString(), str(onnx_path)):
        first = parser.get_error(0) if parser.num_errors else "unknown error"
        raise UserError(f"TensorRT cannot parse {onnx_path}: {first}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mib << 20)
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
        if kind == "aot":  # the lowering's scale / saliency ops stay fp32, as the JIT plugins compute them
            from .tensorrt_aot import FP32_MARK

            config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
            floats = (trt.float32, trt.float16)
            for i in range(network.num_layers):
                layer = network.get_layer(i)
                # the lowering's layers that compute on floats (not its int casts)
                if FP32_MARK not in layer.name or not any(
                        layer.get_input(j) is not None and layer.get_input(j).dtype in floats
                        for j in range(layer.num_inputs)):
                    continue
                layer.precision = trt.float32
                for j in range(layer.num_outputs):
                    if layer.get_output(j).dtype in floats:
                        layer.set_output_type(j, trt.float32)
    if profile:
        opt_profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in profile.items():
            opt_profile.set_shape(name, tuple(lo), tuple(opt), tuple(hi))
        config.add_optimization_profile(opt_profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise UserError(f"TensorRT could not build an engine for {onnx_path}")
    with atomic_path(engine_path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(serialized)
    return kind


class _Engine:
    """A deserialized engine with an execution context, run on torch CUDA tensors."""

    def __init__(self, engine_path, profiler=None):
        trt = _require_tensorrt()
        import torch

        register_plugins()  # JIT plugins: their Python implementations must be registered
        self.trt, self.torch = trt, torch
        logger = trt.Logger(trt.Logger.WARNING)
        with open(engine_path, "rb") as fh:
            self.engine = trt.Runtime(logger).deserialize_cuda_engine(fh.read())
        if self.engine is None:
            raise UserError(f"TensorRT cannot load the engine {engine_path}")
        self.context = self.engine.create_execution_context()
        if profiler is not None:
            self.context.profiler = profiler
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]

    def run(self, feeds: dict) -> list:
        torch = self.torch
        keep = []
        for name in self.inputs:
            t = torch.as_tensor(np.ascontiguousarray(feeds[name]), device="cuda")
            self.context.set_input_shape(name, tuple(t.shape))
            self.context.set_tensor_address(name, t.data_ptr())
            keep.append(t)
        outs = []
        for name in self.outputs:
            dtype = torch.float16 if self.engine.get_tensor_dtype(name) == self.trt.DataType.HALF else torch.float32
            t = torch.empty(tuple(self.context.get_tensor_shape(name)), dtype=dtype, device="cuda")
            self.context.set_tensor_address(name, t.data_ptr())
            outs.append(t)
        stream = torch.cuda.current_stream()
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise UserError("TensorRT failed to run the engine")
        stream.synchronize()
        return [o.float().cpu().numpy() for o in outs]


def run_engine(engine_path, feeds: dict) -> list:
    """Run the engine once on numpy inputs {name: array}; outputs as float32 numpy arrays."""
    return _Engine(engine_path).run(feeds)


def profile_engine_layers(engine_path, feeds: dict, warmup: int = 3, repeats: int = 15) -> dict:
    """Per-layer latency of an engine from TensorRT's layer profiler (IProfiler): {layer name:
    [ms per run]} over `repeats` runs after `warmup` untimed ones."""
    trt = _require_tensorrt()

    class _LayerTimes(trt.IProfiler):
        def __init__(self):
            trt.IProfiler.__init__(self)
            self.times: dict = {}
            self.recording = False

        def report_layer_time(self, layer_name, ms):
            if self.recording:
                self.times.setdefault(layer_name, []).append(float(ms))

    profiler = _LayerTimes()
    engine = _Engine(engine_path, profiler)
    for _ in range(warmup):
        engine.run(feeds)
    profiler.recording = True
    for _ in range(repeats):
        engine.run(feeds)
    return profiler.times
