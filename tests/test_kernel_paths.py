"""Each native kernel path this machine supports, forced, against runtimes/reference.py (issue 18:
"a test forces each path the machine supports and checks numerics").

Paths: the ISA table (G2D_ISA=generic|avx2; avx512 and AMX where the CPU has them: tiers the
machine lacks are skipped, the test runs there on a machine that has them) x the second stage
of CGConv / PGConv's integer path (G2D_SECOND_STAGE=sparse|dense, conv_common.cc), PG on its
int16 stages (G2D_ORT_CONV=0, G2D_PG_INT8=0) or, for the AMX tier, on tiles; and PG's int8
kernels (runtimes/native/pg_int8.h: AVX2, AVX-512 VNNI, and the AVX2 kernel under the avx512
table with G2D_PG_INT8=avx2); CG's span tasks split by plan (G2D_SPLIT_SPANS=always|never).
Each combination runs in a subprocess (the settings are read once per process) that computes
CG and PG layers at gate-on
fractions where the automatic choice would take the other path, compares them with the
reference (tests/test_native_ops.py's tolerance and tie rule), and reports the library's path
counters (G2DSecondStageRuns, G2DAmxConvRuns), so the test also proves the forced path ran.

Also: gate2deploy.kernel_choice keeps a network's function (the export's verification passes
with layers lowered) and records its choice per layer.
"""
from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).resolve().parent


def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


FLAGS = cpu_flags()
TIERS = {
    "generic": (True, {"G2D_ISA": "generic", "G2D_AMX": "0"}),
    "avx2": ({"avx2", "fma"} <= FLAGS, {"G2D_ISA": "avx2", "G2D_AMX": "0"}),
    "avx512": ({"avx512f", "avx512bw", "avx512vl", "avx512_vnni"} <= FLAGS, {"G2D_AMX": "0"}),
    "amx": ({"amx_tile", "amx_int8", "avx512bw"} <= FLAGS, {}),
}


def _child(stage: str) -> None:
    """Runs in the subprocess: CG and PG cases vs the reference; prints the path counters."""
    sys.path.insert(0, str(HERE))
    import test_native_ops as t
    from gate2deploy.runtimes import reference as ref

    rng = np.random.default_rng(7)
    # fractions on both sides of the automatic switch (fp32 0.5, int16 0.1 of a span's gates)
    for frac in (0.05, 0.3, 0.8):
        for c, o, hw, block_diagonal in [(16, 24, 9, False), (32, 32, 12, True)]:
            _check_cg_layer(rng, 2, c, o, hw, 4, block_diagonal, frac)
        for abits, pred in [(3, 2), (8, 4)]:
            x = np.clip(rng.standard_normal((1, 32, 10, 10)), 0, 2.5).astype(np.float32)
            w = t.quantize_weights(rng.standard_normal((48, 32, 3, 3)).astype(np.float32), 8)
            x_hb, _, _ = ref.pg_split_activations(x, abits, pred)
            msb = ref.conv2d(x_hb, w, (1, 1), (1, 1, 1, 1), (1, 1))
            thr = ref.thresholds_for_fraction(msb, frac)
            attrs = dict(t.conv_attrs((1, 1), (1, 1, 1, 1), (1, 1)), abits=abits, pred_bits=pred, static_scale=0.0)
            y = t.run_node("PGConv", x, [w, thr], attrs)
            y_ref = ref.pg_conv_reference(x, w, thr, abits, pred, 0.0, (1, 1), (1, 1, 1, 1), (1, 1), 1)
            t.assert_close_with_ties(y, y_ref, msb, thr)
    t.check_quantizer_at_level_boundaries()
    t.check_cg_strided_phase_planes()
    print_counts()


def print_counts(int8_excluded: int = 0) -> None:
    """Prints the library configuration and its path counters as one JSON line (the int8 runs
    less `int8_excluded`: those of checks that count their own)."""
    _print_native_counters(sparse=("G2DSecondStageRuns", 0), dense=("G2DSecondStageRuns", 1),
                           amx=("G2DAmxConvRuns", None), int8=("G2DPGInt8Runs", None), int8_excluded=int8_excluded)


