"""Physical width choice: which removable channels the fold keeps, as padding, so that each
layer runs at a width the CPU kernels are fast at.

Why: ONNX Runtime's CPU convolutions (MLAS) are fast in a channel-blocked layout (NCHWc,
blocks of 16 channels with AVX-512, 8 with AVX2), which its graph optimiser uses only for
convolutions whose channel counts are multiples of 4; any other count falls back to a plain
im2col kernel and adds layout reorders around it. Measured on this project's machine
(AVX-512, ORT 1.31, 2 threads, a 3x3 conv at 56x56 between two 1x1 convs, median kernel
time): 32 channels 358 us, 31 channels 680 us (no NCHWc). The blocked kernels pad to a whole
block internally (at 28x28, 36, 40 and 48 channels all take 186-193 us), and the other
blocked ops (MaxPool, GlobalAveragePool) need whole blocks: a ResNet-50 stem folded to 36
channels got a ReorderOutput/ReorderInput pair around its MaxPool. So widths are rounded up to
the whole block, which costs no conv time. On whole models (tools/bench_fold_torchvision.py,
latency folded / dense, same masks): mobilenet_v2 0.81 unpadded, 0.50 rounded to 16;
efficientnet_b0 0.73 unpadded, 0.44 rounded to 16.

Contract: `choose_padding(analysis, removable)` returns a subset of `removable` (root ids of
coupled channel groups the fold would remove) that the fold keeps physically instead. For
every channel-creating tensor (the output of a Conv, Gemm or MatMul) it rounds the number of
kept channels up to a multiple of `block` (never beyond the layer's full width), choosing
the lowest-index removed channels. Padding is exact by construction of the fold (padding
channels are never read: their weights at every consume site are zero and their constant
is in the consumer's bias); it only costs the MACs it adds, which the report counts.

Limits: one width rule for every layer (no per-shape timing at compile time); a layer whose
full width is below the block keeps its pruned width.
"""
from __future__ import annotations

import numpy as np

from .channel_analysis import ChannelAnalysis


def _nchwc_block() -> int:
    """MLAS's NCHWc block: 16 channels on AVX-512 machines, else 8."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        flags = ""
    return 16 if " avx512f" in flags else 8


BLOCK = _nchwc_block()
CREATING_OPS = ("Conv", "Gemm", "MatMul")


def choose_padding(ana: ChannelAnalysis, removable: set[int], block: int = BLOCK) -> set[int]:
    removable_sorted = np.array(sorted(removable), dtype=np.int64)
    padding: set[int] = set()
    for node in ana.graph.nodes:
        if node.op not in CREATING_OPS or not node.outputs or node.outputs[0].name not in ana.maps:
            continue
        roots = ana.roots_of(node.outputs[0].name)
        gone = np.isin(roots, removable_sorted) & ~np.isin(roots, list(padding))
        width, kept = len(roots), int((~gone).sum())
        if width < block or kept == 0:
            continue
        target = min(width, -(-kept // block) * block)
        need = target - kept
        if need <= 0:
            continue
        # Distinct roots only: a root appearing twice in one tensor pads twice.
        for root in roots[gone].tolist():
            if need <= 0:
                break
            if root not in padding:
                padding.add(root)
                need -= int((roots == root).sum())
    return padding
