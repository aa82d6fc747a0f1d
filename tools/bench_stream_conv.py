#!/usr/bin/env python
"""Benchmark of StreamConv (runtimes/native/stream_conv.cc; passes/stream_weight_convs.py,
`--stream-convs`): each model exported for --target ort twice, with its big-weight small-map
convs as StreamConv ("stream", --stream-convs on) and as ONNX Runtime's Conv ("plain",
--stream-convs off), timed in alternating blocks in one process (gate2deploy/benchmark.py),
medians; plain / stream > 1 means StreamConv is faster. Models:

- chain: eight grouped 3x3 convs (10 groups of 320 channels, sensAI's fused VGG's late layers:
  4x4 then 2x2 maps, 295 MB of weights) with ReLU and max pooling: the layers alone;
- vgg19 (width 1 and 0.5): a CIFAR VGG-19-BN (80 MB / 20 MB of weights), batch 1 and 8;
- sensai: sensAI's 10 VGG-19-BN group models fused (importers/sensai.py, as tools/bench_sensai.py).

Prints the native library's ISA table (G2DKernelConfig: which kernel path ran) and, per row,
what `--stream-convs auto` would keep (faster by kernel_choice.MARGIN).

`--baseline-library old.so` (another build of the native library, e.g. a copy of the cached
one before a kernel change) adds a "before" session: the stream model on that build, timed in
the same blocks, so a change's effect is read as before / stream in one run ("stream" is then a
private copy of this checkout's build, as `before` is: tools/bench_gated_ops.py's A/B method).

    python tools/bench_stream_conv.py [--threads 1 2] [--batch 1 8] [--runs 30] [--models chain vgg19 sensai]
                                      [--baseline-library old.so]
"""
from __future__ import annotations

import argparse
import ctypes
import statistics
import sys
from pathlib import Path

import numpy as np
import torch
from onnx import TensorProto, helper, numpy_helper

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from bench_gated_ops import check_baseline_library, private_library_copy  # noqa: E402  (the A/B method)
import gate2deploy  # noqa: E402
from gate2deploy.benchmark import time_sessions  # noqa: E402
from gate2deploy.kernel_choice import MARGIN, cpu_model  # noqa: E402
from gate2deploy.ops import DOMAIN, IR_VERSION, opset_imports  # noqa: E402
from gate2deploy.verify import make_session  # noqa: E402

def chain(batch: int, stream: bool):
    """The chain as ONNX (StreamConv nodes or Conv + Relu) and its input."""
    groups, width, maps = 10, 320, [4, 4, 4, 4, 2, 2, 2, 2]
    rng = np.random.default_rng(0)
    nodes, inits, prev = [], [], "x"
    for i, side in enumerate(maps):
        w = (rng.standard_normal((groups * width, width, 3, 3)) * 0.02).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(np.zeros(len(w), np.float32), f"b{i}")]
        attrs = {"pads": [1, 1, 1, 1], "group": groups}
        if stream:
            nodes.append(helper.make_node("StreamConv", [prev, f"w{i}", f"b{i}"], [f"r{i}"], domain=DOMAIN,
                                          activation="Relu", **attrs))
        else:
            nodes += [helper.make_node("Conv", [prev, f"w{i}", f"b{i}"], [f"c{i}"], **attrs),
                      helper.make_node("Relu", [f"c{i}"], [f"r{i}"])]
        prev = f"r{i}"
        if i + 1 < len(maps) and maps[i + 1] < side:
            nodes.append(helper.make_node("MaxPool", [prev], [f"p{i}"], kernel_shape=[2, 2], strides=[2, 2]))
            prev = f"p{i}"
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                             [batch, groups * width, 4, 4])],
                              [helper.make_tensor_value_info(prev, TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), *opset_imports()])
    model.ir_version = IR_VERSION
    return model, rng.standard_normal((batch, groups * width, 4, 4)).astype(np.float32)


def vgg19(width: float) -> torch.nn.Module:
    """sensAI's CIFAR VGG-19-BN (tests/models/sensai_nets.py, cfg "E"), `width` times its
    channels, trained-looking BatchNorms."""
    from models.sensai_nets import CFG_E, VGG, randomize

    torch.manual_seed(0)  # the conv weights: the same model in every run
    return randomize(VGG([v if v == "M" else int(v * width) for v in CFG_E]), seed=0)


