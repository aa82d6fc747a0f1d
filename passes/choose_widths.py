"""Physical width choice: which removable channels the fold keeps, as padding, so that each
layer runs at a width the CPU kernels are fast at.

Why: ONNX Runtime's CPU convolutions (MLAS) run fastest in a channel-blocked layout
(NCHWc, blocks of 8 channels with AVX2, 16 with AVX-512), which its graph optimiser only
uses for convolutions whose channel counts are multiples of the block; other counts fall
back to slower paths and add layout reorders around them. A pruned layer with 37 channels
can run slower than the same layer with 48. Measured here (tools/bench_fold_torchvision.py),
rounding widths up to the block makes the folded models' latency track their MACs.

Contract: `choose_padding(analysis, removable)` returns a subset of `removable` (root ids of
coupled channel groups the fold would remove) that the fold keeps physically instead. For
every channel-creating tensor (the output of a Conv, Gemm or MatMul) it rounds the number of
kept channels up to a multiple of `block` (never beyond the layer's full width), choosing
the lowest-index removed channels. Padding is exact by construction of the fold (padding
channels are never read: their weights at every consume site are zero and their constant
is in the consumer's bias); it only costs the MACs it adds, which the report counts.

Limits: the block is the only width model (no per-shape timing); a layer whose full width
is below the block keeps its pruned width.
"""
from __future__ import annotations

import numpy as np

from .channel_analysis import ChannelAnalysis


def _cpu_block() -> int:
    """MLAS's NCHWc block: 16 on AVX-512 machines, else 8."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        flags = ""
    return 16 if " avx512f" in flags else 8


BLOCK = _cpu_block()
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
