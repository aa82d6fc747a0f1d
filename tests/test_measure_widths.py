"""`--physical-widths measured` (gate2deploy/measure_widths.py): widths chosen by timing stay
exact, timings are cached per CPU, the whole-model guard keeps fast's choice when measured
is slower, untimed targets fall back to fast, bad values are refused.

The equality reference is the un-folded PyTorch model with its masks (PyTorch computes it;
nothing of the fold is involved). Timers are injected where the test needs a given choice:
on a shared machine a real timing could pick any candidate, and exactness must hold for
every candidate, so the fake timer makes the narrowest candidate (the one farthest from
fast's) win.
"""
import json
import re

import numpy as np
import onnx
import pytest
import torch
from torch import nn

import gate2deploy
from gate2deploy.capture import capture
from gate2deploy.errors import OptionError
from gate2deploy.measure_widths import TimingCache, fold_measured
from gate2deploy.nn import ChannelMask
from gate2deploy.pipeline import PassContext, run_pipeline
from gate2deploy.verify import make_session


def _net():
    """A stem, a 1x1 expansion whose 40 channels the mask cuts to 17 (fast: 24 with 8-blocks,
    32 with 16-blocks; measured candidates 20, 24 (and 32)), a depthwise conv reading it and
    a projection: the widths change at the producer, the depthwise reader and the projection."""
    torch.manual_seed(0)
    keep = torch.zeros(40)
    keep[torch.randperm(40)[:17]] = 1
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                        nn.Conv2d(16, 40, 1), nn.BatchNorm2d(40), nn.ReLU(), ChannelMask(keep),
                        nn.Conv2d(40, 40, 3, padding=1, groups=40), nn.BatchNorm2d(40), nn.ReLU(),
                        nn.Conv2d(40, 8, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):  # non-trivial BN so masked channels' constants matter
            m.running_mean.normal_()
            m.bias.data.normal_()
    return net.eval(), int(keep.sum())


class FakeTimer:
    """Narrow models are faster (ms = total Conv output channels); in the whole-model guard
    the measured model is reported `whole_factors[i]` times fast's in the i-th timing and the
    unpadded (exact) one `exact` times fast's. Counts calls."""

    def __init__(self, *whole_factors, exact=1.5):
        self.calls, self.whole_factors, self.exact = 0, list(whole_factors or (0.5, 0.5)), exact

    def __call__(self, models, input_shape, runs):
        self.calls += 1
        if "fast" in models:  # the whole-model guard
            whole = {"fast": 1.0, "exact": self.exact}
            if "measured" in models:
                whole["measured"] = self.whole_factors.pop(0)
            return {name: whole[name] for name in models}
        return {name: float(sum(_conv_widths(m))) for name, m in models.items()}


def _conv_widths(model: onnx.ModelProto) -> list[int]:
    inits = {i.name: i for i in model.graph.initializer}
    return [inits[n.input[1]].dims[0] for n in model.graph.node if n.op_type == "Conv"]


def _fold(net, x, timer, cache, target="onnx"):
    proto = capture(net, x)
    return fold_measured(proto, "onnx", lambda: PassContext(), target, tuple(x.shape), timer=timer, cache=cache)


def _fast(net, x):
    return run_pipeline(capture(net, x), "onnx", PassContext(choose_widths=True))


