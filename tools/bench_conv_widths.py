#!/usr/bin/env python
"""How ONNX Runtime's CPU convolution slows down per MAC as a layer gets narrower.

Issue 3's goal asks a folded model to keep the dense model's speed per MAC. This measures the
floor under that for single layers: a conv (+ ReLU, as ORT fuses it) at full width and at
narrower widths (input and output channels both scaled by `width`, rounded to 16 as the
fold's `--physical-widths fast` does), timed in one run in alternating blocks under ONNX
Runtime's default threading (gate2deploy/benchmark.py), medians of wall time per run (a
one-node session: the session's own overhead, a few microseconds, is in every figure), and
prints the layer-level quotient (time ratio / MACs ratio). A quotient above 1 at the layer
level cannot be removed by any graph pass: it is the runtime's kernel efficiency at that
width.

    python tools/bench_conv_widths.py                 # ResNet-18's conv shapes, widths 1, 0.75, 0.5
    python tools/bench_conv_widths.py --runs 200 --widths 1,0.5,0.25
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from gate2deploy.benchmark import time_sessions, whole_blocks

# (name, in channels, out channels, input size, kernel, stride): ResNet-18 at 224x224.
LAYERS = [
    ("stem 7x7/2", 3, 64, 224, 7, 2),
    ("layer1 3x3", 64, 64, 56, 3, 1),
    ("layer2.0 3x3/2", 64, 128, 56, 3, 2),
    ("layer2 3x3", 128, 128, 28, 3, 1),
    ("layer2.0 down 1x1/2", 64, 128, 56, 1, 2),
    ("layer3 3x3", 256, 256, 14, 3, 1),
    ("layer4 3x3", 512, 512, 7, 3, 1),
]


def conv_session(cin: int, cout: int, size: int, k: int, stride: int, threads: int):
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((cout, cin, k, k)).astype(np.float32), "w")
    b = numpy_helper.from_array(rng.standard_normal(cout).astype(np.float32), "b")
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[k // 2] * 4, strides=[stride] * 2),
             helper.make_node("Relu", ["c"], ["y"])]
    graph = helper.make_graph(nodes, "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, cin, size, size])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w, b])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    session = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return session, {"x": rng.standard_normal((1, cin, size, size)).astype(np.float32)}


def narrowed(channels: int, width: float) -> int:
    if channels <= 3 or width >= 1:
        return channels  # image channels are not pruned
    return max(16, int(round(channels * width / 16)) * 16)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--widths", default="1,0.75,0.5", help="comma-separated fractions of the full width")
    p.add_argument("--runs", type=int, default=100)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    widths = [float(w) for w in args.widths.split(",")]
    print(f"# ONNX Runtime {ort.__version__} CPU, {args.threads} threads, batch 1, Conv+ReLU, "
          f"default threading, medians of {whole_blocks(args.runs)} runs in alternating blocks, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(f"{'layer':22} {'width':>5} {'in>out':>9} {'ms':>7} {'time ratio':>10} {'MACs ratio':>10} {'quotient':>8}")
    for name, cin, cout, size, k, stride in LAYERS:
        shapes = [(narrowed(cin, w), narrowed(cout, w)) for w in widths]
        sessions = dict(enumerate(conv_session(ci, co, size, k, stride, args.threads) for ci, co in shapes))
        times = time_sessions({i: s for i, (s, _) in sessions.items()},
                              {i: [feed] for i, (_, feed) in sessions.items()}, runs=args.runs)
        med = [statistics.median(times[i]) for i in sessions]
        full_macs = shapes[0][0] * shapes[0][1]
        for w, (ci, co), ms in zip(widths, shapes, med):
            t_ratio, m_ratio = ms / med[0], ci * co / full_macs
            print(f"{name:22} {w:5.2f} {f'{ci}>{co}':>9} {ms:7.3f} {t_ratio:10.3f} {m_ratio:10.3f} {t_ratio / m_ratio:8.2f}",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
