"""Property-based fuzzing of the native custom ops (CGConv, PGConv, FBSConv, SparseInputConv,
StreamConv)
over their attributes, shapes and input values, extreme integers included.

Every generated single-node model must either
- run and match the reference (runtimes/reference.py; NaN-aware, tests/nan_compare.py), when
  the case is valid by the op contract (runtimes/OPS.md) and small enough to compute, or
- be refused with an error through ONNX Runtime (or runtimes/ort.py's schema check), when it is
  invalid (unknown or mistyped attribute, value out of range, impossible geometry, a layer over
  the kernels' size limits);
and never crash the process. The validity oracle below is written from OPS.md, independently
of the kernels' code. Valid cases too large to compute in a test (between SMALL_* and the
kernels' limits) are discarded (hypothesis `assume`).

Seeded (derandomize) and bounded: G2D_FUZZ_EXAMPLES examples (default 150; CI runs the
default: ~3 s against the release build, ~15 s against the sanitizer build, measured on 2 cores). Longer runs:
G2D_FUZZ_EXAMPLES=5000 python -m pytest tests/test_native_fuzz.py.

The `sanitizer` test reruns the fuzz test in a subprocess against the AddressSanitizer +
UBSan build (runtimes/native_build.py, variant "asan"), so that a crash or a sanitizer report
fails that test instead of taking pytest down.
"""
from __future__ import annotations

import math
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, assume, event, given, note, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

from gate2deploy.capture import IR_VERSION
from gate2deploy.runtimes import reference as ref
from gate2deploy.runtimes.ort import open_session
from nan_compare import nonfinite_mismatch_mask

EXAMPLES = int(os.environ.get("G2D_FUZZ_EXAMPLES", "150"))
IN_SUBPROCESS = os.environ.get("G2D_FUZZ_SUBPROCESS") == "1"
RTOL = 1e-4

# The kernels' documented limits (runtimes/native/conv_common.h: kMaxConvAttr,
# kMaxBufferElements and the im2col bound): over them a valid layer is refused.
MAX_ATTR = 2**31 - 1
MAX_BUFFER = 2**31
MAX_WORK = 2**34
# Valid cases at most this large are run and compared; larger ones below the limits are
# discarded (they would allocate gigabytes).
SMALL_OUTPUT = 2**15
SMALL_PADDED = 2**18

GROUPED_OPS = ("PGConv", "StreamConv")  # OPS.md: the ops that take group > 1
EXTREME_INTS = [2**31 - 1, 2**31, 2**32 + 3, 2**62, 2**63 - 1, -1, -(2**31), -(2**63), 0]




