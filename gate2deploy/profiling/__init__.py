"""Latency profiling: measure a model's layers on the target runtime, at several widths, and
turn the measurements into a lookup table (LUT), a latency predictor for pruned channel
configurations, Gator's latency-weighted pruning configuration, and a report.

Modules: `edges` (the model's prunable edges and layer table), `measure` (timing protocol and
runtime back ends), `lut` (keys, interpolation, predictor; `lut_latency(lut, key)` is the
entry point for the compiler's width choice), `gator_outputs` (gator_config.json and
timing.csv), `report` (PNG plots + HTML), `prune` (the physically pruned ONNX of a
configuration, for checking the predictor), `runner` (one profile from start to finish, with
resume). The command is `gate2deploy profile` (gate2deploy/cli/profile.py).
"""
from .lut import layer_key, load_lut, lut_latency, parse_key, predict

__all__ = ["layer_key", "load_lut", "lut_latency", "parse_key", "predict"]