def _check_cg_layer(rng, batch: int, c: int, o: int, hw: int, p: int, block_diagonal: bool, frac: float,
                    k: int = 3, strides=(1, 1), dilations=(1, 1)) -> None:
    """One random CGConv layer (c -> o channels, hw x hw, k x k, 1/p base path) with thresholds
    putting `frac` of its gates on, run on the native kernel and checked against
    runtimes/reference.py (ties at the threshold allowed either way)."""
    import test_native_ops as t
    from gate2deploy.runtimes import reference as ref

    x = rng.standard_normal((batch, c, hw, hw)).astype(np.float32)
    w = (rng.standard_normal((o, c, k, k)) / np.sqrt(k * k * c)).astype(np.float32)
    mask = t.cg_base_mask(o, c, p, block_diagonal)
    pads = (k // 2,) * 4
    yp = ref.conv2d(x, w * mask[:, :, None, None], strides, pads, dilations)
    thr = ref.thresholds_for_fraction(yp, frac)
    y = t.run_node("CGConv", x, [w, mask, thr], t.conv_attrs(strides, pads, dilations))
    y_ref = ref.cg_conv_reference(x, w, mask, thr, strides=strides, pads=pads, dilations=dilations)
    t.assert_close_with_ties(y, y_ref, yp, thr)


def _print_native_counters(int8_excluded: int = 0, **counters) -> None:
    """Prints the native library's kernel config and the named counters (name -> (export,
    argument or None)) as one JSON line, for the parent test; an "int8" counter less
    `int8_excluded`."""
    from gate2deploy.runtimes.ort import custom_ops_library_path

    lib = ctypes.CDLL(str(custom_ops_library_path()))
    lib.G2DKernelConfig.restype = ctypes.c_char_p
    values = {}
    for name, (export, arg) in counters.items():
        fn = getattr(lib, export)
        fn.restype = ctypes.c_int64
        values[name] = fn() if arg is None else fn(arg)
    if "int8" in values:
        values["int8"] -= int8_excluded
    print(json.dumps({"config": lib.G2DKernelConfig().decode(), **values}))


def _child_pg_int8() -> None:
    """Runs in the subprocess: PG layers at gate-on 0, 0.2 and 1, signed and post-ReLU inputs,
    weights within int8 (wbits 7) and 9-bit (wbits 8), dilation 1 and 2, 22, 24 and 72 input
    channels (the VNNI stage 2 reads 64 channels of a tap per 512-bit step and the rest, 32, on
    256 bits: 72 channels take both; 22: a last group of four channels half past C, split as
    zeros), 20 and 6 outputs (five blocks of 4 outputs: VNNI's stage 1
    tiles two at a time and one alone; six: a tile whose second block has two real rows), inputs
    9 and 11 wide (11: ten position blocks, so VNNI's whole-block stage 2 ends a chunk on a run
    of two), vs the reference (the int8 kernels take stride-1 layers only)."""
    sys.path.insert(0, str(HERE))
    import test_native_ops as t
    from gate2deploy.runtimes import reference as ref

    rng = np.random.default_rng(9)
    for frac in (0.0, 0.2, 1.0):
        for signed in (False, True):
            for wbits, dil, c, o, width in [(7, (2, 2), 24, 20, 9), (8, (1, 1), 22, 6, 9),
                                            (8, (2, 1), 72, 20, 9), (8, (1, 1), 24, 20, 11)]:
                for abits, pred in [(3, 2), (8, 4)]:
                    x = rng.standard_normal((2, c, 10, width)).astype(np.float32)
                    if not signed:
                        x = np.clip(x, 0, 2.5)
                    w = t.quantize_weights(rng.standard_normal((o, c, 3, 3)).astype(np.float32), wbits)
                    x_hb, _, _ = ref.pg_split_activations(x, abits, pred)
                    msb = ref.conv2d(x_hb, w, (1, 1), (2, 1, 2, 1), dil)
                    thr = ref.thresholds_for_fraction(msb, frac)
                    attrs = dict(t.conv_attrs((1, 1), (2, 1, 2, 1), dil), abits=abits, pred_bits=pred,
                                 static_scale=0.0)
                    y = t.run_node("PGConv", x, [w, thr], attrs)
                    y_ref = ref.pg_conv_reference(x, w, thr, abits, pred, 0.0, (1, 1), (2, 1, 2, 1), dil, 1)
                    t.assert_close_with_ties(y, y_ref, msb, thr)
    t.check_quantizer_at_level_boundaries()
    split_runs = t.pg_int8_runs()
    t.check_pg_split_at_level_boundaries()  # asserts its own int8 runs
    print_counts(int8_excluded=t.pg_int8_runs() - split_runs)


AVX512 = {"avx512f", "avx512bw", "avx512vl", "avx512_vnni"} <= FLAGS
INT8_TIERS = {  # supported, environment, the int8 kernel expected
    "avx2": ({"avx2", "fma"} <= FLAGS, {"G2D_ISA": "avx2", "G2D_AMX": "0"}, "avx2"),
    "avx512-vnni": (AVX512, {"G2D_AMX": "0"}, "vnni"),
    "avx512-avx2": (AVX512, {"G2D_AMX": "0", "G2D_PG_INT8": "avx2"}, "avx2"),
}


@pytest.mark.skipif(os.environ.get("G2D_NATIVE_SUBPROCESS") == "1", reason="already a rerun")
@pytest.mark.parametrize("stage", ["sparse", "dense", "auto"])
@pytest.mark.parametrize("tier", list(INT8_TIERS))
def test_forced_pg_int8_path_matches_reference(tier, stage):
    """The int8 kernels with stage 2 forced to dot products (sparse) or whole blocks (dense), or
    chosen block by block by the cost model (auto: both kinds side by side in one layer)."""
    supported, env_tier, kernel = INT8_TIERS[tier]
    if not supported:
        pytest.skip(f"this CPU lacks the {tier} tier; the test runs on a machine that has it")
    env = {k: v for k, v in os.environ.items() if k != "G2D_SECOND_STAGE"}
    if stage != "auto":
        env["G2D_SECOND_STAGE"] = stage
    proc = subprocess.run([sys.executable, __file__, "pg_int8"], env=dict(env, **env_tier),
                          capture_output=True, text=True, timeout=300, cwd=HERE.parent)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    counts = json.loads(proc.stdout.strip().splitlines()[-1])
    assert f"pg_int8={kernel}" in counts["config"], counts
    # every sample of every case (3 fractions x 2 signs x 4 layer shapes x 2 bit splits x batch 2)
    assert counts["int8"] == 96 and counts["amx"] == 0, counts
    if stage == "auto":
        assert counts["sparse"] > 0 and counts["dense"] > 0, counts
    else:
        assert counts[stage] > 0 and counts["dense" if stage == "sparse" else "sparse"] == 0, counts


@pytest.mark.sanitizer
@pytest.mark.skipif(os.environ.get("G2D_NATIVE_SUBPROCESS") == "1", reason="already a rerun")
@pytest.mark.parametrize("tier", ["avx512-vnni", "avx2"])
def test_forced_pg_int8_path_sanitizer_clean(tier):
    """The int8 kernels (pg_int8.cc) under -fsanitize=address,undefined: the sanitizer rerun of
    test_native_ops runs PG on this machine's default path (AMX where present), so the int8
    paths get their own run of the cases above (both stage-2 forms run: 20% and 100% on)."""
    from gate2deploy.runtimes.native_build import asan_preload, build_library

    supported, env_tier, kernel = INT8_TIERS[tier]
    if not supported:
        pytest.skip(f"this CPU lacks the {tier} tier; the test runs on a machine that has it")
    env = dict(os.environ, GATE2DEPLOY_OPS_LIBRARY=str(build_library("asan")), LD_PRELOAD=asan_preload(),
               ASAN_OPTIONS="detect_leaks=0:abort_on_error=1",
               UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1", **env_tier)
    proc = subprocess.run([sys.executable, __file__, "pg_int8"], env=env, capture_output=True,
                          text=True, timeout=600, cwd=HERE.parent)
    report = proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.returncode == 0, report
    assert "ERROR: AddressSanitizer" not in proc.stderr and "runtime error:" not in proc.stderr, report
    counts = json.loads(proc.stdout.strip().splitlines()[-1])
    assert f"pg_int8={kernel}" in counts["config"] and counts["int8"] == 96, counts
    assert counts["sparse"] > 0 and counts["dense"] > 0, counts


@pytest.mark.skipif(os.environ.get("G2D_NATIVE_SUBPROCESS") == "1", reason="already a rerun")
@pytest.mark.parametrize("stage", ["sparse", "dense"])
@pytest.mark.parametrize("tier", list(TIERS))
def test_forced_kernel_path_matches_reference(tier, stage):
    supported, env_tier = TIERS[tier]
    if not supported:
        pytest.skip(f"this CPU lacks the {tier} tier; the test runs on a machine that has it")
    env = dict(os.environ, G2D_SECOND_STAGE=stage, G2D_ORT_CONV="0", G2D_PG_INT8="0", **env_tier)
    proc = subprocess.run([sys.executable, __file__, stage], env=env, capture_output=True, text=True,
                          timeout=300, cwd=HERE.parent)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    counts = json.loads(proc.stdout.strip().splitlines()[-1])
    expected_isa = {"generic": "generic", "avx2": "avx2"}.get(tier, "avx512")
    assert f"isa={expected_isa}" in counts["config"] and f"second_stage={stage}" in counts["config"], counts
    # the forced second stage ran, the other never did (AMX runs PG on tiles, outside it)
    assert counts[stage] > 0 and counts["dense" if stage == "sparse" else "sparse"] == 0, counts
    assert (counts["amx"] > 0) == (tier == "amx"), counts


def two_cg_layer_model():
    """(model, input) of the kernel-choice tests: a conv and two CG layers (p = 4, one with the
    seed's grouped base path), 16 channels at 16x16."""
    import torch

    from gate2deploy.gated import CGConv2d

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(),
        CGConv2d(16, 16, 3, padding=1, p=4, th=0.0), torch.nn.ReLU(),
        CGConv2d(16, 16, 3, padding=1, p=4, use_group=True, th=0.0)).eval()
    return model, torch.randn(1, 3, 16, 16)


def test_measured_kernel_choice_keeps_the_function(tmp_path, monkeypatch):
    """--gated-kernels measured on a small CG network: each layer gets a recorded choice with
    both timings, the export's own verification (each gated layer against PyTorch) passes,
    and a second export reads the choices from the cache instead of timing again."""
    from gate2deploy.api import compile as g2d_compile

    import gate2deploy.kernel_choice as kc

    # a fresh choice cache (not a fresh GATE2DEPLOY_CACHE: that would rebuild the library)
    monkeypatch.setattr(kc, "_cache_path", lambda: tmp_path / "kernel_choice.json")
    model, x = two_cg_layer_model()
    first = g2d_compile(model, x, target="ort", gated_kernels="measured")
    layers = first.report["kernel_choice"]["layers"]
    assert len(layers) == 2 and all(r["choice"] in ("native", "standard") for r in layers), layers
    assert all(r["native_ms"] > 0 and r["standard_ms"] > 0 and not r["cached"] for r in layers), layers
    assert first.report["gated_layer_check"]["passed"], first.report["gated_layer_check"]
    # a layer chose "standard" exactly when its custom node is gone from the deployed graph
    remaining = {n.name for n in first.onnx_model.graph.node if n.op_type == "CGConv"}
    assert {r["node"] for r in layers if r["choice"] == "native"} == remaining, (layers, remaining)
    twin = first.report["kernel_choice"]["dense_twin"]
    assert twin["gated_ms"] > 0 and twin["dense_ms"] > 0 and not twin["cached"], twin
    assert twin["speedup"] == pytest.approx(twin["dense_ms"] / twin["gated_ms"], rel=1e-2)
    second = g2d_compile(model, x, target="ort", gated_kernels="measured")
    again = second.report["kernel_choice"]["layers"]
    assert [r["choice"] for r in again] == [r["choice"] for r in layers] and all(r["cached"] for r in again)
    assert second.report["kernel_choice"]["dense_twin"]["cached"]
    # another build of the native library (same configuration string): timed again, never the
    # old build's choices
    monkeypatch.setattr(kc, "library_identity", lambda: "another-build")
    third = g2d_compile(model, x, target="ort", gated_kernels="measured")
    assert not any(r["cached"] for r in third.report["kernel_choice"]["layers"])
    assert "library another-build" in third.report["kernel_choice"]["machine"]


@pytest.mark.parametrize("confirmed", [True, False])
def test_measured_network_choice_needs_a_confirming_round(tmp_path, monkeypatch, confirmed):
    """A non-native network is kept only if it beats all-native by MARGIN in the first round
    AND in a second round of the two alone (stub timers: the layer and network timings are
    given, so the expected choice is known); else every layer stays native."""
    from gate2deploy.api import compile as g2d_compile

    import gate2deploy.kernel_choice as kc

    monkeypatch.setattr(kc, "_cache_path", lambda: tmp_path / "kernel_choice.json")
    monkeypatch.setattr(kc, "_time_candidates", lambda *a, **k: (1.0, 0.5))  # every layer: standard
    rounds = []

    def networks(variants, x, threads):
        rounds.append(sorted(variants))
        if len(rounds) == 1:  # first round: per-layer choices 20% faster than native
            return {k: {"native": 1.0, "per_layer": 0.8, "all_standard": 0.9}[k] for k in variants}
        return {"native": 1.0, "per_layer": 0.8 if confirmed else 0.99}

    monkeypatch.setattr(kc, "_time_networks", networks)
    model, x = two_cg_layer_model()
    result = g2d_compile(model, x, target="ort", gated_kernels="measured")
    entry = result.report["kernel_choice"]
    assert rounds == [["native", "per_layer"], ["native", "per_layer"]], rounds
    assert entry["network"]["kept"] == ("per_layer" if confirmed else "native"), entry["network"]
    assert entry["network"]["confirm_ms"]["native"] == 1.0
    custom = [n for n in result.onnx_model.graph.node if n.op_type == "CGConv"]
    assert len(custom) == (0 if confirmed else 2)
    assert all(r["choice"] == ("standard" if confirmed else "native") for r in entry["layers"]), entry["layers"]
    if confirmed:
        # the same input: a confirmed choice is reused from the cache; one made in a single
        # round (a cache written before the confirming round existed) is timed again
        again = g2d_compile(model, x, target="ort", gated_kernels="measured")
        assert again.report["kernel_choice"]["network"]["cached"] and len(rounds) == 2
        cache = json.loads((tmp_path / "kernel_choice.json").read_text())
        for choices in cache.values():
            for value in choices.values():
                value.pop("confirm_ms", None)
        (tmp_path / "kernel_choice.json").write_text(json.dumps(cache))
        rounds.clear()
        third = g2d_compile(model, x, target="ort", gated_kernels="measured")
        assert not third.report["kernel_choice"]["network"]["cached"] and len(rounds) == 2


def test_measured_kernel_choice_fbs(tmp_path, monkeypatch):
    """FBSConv layers and the SparseInputConv reading an FBS layer's output are candidates too
    (the latter timed on its real, partly zero input): each gets its recorded choice and both
    timings, the custom node stays exactly where "native" was kept, and the export's
    verification of the chosen graph (each gated layer against PyTorch, the output) passes."""
    import torch

    from gate2deploy.api import compile as g2d_compile
    from gate2deploy.gated import FBSConv2d

    import gate2deploy.kernel_choice as kc

    monkeypatch.setattr(kc, "_cache_path", lambda: tmp_path / "kernel_choice.json")
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(),
        FBSConv2d(16, 24, 3, padding=1, density=0.5),
        FBSConv2d(24, 16, 3, padding=1, density=1.0),
        torch.nn.Conv2d(16, 8, 3, padding=1)).eval()
    x = torch.randn(1, 3, 16, 16)
    result = g2d_compile(model, x, target="ort", gated_kernels="measured")
    layers = result.report["kernel_choice"]["layers"]
    assert [r["op"] for r in layers] == ["FBSConv", "FBSConv", "SparseInputConv"], layers
    assert all(r["choice"] in ("native", "standard") and r["native_ms"] > 0 and r["standard_ms"] > 0
               for r in layers), layers
    assert result.report["gated_layer_check"]["passed"], result.report["gated_layer_check"]
    with torch.no_grad():  # the chosen graph against PyTorch on another input
        x2 = torch.randn(1, 3, 16, 16)
        expected = model(x2).numpy()
    np.testing.assert_allclose(result.run(x2)[0], expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
    remaining = {n.name for n in result.onnx_model.graph.node if n.op_type in kc.CHOOSABLE_OPS}
    assert {r["node"] for r in layers if r["choice"] == "native"} == remaining, (layers, remaining)


def test_measured_kernel_choice_only_for_ort():
    import torch

    from gate2deploy.api import compile as g2d_compile
    from gate2deploy.errors import UserError

    with pytest.raises(UserError, match="--gated-kernels measured"):
        g2d_compile(torch.nn.Conv2d(3, 4, 3), torch.randn(1, 3, 8, 8), target="onnx",
                    gated_kernels="measured")

def _cg_forms_child() -> None:
    """Runs in the subprocess: CG layers whose sparse second stage takes the channel-last rows
    (or, with G2D_CG_SECOND=fields, the gathered fields) vs the reference; prints the counters."""
    sys.path.insert(0, str(HERE))
    rng = np.random.default_rng(11)
    # base path = first C/4 (one group), block-diagonal p = 2 (two groups, each with its own
    # sparse stage) and p = 4 (joint second stage); 3x3 with and without width dilation (one
    # run per kernel row / per tap), stride 2, a 5x5 kernel; 30 x 30 makes wide spans.
    cases = [(16, 24, 30, 4, False, 3, (1, 1), (1, 1)), (16, 16, 12, 2, True, 3, (1, 1), (1, 1)),
             (32, 32, 12, 4, True, 3, (1, 1), (1, 1)), (24, 16, 11, 4, False, 3, (1, 1), (1, 2)),
             (8, 12, 13, 4, False, 5, (2, 2), (1, 1))]
    for c, o, hw, p, block_diagonal, k, strides, dilations in cases:
        for frac in (0.05, 0.3):
            _check_cg_layer(rng, 2, c, o, hw, p, block_diagonal, frac, k, strides, dilations)
    # Wide layers, p = 4: a tap row of the 3/4 C second-stage channels is 3 x 48, 96, 192, 384
    # floats, the run lengths isa_kernels.cc's sparse_dots compiles as constants (9, 18, 36,
    # 72 vectors on AVX-512; 18, 36, 72 on AVX2; 36, 72 on the generic tier's 4-float vectors);
    # few outputs and a small map keep the reference cheap.
    for c in (64, 128, 256, 512):
        _check_cg_layer(rng, 1, c, 6, 7, 4, False, 0.3)
    _print_native_counters(sparse=("G2DSecondStageRuns", 0), taps=("G2DSecondStageRuns", 2))


@pytest.mark.skipif(os.environ.get("G2D_NATIVE_SUBPROCESS") == "1", reason="already a rerun")
@pytest.mark.parametrize("form", ["taps", "fields"])
@pytest.mark.parametrize("tier", ["generic", "avx2", "avx512"])
def test_cg_sparse_second_stage_forms_match_reference(tier, form):
    """CGConv's two sparse second stages (conv_common.cc: SparseSecondStageTaps on a
    channel-last copy, the default; SparseSecondStageRows on gathered fields with
    G2D_CG_SECOND=fields), forced sparse on each ISA tier the CPU has, against the reference;
    the counters prove which form ran."""
    supported, env_tier = TIERS[tier]
    if not supported:
        pytest.skip(f"this CPU lacks the {tier} tier; the test runs on a machine that has it")
    env = dict(os.environ, G2D_SECOND_STAGE="sparse", G2D_ORT_CONV="0", **env_tier)
    env.pop("G2D_CG_SECOND", None)
    if form == "fields":
        env["G2D_CG_SECOND"] = "fields"
    proc = subprocess.run([sys.executable, __file__, "cg-forms"], env=env, capture_output=True,
                          text=True, timeout=300, cwd=HERE.parent)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    counts = json.loads(proc.stdout.strip().splitlines()[-1])
    assert f"cg_second={form}" in counts["config"], counts
    # every case has spans with gates on; the fields form never reads channel-last rows, the
    # taps form does (the p = 2 groups and the joint stage included)
    assert counts["sparse"] > 0, counts
    assert (counts["taps"] > 0) == (form == "taps"), counts


def _cg_split_child() -> None:
    """Runs in the subprocess: block-diagonal CG layers small enough to have fewer than
    kFewGatedSpans spans (conv_common.h), whose span tasks G2D_SPLIT_SPANS=always splits by plan,
    vs the reference; prints the counters."""
    sys.path.insert(0, str(HERE))
    rng = np.random.default_rng(5)
    # p = 4: one joint second stage over the four plans (each part runs its rows of it); p = 2:
    # two plans with their own second stages; stride 2 (the channel-last pixel table); outputs
    # of 3x3 to 6x6: fewer than 4 spans on the AVX-512 and AVX2 tiers' panel widths, the
    # smaller ones on the generic tier's too
    cases = [(32, 32, 6, 4, (1, 1)), (32, 32, 3, 4, (1, 1)), (16, 24, 5, 2, (1, 1)),
             (16, 24, 3, 2, (1, 1)), (16, 32, 12, 4, (2, 2)), (16, 32, 6, 4, (2, 2))]
    for c, o, hw, p, strides in cases:
        for batch in (1, 2):
            # 0.9: most of a part's gates on, its plans' dense GEMMs instead of the joint stage
            for frac in (0.05, 0.3, 0.9):
                _check_cg_layer(rng, batch, c, o, hw, p, True, frac, strides=strides)
    _print_native_counters(split=("G2DSplitSpanCalls", None), dense=("G2DSecondStageRuns", 1),
                           taps=("G2DSecondStageRuns", 2))


@pytest.mark.skipif(os.environ.get("G2D_NATIVE_SUBPROCESS") == "1", reason="already a rerun")
@pytest.mark.parametrize("setting", ["always", "never"])
@pytest.mark.parametrize("tier", ["generic", "avx2", "avx512"])
def test_cg_spans_split_by_plan_match_reference(tier, setting):
    """A few-span layer's span tasks split by plan (conv_common.cc, GatedTaskParts: each part
    runs its plans' stage 1 and its rows of the joint second stage, or its plans' own second
    stages), forced with G2D_SPLIT_SPANS=always on each ISA tier the CPU has, against the
    reference, and not split with =never; the counter proves which ran."""
    supported, env_tier = TIERS[tier]
    if not supported:
        pytest.skip(f"this CPU lacks the {tier} tier; the test runs on a machine that has it")
    env = dict(os.environ, G2D_SPLIT_SPANS=setting, G2D_ORT_CONV="0", **env_tier)
    for key in ("G2D_CG_SECOND", "G2D_SECOND_STAGE"):
        env.pop(key, None)
    proc = subprocess.run([sys.executable, __file__, "cg-split"], env=env, capture_output=True,
                          text=True, timeout=300, cwd=HERE.parent)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    counts = json.loads(proc.stdout.strip().splitlines()[-1])
    assert f"split_spans={setting}" in counts["config"], counts
    assert (counts["split"] > 0) == (setting == "always"), counts
    assert counts["taps"] > 0 and counts["dense"] > 0, counts  # both second-stage forms ran


def _cg_large_weight_child(threads: int) -> None:
    """Runs in the subprocess: CG layers run through the large-weight span rule (conv_common.h,
    kLargeWeightL2Share: one span per pool thread, as wide as the columns allow) where
    G2D_L2_BYTES makes their weights count as large, each session run several times (the rule
    reads the session's earlier calls: the first call has the default spans), vs the
    reference; prints the counters."""
    sys.path.insert(0, str(HERE))
    import test_native_ops as t
    from gate2deploy.runtimes import reference as ref
    from gate2deploy.runtimes.ort import open_session

    rng = np.random.default_rng(3)
    # 14 x 14: 224 padded columns (7 AVX-512 panels: one span at 1 thread, 4 + 3 panels at 2);
    # 20 x 20: 440 columns, more than the widest span holds (kMaxSpanColumns); stride 2 (the
    # spans' pixel table); 0.9 on: the dense second stage over a wide span
    for c, o, hw, strides in [(32, 24, 14, (1, 1)), (16, 16, 20, (1, 1)), (24, 16, 15, (2, 2))]:
        w = (rng.standard_normal((o, c, 3, 3)) / np.sqrt(9 * c)).astype(np.float32)
        mask = t.cg_base_mask(o, c, 4, False)
        pads = (1, 1, 1, 1)
        attrs = t.conv_attrs(strides, pads, (1, 1))
        x0 = rng.standard_normal((1, c, hw, hw)).astype(np.float32)
        for frac in (0.05, 0.3, 0.9):
            thr = ref.thresholds_for_fraction(ref.conv2d(x0, w * mask[:, :, None, None], strides, pads), frac)
            sess = open_session(t.single_node_model("CGConv", x0.shape, [w, mask, thr], attrs), threads=threads)
            # (A fresh session's pool may run all the first call's tasks on the caller; the rule
            # then plans for one thread and tries two on every kLargeWeightProbeCalls-th call:
            # at 2 threads one session runs past the first probe, so its row parts run surely.)
            runs = 66 if threads == 2 and hw == 14 and frac == 0.3 else 3
            for run in range(runs):
                x = x0 if run == 0 else rng.standard_normal(x0.shape).astype(np.float32)
                yp = ref.conv2d(x, w * mask[:, :, None, None], strides, pads)
                y_ref = ref.cg_conv_reference(x, w, mask, thr, strides=strides, pads=pads)
                t.assert_close_with_ties(sess.run(None, {"x": x})[0], y_ref, yp, thr)
    _print_native_counters(large=("G2DLargeWeightSpanCalls", None), dense=("G2DSecondStageRuns", 1),
                           taps=("G2DSecondStageRuns", 2), rows=("G2DRowPartCalls", None))


@pytest.mark.skipif(os.environ.get("G2D_NATIVE_SUBPROCESS") == "1", reason="already a rerun")
@pytest.mark.parametrize("threads,l2,row_parts", [(1, "4096", "auto"), (2, "4096", "auto"), (1, "system", "auto"),
                                                  (1, "system", "always"), (2, "4096", "never")])
@pytest.mark.parametrize("tier", ["generic", "avx2", "avx512"])
def test_cg_large_weight_spans_match_reference(tier, threads, l2, row_parts):
    """CG layers whose weights exceed half the L2 run one span per thread, each as wide as the
    columns allow (conv_common.cc, RunGatedConv; the thread count from the session's earlier
    calls, ParallelForThreads), forced on small layers with G2D_L2_BYTES=4096 on each ISA tier
    the CPU has, at 1 and 2 threads (every call on the pool, G2D_CG_POOL=always), against the
    reference; with the system's L2 these layers keep the default spans. Where the whole map
    fits in fewer such spans than threads (the 14 x 14 layer at 2 threads), the spans run in
    row parts (conv_common.h, RowParts; G2D_ROW_PARTS=always forces them at 1 thread on the
    default spans, =never keeps them off). The counters prove which ran."""
    supported, env_tier = TIERS[tier]
    if not supported:
        pytest.skip(f"this CPU lacks the {tier} tier; the test runs on a machine that has it")
    env = dict(os.environ, G2D_ORT_CONV="0", G2D_CG_POOL="always", G2D_ROW_PARTS=row_parts, **env_tier)
    for key in ("G2D_CG_SECOND", "G2D_SECOND_STAGE", "G2D_SPLIT_SPANS", "G2D_L2_BYTES"):
        env.pop(key, None)
    if l2 != "system":
        env["G2D_L2_BYTES"] = l2
    proc = subprocess.run([sys.executable, __file__, "cg-large", str(threads)], env=env,
                          capture_output=True, text=True, timeout=300, cwd=HERE.parent)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    counts = json.loads(proc.stdout.strip().splitlines()[-1])
    assert ("l2=4KiB" in counts["config"]) == (l2 != "system"), counts  # the size the rule read
    assert f"row_parts={row_parts}" in counts["config"], counts
    assert (counts["large"] > 0) == (l2 != "system"), counts
    # (At 2 threads the rule needs two threads seen or its probe call: the child runs one
    # session past the probe.)
    expect_rows = row_parts == "always" or (row_parts == "auto" and threads == 2 and l2 != "system")
    assert (counts["rows"] > 0) == expect_rows, counts
    assert counts["taps"] > 0 and counts["dense"] > 0, counts  # both second-stage forms ran


@pytest.mark.sanitizer
@pytest.mark.skipif(os.environ.get("G2D_NATIVE_SUBPROCESS") == "1", reason="already a rerun")
@pytest.mark.parametrize("row_parts", ["auto", "always"])
def test_cg_large_weight_spans_sanitizer_clean(row_parts):
    """The wide spans of the large-weight rule under -fsanitize=address,undefined (the span's
    column arrays hold kMaxSpanColumns: a span wider than that writes past them, which the
    numerics alone need not show), 1 thread: the widest spans; with G2D_ROW_PARTS=always, each
    in two row parts (a row range past the packed weights or the thresholds reads outside
    them)."""
    from gate2deploy.runtimes.native_build import asan_preload, build_library

    env = dict(os.environ, GATE2DEPLOY_OPS_LIBRARY=str(build_library("asan")), LD_PRELOAD=asan_preload(),
               ASAN_OPTIONS="detect_leaks=0:abort_on_error=1", UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1",
               G2D_ORT_CONV="0", G2D_CG_POOL="always", G2D_L2_BYTES="4096", G2D_ROW_PARTS=row_parts)
    proc = subprocess.run([sys.executable, __file__, "cg-large", "1"], env=env, capture_output=True,
                          text=True, timeout=600, cwd=HERE.parent)
    report = proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.returncode == 0, report
    assert "ERROR: AddressSanitizer" not in proc.stderr and "runtime error:" not in proc.stderr, report
    counts = json.loads(proc.stdout.strip().splitlines()[-1])
    assert counts["large"] > 0 and (counts["rows"] > 0) == (row_parts == "always"), report


if __name__ == "__main__":
    if sys.argv[1] == "cg-split":
        _cg_split_child()
    elif sys.argv[1] == "cg-large":
        _cg_large_weight_child(int(sys.argv[2]))
    elif sys.argv[1] == "cg-forms":
        _cg_forms_child()
    elif sys.argv[1] == "pg_int8":
        _child_pg_int8()
    else:
        _child(sys.argv[1])


EXPECTED_CONFIG = {  # what the library reports (G2DKernelConfig) under each tier's forcing
    "amx": ("isa=avx512", "amx=yes"),
    "avx512_vnni": ("isa=avx512", "amx=no", "pg_int8=vnni"),
    "avx2": ("isa=avx2", "amx=no", "pg_int8=avx2"),
}


def test_bench_tiers_force_the_library_to_each_tier():
    """tools/bench_gated_ops.py --tiers runs once per tier this CPU has, and in each run the
    library itself reports that tier's kernels (its configuration line, not the script's
    table); a tier this CPU lacks or an unknown name is one line and exit 2."""
    from gate2deploy.profiling.device import isa_tiers

    script = HERE.parent / "tools" / "bench_gated_ops.py"
    have = [t for t in isa_tiers() if t in EXPECTED_CONFIG]
    if not have:
        pytest.skip("no native-kernel tier on this CPU")
    out = subprocess.run([sys.executable, str(script), "--tiers", "all", "--ops", "none"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    sections = out.stdout.split("=== tier ")[1:]
    assert [s.split()[0] for s in sections] == have
    for tier, section in zip(have, sections):
        config = next(line for line in section.splitlines() if line.startswith("native kernels:"))
        assert all(part in config for part in EXPECTED_CONFIG[tier]), (tier, config)
    # the flag abbreviated, as argparse accepts it: one run of that tier, no nested children
    one = subprocess.run([sys.executable, str(script), "--tier", have[-1], "--ops", "none"],
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0 and one.stdout.count("=== tier ") == 1, one.stdout[-2000:]
    lacking = next((t for t in EXPECTED_CONFIG if t not in have), "avx9")
    bad = subprocess.run([sys.executable, str(script), "--tiers", lacking, "--ops", "none"],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and bad.stdout == ""
    assert len(bad.stderr.strip().splitlines()) == 1 and lacking in bad.stderr


def test_dense_twin_is_the_graph_with_plain_convs():
    """kernel_choice.dense_twin (the benchmarks' baseline): every gated node becomes Conv(X, W)
    with its conv attributes; run in stock ONNX Runtime it equals the reference's plain
    convolution of the same weights (runtimes/reference.py conv2d), not the gated function."""
    import onnxruntime as ort

    from gate2deploy.api import compile as g2d_compile
    from gate2deploy.kernel_choice import dense_twin
    from gate2deploy.runtimes import reference as ref

    model, x = two_cg_layer_model()
    ort_model = g2d_compile(model, x, target="ort", verify=False).onnx_model
    twin = dense_twin(ort_model)
    assert not any(n.domain == "gate2deploy" for n in twin.graph.node)
    assert all(o.domain != "gate2deploy" for o in twin.opset_import)
    session = ort.InferenceSession(twin.SerializeToString(), providers=["CPUExecutionProvider"])
    y = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    # the same network by hand: conv + bias, ReLU, the first CG layer's full conv (its
    # weights, no gate), ReLU, the second's
    w = [model[i].weight.detach().numpy() for i in (0, 2, 4)]
    h = np.maximum(ref.conv2d(x.numpy(), w[0], pads=[1] * 4)
                   + model[0].bias.detach().numpy()[None, :, None, None], 0)
    h = np.maximum(ref.conv2d(h, w[1], pads=[1] * 4), 0)
    h = ref.conv2d(h, w[2], pads=[1] * 4)
    np.testing.assert_allclose(y, h, rtol=1e-4, atol=1e-4)


def test_export_warns_when_the_gated_network_is_slower_than_its_dense_twin(tmp_path, cli, monkeypatch):
    """The CLI prints the dense-twin comparison of --gated-kernels measured, and one warning
    line on stderr when the gated network ran slower (timings stubbed: 2 ms gated, 1 ms dense)."""
    import torch

    import gate2deploy.kernel_choice as kc

    monkeypatch.setattr(kc, "_cache_path", lambda: tmp_path / "kernel_choice.json")
    monkeypatch.setattr(kc, "_time_dense_twin", lambda exported, twin, x, threads: (2.0, 1.0))
    from test_dnn_gating_import import seed_resnet20_state_dict

    ckpt = tmp_path / "cg.pth"
    torch.save(seed_resnet20_state_dict("cg"), ckpt)
    code, out, err = cli("export", ckpt, "--model", "gate2deploy.models.dnn_gating:resnet20_cg",
                         "--model-kwargs", '{"partitions": 4, "shuffle": false}', "--target", "ort",
                         "--gated-kernels", "measured", "--input-shape", "1,3,32,32", "-o", tmp_path / "m.onnx")
    assert code == 0, err
    assert "gated vs dense twin" in out and "(0.50x)" in out
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "0.50x" in warnings[0] and "dense twin" in warnings[0], err
