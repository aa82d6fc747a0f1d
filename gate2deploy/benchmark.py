"""Latency measurement for comparisons made in one run (dense vs folded, dense vs gated).

How: the sessions are timed in alternating blocks (A x block, B x block, A x block, ...),
each block opened by `settle_s` seconds of untimed runs, under ONNX Runtime's default
threading (intra-op workers spin between ops, as in a deployment). Medians and minima over
all timed runs are reported; the machine's noise falls on every session alike because the
blocks alternate throughout the run.

Why blocks with a settling time, not round-robin single runs (this project's earlier method):
- A session's spinning workers keep spinning for ~25 ms after its last run (measured on this
  project's 2-vCPU machine: the first ten 1.7 ms runs of MobileNetV2 after a block of another
  session took up to 4x longer). Run right after another session, a run competes with those
  spinners for the two cores. The settling runs absorb that.
- A deployment runs one model back to back, its weights warm in the caches. Round-robin
  evicts the smaller model's weights with the larger one's and charges the smaller model for
  it (folded ResNet-18: 3.84 ms round-robin, 3.46 ms in blocks, same session).
- Turning spinning off in every session (`spinning=False`) also keeps sessions from starving
  each other, but then every op's parallel section wakes a sleeping worker; that penalises
  models of many small ops, which folded models are (MobileNetV2 folded: 2.67 ms without
  spinning, 1.69 ms with). It is kept as an option, as the figure for hosts that run with
  spinning off.
- With more than one intra-op thread, sessions in one process still share the cores with
  each other's workers, spinning or not. `time_isolated` runs each model in a process of its
  own, one session at a time, as a deployment runs it (ONNX Runtime's default threading): the
  figure for 2 threads on a 2-core machine. Measured there (AMD EPYC Zen 4, 2 vCPUs, CG
  ResNet-20 at 20% gated on): in-process blocks put the gated network at 0.80-0.82x its dense
  twin with spinning off, 0.40-0.71x with spinning on; isolated, 0.67-0.73x (the dense twin
  0.46-0.48 ms at 2 threads against 0.77-0.79 ms at 1).
"""
from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import onnx


BLOCK = 10  # timed runs per block