def test_measured_widths_are_exact_against_unfolded_pytorch(tmp_path):
    net, kept = _net()
    x = torch.randn(2, 3, 12, 12)
    model, ctx, report = _fold(net, x, FakeTimer(), TimingCache(tmp_path / "cache.json"))
    assert report.used == "measured"
    timed = {c.tensor: c for c in report.layers}
    assert timed, "nothing was timed"
    choice = next(c for c in timed.values() if c.kept == kept)
    # the fake timer favours the narrowest candidate: the multiple of 4 at or above the kept count
    assert choice.chosen == -(-kept // 4) * 4 == min(choice.ms)
    assert choice.chosen in _conv_widths(model)  # the expansion and its depthwise reader
    with torch.no_grad():
        expected = net(x).numpy()
    got = make_session(model).run(None, {"input": x.numpy()})[0]
    assert np.isfinite(got).all()
    assert np.abs(got - expected).max() <= 1e-5 * np.abs(expected).max()


def test_timings_are_cached_per_cpu_and_reused(tmp_path):
    net, _ = _net()
    x = torch.randn(1, 3, 12, 12)
    first_timer, path = FakeTimer(), tmp_path / "cache.json"
    first, _, first_report = _fold(net, x, first_timer, TimingCache(path))
    assert first_timer.calls >= 2 and first_report.timed > 0  # layers, then the whole-model guard
    assert path.is_file() and json.loads(path.read_text())
    second_timer = FakeTimer()
    second, _, second_report = _fold(net, x, second_timer, TimingCache(path))
    assert second_timer.calls == 0 and second_report.timed == 0
    assert second_report.cached == first_report.timed
    assert second.SerializeToString() == first.SerializeToString()


def test_default_cache_file_is_named_by_the_cpu(tmp_path, monkeypatch):
    from gate2deploy.measure_widths import cpu_name
    monkeypatch.setenv("GATE2DEPLOY_CACHE", str(tmp_path))
    path = TimingCache().path
    assert path.parent == tmp_path / "widths"
    # the name's words, in the file-name-safe form (runs of other characters become "-":
    # "Intel(R) Xeon(R)" -> "Intel-R-Xeon-R")
    first_word = re.sub(r"[^A-Za-z0-9]+", "-", cpu_name().split()[0]).strip("-")
    assert path.name.startswith(first_word + "-")


@pytest.mark.parametrize("factors, rounds", [((1.5,), 1), ((0.5, 0.99), 2)])
def test_guard_keeps_fast_unless_measured_wins_every_round(tmp_path, factors, rounds):
    """Slower in the first timing, or faster then within the 5% tie band in the second."""
    net, _ = _net()
    x = torch.randn(1, 3, 12, 12)
    model, _, report = _fold(net, x, FakeTimer(*factors), TimingCache(tmp_path / "c.json"))
    assert report.used == "fast" and "not faster" in report.note
    assert report.whole_model_ms == {"fast": [1.0] * rounds, "measured": list(factors), "exact": [1.5] * rounds}
    assert model.SerializeToString() == _fast(net, x).SerializeToString()


def test_guard_keeps_the_unpadded_model_when_it_is_fastest(tmp_path):
    """The exact fold (no padding) is a whole-model candidate: kept when it beats fast's in
    every round and is faster than the measured widths' too; still equal to PyTorch."""
    net, _ = _net()
    x = torch.randn(2, 3, 12, 12)
    model, ctx, report = _fold(net, x, FakeTimer(0.9, 0.9, exact=0.5), TimingCache(tmp_path / "c.json"))
    assert report.used == "exact" and "exact" in report.note
    assert report.whole_model_ms["exact"] == [0.5, 0.5] and report.whole_model_ms["measured"] == [0.9, 0.9]
    exact = run_pipeline(capture(net, x), "onnx", PassContext(choose_widths=False))
    assert model.SerializeToString() == exact.SerializeToString() != _fast(net, x).SerializeToString()
    with torch.no_grad():
        expected = net(x).numpy()
    got = make_session(model).run(None, {"input": x.numpy()})[0]
    assert np.abs(got - expected).max() <= 1e-5 * np.abs(expected).max()


def test_untimed_target_falls_back_to_fast_with_a_note(tmp_path):
    net, _ = _net()
    x = torch.randn(1, 3, 12, 12)
    timer = FakeTimer()
    model, _, report = _fold(net, x, timer, TimingCache(tmp_path / "c.json"), target="trt")
    assert timer.calls == 0
    assert report.used == "fast" and "trt" in report.note
    assert model.SerializeToString() == _fast(net, x).SerializeToString()


def test_compile_api_reports_measured_widths_and_trt_fallback(tmp_path, monkeypatch):
    monkeypatch.setenv("GATE2DEPLOY_CACHE", str(tmp_path))
    net, _ = _net()
    compiled = gate2deploy.compile(net, torch.randn(1, 3, 8, 8), target="trt", physical_widths="measured")
    assert compiled.report["physical_widths"]["used"] == "fast"
    assert "trt" in compiled.report["physical_widths"]["note"]
    exact = gate2deploy.compile(net, torch.randn(1, 3, 8, 8), target="ort", physical_widths="exact")
    assert exact.report["physical_widths"] == {"asked": "exact", "used": "exact"}


def test_info_times_on_this_machine_and_writes_the_cache(tmp_path, monkeypatch):
    """The real ONNX Runtime timer end to end (no speed asserted: the machine is shared)."""
    monkeypatch.setenv("GATE2DEPLOY_CACHE", str(tmp_path))
    net, kept = _net()
    info = gate2deploy.info(net, torch.randn(1, 3, 12, 12), physical_widths="measured")
    widths = info["physical_widths"]
    assert widths["asked"] == "measured" and widths["used"] in ("measured", "fast")
    layer = next(row for row in widths["layers"] if row["kept"] == kept)
    assert set(layer["ms"]) >= {str(-(-kept // 4) * 4), str(layer["fast"])}
    assert all(ms > 0 for ms in layer["ms"].values())
    assert json.loads((tmp_path / "widths" / widths["cache"].rsplit("/", 1)[1]).read_text())


def test_bad_physical_widths_are_refused(cli, capsys):
    with pytest.raises(SystemExit) as exc:
        cli("info", "--model", "torchvision.models:resnet18", "--input-shape", "1,3,32,32",
            "--physical-widths", "timed")
    assert exc.value.code == 2
    assert "invalid choice: 'timed'" in capsys.readouterr().err
    net, _ = _net()
    with pytest.raises(OptionError, match="physical_widths must be one of fast, exact, measured"):
        gate2deploy.compile(net, torch.randn(1, 3, 8, 8), physical_widths="timed")
