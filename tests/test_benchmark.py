"""The timing primitive the benchmarks share (gate2deploy.benchmark): alternating blocks, each
opened by settling runs, feeds cycled, one timed duration per timed run."""
import itertools
import time

import onnx
import pytest
from onnx import TensorProto, helper

from gate2deploy.benchmark import latencies_ms, time_sessions, whole_blocks


class FakeSession:
    def __init__(self, name, log):
        self.name, self.log = name, log

    def run(self, outputs, feed):
        self.log.append((self.name, feed["x"]))


def test_blocks_alternate_with_settling_runs_and_feeds_cycle():
    log = []
    sessions = {"a": FakeSession("a", log), "b": FakeSession("b", log)}
    feeds = {"a": [{"x": 0}, {"x": 1}, {"x": 2}], "b": [{"x": 9}]}
    times = time_sessions(sessions, feeds, runs=12, block=4, settle_s=0.0)

    assert {n: len(t) for n, t in times.items()} == {"a": 12, "b": 12}
    assert (whole_blocks(12, 4), whole_blocks(13, 4), whole_blocks(0, 4)) == (12, 16, 4)
    assert all(t >= 0 for t in itertools.chain(*times.values()))
    blocks = [(name, [x for _, x in group]) for name, group in itertools.groupby(log, key=lambda e: e[0])]
    assert [name for name, _ in blocks] == ["a", "b"] * 3
    for name, xs in blocks:
        assert len(xs) == 2 + 4  # two settling runs (settle_s=0), then the timed block
        if name == "a":
            assert xs[2:] == [0, 1, 2, 0]  # the timed runs cycle through the feeds from the first


def test_settling_lasts_at_least_settle_s():
    log = []
    sessions = {"a": FakeSession("a", log)}
    t0 = time.perf_counter()
    time_sessions(sessions, {"a": [{"x": 0}]}, runs=2, block=1, settle_s=0.02)
    assert time.perf_counter() - t0 >= 0.04
    assert len(log) > 2 * (2 + 1)  # more settling runs than the minimum of two per block


def test_latencies_of_real_sessions():
    node = helper.make_node("Relu", ["input"], ["y"])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    onnx.checker.check_model(model)
    medians, minima = latencies_ms({"one": model, "two": model}, (1, 4), runs=6, block=3)
    assert set(medians) == set(minima) == {"one", "two"}
    assert all(0 < minima[n] <= medians[n] for n in medians)


def test_paired_rounds_alternate_after_warm_runs_and_ratios_are_per_round():
    """time_paired: one timed run per session per round, each after `warm` untimed runs of
    that session, the order rotated from round to round and reversed every len(sessions)
    rounds (paired_order); paired_ratio takes the median of the per-round ratios (not the
    ratio of medians)."""
    from gate2deploy.benchmark import paired_ratio, time_paired

    log = []

    class Session:
        def __init__(self, name):
            self.name = name

        def run(self, _, feed):
            log.append((self.name, feed["x"]))

    sessions = {"a": Session("a"), "b": Session("b"), "c": Session("c")}
    feeds = {k: [{"x": 0}, {"x": 1}] for k in sessions}
    times = time_paired(sessions, feeds, rounds=4, warm=2)
    assert {k: len(v) for k, v in times.items()} == {"a": 4, "b": 4, "c": 4}
    assert len(log) == 4 * 3 * 3
    order = [log[i][0] for i in range(0, len(log), 3)]
    assert order == ["a", "b", "c", "b", "c", "a", "c", "a", "b", "c", "b", "a"]
    assert all(log[i][0] == log[i + 1][0] == log[i + 2][0] for i in range(0, len(log), 3))
    assert [log[i + 2][1] for i in range(0, 9, 3)] == [0, 0, 0] and log[9 + 2][1] == 1  # cycled
    made_up = {"dense": [1.0, 2.0, 10.0], "gated": [2.0, 1.0, 4.0]}
    # per-round ratios 0.5, 2, 2.5: median 2; the ratio of the medians would be 2 / 2 = 1
    assert paired_ratio(made_up, "dense", "gated") == 2.0


