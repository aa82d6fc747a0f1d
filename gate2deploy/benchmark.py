"""Latency measurement for comparisons made in one run: sessions are timed interleaved
(round-robin, so machine noise hits all of them alike) with ONNX Runtime's worker spinning
off (a spinning pool would steal the cores from the next session's run), and medians (and
minima, the least disturbed runs) are reported."""
from __future__ import annotations

import statistics
import time

import numpy as np
import onnx


def interleaved_latencies_ms(models: dict[str, onnx.ModelProto], input_shape, repeats: int = 30,
                             warmup: int = 5, threads: int = 2) -> tuple[dict[str, float], dict[str, float]]:
    """(median, minimum) latency in ms per model, sessions timed round-robin in one run."""
    from .verify import make_session

    sessions = {name: make_session(m, threads=threads, spinning=False) for name, m in models.items()}
    x = np.random.default_rng(0).standard_normal(input_shape).astype(np.float32)
    feeds = {name: {s.get_inputs()[0].name: x} for name, s in sessions.items()}
    for _ in range(warmup):
        for name, s in sessions.items():
            s.run(None, feeds[name])
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for _ in range(repeats):
        for name, s in sessions.items():
            start = time.perf_counter()
            s.run(None, feeds[name])
            times[name].append((time.perf_counter() - start) * 1e3)
    return ({n: statistics.median(t) for n, t in times.items()}, {n: min(t) for n, t in times.items()})


def median_latencies_ms(models: dict[str, onnx.ModelProto], input_shape, repeats: int = 30,
                        warmup: int = 5, threads: int = 2) -> dict[str, float]:
    return interleaved_latencies_ms(models, input_shape, repeats, warmup, threads)[0]
