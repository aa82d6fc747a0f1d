"""Pass: convolutions whose weights dwarf their output become `gate2deploy::StreamConv`
(the `--target ort` path, `--stream-convs`).

Why: at batch 1, the last stages of a CIFAR VGG (and of sensAI's fused group models, issue
16) are 3x3 convs over 4x4 and 2x2 maps with megabytes of weights each: the layer is a matter
of reading its weights once. ONNX Runtime's NCHWc conv computes one output row at a time and
the border pixels (all of them, on such maps) one by one, so it reads each weight several
times per call: a chain of eight sensAI-style grouped convs (295 MB of weights) ran at 11 GB/s
per thread there. StreamConv's kernel reads each weight from memory once per call
(runtimes/native/stream_conv.cc): on that chain 1.19x (1 thread) and 1.08x (2 threads) at
batch 1, 2.08x / 2.04x at batch 8 (tools/bench_stream_conv.py). Whether to keep the rewrite
is measured on the whole network (gate2deploy/kernel_choice.py choose_stream_convs): the
kernel's path for geometries other than a 3x3 same-padded conv on a 2x2 / 4x4 map or a map 8,
16 or 32 wide multiplies the padding's zeros, and lost to ONNX Runtime's conv where the weights
stay in cache.

Expects: a graph after the fold pipeline with static shapes (resolve_static_shapes).

Guarantees: every node matching the pattern below becomes a StreamConv node with the same X,
W, B (a zero constant when the Conv had none) and conv attributes; the function is unchanged
(OPS.md: StreamConv is exactly Conv, then the fused Relu). Every other node is untouched.
Returns the rewritten nodes' names.

Pattern (what is rewritten, declared as data):
    Conv(X, W = constant 4-D float32 of >= MIN_WEIGHT_BYTES, B = constant or absent)
    with a static output of <= MAX_PIXELS pixels per sample, or a 3x3 conv with stride 1,
    dilation 1 and padding 1 whose output is BAND_WIDTHS wide; no auto_pad.
When the conv's output feeds only a Relu (and is not a graph output), the Relu becomes
`activation="Relu"` and the node writes its output.

Decisions:
- MAX_PIXELS = 16: the kernel's register tile on AVX-512 (16 accumulators); with more pixels
  each weight block is read again from L2 per 16 pixels, which ONNX Runtime's own kernels
  (at their best on larger maps) do as well.
- BAND_WIDTHS = (8, 16, 32): except for 3x3 same-padded convs on maps 8, 16 or 32 wide,
  which the kernel takes 16 pixels at a time (2 rows of 8, a row of 16, half a row of 32),
  multiplying only the taps inside the map and leaving out sensAI's zero channels: the fused
  sensAI VGG's 8x8 and 16x16 layers ran 1.06-1.59x faster per node than ONNX Runtime's conv,
  the model 1.06x, a CIFAR VGG-19-BN 1.03x (8 and 16 wide, >= 1 MiB); with 32 wide and
  >= 256 KiB another 1.014x / 1.009x, the VGG at half width 1.053x; >= 64 KiB was slower on
  the VGG (0.97x): its small early layers stay ONNX Runtime's (one-off A/Bs, 2 threads,
  batch 1, Intel Xeon, 2026-12-07). The network-level check below still decides.
- MIN_WEIGHT_BYTES = 256 KiB: below, the weights stay in the private caches between runs and
  the layer is not a matter of memory; ONNX Runtime's conv is as fast there (the small-map
  rule was 1 MiB, unmeasured below, until the bands: see BAND_WIDTHS).
- Whether to run at all is the caller's (gate2deploy/api.py, `--stream-convs auto|on|off`):
  "auto" rewrites, then keeps the rewrite only where the network measured faster with it on
  the exporting machine (kernel_choice.choose_stream_convs); "on" keeps it unmeasured.
  Measured on the AVX-512 tier only (a forced AVX2 kernel on the same CPU ran the chain at
  0.86x ONNX Runtime's AVX-512 conv, which says nothing of an AVX2-only CPU; "auto" measures
  there too).
"""
from __future__ import annotations

import onnx_graphsurgeon as gs

from .ir import STANDARD_DOMAINS, constant_conv_weights, conv_as_custom_op, remove_fused, shape_of, sole_consumer

MAX_PIXELS = 16
BAND_WIDTHS = (8, 16, 32)
MIN_WEIGHT_BYTES = 1 << 18

# What the pass takes, in words (the CLI's help and its line after an export).
SUMMARY = (f"convs with >= {MIN_WEIGHT_BYTES >> 10} KiB of weights and <= {MAX_PIXELS} output pixels per "
           f"sample, or 3x3 same-padded on maps {' / '.join(map(str, BAND_WIDTHS))} wide")

PATTERN = {
    "op": "Conv",
    "weight": "constant 4-D float32, >= MIN_WEIGHT_BYTES",
    "output_pixels_per_sample": "<= MAX_PIXELS, or a 3x3 same-padded conv on a map BAND_WIDTHS wide",
    "attrs": {"auto_pad": ("NOTSET", b"NOTSET")},
}


def _matches(node: gs.Node) -> bool:
    if node.op != PATTERN["op"] or node.domain not in STANDARD_DOMAINS:
        return False
    if node.attrs.get("auto_pad", "NOTSET") not in PATTERN["attrs"]["auto_pad"]:
        return False
    w = constant_conv_weights(node)
    if w is None or w.nbytes < MIN_WEIGHT_BYTES:
        return False
    y = shape_of(node.outputs[0])
    if y is None or len(y) != 4:
        return False
    return y[2] * y[3] <= MAX_PIXELS or (y[3] in BAND_WIDTHS and _same_padded_3x3(node, w))


def _same_padded_3x3(node: gs.Node, w) -> bool:
    """3x3, stride 1, dilation 1, padding 1 (the output is the input map's size)."""
    a = node.attrs
    return (tuple(w.shape[2:]) == (3, 3) and list(a.get("strides", [1, 1])) == [1, 1]
            and list(a.get("dilations", [1, 1])) == [1, 1] and list(a.get("pads", [0, 0, 0, 0])) == [1, 1, 1, 1])


def stream_weight_convs(graph: gs.Graph) -> list[str]:
    rewritten = []
    for node in [n for n in graph.nodes if _matches(n)]:
        conv_as_custom_op(node, "StreamConv", ("strides", "pads", "dilations", "group"))
        relu = sole_consumer(graph, node.outputs[0], "Relu")
        if relu is not None:
            node.attrs["activation"] = "Relu"
            node.outputs = [relu.outputs[0]]
            remove_fused(graph, (relu,))
        rewritten.append(node.name)
    return rewritten
