"""The latency lookup table (lut.json) and the predictor that reads it.

Keys. One entry per measured layer geometry, keyed by a readable string
`Conv/b<batch>/i<in channels>/o<out channels>/f<H>x<W>/k<kh>x<kw>/s<sh>x<sw>/g<groups>`
(Gemm: `Gemm/b<batch>/i<in>/o<out>`); a `/p<t,l,b,r>` part follows only for padding other than
"same" (k//2) and `/d<dh>x<dw>` only for dilation other than 1. The value is the median
latency in ms with its stability (cv, kept/rejected samples, unstable flag) and, on ONNX
Runtime, the kernel layout it ran with ("nchwc" blocked or "nchw").

Widths. Each layer is measured at several widths of every prunable side: fractions of the
full width (0.25, 0.5, 0.75, 1 by default) and, for the input side, the same widths minus one.
The second set is there because ONNX Runtime's CPU convolution is fast only for some input
widths (it uses the blocked NCHWc kernels when the input channel count is small or a multiple
of 4, depthwise ones when it is a multiple of 4; other widths run plain NCHW kernels, up to
3x slower, with layout reorders around them in a graph): a pruned width is predicted
from measured widths that ran the same kernel.

`lut_latency(lut, key)`: the entry when measured, else interpolated among entries of the same
geometry family (everything but the channel counts) that ran the same kernel: bilinear in
(in, out) channels inside a measured rectangle, else a least-squares fit of
a + b*in + c*out + d*in*out over the family, else the nearest entry scaled by MACs.

Predictor. A model's latency for a channel configuration is the sum of its layers' entries,
each times the in-graph scale of its kernel class (`calibrate`): whole-model latency over
the layer sum, solved from two whole models measured during the profile (unpruned, and every
edge one channel narrower). The scales carry what one-layer timing leaves out (pooling,
residual adds, layout reorders between kernels, per-run overhead) as proportions.
"""
from __future__ import annotations

import datetime as _dt
import json
import math
import re
from pathlib import Path

import numpy as np

from ..errors import UserError
from ..fileio import read_json
from ..passes.choose_widths import BLOCK as NCHWC_BLOCK
from ..targets import canonical_name
from .edges import LayerShape, ModelTable, layer_shapes
from .measure import LayerSpec

FORMAT = "gate2deploy-lut/1"
DEFAULT_FRACTIONS = (0.25, 0.5, 0.75, 1.0)


# ---------------------------------------------------------------------------------------
# Keys
# ---------------------------------------------------------------------------------------
def spec_of(shape: LayerShape) -> LayerSpec:
    lay = shape.layer
    return LayerSpec(lay.op, shape.layer_batch, shape.cin, shape.cout, lay.h, lay.w, lay.kh, lay.kw,
                     tuple(lay.stride), tuple(lay.pads), tuple(lay.dilation), shape.groups)


