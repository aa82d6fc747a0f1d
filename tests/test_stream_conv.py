"""StreamConv (runtimes/OPS.md; runtimes/native/stream_conv.cc) and the pass that emits it
(passes/stream_weight_convs.py, `--stream-convs`).

Expected values come from `direct_conv` below, an ONNX Conv written out here as loops over
the taps that read the input (ONNX's Conv: the padding is not multiplied), not from
runtimes/reference.py or the kernel; the exports are checked against PyTorch by the export's
own verification."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from test_kernel_paths import TIERS, _print_native_counters  # noqa: E402
from test_native_ops import run_node  # noqa: E402


def direct_conv(x, w, b, strides=(1, 1), pads=(0, 0, 0, 0), dilations=(1, 1), group=1, relu=False):
    """ONNX Conv + bias (+ Relu) in float64, tap by tap over the output pixels whose tap
    reads inside the input."""
    n, c, h, wd = x.shape
    o, cw, kh, kw = w.shape
    oh = (h + pads[0] + pads[2] - dilations[0] * (kh - 1) - 1) // strides[0] + 1
    ow = (wd + pads[1] + pads[3] - dilations[1] * (kw - 1) - 1) // strides[1] + 1
    y = np.zeros((n, o, oh, ow)) + b.astype(np.float64)[None, :, None, None]
    og = o // group
    rows, cols = np.arange(oh), np.arange(ow)
    for g in range(group):
        xs = x[:, g * cw:(g + 1) * cw].astype(np.float64)
        ws = w[g * og:(g + 1) * og].astype(np.float64)
        for i in range(kh):
            ih = rows * strides[0] - pads[0] + i * dilations[0]
            r = (ih >= 0) & (ih < h)
            for j in range(kw):
                iw = cols * strides[1] - pads[1] + j * dilations[1]
                q = (iw >= 0) & (iw < wd)
                if not r.any() or not q.any():
                    continue
                patch = xs[:, :, ih[r]][:, :, :, iw[q]]  # [n, cw, rows, cols]
                contrib = np.einsum("nchw,oc->nohw", patch, ws[:, :, i, j])
                y[:, g * og:(g + 1) * og, np.ix_(r)[0][:, None], np.ix_(q)[0][None, :]] += contrib
    if relu:
        y = np.where(np.isnan(y), y, np.maximum(y, 0))
    return y.astype(np.float32)


def attrs_of(strides, pads, dilations, group, relu):
    a = {"strides": list(strides), "pads": list(pads), "dilations": list(dilations), "group": group}
    if relu:
        a["activation"] = "Relu"
    return a


# (batch, C, O, side, group, kernel, strides, pads, dilations, relu): groups whose widths are
# not whole vectors, strided / dilated / asymmetric geometry, a batch whose pixels (3 x 25)
# span several 16-pixel chunks and end in a partial one, a 1x1 output; the first two on the
# 3x3 path (stream_block_3x3: 4x4 where the ISA holds 16 pixels, 2x2 everywhere; 7 samples of
# 2x2: calls of 4, 2 and 1 samples on AVX-512, of 2 and 1 on the others). The last eight (side
# (height, width) where not square) are 3x3 same-padded convs on maps 8, 16 or 32 wide, for
# the bands (stream_block_rows: 2 rows of 8, 1 of 16 or half a row of 32 on AVX-512; 8
# columns of a row on the others; where the height is whole bands, the rest on the im2col
# path): first / middle / last rows, a band that is both (2x8 on AVX-512, 1x8 and 1x32 on
# the others), heights 5 and 1 that AVX-512's two-row bands do not divide, a row split into
# a first and last band (AVX-512) or also inner ones (the others).
CASES = [
    (1, 40, 48, 4, 2, 3, (1, 1), (1, 1, 1, 1), (1, 1), True),
    (7, 24, 40, 2, 1, 3, (1, 1), (1, 1, 1, 1), (1, 1), True),
    (3, 17, 33, 5, 1, 3, (1, 1), (1, 1, 1, 1), (1, 1), False),
    (2, 18, 21, 7, 3, 3, (2, 1), (0, 2, 1, 0), (1, 2), True),
    (1, 8, 20, 2, 4, 1, (1, 1), (0, 0, 0, 0), (1, 1), False),
    (1, 64, 70, 1, 1, 3, (1, 1), (1, 1, 1, 1), (1, 1), True),
    (2, 24, 40, 8, 2, 3, (1, 1), (1, 1, 1, 1), (1, 1), True),
    (1, 20, 36, 16, 1, 3, (1, 1), (1, 1, 1, 1), (1, 1), False),
    (1, 12, 20, (6, 8), 1, 3, (1, 1), (1, 1, 1, 1), (1, 1), True),
    (2, 10, 18, (5, 8), 2, 3, (1, 1), (1, 1, 1, 1), (1, 1), False),
    (1, 16, 24, (1, 8), 1, 3, (1, 1), (1, 1, 1, 1), (1, 1), True),
    (1, 12, 20, (2, 8), 1, 3, (1, 1), (1, 1, 1, 1), (1, 1), True),
    (1, 18, 20, (3, 32), 2, 3, (1, 1), (1, 1, 1, 1), (1, 1), True),
    (2, 8, 16, (1, 32), 1, 3, (1, 1), (1, 1, 1, 1), (1, 1), False),
]
BAND_CASES = {"avx512": 6, "other": 8}  # the cases above on stream_block_rows, per tier


def check_cases() -> None:
    rng = np.random.default_rng(3)
    for n, c, o, side, group, k, strides, pads, dil, relu in CASES:
        x = rng.standard_normal((n, c, *(side if isinstance(side, tuple) else (side, side)))).astype(np.float32)
        w = rng.standard_normal((o, c // group, k, k)).astype(np.float32)
        b = rng.standard_normal(o).astype(np.float32)
        got = run_node("StreamConv", x, [w, b], attrs_of(strides, pads, dil, group, relu))
        want = direct_conv(x, w, b, strides, pads, dil, group, relu)
        assert got.shape == want.shape, (got.shape, want.shape)
        scale = np.abs(want).max()
        assert np.abs(got - want).max() <= 2e-6 * scale, (n, c, o, side, group, np.abs(got - want).max(), scale)


def check_nonfinite() -> None:
    """An inf weight whose tap reads only padding for some outputs: those stay finite (ONNX
    Conv does not multiply the padding); a NaN input reaches exactly the outputs reading it."""
    rng = np.random.default_rng(4)
    x = rng.standard_normal((1, 4, 2, 2)).astype(np.float32)
    w = rng.standard_normal((16, 4, 3, 3)).astype(np.float32)
    b = np.zeros(16, np.float32)
    w[3, 1, 0, 0] = np.inf  # tap (0, 0) reads the input only for output pixel (1, 1)
    got = run_node("StreamConv", x, [w, b], attrs_of((1, 1), (1, 1, 1, 1), (1, 1), 1, False))
    want = direct_conv(x, w, b, pads=(1, 1, 1, 1))
    assert np.isfinite(got[0, 3, :1]).all() and np.isfinite(got[0, 3, 1, 0])
    np.testing.assert_array_equal(np.isfinite(got), np.isfinite(want))
    finite = np.isfinite(want)
    assert np.abs(got[finite] - want[finite]).max() <= 2e-6 * np.abs(want[finite]).max()
    x = rng.standard_normal((1, 4, 4, 4)).astype(np.float32)
    x[0, 2, 0, 1] = np.nan  # read by the outputs of rows 0-1, columns 0-2 only
    w[3, 1, 0, 0] = 1.0
    got = run_node("StreamConv", x, [w, b], attrs_of((1, 1), (1, 1, 1, 1), (1, 1), 1, True))
    want = direct_conv(x, w, b, pads=(1, 1, 1, 1), relu=True)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    assert np.isnan(got).any() and not np.isnan(got).all()
    # bands of rows: a NaN in the last row of the first two-row band (AVX-512) reaches the
    # next band's first row through the row it reads above itself, and no further
    x = rng.standard_normal((1, 4, 8, 8)).astype(np.float32)
    x[0, 2, 1, 7] = np.nan
    got = run_node("StreamConv", x, [w, b], attrs_of((1, 1), (1, 1, 1, 1), (1, 1), 1, True))
    want = direct_conv(x, w, b, pads=(1, 1, 1, 1), relu=True)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    assert np.isnan(got[0, :, 2]).any() and not np.isnan(got[0, :, 3:]).any()


# Zero tails (stream_conv.h, StreamWeights::live): sensAI's fused layers pad each group's
# channels with zero weights at the end. (batch, C, O, side, group, kernel, pads): a 2x2 map
# (the 3x3 path on every tier) and a 5x5 one (the im2col path).
ZERO_TAIL_CASES = [(2, 80, 96, 2, 2, 3, (1, 1, 1, 1)), (1, 48, 40, 5, 2, 3, (1, 1, 1, 1))]


def zero_tail_weights(rng, c, o, group, k):
    """W whose groups read fewer channels than they are given: group 0's outputs read 23 of
    its channels, its last outputs (from 32 on) none (whole blocks zero where the group has
    48); group 1's first outputs read all, its others a different prefix per output
    (so a block's reach is its widest output's), each ending inside a channel's taps."""
    cw, og = c // group, o // group
    w = rng.standard_normal((o, cw, k, k)).astype(np.float32)
    w[:og, 23:] = 0
    w[:og, 22, -1] = 0  # the last live channel's last kernel row: the zeros end inside a channel
    w[32:og] = 0
    for j in range(og // 2, og):
        w[og + j, 5 + j % 11:] = 0
        w[og + j, 4 + j % 11].flat[1:] = 0  # of the last live channel, only its first tap
    return w


def check_zero_tails() -> None:
    """Outputs against direct_conv; then inf inputs in channels that some block of group 0
    leaves out: ONNX's Conv multiplies them by the zero weights (NaN), so that call takes the
    plain dense path. Channel 10 is left out only by the all-zero blocks of the 2x2 case (read
    by the others), the last channel by every block."""
    rng = np.random.default_rng(5)
    for n, c, o, side, group, k, pads in ZERO_TAIL_CASES:
        x = rng.standard_normal((n, c, side, side)).astype(np.float32)
        w = zero_tail_weights(rng, c, o, group, k)
        b = rng.standard_normal(o).astype(np.float32)
        a = attrs_of((1, 1), pads, (1, 1), group, True)
        got = run_node("StreamConv", x, [w, b], a)
        want = direct_conv(x, w, b, pads=pads, group=group, relu=True)
        assert np.abs(got - want).max() <= 2e-6 * np.abs(want).max(), (c, o, side, np.abs(got - want).max())
        w[o // group:] = rng.standard_normal(w[o // group:].shape)  # group 1 reads everything
        for channel in (10, c // group - 1):
            xi = x.copy()
            xi[-1, channel, side // 2, side // 2] = np.inf
            got = run_node("StreamConv", xi, [w, b], a)
            want = direct_conv(xi, w, b, pads=pads, group=group, relu=True)
            assert np.isnan(want[-1, :o // group]).any() or channel == 10
            for kind in (np.isnan, np.isposinf):
                np.testing.assert_array_equal(kind(got), kind(want))
            finite = np.isfinite(want)
            assert np.abs(got[finite] - want[finite]).max() <= 2e-6 * np.abs(want[finite]).max()


def _child() -> None:
    check_cases()
    check_nonfinite()
    check_zero_tails()
    _print_native_counters(im2col=("G2DStreamConvRuns", 0), direct=("G2DStreamConvRuns", 1),
                           three=("G2DStreamConvRuns", 2), skipped=("G2DStreamConvRuns", 3),
                           rows=("G2DStreamConvRuns", 4))


@pytest.mark.skipif(os.environ.get("G2D_NATIVE_SUBPROCESS") == "1", reason="already a rerun")
@pytest.mark.parametrize("tier", [t for t in TIERS if t != "amx"])
def test_stream_conv_matches_a_direct_conv_on_each_tier(tier):
    supported, env_tier = TIERS[tier]
    if not supported:
        pytest.skip(f"this CPU lacks the {tier} tier; the test runs on a machine that has it")
    proc = subprocess.run([sys.executable, __file__], env=dict(os.environ, **env_tier), capture_output=True,
                          text=True, timeout=300, cwd=HERE.parent)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    counts = json.loads(proc.stdout.strip().splitlines()[-1])
    assert f"isa={tier}" in counts["config"], counts
    # the inf weight on the dense path (DenseConvSample); the 3x3 cases (and the NaN input, 3x3 at 4x4) on
    # stream_block_3x3 where the ISA takes their map, the band cases and the NaN input at 8x8 on
    # stream_block_rows, every other call on the im2col path
    # The zero-tail cases: each case's first call and the 5x5 case's inf in channel 10 (which
    # every block there reads) run the stream kernels, skipping; the other three infs lie in
    # channels some block skips: the dense path (the 2x2 case on stream_block_3x3, 5x5 im2col).
    three = 1 + (tier == "avx512") * 2 + 1  # the 2x2 case; the 4x4 one and the NaN input on AVX-512
    rows = BAND_CASES["avx512" if tier == "avx512" else "other"] + 1
    assert counts["direct"] == 1 + 3 and counts["three"] == three and counts["rows"] == rows, counts
    assert counts["im2col"] + counts["three"] + counts["rows"] == len(CASES) + 2 + 3, counts
    assert counts["skipped"] == len(ZERO_TAIL_CASES) + 1, counts


def test_wrong_bias_and_attributes_are_errors_not_crashes():
    from onnxruntime.capi.onnxruntime_pybind11_state import Fail, InvalidArgument

    x = np.ones((1, 4, 2, 2), np.float32)
    w = np.ones((8, 2, 3, 3), np.float32)
    with pytest.raises((InvalidArgument, Fail), match="B"):
        run_node("StreamConv", x, [w, np.zeros(7, np.float32)], {"group": 2, "pads": [1, 1, 1, 1]})
    with pytest.raises((InvalidArgument, Fail), match="group|channels"):
        run_node("StreamConv", x, [w, np.zeros(8, np.float32)], {"group": 3})
    with pytest.raises((InvalidArgument, Fail), match="activation"):
        run_node("StreamConv", x, [w, np.zeros(8, np.float32)], {"group": 2, "activation": "Tanh"})


# ---------------------------------------------------------------------------- the pass


def small_map_net(width: int = 192, side: int = 4) -> torch.nn.Module:
    """A conv at side x side (big weights: width x width x 3 x 3 floats, 1.3 MiB at 192), ReLU,
    then a small conv (weights under 1 MiB) and a linear head."""
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, width, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(width, width, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(width, 16, 3, padding=1), torch.nn.Flatten(),
        torch.nn.Linear(16 * side * side, 10)).eval()


def op_types(model) -> list[str]:
    return [n.op_type for n in model.graph.node]


@pytest.mark.parametrize("side", [4, 8, 16, 32])
def test_pass_rewrites_the_big_weight_conv_and_fuses_its_relu(side):
    """At most 16 output pixels (4x4), or a 3x3 same-padded conv on a map 8, 16 or 32 wide
    (the kernel's bands: passes/stream_weight_convs.py BAND_WIDTHS)."""
    import gate2deploy

    model = small_map_net(side=side)
    c = gate2deploy.compile(model, torch.randn(2, 3, side, side), target="ort", stream_convs="on")
    ops = op_types(c.onnx_model)
    # the 3->192 conv (20 KiB) and 192->16 (108 KiB) stay; 192->192 (1.3 MiB) is streamed
    assert ops.count("StreamConv") == 1 and ops.count("Conv") == 2, ops
    node = next(n for n in c.onnx_model.graph.node if n.op_type == "StreamConv")
    assert {a.name: a.s for a in node.attribute if a.name == "activation"} == {"activation": b"Relu"}
    assert ops.count("Relu") == 1  # the first conv's (ONNX Runtime fuses that one itself)
    assert c.report["stream_convs"]["convs"] == [node.name] and c.report["stream_convs"]["kept"]
    assert c.report["verification"].startswith("max abs err")  # verified against PyTorch
    # the exported model (dynamic batch) at another batch size
    x = torch.randn(3, 3, side, side)
    got = c.session().run(None, {c.onnx_model.graph.input[0].name: x.numpy()})[0]
    np.testing.assert_allclose(got, model(x).detach().numpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("case", ["large map", "strided", "off", "onnx target"])
def test_pass_leaves_other_convs_alone(case):
    import gate2deploy

    # 12x12: 144 output pixels, more than MAX_PIXELS, on a map no band width fits
    side = 12 if case == "large map" else 16 if case == "strided" else 4
    model = small_map_net(side=side)
    if case == "strided":  # an 8x8 output (a band width), but of a stride-2 conv: no band
        model[2] = torch.nn.Conv2d(192, 192, 3, padding=1, stride=2)
        model[6] = torch.nn.Linear(16 * 8 * 8, 10)
    options = {"stream_convs": "off"} if case == "off" else {}
    target = "onnx" if case == "onnx target" else "ort"
    if case != "onnx target":
        options.setdefault("stream_convs", "on")
    c = gate2deploy.compile(model, torch.randn(1, 3, side, side), target=target, **options)
    assert "StreamConv" not in op_types(c.onnx_model)
    assert c.report["stream_convs"]["convs"] == [] and not c.report["stream_convs"]["kept"]


def test_dense_twin_keeps_streamconv_which_is_not_a_gate():
    """kernel_choice.dense_twin (the gated benchmarks' baseline) replaces gates by plain Convs
    without bias; a StreamConv is no gate and stays whole, bias and ReLU included."""
    import gate2deploy
    from gate2deploy.kernel_choice import dense_twin

    model = gate2deploy.compile(small_map_net(), torch.randn(1, 3, 4, 4), target="ort", stream_convs="on").onnx_model
    twin = dense_twin(model)
    before = [(n.op_type, list(n.input)) for n in model.graph.node if n.op_type == "StreamConv"]
    after = [(n.op_type, list(n.input)) for n in twin.graph.node if n.op_type == "StreamConv"]
    assert len(before) == 1 and after == before


def test_stream_convs_on_needs_the_ort_target():
    import gate2deploy
    from gate2deploy.errors import OptionError

    with pytest.raises(OptionError, match="--stream-convs on needs --target ort"):
        gate2deploy.compile(small_map_net(), torch.randn(1, 3, 4, 4), target="onnx", stream_convs="on")


@pytest.mark.parametrize("faster", [True, False])
def test_auto_keeps_the_streamed_network_only_where_it_measures_faster(tmp_path, monkeypatch, faster):
    import gate2deploy
    import gate2deploy.kernel_choice as kc

    monkeypatch.setattr(kc, "_cache_path", lambda: tmp_path / "kernel_choice.json")
    calls = []

    def timer(variants, x, threads):
        calls.append(sorted(variants))
        assert "StreamConv" in op_types(variants["stream"]) and "StreamConv" not in op_types(variants["plain"])
        return {"stream": 1.0 if faster else 1.2, "plain": 1.2 if faster else 1.0}

    monkeypatch.setattr(kc, "_time_networks", timer)
    c = gate2deploy.compile(small_map_net(), torch.randn(1, 3, 4, 4), target="ort")  # auto, the default
    assert ("StreamConv" in op_types(c.onnx_model)) == faster
    report = c.report["stream_convs"]
    assert report["asked"] == "auto" and report["kept"] == faster and not report["cached"]
    assert len(calls) == (2 if faster else 1)  # a win is confirmed in a second round
    # the same model again: the choice comes from the cache, nothing is timed
    c = gate2deploy.compile(small_map_net(), torch.randn(1, 3, 4, 4), target="ort")
    assert c.report["stream_convs"]["cached"] and len(calls) == (2 if faster else 1)
    assert ("StreamConv" in op_types(c.onnx_model)) == faster


def test_export_cli_says_what_it_did_with_the_streamed_convs(tmp_path, cli, capsys, monkeypatch):
    """`export --target ort`: one line on the StreamConvs (kept or left as Conv, with the
    measured times under auto), none with --stream-convs off; a bad value is one line, exit 2.
    A CIFAR VGG-16-BN at width 0.5: its last six convs (128-256 channels at 4x4 and 2x2) have
    1.2-2.4 MB of weights each, the three before them (128 channels at 8x8) 295-590 KB: nine
    StreamConvs; its 32x32 and 16x16 convs (up to 147 KB) stay."""
    from models.cifar_nets import vgg16_bn

    import gate2deploy.kernel_choice as kc

    monkeypatch.setattr(kc, "_cache_path", lambda: tmp_path / "kernel_choice.json")
    monkeypatch.setattr(kc, "_time_networks", lambda variants, x, threads: {"stream": 2.0, "plain": 1.0})
    ckpt = tmp_path / "vgg.pt"
    torch.save(vgg16_bn(width=0.5).state_dict(), ckpt)
    common = ["export", ckpt, "--model", "tests/models/cifar_nets.py:vgg16_bn", "--model-kwargs", '{"width": 0.5}',
              "--target", "ort", "--input-shape", "1,3,32,32"]
    rule = ("convs with >= 256 KiB of weights and <= 16 output pixels per sample, or 3x3 same-padded on maps "
            "8 / 16 / 32 wide")
    for mode, line in [("on", f"StreamConv: 9 convs ({rule}) kept"),
                       ("auto", f"StreamConv: 9 convs ({rule}) left as Conv "
                                "(measured here, 2 threads: 2.000 vs 1.000 ms as Conv)"),
                       ("off", None)]:
        out = tmp_path / f"{mode}.onnx"
        code, stdout, err = cli(*common, "--stream-convs", mode, "-o", out)
        assert code == 0, err
        lines = [x for x in stdout.splitlines() if x.startswith("StreamConv:")]
        assert lines == ([line] if line else []), stdout
        import onnx
        streamed = sum(n.op_type == "StreamConv" for n in onnx.load(str(out)).graph.node)
        assert streamed == (9 if mode == "on" else 0)
    with pytest.raises(SystemExit) as exited:  # argparse's usage error
        cli(*common, "--stream-convs", "sometimes", "-o", tmp_path / "bad.onnx")
    err = capsys.readouterr().err
    assert exited.value.code == 2 and len(err.strip().splitlines()) == 1 and "--stream-convs" in err
    assert not (tmp_path / "bad.onnx").exists()


if __name__ == "__main__":
    _child()