@st.composite
def cases(draw):
    op = draw(st.sampled_from(["CGConv", "PGConv", "FBSConv", "SparseInputConv", "StreamConv"]))
    problems: list[str] = []  # why this case is invalid (empty: valid)
    group = 1
    attrs: dict = {}
    if op in GROUPED_OPS:
        group = draw(st.sampled_from([1, 1, 2, 3]))
    cg = draw(st.integers(1, 4))
    og = draw(st.integers(1, 4))
    c, o = cg * group, og * group
    n = draw(st.integers(1, 2))
    h, w = draw(st.integers(1, 7)), draw(st.integers(1, 7))
    kh, kw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    strides = [draw(st.integers(1, 3)) for _ in range(2)]
    pads = [draw(st.integers(0, 2)) for _ in range(4)]
    dilations = [draw(st.integers(1, 2)) for _ in range(2)]
    if op == "StreamConv" and draw(st.integers(0, 2)) == 0:  # its bands: 3x3 same-padded, 8 / 16 / 32 wide
        w, kh, kw, strides, pads, dilations = draw(st.sampled_from([8, 16, 32])), 3, 3, [1, 1], [1] * 4, [1, 1]
    if draw(st.integers(0, 2)) == 0:  # a third of the cases: one extreme integer somewhere
        target = draw(st.sampled_from([strides, pads, pads, dilations]))
        target[draw(st.integers(0, len(target) - 1))] = draw(st.sampled_from(EXTREME_INTS))
    if draw(st.booleans()):
        attrs["strides"] = strides
    else:
        strides = [1, 1]
    if draw(st.booleans()):
        attrs["pads"] = pads
    else:
        pads = [0, 0, 0, 0]
    if draw(st.booleans()):
        attrs["dilations"] = dilations
    else:
        dilations = [1, 1]
    if group != 1 or draw(st.integers(0, 9)) == 0:
        attrs["group"] = group if draw(st.integers(0, 9)) else draw(st.sampled_from(EXTREME_INTS))
        group_attr = attrs["group"]
        if op not in GROUPED_OPS and group_attr != 1:
            problems.append("group != 1")
        elif group_attr != group:
            problems.append("group does not fit W")

    for name, values, lo, length in (("strides", strides, 1, 2), ("pads", pads, 0, 4),
                                     ("dilations", dilations, 1, 2)):
        if any(not lo <= v <= MAX_ATTR for v in values):
            problems.append(f"{name} out of range")

    if op in ("CGConv", "PGConv", "SparseInputConv", "StreamConv") and draw(st.integers(0, 3)) == 0:
        activation = draw(st.sampled_from(["Relu", "Relu", "", "", "Tanh"]))
        attrs["activation"] = activation
        if activation == "Tanh":
            problems.append("bad activation")
    if op in ("CGConv", "PGConv") and draw(st.integers(0, 3)) == 0:  # the epilogue's clamp
        clip = draw(st.sampled_from([6.0, 0.25, -1.0, math.inf, math.nan]))
        attrs["clip_max"] = clip
        if math.isnan(clip):
            problems.append("clip_max NaN")
    if op in ("CGConv", "PGConv") and draw(st.integers(0, 3)) == 0:  # and its quantizer
        levels = draw(st.sampled_from([7.0, 255.0, 1.0, None, 0.5, math.nan, math.inf]))
        scale = draw(st.sampled_from([None, None, 0.0, 2.0, -1.0, math.nan]))
        eps = draw(st.sampled_from([None, None, 0.0, 1e-3, -1.0]))
        for name, value in (("quantize_levels", levels), ("quantize_scale", scale), ("quantize_eps", eps)):
            if value is not None:
                attrs[name] = value
        if levels is None and (scale is not None or eps is not None):
            problems.append("quantize_scale / eps without levels")
        elif levels is not None and not (math.isfinite(levels) and levels >= 1):
            problems.append("quantize_levels invalid")
        elif levels is not None and any(v is not None and not (math.isfinite(v) and v >= 0) for v in (scale, eps)):
            problems.append("quantize_scale / eps invalid")
    if op == "PGConv":
        rare = draw(st.integers(0, 5)) == 0  # a sixth of the PG cases: a bad or edge value
        abits = draw(st.sampled_from([1, 9, 16, 17, 2**40]) if rare else st.integers(2, 8))
        pred_bits = draw(st.sampled_from([0, 2**63 - 1]) if rare and draw(st.booleans())
                         else st.integers(1, max(1, min(abits, 17) - 1)))
        static_scale = draw(st.sampled_from([-1.0, math.nan, math.inf]) if rare and draw(st.booleans())
                            else st.sampled_from([0.0, 0.0, 0.7, 3.0]))
        attrs.update(abits=abits, pred_bits=pred_bits)
        if static_scale or draw(st.booleans()):
            attrs["static_scale"] = static_scale
        if not (2 <= abits <= 16 and 1 <= pred_bits < abits):
            problems.append("abits / pred_bits out of range")
        if not (math.isfinite(static_scale) and static_scale >= 0):
            problems.append("static_scale invalid")
    if op == "FBSConv":
        density = draw(st.sampled_from([0.0, -0.5, 1.5, math.nan, 1e-30]) if draw(st.integers(0, 7)) == 0
                       else st.floats(0.05, 1.0))
        pool = draw(st.sampled_from(["avg", "max", "avg", "max", "avg", "min"]))
        attrs["density"] = density
        if pool != "avg" or draw(st.booleans()):
            attrs["pool"] = pool
        if not 0 < np.float32(density) <= 1:
            problems.append("density out of range")
        if pool not in ("avg", "max"):
            problems.append("bad pool")

    # The layout attributes (runtimes/ort_layout.py sets them at session creation): a value
    # that is not this CPU's block, or a blocked input with an NCHW output, is refused.
    if op in ("FBSConv", "SparseInputConv") and draw(st.integers(0, 9)) == 0:
        name = draw(st.sampled_from(["input_block", "output_block"]))
        attrs[name] = draw(st.sampled_from([3, 7, 32, 64, *EXTREME_INTS[:-1]]))  # not 0, not 8 or 16
        problems.append(f"{name} not this CPU's block")

    # Schema violations: an unknown name, a wrong type, a missing required attribute.
    damage = draw(st.integers(0, 19))
    if damage == 0:
        attrs[draw(st.sampled_from(["auto_pad", "kernel_shape", "padding", "Group"]))] = (
            draw(st.sampled_from(["NOTSET", "SAME_UPPER"])))
        problems.append("unknown attribute")
    elif damage == 1:
        attrs["kernel_shape"] = [kh, kw]
        problems.append("unknown attribute kernel_shape")
    elif damage == 2 and attrs:
        name = draw(st.sampled_from(sorted(attrs)))
        value = attrs[name]
        attrs[name] = ([float(v) for v in value] if isinstance(value, list)
                       else "1" if isinstance(value, (int, float)) else 1)
        problems.append(f"{name} mistyped")
    elif damage == 3 and op in ("PGConv", "FBSConv"):
        del attrs[{"PGConv": "abits", "FBSConv": "density"}[op]]
        problems.append("required attribute missing")

    # Geometry (exact integers), as ONNX Conv: the output and the zero-padded input.
    if not problems:
        eff_h, eff_w = (kh - 1) * dilations[0] + 1, (kw - 1) * dilations[1] + 1
        ph, pw = h + pads[0] + pads[2], w + pads[1] + pads[3]
        if ph < eff_h or pw < eff_w:
            problems.append("kernel larger than the padded input")
        else:
            oh, ow = (ph - eff_h) // strides[0] + 1, (pw - eff_w) // strides[1] + 1
            output, padded = n * o * oh * ow, c * ph * pw
            if output > MAX_BUFFER or padded > MAX_BUFFER or cg * kh * kw * oh * ow > MAX_WORK:
                problems.append("layer over the size limits")
            else:
                assume(output <= SMALL_OUTPUT and padded <= SMALL_PADDED)

    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, c, h, w)).astype(np.float32)
    nonfinite = draw(st.sampled_from([None, None, None, np.nan, np.inf, -np.inf]))
    if nonfinite is not None:
        for _ in range(draw(st.integers(1, 3))):
            x[tuple(rng.integers(0, d) for d in x.shape)] = nonfinite
    wt = (rng.standard_normal((o, cg, kh, kw)) / math.sqrt(cg * kh * kw)).astype(np.float32)
    if op == "PGConv" and draw(st.booleans()):  # on a 4-bit grid: the integer paths
        step = np.abs(wt).max() / 7
        wt = (np.round(wt / step) * step).astype(np.float32)
    if op == "StreamConv" and draw(st.integers(0, 2)) == 0:  # zero tails (each row's own), left out
        for row in wt:
            row.flat[rng.integers(0, row.size + 1):] = 0
    if draw(st.integers(0, 7)) == 0:  # a NaN or inf weight (0 * inf must stay NaN)
        wt[tuple(rng.integers(0, d) for d in wt.shape)] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
    per_o = lambda: rng.standard_normal(o).astype(np.float32)  # noqa: E731
    if op == "CGConv":
        mask = (rng.random((o, c)) < 0.4).astype(np.float32)
        inits = [wt, mask, per_o()]
    elif op == "PGConv":
        inits = [wt, per_o()]
    elif op == "FBSConv":
        inits = [wt, rng.standard_normal((o, c)).astype(np.float32), per_o(),
                 np.abs(per_o()) + 0.5, per_o(), per_o()]
    else:
        inits = [wt, per_o()]
    post = op in ("CGConv", "PGConv") and draw(st.integers(0, 3)) == 0
    if post:
        inits += [per_o(), per_o()]
    return dict(op=op, x=x, inits=inits, attrs=attrs, problems=problems, post=post)