@pytest.mark.parametrize("n", [3, 4, 7])
def test_paired_order_balances_positions_and_never_repeats_a_session_across_rounds(n):
    """Over 2n rounds of paired_order every session is first, and last, exactly twice, and the
    last session of a round is never the first of the next (with the order merely reversed
    every other round, the first and last sessions ran twice in a row there and were never in
    the middle)."""
    from gate2deploy.benchmark import paired_order

    names = [f"s{i}" for i in range(n)]
    rounds = [paired_order(names, r) for r in range(2 * n)]
    assert all(sorted(order) == sorted(names) for order in rounds)
    assert all(sum(order[0] == name for order in rounds) == 2 for name in names)
    assert all(sum(order[-1] == name for order in rounds) == 2 for name in names)
    assert all(a[-1] != b[0] for a, b in zip(rounds, rounds[1:] + [paired_order(names, 2 * n)]))
    # not always the same predecessor: some session follows two different ones
    followers = {(order[i], order[i + 1]) for order in rounds for i in range(n - 1)}
    assert len(followers) > n - 1


def test_isolated_timing_runs_each_model_in_a_process_of_its_own(tmp_path):
    """time_isolated: per model one median per round, each from a child process that opens
    only that model's session and runs the feeds in turn (a list of two: a second input of
    another shape, which the model refuses, fails the child, so it was run); a child that fails
    is an error naming the model and the child's exception (ONNX Runtime's, open_session's);
    `env` sets variables for the children."""
    import os

    import numpy as np

    from gate2deploy.benchmark import time_isolated

    node = helper.make_node("Relu", ["input"], ["y"])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    path = tmp_path / "relu.onnx"
    onnx.save(model, str(path))
    feed = {"input": np.ones((1, 4), np.float32)}
    times = time_isolated({"a": (str(path), None), "b": (str(path), None)}, feed, rounds=3, runs=5, warm=1,
                          threads=1)
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3}
    assert all(t > 0 for t in itertools.chain(*times.values()))
    bad = [feed, {"input": np.ones((1, 5), np.float32)}]
    with pytest.raises(RuntimeError, match="timing a failed: .*INVALID_ARGUMENT"):
        time_isolated({"a": (str(path), None)}, bad, rounds=1, runs=2, warm=0, threads=1)
    times = time_isolated({"a": (str(path), None)}, [feed, feed], rounds=1, runs=2, warm=0, threads=1)
    assert len(times["a"]) == 1
    with pytest.raises(RuntimeError, match="timing missing failed: .*does not exist"):
        time_isolated({"a": (str(path), None), "missing": (os.fspath(tmp_path / "none.onnx"), None)}, feed,
                      rounds=1, runs=1, warm=0, threads=1)
    # `env` reaches the children: a PYTHONPATH whose onnxruntime refuses to import fails them
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    (shadow / "onnxruntime.py").write_text("raise ImportError('shadowed onnxruntime')\n")
    with pytest.raises(RuntimeError, match="timing a failed: .*shadowed onnxruntime"):
        time_isolated({"a": (str(path), None)}, feed, rounds=1, runs=1, warm=0, threads=1,
                      env={"PYTHONPATH": str(shadow)})


def test_isolated_timing_rotates_the_order_of_its_children(monkeypatch, tmp_path):
    """time_isolated starts its children in a balanced order: over 2n rounds of n models each
    model is started first, and last, exactly twice, and no model's child runs twice in a row
    across a round boundary (with the order merely reversed every other round, the first and
    last models did, and the others were never first or last). The children are spied on,
    not run."""
    import subprocess
    import types

    import numpy as np

    from gate2deploy import benchmark

    started = []

    def fake_run(cmd, **kwargs):
        started.append(cmd[cmd.index("-m") + 2])  # the model file the child would open
        return types.SimpleNamespace(returncode=0, stdout="1.0\n", stderr="")

    monkeypatch.setattr(subprocess, "run", fake_run)
    paths = {}
    for name in ("a", "b", "c"):
        paths[name] = tmp_path / f"{name}.onnx"
        paths[name].write_bytes(b"")
    n, rounds = 3, 6
    times = benchmark.time_isolated({k: (str(p), None) for k, p in paths.items()},
                                    {"input": np.ones(1, np.float32)}, rounds=rounds, runs=1, warm=0)
    assert {k: len(v) for k, v in times.items()} == {"a": rounds, "b": rounds, "c": rounds}
    order = [[next(k for k, p in paths.items() if str(p) == s) for s in started[r * n:(r + 1) * n]]
             for r in range(rounds)]
    assert all(sorted(o) == ["a", "b", "c"] for o in order)
    for name in paths:
        assert sum(o[0] == name for o in order) == 2, order
        assert sum(o[-1] == name for o in order) == 2, order
    assert all(x[-1] != y[0] for x, y in zip(order, order[1:])), order


