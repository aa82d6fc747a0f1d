"""Per-layer kernel choice for `--target ort` (`--gated-kernels measured`, issue 18).

Whether a gated layer's native kernel (CGConv / PGConv / FBSConv of runtimes/native) beats ONNX
Runtime's own kernels depends on the processor (AMX, AVX-512 VNNI or AVX2 only), the
thread count and the layer's shape and gate-on fraction: on an AVX2-only 2-core AMD EPYC the
native CG kernel of a 16-channel 32x32 CIFAR layer took 3-4x the time of MLAS's dense conv
(per-node ONNX Runtime profile of the CG ResNet-20), while MLAS computing the layer's
standard-op form (passes/lower_portable.py: base-path conv, full conv, Greater, Where; PG:
MSB and LSB convs and the select) costs about 1.3-2 dense convs. So each gated layer is
timed both ways, on this machine, on the activations the export's example input gives
it, and keeps the faster:

- "native": the custom node as the pipeline left it;
- "standard": that node lowered to standard ONNX ops (lower_portable with `only`), which
  compute the reference's function with the same float operations in the same order (the
  `--target onnx` path): equal to the native kernel up to convolution summation order and
  gate ties, the contract runtimes/OPS.md gives every implementation, and the export's
  verification checks the chosen network afterwards like any other.

Decisions (the issue leaves them open):
- Timing: the two single-node models in alternating blocks (gate2deploy.benchmark), medians;
  "standard" must be faster by more than `MARGIN` (5%) to replace the native kernel, so that
  noise does not flip choices between exports.
- Candidates: CGConv, PGConv, FBSConv and SparseInputConv nodes whose weights, masks and
  thresholds are constants (a computed weight has no fixed cost to time). FBSConv and
  SparseInputConv (an FBS layer's plain-conv consumer) joined later: FBS's native kernel
  meets its layer goal at density 0.5, but at density 1 (every channel kept: nothing to skip)
  the FBS ResNet-18 ran at 0.78x dense with it, and an "all standard" network that lowered
  the FBSConvs still ran its 8 SparseInputConvs natively on dense inputs.
- Cache: `$GATE2DEPLOY_CACHE/kernel_choice.json` (default ~/.cache/gate2deploy), keyed by the
  CPU model, the native library's kernel configuration (ISA table, AMX) and a digest of its
  file (a rebuilt kernel is timed again), ONNX Runtime's version and the thread count;
  inside, by a hash of the node (op, attributes, constant inputs) and of its measured
  input(s). A re-export of the same model on the same machine reuses the choice and its
  timings instead of timing again.
- A layer timed alone is not the layer in its network (layout reorders around non-NCHWc ops,
  the unfused epilogue): when some layer chose "standard", the whole network is timed the
  same way as all native, with the per-layer choices, and with every timed layer standard,
  and the fastest is kept (a non-native one only if faster than all-native by more than
  MARGIN, in that round and again in a second round of native against it alone: one round
  on a shared machine let transients pick a slower network); report: `network` (`kept`, the
  three medians, the confirming round's `confirm_ms`), each overridden layer's `why`.
- The choices and timings go into the export report (`kernel_choice`).
- Whether gating pays here at all (`dense_twin`): the exported network is also timed against
  its dense twin (`dense_twin`: the same graph with every gated node a plain Conv of the same
  weights, the benchmarks' baseline, tools/bench_gated_ops.py). Neither choice above can
  make a gated layer cheaper than its own kernels, and the twin computes another function
  (no gates), so it is never exported: the figure is reported, and the CLI warns when the
  gated network is slower, because a user deploying for speed then learns that the gates
  cost more than they skip on this machine (measured: CG ResNet-20 at 0.71x on an Intel
  Xeon, tools/bench_gated_ops.py --networks cg). Cached with the choices.
"""
from __future__ import annotations

import ctypes
import hashlib
import json
import os
import platform
import statistics
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .benchmark import time_sessions
from .ops import CATALOG, DOMAIN

CHOOSABLE_OPS = ("CGConv", "PGConv", "FBSConv", "SparseInputConv")
NOT_GATES = ("StreamConv",)  # gate2deploy convs the dense twin keeps (a dense conv's own kernel)
MARGIN = 0.05  # "standard" replaces "native" only when faster by more than this fraction;
# the dense twin counts as faster (the gates do not pay) likewise
RUNS = 20      # timed runs per candidate (two alternating blocks of 10)


