"""Layout pass at session creation: FBSConv and SparseInputConv read and write ONNX Runtime's
blocked (NCHWc) layout instead of NCHW.

Why: ONNX Runtime's NCHWc transformer keeps its own convolutions and pools in a blocked layout
(channels in blocks of 16 with AVX-512, 8 with AVX2) but cannot know a custom op: it leaves
FBSConv / SparseInputConv in NCHW and converts at each boundary (ReorderOutput before,
ReorderInput after). Inside, those kernels hand their dense part to the same blocked conv
(runtimes/native/nchwc_conv.h) and convert again (NCHW -> blocked gather, blocked -> NCHW
scatter). Measured (FBS ResNet-18 at density 1, ONNX Runtime profile, Intel Xeon, 1 thread):
each FBSConv / SparseInputConv 5-11% slower than the dense twin's conv of the same layer (the
stem 39%), 0.6 ms of reorders, the network 0.88x its dense twin.

How: ONNX Runtime optimizes the model once with every optimization (its NCHWc nodes written
out through `optimized_model_filepath`), `rewrite` below edits that graph, and the session
runs the edited graph with ONNX Runtime's optimizations off (ONNX Runtime's documented
workflow for offline-optimized models). The edited graph depends on this CPU's block size:
it lives in the session only, never in an export (the exported model stays NCHW and portable;
a plain ONNX Runtime session of it computes the same function, converting as before).

Rewrite (the ops in BLOCKED_OPS whose W is a constant):
- Y: every such op writes the blocked layout (`output_block` = B, [N, O rounded up to B, H, W]).
  A ReorderInput that read Y goes: its readers read the blocked Y. Other readers, and a graph
  output, get one ReorderOutput back to NCHW.
- X: read blocked (`input_block` = B) where it exists blocked: another rewritten op's Y, or
  the input of a ReorderOutput (which goes when nothing else reads its output).
- R (SparseInputConv's residual, Y's layout): the blocked tensor where it exists, else a
  ReorderInput is inserted.
The edit is kept only if it removes more reorders (ONNX Runtime's, plus the two inside each
op whose X and Y are both blocked) than it inserts; a single-node model stays as it is.
Contract: the same function, bit for bit (the kernels compute the same float operations in
either layout: tests/test_ort_layout.py); nodes the rewrite does not name are untouched.
"""
from __future__ import annotations

import ctypes
import os
import tempfile
from collections import defaultdict
from pathlib import Path

import onnx
from onnx import helper

from gate2deploy.ops import DOMAIN

NCHWC_DOMAIN = "com.microsoft.nchwc"
BLOCKED_OPS = ("FBSConv", "SparseInputConv")
_RESIDUAL_INPUT = {"SparseInputConv": 3}


def nchwc_block(library_path: Path) -> int:
    """The block size of the native kernels' NCHWc layout on this CPU (0: none)."""
    return int(ctypes.CDLL(str(library_path)).G2DNchwcBlock())


def _attr(node: onnx.NodeProto, name: str, default=0):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _set_int(node: onnx.NodeProto, name: str, value: int) -> None:
    for a in list(node.attribute):
        if a.name == name:
            node.attribute.remove(a)
    node.attribute.append(helper.make_attribute(name, int(value)))


def _is(node: onnx.NodeProto, domain: str, op: str) -> bool:
    return node.domain == domain and node.op_type == op and _attr(node, "channels_last", 0) == 0


