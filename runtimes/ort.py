"""Open ONNX Runtime sessions that can run gate2deploy's custom ops.

    from gate2deploy.runtimes.ort import open_session
    sess = open_session("model.onnx", threads=2)
    y = sess.run(None, {"x": x})[0]

`open_session` builds the native custom-op library on first use (runtimes/native_build.py:
g++ plus the ONNX Runtime headers fetched from Debian, cached under ~/.cache/gate2deploy),
registers it, and opens a CPU session with `threads` intra-op threads (the kernels split
their GEMMs and per-pixel loops over that same thread pool). `custom_ops_library_path()`
returns the library's path for use with other tools
(`SessionOptions.register_custom_ops_library`).

Attributes: before a session is created, `check_custom_op_attributes` checks every
gate2deploy node's attributes against its ONNX schema (gate2deploy/opdefs.py, which states
runtimes/OPS.md): an unknown attribute name (a typo, or ONNX Conv's `auto_pad` /
`kernel_shape`, which these ops do not take), a wrong type (`group` as a float) or a missing
required attribute is a UserError naming the node. This check lives here, at graph level,
because the kernels cannot do it: ONNX Runtime's C API (OrtKernelInfo) reads an attribute by
name but cannot list a node's attributes, so a name the kernel does not ask for is invisible
to it. The kernels themselves check the type and range of every attribute they read (and
refuse auto_pad and a kernel_shape that disagrees with W), so a model opened by other tools
without this check still gets an error, never a silently ignored value, for those.
"""
from __future__ import annotations

import os
from pathlib import Path

import onnx
import onnxruntime as ort

from gate2deploy.errors import UserError

from .native_build import build_library

DOMAIN = "gate2deploy"
# Attributes TensorRT's ONNX parser reads on plugin nodes (runtimes/tensorrt_plugins.py adds
# them to the gate2deploy nodes of a TensorRT-ready model, which is also run here to verify it):
# not part of the ops' semantics, allowed on any gate2deploy node.
PARSER_ATTRIBUTES = {"plugin_namespace": onnx.AttributeProto.STRING,
                     "plugin_version": onnx.AttributeProto.STRING}


def _nodes(graph: onnx.GraphProto):
    """Every node of `graph`, its subgraphs' (If/Loop/Scan bodies) included."""
    for node in graph.node:
        yield node
        for attr in node.attribute:
            for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else
                        attr.graphs if attr.type == onnx.AttributeProto.GRAPHS else []):
                yield from _nodes(sub)


def check_custom_op_attributes(model: onnx.ModelProto) -> None:
    """UserError unless every gate2deploy node's attributes are exactly what its schema
    allows (names, types, required ones present); see the module docstring."""
    from onnx import defs

    from gate2deploy.opdefs import OPSET_VERSION, register_all

    register_all()
    nodes = list(_nodes(model.graph))
    for function in model.functions:
        nodes.extend(function.node)
    for node in nodes:
        if node.domain != DOMAIN:
            continue
        where = f"{node.op_type} node {node.name!r}" if node.name else f"{node.op_type} node"
        if not defs.has(node.op_type, DOMAIN):
            raise UserError(f"{where}: {node.op_type} is not an op of the {DOMAIN} domain")
        allowed = {name: int(a.type) for name, a in
                   defs.get_schema(node.op_type, OPSET_VERSION, DOMAIN).attributes.items()}
        required = {name for name, a in
                    defs.get_schema(node.op_type, OPSET_VERSION, DOMAIN).attributes.items()
                    if a.required}
        seen = set()
        for attr in node.attribute:
            expected = allowed.get(attr.name, PARSER_ATTRIBUTES.get(attr.name))
            if expected is None:
                raise UserError(f"{where}: unknown attribute {attr.name!r} (allowed: "
                                f"{', '.join(sorted(allowed))})")
            if attr.name in seen:
                raise UserError(f"{where}: attribute {attr.name!r} given twice")
            seen.add(attr.name)
            if int(attr.type) != expected:
                got = onnx.AttributeProto.AttributeType.Name(attr.type)
                want = onnx.AttributeProto.AttributeType.Name(expected)
                raise UserError(f"{where}: attribute {attr.name!r} must be {want}, not {got}")
        missing = sorted(required - seen)
        if missing:
            raise UserError(f"{where}: required attribute {missing[0]!r} missing")


def custom_ops_library_path(variant: str = "release") -> Path:
    """Path of the compiled custom-op library (built and cached on first call).

    GATE2DEPLOY_OPS_LIBRARY=/path/lib.so uses a prebuilt library instead."""
    env = os.environ.get("GATE2DEPLOY_OPS_LIBRARY")
    if env:
        if not Path(env).is_file():
            raise UserError(f"GATE2DEPLOY_OPS_LIBRARY={env} does not exist")
        return Path(env)
    return build_library(variant)


def session_options(threads: int = 2, optimization: str = "all", library_variant: str = "release",
                    profile: bool = False, log_severity: int = 3,
                    config: dict[str, str] | None = None) -> ort.SessionOptions:
    """SessionOptions with the custom ops registered and a fixed thread count; `config`
    entries go to add_session_config_entry (e.g. {"session.intra_op.allow_spinning": "0"})."""
    if threads < 1:
        raise UserError(f"threads must be >= 1, not {threads}")
    levels = {"disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
              "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
              "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
              "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
    if optimization not in levels:
        raise UserError(f"optimization must be one of {sorted(levels)}, not {optimization!r}")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = levels[optimization]
    opts.log_severity_level = log_severity  # 3: errors only; 4: silent (caller reports errors)
    opts.enable_profiling = profile
    for key, value in (config or {}).items():
        opts.add_session_config_entry(key, value)
    opts.register_custom_ops_library(str(custom_ops_library_path(library_variant)))
    return opts


def _parse(data: bytes) -> onnx.ModelProto | None:
    """The model's graph (external weights not loaded), or None when it does not parse: ONNX
    Runtime then gives its own error."""
    try:
        return onnx.load_from_string(data)
    except Exception:  # noqa: BLE001 - any parse failure is reported by ONNX Runtime below
        return None


def open_session(model: str | os.PathLike | onnx.ModelProto | bytes, threads: int = 2,
                 optimization: str = "all", library_variant: str = "release",
                 profile: bool = False, log_severity: int = 3,
                 config: dict[str, str] | None = None) -> ort.InferenceSession:
    """An ONNX Runtime CPU session for `model` (path, ModelProto or serialized bytes) with
    gate2deploy's CGConv/PGConv/FBSConv kernels registered, after its gate2deploy nodes'
    attributes are checked (check_custom_op_attributes)."""
    if isinstance(model, onnx.ModelProto):
        proto = model
        payload: str | bytes = model.SerializeToString()
    elif isinstance(model, bytes):
        payload = model
        proto = _parse(model)
    else:
        path = Path(model)
        if not path.is_file():
            raise UserError(f"model file {path} does not exist")
        payload = str(path)
        proto = _parse(path.read_bytes())
    if proto is not None:
        check_custom_op_attributes(proto)
    opts = session_options(threads, optimization, library_variant, profile, log_severity, config)
    try:
        return ort.InferenceSession(payload, opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own exception types for invalid models
        first = (str(exc).strip().splitlines() or ["unknown error"])[0]
        raise UserError(f"ONNX Runtime cannot open the model: {first}") from exc