@pytest.mark.parametrize("net,point,convs", [
    # ResNet-20 (dnn-gating's resnet20_cg): the stem and 9 blocks of two 3x3 convs, option-A
    # shortcuts (no 1x1 conv), CG on each block's conv1
    ("cg", ["--offsets", "1.0"], {"CGConv": 9, "Conv": 10}),
    # ResNet-18: the stem, 8 blocks of two convs, 3 downsampling 1x1 convs; FBS on the stem and
    # each block's conv1 (models/fbs.py), each conv2 reading an FBS output a SparseInputConv
    ("fbs", ["--densities", "0.5"], {"FBSConv": 9, "SparseInputConv": 8, "Conv": 3}),
])
def test_node_profile_pairs_every_conv_with_its_twin(net, point, convs):
    """tools/profile_gated_network.py --per-node: one row per conv node of the gated network,
    each beside the dense twin's conv of the same layer, though ONNX Runtime renames the
    twin's convs it moves to its blocked layout (after their output tensor) and runs them in
    another order (the FBS twin's downsampling convs)."""
    import re
    import subprocess
    import sys
    from collections import Counter
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "tools" / "profile_gated_network.py"
    done = subprocess.run([sys.executable, str(script), "--net", net, *point, "--runs", "2", "--per-node"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = done.stdout.split("conv node (gated network)", 1)[1].splitlines()[1:]  # after the header
    pattern = re.compile(r"^\s+\S+\s+(\w+)\s+(\d+)\s+(\d+)\s+(\d+\.\d+)$")
    parsed = [pattern.match(row) for row in rows]
    assert all(parsed), rows  # a row whose twin was not found prints "-" and fails here
    assert Counter(m.group(1) for m in parsed) == Counter(convs)


def test_node_profile_with_a_baseline_library_adds_each_nodes_time_on_that_build(tmp_path):
    """tools/profile_gated_network.py --baseline-library: the gated network profiled on the
    other build too, a "before" column per op type and a before time and ratio per conv node
    (the same graph, so every node is found on both builds: a row missing one prints "-" and
    fails the pattern)."""
    import re
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    from gate2deploy.runtimes.ort import custom_ops_library_path

    copy = tmp_path / "libcopy.so"  # another path: a separate instance of the same build
    shutil.copy(custom_ops_library_path(), copy)
    script = Path(__file__).resolve().parent.parent / "tools" / "profile_gated_network.py"
    done = subprocess.run([sys.executable, str(script), "--net", "cg", "--offsets", "1.0", "--runs", "2",
                           "--per-node", "--baseline-library", str(copy)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    header = next(line for line in done.stdout.splitlines() if line.strip().startswith("op type"))
    assert header.split()[-3:] == ["dense", "twin", "before"], header
    rows = done.stdout.split("conv node (gated network)", 1)[1].splitlines()[1:]
    pattern = re.compile(r"^\s+\S+\s+(\w+)\s+(\d+)\s+(\d+)\s+(\d+\.\d+)\s+(\d+)\s+(\d+\.\d+)$")
    parsed = [pattern.match(row) for row in rows]
    assert all(parsed), rows
    assert len(parsed) == 19  # 9 CGConv + 10 Conv (test above)


def test_native_setting_ab_switches_the_setting_run_by_run():
    """tools/ab_native_setting.py times the values of a native setting in one session: one
    row per point and thread count with a ratio per value after the first, the outputs of the
    values compared (the same function: a split span may differ in the last bits only), and
    an unknown value refused with exit code 2 before anything is timed."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    tool = Path(__file__).resolve().parent.parent / "tools" / "ab_native_setting.py"
    done = subprocess.run([sys.executable, str(tool), "--setting", "split_spans=never,auto,always", "--layer", "7",
                           "--points", "2", "--threads", "1,2", "--rounds", "5"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [line for line in done.stdout.splitlines() if "thread(s)" in line]
    assert len(rows) == 2, done.stdout
    for row in rows:
        assert len(re.findall(r"\(\d+\.\d+x\)", row)) == 2, row
        assert float(row.rsplit("max|d| ", 1)[1]) < 1e-4, row  # the same function under each value
    bad = subprocess.run([sys.executable, str(tool), "--setting", "split_spans=never,bogus"],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "no setting split_spans=bogus" in bad.stderr, bad.stderr


@pytest.mark.parametrize("tool", ["bench_gated_ops.py", "bench_network_layers.py", "profile_gated_network.py",
                                  "bench_stream_conv.py"])
def test_a_missing_baseline_library_is_one_line(tool, tmp_path):
    """--baseline-library naming no file: the usage and one error line naming it, exit 2,
    before anything is built or timed (ONNX Runtime's own refusal was a traceback); the
    session factory refuses it by name too."""
    import subprocess
    import sys
    from pathlib import Path

    from gate2deploy.errors import UserError
    from gate2deploy.runtimes.ort import session_options

    missing = tmp_path / "libnone.so"
    script = Path(__file__).resolve().parent.parent / "tools" / tool
    done = subprocess.run([sys.executable, str(script), "--baseline-library", str(missing)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].endswith(f"--baseline-library {missing} does not exist")
    with pytest.raises(UserError, match="libnone.so does not exist"):
        session_options(threads=1, library=missing)


def test_a_variant_computing_another_function_is_flagged_not_compared():
    """tools/bench_gated_ops.py's variants_disagreeing: a variant timing the ort model on
    another build or layout ("after", "before", "nchw") must compute its function. A build that
    ignores an attribute the graph sets writes another layout (here: the same values in another
    order), which is flagged; a few elements moved as by a gate flipping near its threshold, or
    last-bit differences, are not; NaN where the reference has none is; the dense twin and other
    variants are not compared at all."""
    import importlib
    import sys
    from pathlib import Path

    import numpy as np

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
    bench = importlib.import_module("bench_gated_ops")

    class Returns:
        def __init__(self, y):
            self.y = y

        def run(self, outputs, feed):
            return [self.y]

    rng = np.random.default_rng(0)
    y = rng.standard_normal((1, 32, 8, 8)).astype(np.float32)
    flipped = y.copy()
    flipped.flat[[3, 700]] += 1.0  # two gates near their thresholds went the other way
    with_nan = y.copy()
    with_nan.flat[5] = np.nan
    sessions = {"ort": Returns(y), "dense": Returns(-y), "meas": Returns(2 * y),
                "after": Returns(y * (1 + 1e-7)), "nchw": Returns(flipped),
                "before": Returns(y.reshape(1, 2, 16, 64).transpose(0, 2, 1, 3).reshape(y.shape))}
    assert bench.variants_disagreeing(sessions, {"x": None}) == ["before"]
    sessions["before"] = Returns(with_nan)
    assert bench.variants_disagreeing(sessions, {"x": None}) == ["before"]
    sessions["before"] = Returns(y[:, :16])
    assert bench.variants_disagreeing(sessions, {"x": None}) == ["before"]
    sessions["before"] = Returns(y.copy())
    assert bench.variants_disagreeing(sessions, {"x": None}) == []
    assert "before" in bench.disagreement_note(["before"]) and bench.disagreement_note([]) == ""


def test_the_network_goal_verdict_reads_the_goal_point_and_every_point():
    """tools/bench_gated_ops.py's network_goal: issue 18's network goals, speed-up >= 0.8 of the
    MAC bound at the goal point (the row nearest it) and >= 0.95x dense at every row, judged per
    variant. Expected verdicts worked out by hand from the issue's two numbers, not from the
    function: 1.20x / bound 1.39 = 0.86 (met), 1.00x / 1.39 = 0.72 (missed); a 0.94x row
    anywhere misses the floor, 0.95x exactly meets it."""
    import importlib
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
    bench = importlib.import_module("bench_gated_ops")
    rows = [(0.003, 1.53, {"ort": 1.30, "meas": 1.30}),
            (0.203, 1.39, {"ort": 1.20, "meas": 1.00}),
            (0.903, 1.04, {"ort": 0.95, "meas": 0.94})]
    ort, meas = bench.network_goal(rows, 0.2)
    assert ort.startswith("  goal, ort: at 20.3% on 1.20x = 0.86 of the bound 1.39 (>= 0.8: MET)")
    assert ort.endswith("lowest 0.95x at 90.3% on (>= 0.95x: MET)")
    assert "= 0.72 of the bound 1.39 (>= 0.8: MISSED)" in meas
    assert meas.endswith("lowest 0.94x at 90.3% on (>= 0.95x: MISSED)")
    # No bound known (a network without MAC figures): the floor alone; a variant some row lacks
    # (no measured choice) is not judged.
    only = bench.network_goal([(0.5, None, {"ort": 1.1}), (1.0, None, {"ort": 0.9, "meas": 1.0})], 0.5)
    assert only == ["  goal, ort: lowest 0.90x at 100.0% on (>= 0.95x: MISSED)"]
    # A sweep without a row near the goal point (--net-points 0,7) judges the floor alone.
    far = bench.network_goal([rows[0], rows[2]], 0.2)
    assert far[0] == "  goal, ort: lowest 0.95x at 90.3% on (>= 0.95x: MET)"
