"""Gator's pruning configuration and timing table, made from the LUT.

Gator (seed 002) weighs each hyper-edge's gates by its FLOPs (`factor_type: flop_factor`)
times `edge_multipliers[i]`. Its latency weights come from timing the network once per edge
with that edge's channels halved (analysis/time_nets.ipynb) and, per edge
(analysis/timing_results_analysis.ipynb):

    multiplier_i = (relative latency saving of edge i) / (relative FLOPs saving of edge i)
                 = (100 * (T0 - T_i) / T0) / (100 - flops_percent_i)

Here T_i is the predictor's whole-model latency for "edge i halved" (layer-local
measurements, see lut.py) instead of a whole-network run per edge. The FLOPs are Gator's own
cost, not true MACs (`gator_flops_cost`): Gator's training multiplies the multiplier onto
that cost's per-conv factors, so a saving measured in true MACs would mis-weigh the edges
whose convs Gator counts at another resolution (ResNet-50's layerN.0.conv1, ~0.7x).

Files:
- `gator_config.json`: exactly the keyword arguments Gator's
  `get_wrapped_gating_net_and_criteria` takes from its `--gating_config_path` file
  (`factor_type`, `criteria_weight`, `gradient_multiplier`, `gate_init_prob`,
  `static_total_cost`, `no_last_conv`, `edge_multipliers`), with `edge_multipliers` a list in
  hyper-edge order. `no_last_conv` is written because Gator's wrapper builds its hyper-edges
  from it (default False) and asserts one multiplier per edge: without it a profile made with
  `no_last_conv` (36 edges for ResNet-50) stops Gator's training at that assert. Nothing else
  goes in; the name-keyed copy for people is `edge_multipliers_by_name.json`.
- `timing.csv`: the file timing_results_analysis.ipynb reads (`pd.read_csv(...,
  header=None)`, columns edge, flops percent, ms; models/data/timinig_resnet_50_edges_7_runs_
  batch_32.csv): no header row, `0, 100.0000, T0` for the unmodified network, then `i + 1,
  flops percent, T_i` for hyper-edge i halved, formatted as time_nets.ipynb prints them (ms to
  6 decimals instead of 4). One
  row per configuration (the notebook's outlier filter is meant for several runs of each; the
  multipliers it would compute are the ones in gator_config.json). T0 is measured, T_i
  predicted from the LUT.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

from .edges import ModelTable, layer_shapes, total_macs
from .lut import predict

GATOR_KEYS = ("factor_type", "criteria_weight", "gradient_multiplier", "gate_init_prob",
              "static_total_cost", "no_last_conv", "edge_multipliers")
_STAGE = re.compile(r"^/?layer(\d+)/")  # a torchvision ResNet stage's nodes: /layerN/...


def gator_flops_cost(table: ModelTable, channels: list[int] | None = None) -> float:
    """Gator's FLOPs cost of a channel configuration, per sample.

    Gator's rules (models/custom_resnet.py `CustomResNet.compute_flops_memory`, which
    time_nets.ipynb uses for the timing table's flops percentages; models/gates_mapper.py
    `ConvInfo` / `ResNetGatesModulesMapper`, the training's cost, agree on the convs):
    a conv costs in_channels * out_channels * kh * kw / (dilation_h * dilation_w) (`get_conv_cost`),
    divided by its groups and by `downsample ** 2`, where `downsample` is the network's
    stride at that point: 2 for the stem conv, then 4, 8, 16, 32 for layer1..layer4 (1, 2, 4
    on CIFAR ResNets). Every conv of a stage, its downsample conv included, is counted at the
    stage's output resolution, also layerN.0.conv1 of a bottleneck, which really runs before
    the stride. Expressed on the layer table: a conv's area is its stage's smallest output area
    (module path layerN), else its own output area; cost = sum of conv terms * area / input
    area, so ResNet-50 at 224x224 costs Gator's 76848.0 (`static_total_cost` of
    cfg/resnet_50_flops_rel_timing_config_batch_32.json, `original_cost` of time_nets.ipynb).
    No Linear/Gemm term: Gator's published percentages (models/data/timinig_resnet_50_edges_
    7_runs_batch_32.csv) and the mapper's cost have none; compute_flops_memory's `include_fc`
    would add in * out / 224**2 to a configuration but not to the hard-coded original cost.
    Models that are not ResNets have no stage: each conv at its own output resolution (the
    naive sequential mapper's cumulative stride)."""
    shapes = layer_shapes(table, channels)
    stage_area: dict[str, int] = {}
    for s in shapes:
        m = _STAGE.match(s.layer.name)
        if m and s.layer.op == "Conv":
            stage_area[m.group(1)] = min(stage_area.get(m.group(1), math.inf), s.layer.out_h * s.layer.out_w)
    input_area = table.input_shape[-2] * table.input_shape[-1] if len(table.input_shape) >= 4 else 1
    cost = 0.0
    for s in shapes:
        lay = s.layer
        if lay.op != "Conv":
            continue
        m = _STAGE.match(lay.name)
        area = stage_area[m.group(1)] if m else lay.out_h * lay.out_w
        cost += (s.cin * s.cout * lay.kh * lay.kw / (lay.dilation[0] * lay.dilation[1]) / max(s.groups, 1)
                 * area / input_area)
    return cost


@dataclass
class EdgeSaving:
    index: int
    name: str
    channels: int
    halved: int
    latency_ms: float  # predicted whole-model latency with this edge halved
    macs: int  # true MACs of that configuration
    cost: float  # Gator's FLOPs cost of it (gator_flops_cost)
    latency_saving: float  # relative
    flops_saving: float  # relative, in Gator's cost
    multiplier: float


def edge_savings(lut: dict, table: ModelTable) -> tuple[float, float, list[EdgeSaving]]:
    """(predicted full latency, Gator's full cost, one saving per edge halved). Halved as
    time_nets.ipynb does (int(channels * 0.5)), at least one channel kept."""
    full = table.full_channels()
    cost, f0 = gator_flops_cost, gator_flops_cost(table, full)
    if f0 <= 0:  # no convs (Gemm layers only): no Gator cost (its mappers map Conv2d only), MACs stand in
        cost, f0 = total_macs, float(total_macs(table, full))
    t0 = predict(lut, full, table)
    out = []
    for edge in table.edges:
        channels = list(full)
        channels[edge.index] = max(1, edge.channels // 2)
        t, f = predict(lut, channels, table), float(cost(table, channels))
        lat, flops = (t0 - t) / t0, (f0 - f) / f0
        mult = lat / flops if flops > 0 else 1.0
        out.append(EdgeSaving(edge.index, edge.name, edge.channels, channels[edge.index], t,
                              total_macs(table, channels), f, lat, flops, mult))
    return t0, f0, out


def gator_config(savings: list[EdgeSaving], criteria_weight: float, gradient_multiplier: float,
                 gate_init_prob: float, static_total_cost: float | None, no_last_conv: bool) -> dict:
    return {"factor_type": "flop_factor", "criteria_weight": criteria_weight,
            "gradient_multiplier": gradient_multiplier, "gate_init_prob": gate_init_prob,
            "static_total_cost": static_total_cost, "no_last_conv": bool(no_last_conv),
            "edge_multipliers": [round(s.multiplier, 6) for s in savings]}


def named_multipliers(savings: list[EdgeSaving]) -> dict:
    return {"edge_multipliers": {s.name: round(s.multiplier, 6) for s in savings},
            "edges": [{"index": s.index, "name": s.name, "channels": s.channels, "halved_to": s.halved,
                       "relative_latency_saving": round(s.latency_saving, 6),
                       "relative_flops_saving": round(s.flops_saving, 6),
                       "multiplier": round(s.multiplier, 6)} for s in savings]}


def timing_csv(measured_ms: float, f0: float, savings: list[EdgeSaving]) -> str:
    # time_nets.ipynb's "{:2d}, {:8.4f}, {:8.4f}", with the ms to 6 decimals: a CPU layer
    # table's whole model can take 0.1 ms, where 4 decimals would round the savings away
    rows = [f"{0:2d}, {100.0:8.4f}, {measured_ms:10.6f}"]
    rows += [f"{s.index + 1:2d}, {100.0 * s.cost / f0:8.4f}, {measured_ms * (1 - s.latency_saving):10.6f}"
             for s in savings]
    return "\n".join(rows) + "\n"