def whole_blocks(runs: int, block: int = BLOCK) -> int:
    """The number of timed runs per session that time_sessions makes for `runs`: rounded up
    to whole blocks, at least one."""
    return max(1, -(-runs // block)) * block


def time_sessions(sessions: dict, feeds: dict[str, list[dict]], runs: int = 60, block: int = BLOCK,
                  settle_s: float = 0.1) -> dict[str, list[float]]:
    """Timed run durations in ms per session, whole_blocks(runs, block) runs each, in
    alternating blocks. `feeds[name]` is a list of feed dicts cycled through from run to run
    (one entry repeats the same input)."""
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for _ in range(whole_blocks(runs, block) // block):
        for name, session in sessions.items():
            inputs = feeds[name]
            start = time.perf_counter()
            runs = 0
            while runs < 2 or time.perf_counter() - start < settle_s:
                session.run(None, inputs[runs % len(inputs)])
                runs += 1
            for i in range(block):
                t0 = time.perf_counter()
                session.run(None, inputs[i % len(inputs)])
                times[name].append((time.perf_counter() - t0) * 1e3)
    return times


def paired_order(names: list[str], r: int) -> list[str]:
    """The order of round r in time_paired: the names rotated by r (each session in each
    position equally often over len(names) rounds), in the given order for rounds in even
    blocks of len(names) and reversed in odd ones (so no session always follows the same one).
    With three or more sessions no session runs last in one round and first in the next: the
    earlier scheme, reversed every other round, ran the first and last sessions twice in a row
    at the round boundaries and kept every other session in the middle (an asymmetry whose
    effect was below the noise: A/As of two copies of one build came out 0-3 points apart under
    either scheme, docs/performance.md, twenty-sixth session)."""
    n = len(names)
    base = names if (r // n) % 2 == 0 else names[::-1]
    i = r % n
    return base[i:] + base[:i]


def time_paired(sessions: dict, feeds: dict[str, list[dict]], rounds: int = 200,
                warm: int = 3) -> dict[str, list[float]]:
    """Timed run durations in ms per session, one per round: each round runs every session
    once (in paired_order), each timed run right after `warm` untimed runs of the same
    session (its weights back in the caches). The runs of a round are adjacent in time and
    see the same machine, so the median of per-round ratios (paired_ratio) ranks two builds
    that differ by a few percent, which the medians of blocks cannot on a shared machine whose
    speed drifts by more than that between blocks. For one intra-op thread, or spinning off:
    a spinning session's workers spin on for ~25 ms after its last run (above), longer than
    the warm-up."""
    times: dict[str, list[float]] = {name: [] for name in sessions}
    names = list(sessions)
    for r in range(rounds):
        for name in paired_order(names, r):
            session, inputs = sessions[name], feeds[name]
            for i in range(warm):
                session.run(None, inputs[i % len(inputs)])
            t0 = time.perf_counter()
            session.run(None, inputs[r % len(inputs)])
            times[name].append((time.perf_counter() - t0) * 1e3)
    return times


def time_isolated(models: dict[str, tuple[str | onnx.ModelProto, str | None]], feeds: dict[str, np.ndarray] | list[dict],
                  rounds: int = 10, runs: int = 400, threads: int = 2, warm: int = 100,
                  env: dict[str, str] | None = None) -> dict[str, list[float]]:
    """Per model, one median run time in ms per round, each measured by a process of its own
    holding that one session (`models`: name -> (ONNX file or ModelProto, a build of the native
    library to register instead of this checkout's, or None: runtimes.ort.open_session's
    session); a ModelProto is saved once, in a temporary folder, whoever else names it);
    `warm` untimed runs, then `runs` timed ones on `feeds`, one feed dict or a list cycled
    through from run to run). The models' order changes from round to round as time_paired's
    does (paired_order: each model in each position equally often); paired_ratio
    of the result gives the speed-ups (a round's processes run minutes apart at most, so the
    machine's drift falls on each round's pair alike). `env`: variables set for the children
    (over this process's environment)."""
    times: dict[str, list[float]] = {name: [] for name in models}
    names = list(models)
    feeds = feeds if isinstance(feeds, list) else [feeds]
    with tempfile.TemporaryDirectory(prefix="g2d_isolated_") as tmp:
        feed_path = os.path.join(tmp, "feeds.npz")  # feed i's input `name` as "i/name"
        np.savez(feed_path, **{f"{i}/{name}": v for i, feed in enumerate(feeds) for name, v in feed.items()})
        paths: dict[int, str] = {}  # id(ModelProto) -> its file: a model named twice is saved once
        for model, _ in models.values():
            if isinstance(model, onnx.ModelProto) and id(model) not in paths:
                paths[id(model)] = os.path.join(tmp, f"model{len(paths)}.onnx")
                onnx.save(model, paths[id(model)])
        for r in range(rounds):
            for name in paired_order(names, r):
                model, library = models[name]
                path = paths[id(model)] if isinstance(model, onnx.ModelProto) else str(model)
                cmd = [sys.executable, "-m", "gate2deploy.benchmark", path, feed_path, str(threads), str(runs),
                       str(warm), *([library] if library else [])]
                done = subprocess.run(cmd, capture_output=True, text=True,
                                      env={**os.environ, **env} if env else None)
                if done.returncode != 0:
                    raise RuntimeError(f"timing {name} failed: {_exception_line(done.stderr)}")
                times[name].append(float(done.stdout.split()[-1]))
    return times


def _exception_line(stderr: str) -> str:
    """The line of a child's traceback naming its exception ("module.Error: message"; an ONNX
    Runtime message goes on over more lines), else its last line."""
    import re

    lines = [line for line in stderr.strip().splitlines() if line.strip()] or ["no output"]
    named = [line for line in lines if re.match(r"[A-Za-z_][\w.]*: ", line)]
    return (named or lines)[-1]


def _time_one(argv: list[str]) -> None:
    """time_isolated's child: prints the median ms of one session's timed runs."""
    from .runtimes.ort import open_session

    path, feed_path, threads, runs, warm, *library = argv
    session = open_session(path, threads=int(threads), library=library[0] if library else None)
    stored = np.load(feed_path)
    feeds: dict[int, dict] = {}
    for key in stored.files:
        index, name = key.split("/", 1)
        feeds.setdefault(int(index), {})[name] = stored[key]
    cycle = [feeds[i] for i in sorted(feeds)]
    for i in range(int(warm)):
        session.run(None, cycle[i % len(cycle)])
    durations = time_sessions({"one": session}, {"one": cycle}, runs=int(runs), block=int(runs), settle_s=0.0)
    print(statistics.median(durations["one"]))


def paired_ratio(times: dict[str, list[float]], numerator: str, denominator: str) -> float:
    """The median over rounds of times[numerator][r] / times[denominator][r] (time_paired):
    with the dense model as numerator, the gated one's speed-up."""
    return statistics.median(a / b for a, b in zip(times[numerator], times[denominator], strict=True))


def latencies_ms(models: dict[str, onnx.ModelProto], input_shape, runs: int = 60, block: int = BLOCK,
                 threads: int = 2, spinning: bool = True) -> tuple[dict[str, float], dict[str, float]]:
    """(median, minimum) latency in ms per model on one random normal input."""
    from .verify import make_session

    sessions = {name: make_session(m, threads=threads, spinning=spinning) for name, m in models.items()}
    x = np.random.default_rng(0).standard_normal(input_shape).astype(np.float32)
    feeds = {name: [{s.get_inputs()[0].name: x}] for name, s in sessions.items()}
    times = time_sessions(sessions, feeds, runs, block)
    return ({n: statistics.median(t) for n, t in times.items()}, {n: min(t) for n, t in times.items()})


if __name__ == "__main__":  # time_isolated's child process
    _time_one(sys.argv[1:])