def rewrite(model: onnx.ModelProto, block: int) -> onnx.ModelProto | None:
    """The graph of an ONNX Runtime-optimized `model` with BLOCKED_OPS in the blocked layout
    of `block`, or None when that would not remove more conversions than it adds."""
    model = onnx.ModelProto.FromString(model.SerializeToString())  # the caller's stays as it is
    graph = model.graph
    nodes = list(graph.node)
    weights = {i.name: list(i.dims) for i in graph.initializer}  # constant W: its output channels
    for n in nodes:
        if n.op_type == "Constant" and n.domain in ("", "ai.onnx") and _attr(n, "value", None) is not None:
            weights[n.output[0]] = list(_attr(n, "value").dims)
    targets = [n for n in nodes if n.domain == DOMAIN and n.op_type in BLOCKED_OPS
               and len(n.input) > 1 and len(weights.get(n.input[1], ())) == 4]
    if not targets or block <= 0:
        return None
    target_ids = {id(n) for n in targets}
    graph_outputs = {o.name for o in graph.output}
    readers: dict[str, list[tuple[onnx.NodeProto, int]]] = defaultdict(list)
    for n in nodes:
        for i, t in enumerate(n.input):
            if t:
                readers[t].append((n, i))
    blocked: dict[str, str] = {}  # NCHW tensor -> the same tensor blocked
    for n in nodes:
        if _is(n, NCHWC_DOMAIN, "ReorderOutput"):
            blocked[n.output[0]] = n.input[0]
    dropped: set[int] = set()
    after: dict[int, list[onnx.NodeProto]] = defaultdict(list)   # nodes to insert after / before
    before: dict[int, list[onnx.NodeProto]] = defaultdict(list)
    removed = inserted = 0
    for n in targets:
        y = n.output[0]
        yb = f"{y}/nchwc{block}"
        n.output[0] = yb
        _set_int(n, "output_block", block)
        removed += 1  # the op's own scatter back to NCHW
        blocked[y] = yb
        nchw_readers = y in graph_outputs
        for reader, _ in readers[y]:
            if _is(reader, NCHWC_DOMAIN, "ReorderInput") and reader.output[0] not in graph_outputs:
                for r2, j in readers[reader.output[0]]:
                    r2.input[j] = yb
                dropped.add(id(reader))
                removed += 1
            elif id(reader) not in target_ids:
                nchw_readers = True
        if nchw_readers:
            channels = weights[n.input[1]][0]
            after[id(n)].append(helper.make_node("ReorderOutput", [yb], [y], name=f"{n.name}/to_nchw",
                                                 domain=NCHWC_DOMAIN, channels=channels, channels_last=0))
            inserted += 1
    for n in targets:
        if n.input[0] in blocked:
            n.input[0] = blocked[n.input[0]]
            _set_int(n, "input_block", block)
            removed += 1  # the op's own gather into blocks
        at = _RESIDUAL_INPUT.get(n.op_type)
        if at is not None and len(n.input) > at and n.input[at]:
            r = n.input[at]
            if r in blocked:
                n.input[at] = blocked[r]
            else:
                rb = f"{r}/nchwc{block}"
                before[id(n)].append(helper.make_node("ReorderInput", [r], [rb], name=f"{n.name}/residual_to_nchwc",
                                                      domain=NCHWC_DOMAIN, channels_last=0))
                n.input[at] = rb
                inserted += 1
    ordered = []
    for n in nodes:
        if id(n) in dropped:
            continue
        ordered += before[id(n)] + [n] + after[id(n)]
    # ReorderOutputs nothing reads any more
    read = {t for n in ordered for t in n.input} | graph_outputs
    for n in list(ordered):
        if _is(n, NCHWC_DOMAIN, "ReorderOutput") and n.output[0] not in read:
            ordered.remove(n)
            removed += 1
    if removed <= inserted:
        return None
    del graph.node[:]
    graph.node.extend(ordered)
    produced = {t for n in ordered for t in n.output}
    kept = [v for v in graph.value_info if v.name in produced]
    del graph.value_info[:]
    graph.value_info.extend(kept)
    return model


def optimized_and_rewritten(payload: str | bytes, options, block: int) -> onnx.ModelProto | None:
    """ONNX Runtime's optimized graph of `payload` (a path or serialized model, opened with
    `options`, which must register the custom ops and enable every optimization), rewritten;
    None when the rewrite does not pay (see `rewrite`)."""
    import onnxruntime as ort

    handle, path = tempfile.mkstemp(suffix=".onnx", prefix="g2d_layout_")
    os.close(handle)
    try:
        options.optimized_model_filepath = path
        ort.InferenceSession(payload, options, providers=["CPUExecutionProvider"])
        optimized = onnx.load(path)
    finally:
        Path(path).unlink(missing_ok=True)
    return rewrite(optimized, block)
