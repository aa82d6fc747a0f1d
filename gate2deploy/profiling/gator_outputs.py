"""Gator's pruning configuration and timing table, made from the LUT.

Gator (seed 002) weighs each hyper-edge's gates by its FLOPs (`factor_type: flop_factor`)
times `edge_multipliers[i]`. Its latency weights come from timing the network once per edge
with that edge's channels halved:

    multiplier_i = (relative latency saving of edge i) / (relative FLOPs saving of edge i)
                 = ((T0 - T_i) / T0) / ((F0 - F_i) / F0)

Here T_i is the predictor's whole-model latency for "edge i halved" (layer-local
measurements, see lut.py) instead of a whole-network run per edge; F counts the MACs of every
Conv/Gemm. A multiplier above 1 means the edge saves more time than its FLOPs suggest.

Files:
- `gator_config.json`: exactly Gator's keys (`factor_type`, `criteria_weight`,
  `gradient_multiplier`, `gate_init_prob`, `static_total_cost`, `edge_multipliers`), with
  `edge_multipliers` a list in hyper-edge order. Gator passes the file's keys to its wrapper
  as keyword arguments, so nothing else goes in it; the name-keyed copy for people is
  `edge_multipliers_by_name.json`.
- `timing.csv`: Gator's columns `edge (layer) removed, flops cost percentage, run time`;
  row 0 is the unmodified network (edge -1), then one row per edge in order; flops cost
  percentage is the configuration's FLOPs as a percentage of the full network's; run time in
  ms (predicted from the LUT for the halved rows, measured for row 0).
"""
from __future__ import annotations

import csv
import io
from dataclasses import dataclass

from .edges import ModelTable, total_macs
from .lut import predict

GATOR_KEYS = ("factor_type", "criteria_weight", "gradient_multiplier", "gate_init_prob",
              "static_total_cost", "edge_multipliers")
TIMING_COLUMNS = ("edge (layer) removed", "flops cost percentage", "run time")


@dataclass
class EdgeSaving:
    index: int
    name: str
    channels: int
    halved: int
    latency_ms: float  # predicted whole-model latency with this edge halved
    macs: int
    latency_saving: float  # relative
    flops_saving: float  # relative
    multiplier: float


def edge_savings(lut: dict, table: ModelTable) -> tuple[float, int, list[EdgeSaving]]:
    full = table.full_channels()
    t0, f0 = predict(lut, full, table), total_macs(table, full)
    out = []
    for edge in table.edges:
        channels = list(full)
        channels[edge.index] = max(1, edge.channels // 2)
        t, f = predict(lut, channels, table), total_macs(table, channels)
        lat, flops = (t0 - t) / t0, (f0 - f) / f0
        mult = lat / flops if flops > 0 else 1.0
        out.append(EdgeSaving(edge.index, edge.name, edge.channels, channels[edge.index], t, f, lat, flops, mult))
    return t0, f0, out


def gator_config(savings: list[EdgeSaving], criteria_weight: float, gradient_multiplier: float,
                 gate_init_prob: float, static_total_cost: float | None) -> dict:
    return {"factor_type": "flop_factor", "criteria_weight": criteria_weight,
            "gradient_multiplier": gradient_multiplier, "gate_init_prob": gate_init_prob,
            "static_total_cost": static_total_cost,
            "edge_multipliers": [round(s.multiplier, 6) for s in savings]}


def named_multipliers(savings: list[EdgeSaving]) -> dict:
    return {"edge_multipliers": {s.name: round(s.multiplier, 6) for s in savings},
            "edges": [{"index": s.index, "name": s.name, "channels": s.channels, "halved_to": s.halved,
                       "relative_latency_saving": round(s.latency_saving, 6),
                       "relative_flops_saving": round(s.flops_saving, 6),
                       "multiplier": round(s.multiplier, 6)} for s in savings]}


def timing_csv(measured_ms: float, f0: int, savings: list[EdgeSaving]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(TIMING_COLUMNS)
    writer.writerow([-1, 100.0, round(measured_ms, 4)])
    for s in savings:
        writer.writerow([s.index, round(100.0 * s.macs / f0, 4), round(measured_ms * (1 - s.latency_saving), 4)])
    return buf.getvalue()