def sensai_fused() -> torch.nn.Module:
    from gate2deploy.importers.sensai import grouped_model
    from models.sensai_nets import CFG_E, group_models

    groups = [list(range(10 * g, 10 * g + 10)) for g in range(10)]
    models = group_models("vgg", groups, 100, seed=1, layer_spread=0.05, cfg=CFG_E)
    return grouped_model(models, groups, torch.randn(1, 3, 32, 32), form="fused")


def exported(module: torch.nn.Module, batch: int):
    x = torch.randn(batch, 3, 32, 32)
    both = {k: gate2deploy.compile(module, x, target="ort", stream_convs=v).onnx_model
            for k, v in (("stream", "on"), ("plain", "off"))}
    return both, x.numpy()


def row(name: str, models: dict, x: np.ndarray, threads: int, runs: int, libraries: dict) -> None:
    """libraries: {"stream": this build's private copy, "before": the baseline} or {}."""
    from gate2deploy.runtimes.ort import open_session

    nospin = {"session.intra_op.allow_spinning": "0"}
    sessions = {k: make_session(m, threads=threads, spinning=False) for k, m in models.items()}
    for k, library in libraries.items():
        sessions[k] = open_session(models["stream"], threads=threads, config=nospin, library=library)
    feed = {sessions["plain"].get_inputs()[0].name: x}
    out = {k: s.run(None, feed)[0] for k, s in sessions.items()}
    scale = max(np.abs(out["plain"]).max(), 1e-30)
    err = max(float(np.abs(o - out["plain"]).max() / scale) for o in out.values())
    times = time_sessions(sessions, {k: [feed] for k in sessions}, runs=runs)
    med = {k: statistics.median(t) for k, t in times.items()}
    n = sum(node.op_type == "StreamConv" for node in models["stream"].graph.node)
    ratio = med["plain"] / med["stream"]
    auto = "stream" if med["stream"] < (1 - MARGIN) * med["plain"] else "plain"
    before = (f"  before {med['before']:8.2f} ms  before/stream {med['before'] / med['stream']:5.3f}x"
              if "before" in med else "")
    print(f"  {name:34s} threads {threads}: plain {med['plain']:8.2f} ms  stream {med['stream']:8.2f} ms  "
          f"plain/stream {ratio:5.2f}x{before}  ({n} StreamConv; auto would keep {auto}; max rel diff {err:.1e})",
          flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--runs", type=int, default=30, help="timed runs per model, in blocks of 10")
    ap.add_argument("--models", nargs="+", default=["chain", "vgg19", "sensai"], choices=["chain", "vgg19", "sensai"])
    ap.add_argument("--baseline-library", help="another build of the native library: its stream model "
                                               "timed beside this build's (before / stream)")
    args = ap.parse_args()
    check_baseline_library(ap, args.baseline_library)
    torch.set_num_threads(1)
    from gate2deploy.runtimes.ort import custom_ops_library_path
    lib = ctypes.CDLL(str(custom_ops_library_path()))
    lib.G2DKernelConfig.restype = ctypes.c_char_p
    print(f"CPU: {cpu_model()}; native library: {lib.G2DKernelConfig().decode()}; spinning off")
    libraries = {}
    if args.baseline_library:
        libraries = {"stream": private_library_copy(), "before": args.baseline_library}
        print(f"before: {args.baseline_library}")
    for batch in args.batch:
        print(f"batch {batch}")
        cases = []
        if "chain" in args.models:
            (m_stream, x), (m_plain, _) = chain(batch, True), chain(batch, False)
            cases.append(("chain (295 MB, 4x4 + 2x2)", {"stream": m_stream, "plain": m_plain}, x))
        if "vgg19" in args.models:
            for width in (1.0, 0.5):
                models, x = exported(vgg19(width), batch)
                cases.append((f"CIFAR VGG-19-BN width {width}", models, x))
        if "sensai" in args.models:
            models, x = exported(sensai_fused(), batch)
            cases.append(("sensAI VGG-19-BN, 10 groups fused", models, x))
        for name, models, x in cases:
            for threads in args.threads:
                row(name, models, x, threads, args.runs, libraries)
    return 0


if __name__ == "__main__":
    sys.exit(main())
