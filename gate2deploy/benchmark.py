"""Latency measurement for comparisons made in one run: sessions are timed interleaved
(round-robin, so machine noise hits all of them alike) and medians are reported."""
from __future__ import annotations

import statistics
import time

import numpy as np
import onnx


def median_latencies_ms(models: dict[str, onnx.ModelProto], input_shape, repeats: int = 30,
                        warmup: int = 5, threads: int = 2) -> dict[str, float]:
    from .verify import make_session

    sessions = {name: make_session(m, threads=threads) for name, m in models.items()}
    feeds = {name: {s.get_inputs()[0].name: np.random.default_rng(0).standard_normal(input_shape).astype(np.float32)}
             for name, s in sessions.items()}
    for _ in range(warmup):
        for name, s in sessions.items():
            s.run(None, feeds[name])
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for _ in range(repeats):
        for name, s in sessions.items():
            start = time.perf_counter()
            s.run(None, feeds[name])
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}
