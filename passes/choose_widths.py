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
kept channels up to a multiple of `block` (of 4 for layers narrower than a block, which
MLAS still runs blocked, e.g. squeeze-excitation convs), never beyond the layer's full
width, choosing the lowest-index removed channels. For a grouped Conv whose full group width
is a whole number of blocks (ResNeXt's later stages), every group of its input and output
is padded to the same whole number of blocks: MLAS runs grouped convs blocked only then
(measured: with ragged groups 7 of ResNeXt-50's grouped convs fell back to im2col); other
grouped convs get equal groups whose total is a multiple of 4, so that their neighbours stay
blocked (RegNet-Y-400MF: 13 groups of 5 = 65 channels unblocked the 1x1 convs reading them). Padding is exact by construction of the fold (padding
channels are never read: their weights at every consume site are zero and their constant
is in the consumer's bias); it only costs the MACs it adds, which the report counts.

Limits: one width rule for every layer (no per-shape timing at compile time). Tensors that
mix several layers' channels through Slice/Gather (ShuffleNetV2's split halves after the
shuffle) can stay ragged, and the convs reading them unblocked: rounding them too was tried
and cascades through the coupled channels (ShuffleNetV2 back to 88-93% of its MACs, slower).
"""
from __future__ import annotations

import numpy as np

from .channel_analysis import ChannelAnalysis


def cpu_flags() -> frozenset[str]:
    """This machine's CPU feature flags (/proc/cpuinfo; empty where there is none). Also read
    by the profiler's device identity (profiling/device.py)."""
    try:
        with open("/proc/cpuinfo") as f:
            line = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        line = ""
    return frozenset(line.partition(":")[2].split())


def _nchwc_block() -> int:
    """MLAS's NCHWc block: 16 channels on AVX-512 machines, else 8."""
    return 16 if "avx512f" in cpu_flags() else 8


BLOCK = _nchwc_block()
MIN_MULTIPLE = 4  # NCHWc eligibility for layers narrower than a block
CREATING_OPS = ("Conv", "Gemm", "MatMul")


def _round_up(kept: int, width: int, block: int) -> int:
    multiple = block if width >= block else MIN_MULTIPLE
    return min(width, -(-kept // multiple) * multiple)


def _pad(roots: np.ndarray, gone: np.ndarray, need: int, padding: set[int]) -> None:
    """Add removed roots of `roots` (in order) to `padding` until `need` positions return."""
    for root in roots[gone].tolist():
        if need <= 0:
            break
        if root not in padding:
            padding.add(root)
            need -= int((roots == root).sum())  # a root may sit at several positions


def choose_padding(ana: ChannelAnalysis, removable: set[int], block: int = BLOCK) -> set[int]:
    removable_sorted = np.array(sorted(removable), dtype=np.int64)
    padding: set[int] = set()

    def gone_of(roots):
        return np.isin(roots, removable_sorted) & ~np.isin(roots, np.array(sorted(padding), np.int64))

    for node in ana.graph.nodes:
        if node.op not in CREATING_OPS or not node.outputs or node.outputs[0].name not in ana.maps:
            continue
        roots = ana.roots_of(node.outputs[0].name)
        gone = gone_of(roots)
        kept = int((~gone).sum())
        if kept:
            _pad(roots, gone, _round_up(kept, len(roots), block) - kept, padding)
    # Grouped convs run blocked only with whole blocks per group: where the full group width
    # is a multiple of the block, every group is padded to the same whole number of blocks.
    for node in ana.grouped_convs:
        groups = int(node.attrs["group"])
        for tensor in (node.inputs[0].name, node.outputs[0].name):
            roots = ana.roots_of(tensor).reshape(groups, -1)
            per_group = roots.shape[1]
            gone = gone_of(roots.reshape(-1)).reshape(groups, -1)
            target = int((~gone).sum(axis=1).max())
            if per_group % block == 0:
                target = _round_up(target, per_group, block)
            else:  # not blocked anyway; keep the whole tensor a multiple of 4 for its neighbours
                while (target * groups) % MIN_MULTIPLE and target < per_group:
                    target += 1
            for g in range(groups):
                _pad(roots[g], gone[g], target - int((~gone[g]).sum()), padding)
    return padding