def layer_key(spec: LayerSpec) -> str:
    if spec.op == "Gemm":
        return f"Gemm/b{spec.batch}/i{spec.cin}/o{spec.cout}"
    key = (f"Conv/b{spec.batch}/i{spec.cin}/o{spec.cout}/f{spec.h}x{spec.w}/k{spec.kh}x{spec.kw}"
           f"/s{spec.stride[0]}x{spec.stride[1]}/g{spec.groups}")
    same = tuple(d * (k // 2) for d, k in zip(spec.dilation, (spec.kh, spec.kw)))
    if tuple(spec.pads) != same * 2:
        key += "/p" + ",".join(str(p) for p in spec.pads)
    if tuple(spec.dilation) != (1, 1):
        key += f"/d{spec.dilation[0]}x{spec.dilation[1]}"
    return key


_CONV_KEY = re.compile(r"^Conv/b(\d+)/i(\d+)/o(\d+)/f(\d+)x(\d+)/k(\d+)x(\d+)/s(\d+)x(\d+)/g(\d+)"
                       r"(?:/p(\d+),(\d+),(\d+),(\d+))?(?:/d(\d+)x(\d+))?$")
_GEMM_KEY = re.compile(r"^Gemm/b(\d+)/i(\d+)/o(\d+)$")


def parse_key(key: str) -> LayerSpec:
    m = _GEMM_KEY.match(key)
    if m:
        b, i, o = map(int, m.groups())
        return LayerSpec("Gemm", b, i, o, 1, 1, 1, 1, (1, 1), (0, 0, 0, 0), (1, 1), 1)
    m = _CONV_KEY.match(key)
    if not m:
        raise UserError(f"{key!r} is not a LUT layer key (e.g. Conv/b1/i64/o64/f56x56/k3x3/s1x1/g1)")
    g = [int(v) if v is not None else None for v in m.groups()]
    b, i, o, h, w, kh, kw, sh, sw, groups = g[:10]
    dilation = (g[14], g[15]) if g[14] is not None else (1, 1)
    pads = tuple(g[10:14]) if g[10] is not None else (dilation[0] * (kh // 2), dilation[1] * (kw // 2)) * 2
    return LayerSpec("Conv", b, i, o, h, w, kh, kw, (sh, sw), pads, dilation, groups)


def _depthwise(spec: LayerSpec) -> bool:
    return spec.op == "Conv" and spec.groups > 1 and spec.groups == spec.cin == spec.cout


def _family(spec: LayerSpec) -> tuple:
    return (spec.op, spec.batch, spec.h, spec.w, spec.kh, spec.kw, tuple(spec.stride), tuple(spec.pads),
            tuple(spec.dilation), _depthwise(spec), spec.groups if not _depthwise(spec) else -1)


def _on_ort_cpu(lut: dict) -> bool:
    """Measured by ONNX Runtime's CPU provider (target onnx or ort; "ort-cpu" in older LUTs)."""
    return canonical_name(lut.get("target", "")) in ("onnx", "ort")


def ort_cpu_kernel(spec: LayerSpec) -> str:
    """Which convolution kernel ONNX Runtime 1.31's CPU provider picks (checked against every
    measured entry during a profile: mismatches are counted in the LUT)."""
    if spec.op != "Conv" or (spec.groups > 1 and not _depthwise(spec)):
        return "nchw"
    if _depthwise(spec):
        return "nchwc" if spec.cin % 4 == 0 else "nchw"
    # narrower than MLAS's NCHWc block (16 with AVX-512, 8 with AVX2): blocked at any count
    return "nchwc" if spec.cin < NCHWC_BLOCK or spec.cin % 4 == 0 else "nchw"


def macs(spec: LayerSpec) -> float:
    if spec.op == "Gemm":
        return float(spec.batch * spec.cin * spec.cout)
    oh = (spec.h + spec.pads[0] + spec.pads[2] - spec.dilation[0] * (spec.kh - 1) - 1) // spec.stride[0] + 1
    ow = (spec.w + spec.pads[1] + spec.pads[3] - spec.dilation[1] * (spec.kw - 1) - 1) // spec.stride[1] + 1
    return float(spec.batch * spec.cout * oh * ow * (spec.cin // spec.groups) * spec.kh * spec.kw)


# ---------------------------------------------------------------------------------------
# Which widths a profile measures
# ---------------------------------------------------------------------------------------
def _axis(full: int, prunable: bool, fractions, odd: bool) -> list[int]:
    if not prunable:
        return [full]
    values = {max(1, int(round(full * f))) for f in fractions} | {full}
    if odd:
        values |= {v - 1 for v in values if v > 2}
    return sorted(values)


def widths_to_measure(table: ModelTable, fractions=DEFAULT_FRACTIONS) -> list[str]:
    """Every LUT key a profile of `table` measures, in layer order, without duplicates."""
    keys: list[str] = []
    seen: set[str] = set()
    full = layer_shapes(table)
    for shape in full:
        lay = shape.layer
        in_prunable = any(e is not None for e, _ in lay.in_parts)
        out_prunable = any(e is not None for e, _ in lay.out_parts)
        base = spec_of(shape)
        if lay.depthwise:
            grid = [(c, c) for c in _axis(shape.cin, in_prunable, fractions, odd=True)]
        else:
            grid = [(ci, co) for ci in _axis(shape.cin, in_prunable, fractions, odd=lay.op == "Conv")
                    for co in _axis(shape.cout, out_prunable, fractions, odd=False)]
        for ci, co in grid:
            spec = LayerSpec(base.op, base.batch, ci, co, base.h, base.w, base.kh, base.kw, base.stride,
                             base.pads, base.dilation, ci if lay.depthwise else base.groups)
            key = layer_key(spec)
            if key not in seen:
                seen.add(key)
                keys.append(key)
    return keys


# ---------------------------------------------------------------------------------------
# Reading the table
# ---------------------------------------------------------------------------------------
def lut_latency(lut: dict, layer_key: str) -> float:
    """Latency in ms of the layer `layer_key` on the LUT's target: measured or interpolated."""
    entries = lut["entries"]
    if layer_key in entries:
        return float(entries[layer_key]["ms"])
    index = _index(lut)
    spec = parse_key(layer_key)
    family = index.get(_family(spec))
    if not family:
        raise UserError(f"the LUT has no measurement of a layer like {layer_key} (same kernel, stride, "
                        "feature size and batch); profile a model containing it")
    kernel = ort_cpu_kernel(spec) if _on_ort_cpu(lut) else None
    points = [p for p in family if kernel is None or p[3] == kernel] or family
    return _interpolate(spec, points)


def _index(lut: dict) -> dict:
    """family -> [(cin, cout, ms, kernel)], cached on the dict."""
    cache = lut.get("_index")
    if cache is None or cache[0] != len(lut["entries"]):
        index: dict = {}
        for key, entry in lut["entries"].items():
            spec = parse_key(key)
            index.setdefault(_family(spec), []).append((spec.cin, spec.cout, float(entry["ms"]), entry.get("kernel")))
        cache = (len(lut["entries"]), index)
        lut["_index"] = cache
    return cache[1]


def _interpolate(spec: LayerSpec, points: list[tuple]) -> float:
    ci, co = spec.cin, spec.cout
    if _depthwise(spec):
        return _interp_1d(ci, [(p[0], p[2]) for p in points], spec)
    grid = {(p[0], p[1]): p[2] for p in points}
    cins = sorted({p[0] for p in points})
    couts = sorted({p[1] for p in points})
    lo_i = max((c for c in cins if c <= ci), default=None)
    hi_i = min((c for c in cins if c >= ci), default=None)
    lo_o = max((c for c in couts if c <= co), default=None)
    hi_o = min((c for c in couts if c >= co), default=None)
    if None not in (lo_i, hi_i, lo_o, hi_o) and all((a, b) in grid for a in (lo_i, hi_i) for b in (lo_o, hi_o)):
        ti = 0.0 if hi_i == lo_i else (ci - lo_i) / (hi_i - lo_i)
        to = 0.0 if hi_o == lo_o else (co - lo_o) / (hi_o - lo_o)
        return ((1 - ti) * (1 - to) * grid[lo_i, lo_o] + ti * (1 - to) * grid[hi_i, lo_o]
                + (1 - ti) * to * grid[lo_i, hi_o] + ti * to * grid[hi_i, hi_o])
    if len(cins) >= 2 and len(couts) >= 2 and len(points) >= 4:
        a = np.array([[1.0, p[0], p[1], p[0] * p[1]] for p in points])
        y = np.array([p[2] for p in points])
        wts = 1.0 / np.maximum(y, 1e-6)  # fit relative error: small layers matter as much
        coef, *_ = np.linalg.lstsq(a * wts[:, None], y * wts, rcond=None)
        value = float(coef @ np.array([1.0, ci, co, ci * co]))
        if value > 0:
            return value
    return _nearest_scaled(spec, points)


def _interp_1d(c: int, pts: list[tuple[int, float]], spec: LayerSpec) -> float:
    pts = sorted(set(pts))
    xs = [p[0] for p in pts]
    if len(pts) == 1:
        return pts[0][1] * c / max(xs[0], 1)
    if c <= xs[0]:
        (x0, y0), (x1, y1) = pts[0], pts[1]
    elif c >= xs[-1]:
        (x0, y0), (x1, y1) = pts[-2], pts[-1]
    else:
        j = next(i for i, x in enumerate(xs) if x >= c)
        (x0, y0), (x1, y1) = pts[j - 1], pts[j]
    value = y0 + (y1 - y0) * (c - x0) / (x1 - x0) if x1 != x0 else y0
    return value if value > 0 else min(p[1] for p in pts) * c / max(xs[0], 1)


def _nearest_scaled(spec: LayerSpec, points: list[tuple]) -> float:
    def dist(p):
        return abs(math.log(max(p[0], 1) / max(spec.cin, 1))) + abs(math.log(max(p[1], 1) / max(spec.cout, 1)))
    p = min(points, key=dist)
    ref = LayerSpec(spec.op, spec.batch, p[0], p[1], spec.h, spec.w, spec.kh, spec.kw, spec.stride, spec.pads,
                    spec.dilation, spec.groups if spec.groups == 1 else p[0])
    return p[2] * macs(spec) / max(macs(ref), 1.0)


# ---------------------------------------------------------------------------------------
# Predictor
# ---------------------------------------------------------------------------------------
def table_of(lut: dict) -> ModelTable:
    if "table" not in lut:
        raise UserError("this LUT holds no model layer table; it was not written by `gate2deploy profile`")
    return ModelTable.from_json(lut["table"])


def layer_kernel(lut: dict, key: str) -> str:
    """The kernel class a layer runs with: as measured when the key is in the LUT, else by
    ONNX Runtime's rule on ort-cpu, else one class for all."""
    entry = lut["entries"].get(key)
    if entry is not None and entry.get("kernel"):
        return entry["kernel"]
    return ort_cpu_kernel(parse_key(key)) if _on_ort_cpu(lut) else "all"


def kernel_scale(lut: dict, kernel: str) -> float:
    scales = lut.get("calibration", {}).get("scales", {})
    return float(scales.get(kernel, scales.get("all", 1.0)))


def layer_latencies(lut: dict, channels: list[int] | None = None, table: ModelTable | None = None,
                    calibrated: bool = True) -> list[tuple[str, str, str, float]]:
    """(layer name, key, kernel, ms) of every layer of the profiled model for `channels`;
    calibrated: times the kernel class' in-graph scale (see `calibrate`)."""
    table = table or table_of(lut)
    out = []
    for shape in layer_shapes(table, channels):
        key = layer_key(spec_of(shape))
        kernel = layer_kernel(lut, key)
        ms = lut_latency(lut, key)
        out.append((shape.layer.name, key, kernel, ms * kernel_scale(lut, kernel) if calibrated else ms))
    return out


def kernel_sums(lut: dict, channels: list[int] | None = None, table: ModelTable | None = None) -> dict[str, float]:
    """Uncalibrated layer latency summed per kernel class."""
    sums: dict[str, float] = {}
    for _, _, kernel, ms in layer_latencies(lut, channels, table, calibrated=False):
        sums[kernel] = sums.get(kernel, 0.0) + ms
    return sums


INTERCEPT = "fixed_ms"  # per-graph cost not in any layer (calibration key)


def calibrate(observations: list[tuple[dict[str, float], float]]) -> dict[str, float]:
    """In-graph scale per kernel class from whole-model measurements.

    Each observation is (layer-sum per kernel class, measured whole-model ms). With the
    unpruned model (blocked kernels nearly everywhere) and the model one channel narrower on
    every edge (plain kernels wherever the input width decides), two scales are solved for:
    a layer's in-graph time differs from its one-layer time in opposite directions for the two
    (the blocked kernel's one-layer model pays layout reorders the graph mostly avoids, the
    plain kernel's pays none but the graph adds them around it). When the system is
    degenerate or gives a non-positive scale, one scale for all classes is used."""
    total_scale = observations[0][1] / max(sum(observations[0][0].values()), 1e-9)
    kinds = sorted({k for sums, _ in observations for k in sums})
    if len(observations) >= 3 and kinds == ["nchw", "nchwc"]:
        # A third model at half width separates a fixed per-graph cost (run overhead, ops the
        # layers do not cover) from the per-class scales: pruned models are small, and a
        # purely multiplicative correction shrinks that fixed cost with them.
        a = np.array([[sums.get(k, 0.0) for k in kinds] + [1.0] for sums, _ in observations[:3]])
        y = np.array([t for _, t in observations[:3]])
        if abs(np.linalg.det(a)) > 1e-9 * np.abs(a).max() ** 2:
            *solved, intercept = np.linalg.solve(a, y)
            if all(0.5 < v < 2.0 for v in solved) and 0 <= intercept < 0.5 * y[0]:
                return {**{k: round(float(v), 6) for k, v in zip(kinds, solved)},
                        INTERCEPT: round(float(intercept), 6)}
    if len(observations) >= 2 and kinds == ["nchw", "nchwc"]:
        a = np.array([[sums.get(k, 0.0) for k in kinds] for sums, _ in observations[:2]])
        y = np.array([t for _, t in observations[:2]])
        if abs(np.linalg.det(a)) > 1e-6 * np.abs(a).max() ** 2:
            solved = np.linalg.solve(a, y)
            if np.all(solved > 0.5) and np.all(solved < 2.0):
                return {k: round(float(v), 6) for k, v in zip(kinds, solved)}
    return {"all": round(total_scale, 6)}


def predict(lut: dict, channels: list[int] | None = None, table: ModelTable | None = None) -> float:
    """Predicted whole-model latency (ms) of the profiled model with `channels` per edge."""
    fixed = lut.get("calibration", {}).get("scales", {}).get(INTERCEPT, 0.0)
    return float(sum(ms for *_, ms in layer_latencies(lut, channels, table)) + fixed)


def parse_channels(table: ModelTable, data) -> list[int]:
    """A channel configuration from JSON: a list (edge order), {"edges": list | {name: n}},
    {name: n} (missing edges keep all channels), or Gator's nested `channels_config`
    (module path -> out channels, optionally under the key "channels_config")."""
    full = table.full_channels()
    names = {e.name: e.index for e in table.edges}
    if isinstance(data, dict) and "edges" in data:
        data = data["edges"]
    elif isinstance(data, dict) and "channels_config" in data:
        data = data["channels_config"]
    if isinstance(data, list):
        if len(data) != len(full) or not all(isinstance(v, int) for v in data):
            raise UserError(f"the channel list needs {len(full)} integers (one per edge), got {len(data)} items")
        return list(data)
    if not isinstance(data, dict):
        raise UserError("the channel configuration must be a JSON list or object")
    if data and all(k in names for k in data):
        out = list(full)
        for name, value in data.items():
            if not isinstance(value, int):
                raise UserError(f"edge {name}: channel count {value!r} is not an integer")
            out[names[name]] = value
        return out
    flat = _flatten(data)
    out = list(full)
    matched = 0
    for edge in table.edges:
        for module in edge.modules:
            value = flat.get(module, flat.get(module[:-2] if module.endswith(".0") else module))
            if isinstance(value, int):
                out[edge.index] = value
                matched += 1
                break
    if not matched:
        unknown = [k for k in data if k not in names][:3]
        raise UserError(f"the channel configuration names neither edges nor modules of the profiled model "
                        f"(e.g. {', '.join(map(str, unknown))}); edges are: {', '.join(list(names)[:4])}, ...")
    return out


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        path = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, path + "."))
        else:
            out[path] = v
    return out


# ---------------------------------------------------------------------------------------
# File
# ---------------------------------------------------------------------------------------
def new_lut(target: str, machine: dict, runtime: dict, threads: int, table: ModelTable, settings: dict,
            model_info: dict) -> dict:
    return {"format": FORMAT, "target": target, "machine": machine, "runtime": runtime, "threads": threads,
            "batch": table.batch, "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "settings": settings, "model": model_info, "entries": {}, "table": table.to_json()}


def dumps(lut: dict) -> str:
    return json.dumps({k: v for k, v in lut.items() if not k.startswith("_")}, indent=1)


def load_lut(path: str | Path) -> dict:
    path = Path(path)
    lut = read_json(path, "LUT")
    if not isinstance(lut, dict) or lut.get("format") != FORMAT or not isinstance(lut.get("entries"), dict):
        raise UserError(f"{path} is not a gate2deploy LUT (format {FORMAT})")
    check_entries(lut["entries"], str(path))
    check_structure(lut, str(path))
    return lut


# The fields a LUT's readers index, and their JSON types (a damaged file is one line naming
# the field, not a KeyError deep in the predictor).
_FIELDS = {"target": str, "threads": int, "batch": int, "machine": dict, "settings": dict}


def check_structure(lut: dict, where: str) -> None:
    for name, kind in _FIELDS.items():
        value = lut.get(name)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise UserError(f"{where}: field {name!r} is {value!r}, not a JSON {kind.__name__}; the LUT is damaged")
    if "table" in lut:
        try:
            table = ModelTable.from_json(lut["table"])
        except (TypeError, KeyError, ValueError, AttributeError) as exc:
            raise UserError(f"{where}: its layer table is damaged ({type(exc).__name__}: {exc})") from None
        if not table.layers:
            raise UserError(f"{where}: its layer table has no layers; the LUT is damaged")
        for edge in table.edges:
            if not isinstance(edge.channels, int) or isinstance(edge.channels, bool) or edge.channels < 1:
                raise UserError(f"{where}: edge {edge.index} has {edge.channels!r} channels; the LUT is damaged")
    calibration = lut.get("calibration", {})
    scales = calibration.get("scales", {}) if isinstance(calibration, dict) else None
    if not isinstance(scales, dict) or not all(valid_ms(v) for v in scales.values()):
        raise UserError(f"{where}: its calibration scales {scales!r} are not finite numbers >= 0; the LUT is damaged")


def valid_ms(ms) -> bool:
    return isinstance(ms, (int, float)) and not isinstance(ms, bool) and math.isfinite(ms) and ms >= 0


def check_entries(entries, where: str, keys: bool = False) -> None:
    """Refuse (UserError naming `where`) timings that are not finite and >= 0 ms, and with
    `keys` entry keys that are not LUT layer keys."""
    if not isinstance(entries, dict):
        raise UserError(f"{where}: 'entries' is not a JSON object")
    for key, entry in entries.items():
        ms = entry.get("ms") if isinstance(entry, dict) else None
        if not valid_ms(ms):
            raise UserError(f"{where}: entry {key} has timing {ms!r}; a LUT's timings are finite and >= 0 ms")
        if keys:
            parse_key(key)