def cpu_model() -> str:
    """The processor's model name (/proc/cpuinfo), or platform.processor() elsewhere."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def kernel_config() -> str:
    """The native library's kernel configuration: ISA table, AMX, ONNX Runtime NCHWc
    delegation and the second-stage setting (G2DKernelConfig in conv_common.cc)."""
    from .runtimes.ort import custom_ops_library_path

    fn = ctypes.CDLL(str(custom_ops_library_path())).G2DKernelConfig
    fn.restype = ctypes.c_char_p
    return fn().decode()


_LIBRARY_IDS: dict[tuple, str] = {}


def library_identity() -> str:
    """A digest of the native library file the sessions load: choices and timings belong to
    that build. Its configuration string (kernel_config) names the paths, not their code: a
    faster kernel under the same configuration had kept reusing choices timed with the old
    one (the CG ResNet-20's measured network ran slower than both of its candidates)."""
    from .runtimes.ort import custom_ops_library_path

    path = custom_ops_library_path()
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key not in _LIBRARY_IDS:
        _LIBRARY_IDS[key] = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    return _LIBRARY_IDS[key]


def machine_key(threads: int) -> str:
    import onnxruntime as ort

    return (f"{cpu_model()} | {kernel_config()} | library {library_identity()} | "
            f"onnxruntime {ort.__version__} | {threads} threads")


def _cache_path() -> Path:
    root = os.environ.get("GATE2DEPLOY_CACHE") or Path.home() / ".cache" / "gate2deploy"
    return Path(root) / "kernel_choice.json"


def _load_cache(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _store_cache(path: Path, data: dict) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        tmp.replace(path)  # atomic: a concurrent export reads the old or the new file
    except OSError:
        pass  # a read-only cache only costs re-timing next time


# The op catalog's input slots that carry activations (fed from the network run when a node
# is timed alone): X, and SparseInputConv's residual R. Every other input is a weight and must
# be constant.
ACTIVATION_SLOTS = ("X", "R")


def activation_inputs(node: onnx.NodeProto) -> list[str]:
    slots = CATALOG[node.op_type].inputs
    return [name for i, name in enumerate(node.input)
            if name and i < len(slots) and slots[i].rstrip("?") in ACTIVATION_SLOTS]


def _gated_inputs(model: onnx.ModelProto, nodes: list[onnx.NodeProto], example: np.ndarray,
                  threads: int) -> dict[str, np.ndarray]:
    """The activations the nodes receive when the model runs on `example`, by tensor name."""
    from .runtimes.ort import open_session

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    names = list(dict.fromkeys(name for n in nodes for name in activation_inputs(n)))
    known = {o.name for o in probe.graph.output}
    probe.graph.output.extend(helper.make_empty_tensor_value_info(n) for n in names if n not in known)
    session = open_session(probe, threads=threads)
    values = session.run(names, {session.get_inputs()[0].name: example})
    return dict(zip(names, values))


def _constants(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    """Every constant tensor of the graph by name: initializers and Constant nodes' values."""
    out = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            for a in node.attribute:
                if a.name == "value":
                    tensor = onnx.TensorProto()
                    tensor.CopyFrom(a.t)
                    tensor.name = node.output[0]
                    out[node.output[0]] = tensor
    return out


def _single_node(model: onnx.ModelProto, node: onnx.NodeProto,
                 feeds: dict[str, np.ndarray]) -> onnx.ModelProto:
    """A model of `node` alone: its activation inputs (activation_inputs, shapes from `feeds`)
    as graph inputs under their own names, its constant inputs as initializers."""
    inits = _constants(model)
    acts = activation_inputs(node)
    graph = helper.make_graph(
        [node], node.name or node.op_type,
        [helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, list(feeds[name].shape))
         for name in acts],
        [helper.make_tensor_value_info(node.output[0], onnx.TensorProto.FLOAT, None)],
        [inits[name] for name in dict.fromkeys(node.input) if name and name not in acts])
    single = helper.make_model(graph, opset_imports=list(model.opset_import))
    single.ir_version = model.ir_version
    return single


def _lowered(model: onnx.ModelProto, names: set[str]) -> onnx.ModelProto:
    from gate2deploy.passes.ir import export_model, import_graph
    from gate2deploy.passes.lower_portable import lower_portable

    return export_model(lower_portable(import_graph(model), only=names))


def _signature(model: onnx.ModelProto, node: onnx.NodeProto, feeds: dict[str, np.ndarray]) -> str:
    inits = _constants(model)
    h = hashlib.sha256()
    h.update(node.op_type.encode())
    for a in sorted(node.attribute, key=lambda a: a.name):
        h.update(a.SerializeToString(deterministic=True))
    for name in node.input[1:]:
        h.update(name.encode() if name not in inits else numpy_helper.to_array(inits[name]).tobytes())
    for name in activation_inputs(node):
        h.update(str(feeds[name].shape).encode())
        h.update(np.ascontiguousarray(feeds[name]).tobytes())
    return h.hexdigest()[:32]


def _time_candidates(native: onnx.ModelProto, standard: onnx.ModelProto,
                     feeds: dict[str, np.ndarray], threads: int) -> tuple[float, float]:
    from .runtimes.ort import open_session

    sessions = {"native": open_session(native, threads=threads),
                "standard": open_session(standard, threads=threads)}
    times = time_sessions(sessions, {k: [feeds] for k in sessions}, runs=RUNS)
    return statistics.median(times["native"]), statistics.median(times["standard"])


def choose_gated_kernels(model: onnx.ModelProto, example: np.ndarray, threads: int = 2,
                         cache_path: Path | None = None) -> tuple[onnx.ModelProto, dict]:
    """(model with each CG/PG/FBS node that runs faster as standard ops lowered, the report
    entry: machine key and per layer its choice, both medians in ms and whether cached)."""
    nodes = [n for n in model.graph.node if n.domain == DOMAIN and n.op_type in CHOOSABLE_OPS]
    key = machine_key(threads)
    entry: dict = {"machine": key, "layers": []}
    if not nodes:
        return model, entry
    inits = set(_constants(model))
    cache_path = cache_path or _cache_path()
    cache = _load_cache(cache_path)
    seen = cache.setdefault(key, {})
    inputs = _gated_inputs(model, nodes, np.asarray(example, np.float32), threads)
    chosen: set[str] = set()
    for node in nodes:
        row = {"node": node.name, "op": node.op_type}
        if not node.name:
            entry["layers"].append({**row, "choice": "native", "why": "unnamed node: not timed"})
            continue
        acts = activation_inputs(node)
        if not all(name in inits for name in node.input if name and name not in acts):
            entry["layers"].append({**row, "choice": "native", "why": "computed weights: not timed"})
            continue
        feeds = {name: inputs[name] for name in acts}
        sig = _signature(model, node, feeds)
        if sig in seen and seen[sig].get("choice") in ("native", "standard"):
            result = {**seen[sig], "cached": True}
        else:
            single = _single_node(model, node, feeds)
            t_native, t_standard = _time_candidates(single, _lowered(single, {node.name}), feeds, threads)
            choice = "standard" if t_standard < (1 - MARGIN) * t_native else "native"
            result = {"choice": choice, "native_ms": round(t_native, 4),
                      "standard_ms": round(t_standard, 4)}
            seen[sig] = result
            result = {**result, "cached": False}
        if result["choice"] == "standard":
            chosen.add(node.name)
        entry["layers"].append({**row, **result})
    out = model
    timed = {row["node"] for row in entry["layers"] if "native_ms" in row}
    if chosen:
        # A layer timed alone is not the layer in its network: there the standard ops' Greater /
        # Where and unfused epilogue leave ONNX Runtime's NCHWc chain (reorders), where the
        # native node had one reorder pair. Measured on the CG ResNet-20 (AVX2, 2 threads): 8
        # of 9 layers faster alone as standard ops, the network with them slower than native,
        # and the network with every layer standard faster than either at 1 thread. So the
        # whole network is timed three ways (all native, the per-layer choices, every timed
        # layer standard) and the fastest kept; a non-native one must win by MARGIN.
        variants = {"native": model, "per_layer": _lowered(model, chosen)}
        if timed != chosen:
            variants["all_standard"] = _lowered(model, timed)
        sig = _network_signature(model, chosen, example)
        # Cached choices are reused, except an older format's and a non-native one made in a
        # single round (before the confirming round below): those are timed again.
        cached = seen.get(sig, {})
        if cached.get("kept") in variants and (cached["kept"] == "native" or "confirm_ms" in cached):
            net = {**cached, "cached": True}
        else:
            x = np.asarray(example, np.float32)
            ms = _time_networks(variants, x, threads)
            best = min(ms, key=ms.get)
            net = {f"{k}_ms": round(v, 4) for k, v in ms.items()}
            if best != "native" and ms[best] < (1 - MARGIN) * ms["native"]:
                # Confirmed in a second round (native against the winner only): on a shared
                # machine one round's transient made a non-native network "win" that then ran
                # slower than native (CG ResNet-20, 20% on: meas 0.66x dense, native 0.73x).
                again = _time_networks({"native": model, best: variants[best]}, x, threads)
                net["confirm_ms"] = {k: round(v, 4) for k, v in again.items()}
                if again[best] >= (1 - MARGIN) * again["native"]:
                    best = "native"
            else:
                best = "native"
            net = {"kept": best, **net}
            seen[sig] = net
            net = {**net, "cached": False}
        entry["network"] = net
        final = {"native": set(), "per_layer": chosen, "all_standard": timed}[net["kept"]]
        out = variants.get(net["kept"], model) if final else model
        for row in entry["layers"]:
            if "native_ms" not in row:
                continue
            was = row["choice"]
            row["choice"] = "standard" if row["node"] in final else "native"
            if row["choice"] != was:
                row["why"] = f"the network ran fastest as {net['kept'].replace('_', ' ')}"
    entry["dense_twin"] = {**_against_dense_twin(model, out, example, threads, seen), "threads": threads}
    _store_cache(cache_path, cache)
    return out, entry


def choose_stream_convs(model: onnx.ModelProto, example: np.ndarray, threads: int = 2,
                        cache_path: Path | None = None) -> tuple[onnx.ModelProto, dict]:
    """`--stream-convs auto`: the model with its StreamConv nodes (passes/stream_weight_convs.py)
    kept where the whole network runs faster with them, else with every one back as the plain
    Conv it stands for; the report entry (machine key, the nodes, `kept`, both medians).

    Why the network and not each layer: whether a layer's weights come from memory, where
    StreamConv reads them once, or stay in the last-level cache between runs, where ONNX
    Runtime's conv is at its best, depends on the whole model's weights against this
    machine's cache, and a layer timed alone keeps its weights in cache. Measured (Intel
    Xeon, 2 vCPU, batch 1, tools/bench_stream_conv.py): before StreamConv skipped the
    padding's products of 3x3 layers, a CIFAR VGG-19 with 80 MB of weights ran 1.02x
    (1 thread) and 0.98x (2 threads) with it, the same at half width (20 MB) 0.91 / 0.90x;
    since, 0.98-1.28x / 1.09-1.22x and 0.99-1.10x / 1.03-1.11x (six runs; batch 1 at 1 thread
    swings most); with the 3x3 layers on maps 8-32 wide in bands too (thirty-first session),
    the VGG at half width 1.02x at 2 threads, so "auto" keeps Conv there. Other geometries take
    the path that multiplies the padding. The streamed form must win by MARGIN, in a
    first round and again in a second (as choose_gated_kernels' network check); the choice
    is cached like the gated layers'."""
    names = {n.name for n in model.graph.node if n.domain == DOMAIN and n.op_type == "StreamConv"}
    key = machine_key(threads)
    entry: dict = {"machine": key, "convs": sorted(names)}
    if not names:
        return model, {**entry, "kept": False}
    cache_path = cache_path or _cache_path()
    cache = _load_cache(cache_path)
    seen = cache.setdefault(key, {})
    sig = "stream:" + _network_signature(model, names, example)
    plain = None  # the model with every StreamConv lowered: built only when timed or returned
    if "kept" in seen.get(sig, {}):
        net = {**seen[sig], "cached": True}
    else:
        x = np.asarray(example, np.float32)
        plain = _lowered(model, names)
        variants = {"stream": model, "plain": plain}
        ms = _time_networks(variants, x, threads)
        net = {f"{k}_ms": round(v, 4) for k, v in ms.items()}
        kept = ms["stream"] < (1 - MARGIN) * ms["plain"]
        if kept:
            again = _time_networks(variants, x, threads)
            net["confirm_ms"] = {k: round(v, 4) for k, v in again.items()}
            kept = again["stream"] < (1 - MARGIN) * again["plain"]
        net = {"kept": kept, **net}
        seen[sig] = net
        _store_cache(cache_path, cache)
        net = {**net, "cached": False}
    if net["kept"]:
        return model, {**entry, **net}
    return (plain if plain is not None else _lowered(model, names)), {**entry, **net}


def dense_twin(model: onnx.ModelProto) -> onnx.ModelProto:
    """The same graph with every gate2deploy convolution (an op of the catalog's "conv"
    channel rule) replaced by a plain Conv(X, W) of the same weight and conv attributes: the
    dense network the gated kernels are compared against (for PG, its quantized weights in
    fp32; a SparseInputConv's bias and residual dropped). Other gate2deploy nodes (the fused
    activation quantizer, StreamConv) stay: they are not gates, and the twin runs them as the
    export does, so the ratio measures what the gates save. A CG/PG node's fused epilogue
    becomes its nodes again after the Conv (passes/fuse_gated_epilogue.split_gated_epilogues):
    ONNX Runtime folds the BatchNorm's Mul and Add and the Relu into its Conv, as in a dense
    export, and runs the clamp and the quantizer as nodes, which only the gated kernels fuse."""
    from gate2deploy.passes.fuse_gated_epilogue import split_gated_epilogues
    from gate2deploy.passes.ir import export_model, import_graph

    graph = import_graph(model)
    out = onnx.ModelProto()
    out.CopyFrom(export_model(graph) if split_gated_epilogues(graph) else model)
    conv_attrs = {"strides", "pads", "dilations", "group"}
    nodes = []
    for node in out.graph.node:
        if node.domain != DOMAIN or node.op_type in NOT_GATES or CATALOG[node.op_type].channel_rule != "conv":
            nodes.append(node)
            continue
        conv = helper.make_node("Conv", list(node.input[:2]), list(node.output), name=node.name + "_dense")
        conv.attribute.extend(a for a in node.attribute if a.name in conv_attrs)
        nodes.append(conv)
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    if not any(n.domain == DOMAIN for n in nodes):
        keep = [o for o in out.opset_import if o.domain != DOMAIN]
        del out.opset_import[:]
        out.opset_import.extend(keep)
    return out


def _against_dense_twin(model: onnx.ModelProto, exported: onnx.ModelProto, example, threads: int,
                        seen: dict) -> dict:
    """{gated_ms, dense_ms, speedup (dense / gated), slower, cached}: `exported` (the kernel
    choice's result) and the dense twin of `model`, timed in alternating blocks like the
    choices; `slower`: the gated network is slower by more than MARGIN (timing noise)."""
    sig = "dense_twin:" + _network_signature(exported, set(), example)
    if isinstance(seen.get(sig), dict) and "speedup" in seen[sig]:
        cached = seen[sig]
        return {**cached, "slower": cached["speedup"] < 1 - MARGIN, "cached": True}
    gated_ms, dense_ms = _time_dense_twin(exported, dense_twin(model), np.asarray(example, np.float32), threads)
    result = {"gated_ms": round(gated_ms, 4), "dense_ms": round(dense_ms, 4),
              "speedup": round(dense_ms / gated_ms, 3)}
    seen[sig] = result
    return {**result, "slower": result["speedup"] < 1 - MARGIN, "cached": False}


def _network_signature(model: onnx.ModelProto, chosen: set[str], example) -> str:
    h = hashlib.sha256(model.SerializeToString(deterministic=True))
    h.update(",".join(sorted(chosen)).encode())
    h.update(np.ascontiguousarray(example, np.float32).tobytes())
    return "network:" + h.hexdigest()[:32]


def _time_networks(variants: dict[str, onnx.ModelProto], x: np.ndarray, threads: int) -> dict[str, float]:
    return _median_ms(variants, x, threads)


def _time_dense_twin(exported: onnx.ModelProto, twin: onnx.ModelProto, x: np.ndarray,
                     threads: int) -> tuple[float, float]:
    """(exported ms, dense twin ms)."""
    ms = _median_ms({"exported": exported, "dense": twin}, x, threads)
    return ms["exported"], ms["dense"]


def _median_ms(variants: dict[str, onnx.ModelProto], x: np.ndarray, threads: int) -> dict[str, float]:
    """Median ms of each model, timed in alternating blocks (RUNS runs each)."""
    from .runtimes.ort import open_session

    sessions = {k: open_session(m, threads=threads) for k, m in variants.items()}
    name = next(iter(sessions.values())).get_inputs()[0].name
    times = time_sessions(sessions, {k: [{name: x}] for k in sessions}, runs=RUNS)
    return {k: statistics.median(t) for k, t in times.items()}
