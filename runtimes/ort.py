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
gate2deploy node's attributes against the op catalog (gate2deploy/ops.py, which states
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

import logging
import os
from pathlib import Path

import onnx
import onnxruntime as ort

from gate2deploy.errors import UserError, first_line

from .native_build import build_library
from .ort_layout import BLOCKED_OPS, nchwc_block, optimized_and_rewritten

from gate2deploy.ops import CATALOG, DOMAIN


def _nodes(graph: onnx.GraphProto):
    """Every node of `graph`, its subgraphs' (If/Loop/Scan bodies) included."""
    for node in graph.node:
        yield node
        for attr in node.attribute:
            for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else
                        attr.graphs if attr.type == onnx.AttributeProto.GRAPHS else []):
                yield from _nodes(sub)


def check_custom_op_attributes(model: onnx.ModelProto) -> None:
    """UserError unless every gate2deploy node's attributes are exactly what its catalog
    entry allows (names, types, required ones present; TensorRT's plugin_namespace /
    plugin_version are allowed on any: a TensorRT-ready model is verified here too)."""
    nodes = list(_nodes(model.graph))
    for function in model.functions:
        nodes.extend(function.node)
    for node in nodes:
        if node.domain != DOMAIN:
            continue
        where = f"{node.op_type} node {node.name!r}" if node.name else f"{node.op_type} node"
        spec = CATALOG.get(node.op_type)
        if spec is None:
            raise UserError(f"{where}: {node.op_type} is not an op of the {DOMAIN} domain")
        names = [a.name for a in node.attribute]
        twice = next((n for n in names if names.count(n) > 1), None)
        if twice:
            raise UserError(f"{where}: attribute {twice!r} given twice")
        problems = spec.check_node(node, plugin_attributes=True)
        if problems:
            raise UserError(f"{where}: {problems[0]} (allowed: {', '.join(a.name for a in spec.attributes)})")


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
                    config: dict[str, str] | None = None, custom_ops: bool = True,
                    profile_prefix: str | None = None, optimized_path: str | None = None,
                    library: str | os.PathLike | None = None) -> ort.SessionOptions:
    """SessionOptions with a fixed thread count and (`custom_ops`) the custom ops registered;
    `config` entries go to add_session_config_entry (e.g. {"session.intra_op.allow_spinning":
    "0"}); `profile_prefix` / `optimized_path`: where ONNX Runtime writes its profile / the
    optimized graph; `library`: another build of the native library to register instead of
    this checkout's (the benchmarks' `--baseline-library`; implies `custom_ops`)."""
    if threads < 1:
        raise UserError(f"threads must be >= 1, not {threads}")
    cores = os.cpu_count() or 1
    if threads > cores:  # more intra-op threads than cores only adds contention (and 10^5 hang)
        raise UserError(f"threads {threads}: this machine has {cores} cores; use at most {cores}")
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
    if profile_prefix:
        opts.profile_file_prefix = profile_prefix
    if optimized_path:
        opts.optimized_model_filepath = optimized_path
    for key, value in (config or {}).items():
        opts.add_session_config_entry(key, value)
    if library:
        if not Path(library).is_file():
            raise UserError(f"native library {library} does not exist")
        opts.register_custom_ops_library(str(library))
    elif custom_ops:
        opts.register_custom_ops_library(str(custom_ops_library_path(library_variant)))
    return opts


def uses_custom_ops(model: onnx.ModelProto) -> bool:
    return any(n.domain == DOMAIN for n in _nodes(model.graph))


def _parse(data: bytes) -> onnx.ModelProto | None:
    """The model's graph (external weights not loaded), or None when it does not parse: ONNX
    Runtime then gives its own error."""
    try:
        return onnx.load_from_string(data)
    except Exception:  # noqa: BLE001 - any parse failure is reported by ONNX Runtime below
        return None


def _blocked_layout(payload: str | bytes, threads: int, library_variant: str, log_severity: int,
                    config: dict[str, str] | None, library: str | os.PathLike | None = None) -> onnx.ModelProto | None:
    """ONNX Runtime's optimized graph of `payload` with the FBS ops in its blocked layout
    (runtimes/ort_layout.py), or None: no NCHWc block on this CPU, the rewrite does not pay, or
    the step failed (e.g. ONNX Runtime cannot write the optimized graph of a model over
    protobuf's 2 GB). The layout is an optimization: without it the session opens as ONNX
    Runtime lays the model out itself (and reports a real error as such); the failure is
    logged (logger `gate2deploy.runtimes.ort`, one line) so that a slower session says why.
    `library`: the native build to ask and register (default this checkout's)."""
    lib = library or custom_ops_library_path(library_variant)
    block = nchwc_block(lib)
    if not block:
        return None
    try:
        return optimized_and_rewritten(
            payload, session_options(threads, "all", library_variant, False, log_severity, config, True,
                                     library=library), block)
    except Exception as exc:  # noqa: BLE001 - see the docstring
        logging.getLogger(__name__).warning("blocked layout not used, ONNX Runtime lays the model out: %s",
                                            first_line(exc))
        return None


def open_session(model: str | os.PathLike | onnx.ModelProto | bytes, threads: int = 2,
                 optimization: str = "all", library_variant: str = "release",
                 profile: bool = False, log_severity: int = 3,
                 config: dict[str, str] | None = None, custom_ops: bool | str = "auto",
                 profile_prefix: str | None = None, optimized_path: str | None = None,
                 layout: str = "auto", library: str | os.PathLike | None = None) -> ort.InferenceSession:
    """THE ONNX Runtime CPU session factory of gate2deploy: a session for `model` (path,
    ModelProto or serialized bytes) with gate2deploy's kernels registered when it uses them
    (`custom_ops="auto"`; True / False force it: the native library is compiled on first
    registration, so stock models do not pay for it). `layout="auto"` (with every optimization
    on) lets FBSConv and SparseInputConv run in ONNX Runtime's blocked layout where that
    removes conversions (runtimes/ort_layout.py); "nchw" leaves the graph as ONNX Runtime makes
    it. `library`: another build of the native library, registered (and asked for its layout)
    instead of this checkout's (the benchmarks' `--baseline-library`)."""
    if layout not in ("auto", "nchw"):
        raise UserError(f"layout must be auto or nchw, not {layout!r}")
    if isinstance(model, onnx.ModelProto):
        payload: str | bytes = model.SerializeToString()
        proto = model
    elif isinstance(model, bytes):
        payload, proto = model, _parse(model)
    else:
        path = Path(model)
        if not path.is_file():
            raise UserError(f"model file {path} does not exist")
        payload, proto = str(path), _parse(path.read_bytes())
    if proto is not None:
        check_custom_op_attributes(proto)
    if custom_ops == "auto":
        custom_ops = proto is not None and uses_custom_ops(proto)
    if layout == "auto" and custom_ops and optimization == "all" and proto is not None and \
            any(n.domain == DOMAIN and n.op_type in BLOCKED_OPS for n in proto.graph.node):
        rewritten = _blocked_layout(payload, threads, library_variant, log_severity, config, library)
        if rewritten is not None:  # already optimized: ONNX Runtime runs it as it is
            check_custom_op_attributes(rewritten)
            payload, optimization = rewritten.SerializeToString(), "disable"
    opts = session_options(threads, optimization, library_variant, profile, log_severity, config, bool(custom_ops),
                           profile_prefix, optimized_path, library if custom_ops else None)
    try:
        return ort.InferenceSession(payload, opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own exception types for invalid models
        first = (str(exc).strip().splitlines() or ["unknown error"])[0]
        raise UserError(f"ONNX Runtime cannot open the model: {first}") from exc