def build(case) -> onnx.ModelProto:
    names = [f"in{i}" for i in range(len(case["inits"]))]
    node = helper.make_node(case["op"], ["x", *names], ["y"], domain="gate2deploy", **case["attrs"])
    graph = helper.make_graph(
        [node], "fuzz", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(case["x"].shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [helper.make_tensor(nm, TensorProto.FLOAT, a.shape, a.ravel()) for nm, a in zip(names, case["inits"])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("gate2deploy", 1)])
    model.ir_version = IR_VERSION
    return model


def reference(case):
    a = case["attrs"]
    conv = dict(strides=a.get("strides", (1, 1)), pads=a.get("pads", (0, 0, 0, 0)),
                dilations=a.get("dilations", (1, 1)))
    x, inits, op = case["x"], case["inits"], case["op"]
    post = dict(post_scale=inits[-2], post_shift=inits[-1]) if case["post"] else {}
    post.update({k: a[k] for k in ("clip_max", "quantize_levels", "quantize_scale", "quantize_eps") if k in a})
    with np.errstate(invalid="ignore", over="ignore"):
        if op == "CGConv":
            return ref.cg_conv_reference(x, *inits[:3], **conv, activation=a.get("activation"), **post)
        if op == "PGConv":
            return ref.pg_conv_reference(x, *inits[:2], a["abits"], a["pred_bits"],
                                         a.get("static_scale", 0.0), **conv, group=a.get("group", 1),
                                         activation=a.get("activation"), **post)
        if op == "FBSConv":
            return ref.fbs_conv_reference(x, *inits, float(np.float32(a["density"])),
                                          a.get("pool", "avg"), **conv)
        if op == "StreamConv":
            return ref.stream_conv_reference(x, *inits, **conv, group=a.get("group", 1), activation=a.get("activation"))
        return ref.sparse_input_conv_reference(x, *inits, **conv, activation=a.get("activation"))


def check_case(case) -> None:
    note(f"{case['op']} x{list(case['x'].shape)} W{list(case['inits'][0].shape)} "
         f"attrs={case['attrs']} problems={case['problems']}")
    model = build(case)
    try:
        y = open_session(model, threads=2, log_severity=4).run(None, {"x": case["x"]})[0]
    except Exception as exc:  # noqa: BLE001 - any error through ONNX Runtime / the check is a refusal
        assert case["problems"], f"a valid case was refused: {str(exc).splitlines()[0]}"
        event(f"refused: {case['problems'][0]}")
        return
    assert not case["problems"], f"an invalid case ran ({case['problems']}), output {y.shape}"
    y_ref = reference(case)
    assert y.shape == y_ref.shape
    bad = nonfinite_mismatch_mask(y, y_ref)
    assert not bad.any(), f"{int(bad.sum())} NaN/inf elements differ from the reference"
    event(f"ran {case['op']}" + (" with NaN/inf output" if not np.isfinite(y_ref).all() else ""))
    both = np.isfinite(y) & np.isfinite(y_ref)
    if both.any():
        diff = np.abs(y[both].astype(np.float64) - y_ref[both])
        scale = max(float(np.abs(y_ref[both]).max()), 1e-6)
        # The gates are discontinuous: a partial sum within float rounding of its threshold
        # may flip (tests/test_native_ops.py checks ties exactly); a flip moves an element by a
        # visible amount, so only rare outliers are tolerated here, and counted.
        outliers = diff > RTOL * scale
        if outliers.any():
            event("gate flip outliers")
        assert outliers.mean() <= 0.01, f"normwise error {diff.max() / scale:.3g}"


@settings(max_examples=EXAMPLES, derandomize=True, deadline=None, database=None,
          suppress_health_check=list(HealthCheck))
@given(cases())
def test_fuzz_native_ops(case):
    check_case(case)


@pytest.mark.sanitizer
@pytest.mark.skipif(IN_SUBPROCESS, reason="already the sanitizer run")
def test_fuzz_native_ops_under_sanitizers():
    """The same seeded examples against -fsanitize=address,undefined (ASan preloaded), in a
    subprocess: a crash or a sanitizer report fails this test, not the pytest process."""
    from gate2deploy.runtimes.native_build import asan_preload, build_library

    lib = build_library("asan")
    env = dict(os.environ, G2D_FUZZ_SUBPROCESS="1", GATE2DEPLOY_OPS_LIBRARY=str(lib),
               LD_PRELOAD=asan_preload(),
               # allocator_may_return_null: a refused huge allocation is std::bad_alloc (an
               # error status), as in the release build, not an ASan abort.
               ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:allocator_may_return_null=1",
               UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", __file__,
           "-k", "test_fuzz_native_ops and not sanitizers"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    report = proc.stdout[-4000:] + proc.stderr[-4000:]
    assert proc.returncode == 0, report
    assert "ERROR: AddressSanitizer" not in proc.stderr and "runtime error:" not in proc.stderr, report
    assert " passed" in proc.stdout, report
