"""Network slimming (seed 000 and Liu et al. 2017): masks from BatchNorm scales.

Two selection rules, named in the report:
- "mayo" (Mayo's NetworkSlimmer, the default; mayo/override/prune/netslim.py
  `NetworkSlimmer._threshold` and `_updated_mask`): raw gamma (not |gamma|). With density d over
  n values, k = ceil(n * d); threshold = sorted(values)[-k-1] (the (k+1)-th largest), or 0 when
  k == n; keep gamma > threshold. So density 1 (Mayo's own default in
  models/override/prune/netslim.yaml) still removes the channels whose gamma is <= 0, as Mayo
  does (gating-semantics.md §1 says "nothing is pruned" there; Mayo's code returns 0).
- "abs" (Liu et al.'s PyTorch code): |gamma|, threshold = sorted(|gamma|)[int(n * (1 - d))],
  keep |gamma| > threshold. (d >= 1 prunes nothing; Liu's code would still drop the minimum.)
Both "global" (one threshold over all participating layers, the default) or "layer" (each
BatchNorm on its own).

Which BatchNorms take part: those whose channels are not coupled to another BatchNorm's
channels (through a residual Add, a concat feeding shared consumers, ...) and not pinned (a
graph output, an op without a channel rule). Coupled BNs would need one shared mask per
coupled group, which is not network slimming's rule; like Liu et al.'s ResNet experiments,
only independent layers are slimmed. The analysis that decides this is the compiler's own
channel analysis on the captured graph, so the choice is exact for any architecture.

The mask multiplies the BatchNorm's output, as Mayo's activation overrider does (before the
layer's activation: mayo/net/tf/transform.py composes the overrider, then activation_fn);
Liu et al. rebuild the network with the kept channels, which is the same for activations with
act(0) = 0 (ReLU, ReLU6, SiLU, Hardswish, GELU, LeakyReLU).
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from ..errors import UserError
from ..nn import MaskSpec, attach_masks

RULES = ("mayo", "abs")
SCOPES = ("global", "layer")


@dataclass
class NetslimReport:
    rule: str
    scope: str
    density: float
    participating: list[str] = field(default_factory=list)
    excluded: dict[str, str] = field(default_factory=dict)  # BN name -> why
    kept: dict[str, int] = field(default_factory=dict)  # BN name -> kept channels
    emptied: list[str] = field(default_factory=list)  # BNs that keep no channel (warned)


def _threshold(values: np.ndarray, density: float, rule: str) -> float | None:
    """The value a channel must exceed to stay; None when nothing is pruned."""
    n = len(values)
    if rule == "mayo":
        k = math.ceil(n * density)
        return 0.0 if k >= n else float(np.sort(values)[-k - 1])
    if density >= 1:
        return None
    return float(np.sort(values)[min(int(n * (1 - density)), n - 1)])


def independent_batchnorms(model: nn.Module, example: torch.Tensor) -> tuple[list[str], dict[str, str]]:
    """BatchNorm modules whose output channels are coupled to no other BatchNorm's."""
    from ..capture import capture
    from ..passes.channel_analysis import analyze
    from ..passes.cleanup import cleanup
    from ..passes.ir import import_graph

    bns = {n: m for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    probes = [MaskSpec(n, "out", torch.ones(m.num_features), n) for n, m in bns.items()]
    bn_of_label = {p.label: p.module for p in probes}
    handles = attach_masks(model, probes)
    try:
        graph = cleanup(import_graph(capture(model, example)))
    finally:
        for h in handles:
            h.remove()
    ana = analyze(graph)
    pinned = ana.pinned_roots()
    owners: dict[int, set[str]] = {}
    roots_of_bn: dict[str, set[int]] = {}
    for node in graph.nodes:
        if node.op == "ChannelMask" and node.inputs[0].name in ana.maps:
            bn = bn_of_label[node.attrs["source"]]
            roots = set(ana.roots_of(node.inputs[0].name).tolist())
            roots_of_bn[bn] = roots
            for r in roots:
                owners.setdefault(r, set()).add(bn)
    independent, excluded = [], {}
    for bn in bns:
        roots = roots_of_bn.get(bn)
        if roots is None:
            excluded[bn] = "not reached by the traced forward"
            continue
        partners = set().union(*(owners[r] for r in roots)) - {bn}
        pin = next((pinned[r] for r in roots if r in pinned), None)
        if partners:
            excluded[bn] = f"channels coupled with {sorted(partners)[0]}"
        elif pin:
            excluded[bn] = f"channels pinned: {pin}"
        else:
            independent.append(bn)
    return independent, excluded


def netslim_specs(model: nn.Module, example: torch.Tensor, density: float, rule: str = "mayo",
                  scope: str = "global") -> tuple[list[MaskSpec], NetslimReport]:
    if not 0 <= density <= 1:
        raise UserError(f"--netslim-density must be in [0, 1], not {density}")
    if rule not in RULES or scope not in SCOPES:
        raise UserError(f"netslim rule must be one of {RULES} and scope one of {SCOPES}")
    names, excluded = independent_batchnorms(model, example)
    if not names:
        raise UserError("network slimming found no BatchNorm layer whose channels can be pruned independently")
    modules = dict(model.named_modules())
    gammas = {n: modules[n].weight.detach().double().numpy() for n in names}
    if rule == "abs":
        gammas = {n: np.abs(g) for n, g in gammas.items()}
    report = NetslimReport(rule, scope, density, names, excluded)
    if scope == "global":
        t = _threshold(np.concatenate(list(gammas.values())), density, rule)
        thresholds = {n: t for n in names}
    else:
        thresholds = {n: _threshold(g, density, rule) for n, g in gammas.items()}
    specs = []
    for n in names:
        t = thresholds[n]
        keep = np.ones_like(gammas[n], bool) if t is None else gammas[n] > t
        report.kept[n] = int(keep.sum())
        if not keep.all():
            specs.append(MaskSpec(n, "out", torch.from_numpy(keep.astype(np.float32)),
                                  f"netslim {rule}/{scope} d={density}"))
    emptied = [n for n in names if report.kept[n] == 0]
    if emptied:
        report.emptied = emptied
        print(f"warning: network slimming at density {density} keeps no channel of {len(emptied)} layer(s) "
              f"({emptied[0]}{', ...' if len(emptied) > 1 else ''}): what follows them no longer depends on "
              "the input", file=sys.stderr)
    return specs, report
