"""One profile, start to finish: edges -> layer measurements -> LUT -> Gator files -> report.

Resuming. Measured entries are saved every few seconds to `<out>/lut.partial.json` (and on
Ctrl-C). `--resume` reloads them when the partial file was made for the same model, input
shape, target, runtime version, threads and measurement settings, and measures only what is
missing; anything else is refused with a one-line error rather than mixing incomparable
timings. The partial file is removed once the outputs are written. Every output file is
written atomically.
"""
from __future__ import annotations

import csv
import io
import json
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..errors import UserError
from ..fileio import write_text
from . import gator_outputs as gout
from . import report as rep
from .edges import ModelTable, build_table
from ..targets import canonical_name
from .lut import (DEFAULT_FRACTIONS, FORMAT, calibrate, check_entries, dumps, kernel_sums, new_lut, ort_cpu_kernel,
                  parse_key, predict, valid_ms, widths_to_measure)
from .prune import pruned_model
from .measure import BACKENDS, Settings, machine_info, make_backend

PARTIAL = "lut.partial.json"
SAVE_EVERY_S = 5.0


@dataclass
class ProfileOptions:
    target: str = "ort"  # targets.py names
    threads: int = 2
    settings: Settings = field(default_factory=Settings)
    fractions: tuple = DEFAULT_FRACTIONS
    edges: str = "auto"
    gator_no_last_conv: bool = False  # Gator's option (importers/gator.py): no edge for the last stream
    resume: bool = False
    report: bool = True
    progress: bool = True
    criteria_weight: float = 1.0
    gradient_multiplier: float = 1.0
    gate_init_prob: float = 0.99
    static_total_cost: float | None = None
    ray: str | None = None  # Ray head address: measure on the cluster's device classes (profiling/fleet.py)
    device_classes: tuple = ()  # with ray: the classes to measure on (default: every one offered)


@dataclass
class ProfileResult:
    out_dir: Path
    table: ModelTable
    lut: dict
    measured_ms: float
    predicted_ms: float
    entries_measured: int
    entries_resumed: int
    unstable: int
    files: list[str]
    seconds: float
    current_ms: float | None = None  # predicted latency of the checkpoint's own gates


def profile(model: nn.Module, example: torch.Tensor, out_dir: str | Path, options: ProfileOptions,
            model_info: dict, current_channels: list[int] | None = None):
    """Profile locally (a ProfileResult), or with `options.ray` on every device class asked
    for (profiling/fleet.py; {device class: ProfileResult}, each written to out/<class>/)."""
    start = time.perf_counter()
    out = Path(out_dir)
    check_out_dir(out)
    if options.threads < 1:
        raise UserError("--threads must be at least 1")
    if options.ray:
        return _profile_fleet(model, example, out, options, model_info, current_channels, start)
    if options.device_classes:
        raise UserError("--device-class needs --ray ADDRESS (the cluster whose nodes offer the classes)")
    backend = make_backend(options.target, options.threads, options.settings)
    plan = _plan(model, example, options)
    out.mkdir(exist_ok=True)
    lut = new_lut(options.target, machine_info(), backend.runtime_info(), options.threads, plan.table,
                  plan.settings, model_info)
    resumed = _resume(out / PARTIAL, lut) if options.resume else 0

    todo = [k for k in plan.keys if k not in lut["entries"]]
    last_save = time.perf_counter()

    def time_whole_models() -> None:
        timings = lut.setdefault("whole_models", {})
        for name, model in plan.calibration_models.items():
            if model is None:
                continue
            m = backend.measure_whole(model, plan.whole_settings).to_json()
            if name not in timings or m["ms"] < timings[name]["ms"]:
                timings[name] = m

    try:
        if "whole_models" not in lut:
            time_whole_models()
            time_whole_models()
        for key in _progress(todo, options.progress, "layers"):
            measurement, kernel = backend.measure_layer(parse_key(key))
            lut["entries"][key] = {**measurement.to_json(), "kernel": kernel}
            if time.perf_counter() - last_save > SAVE_EVERY_S:
                write_text(out / PARTIAL, dumps(lut))
                last_save = time.perf_counter()
        if todo or not lut.get("whole_models_after"):
            time_whole_models()
            lut["whole_models_after"] = True
    except KeyboardInterrupt:
        write_text(out / PARTIAL, dumps(lut))
        raise
    write_text(out / PARTIAL, dumps(lut))
    return finish(lut, plan, out, options, current_channels, len(todo), resumed, start)


def _profile_fleet(model, example, out: Path, options: ProfileOptions, model_info: dict,
                   current_channels: list[int] | None, start: float) -> dict[str, ProfileResult]:
    from .fleet import Fleet

    fleet = Fleet.connect(options.ray, options.device_classes, options.target)  # checked before any work
    try:
        plan = _plan(model, example, options)
    except BaseException:
        fleet.close()
        raise
    luts = fleet.measure(plan, out, options, model_info)  # closes the connection
    results = {}
    for cls, lut in luts.items():
        resumed = lut["fleet"]["resumed_entries"]
        results[cls] = finish(lut, plan, out / cls, options, current_channels, len(plan.keys) - resumed, resumed,
                              start)
    return results


@dataclass
class Plan:
    """What a profile measures: the layer table, the LUT keys, the calibration models."""

    table: ModelTable
    keys: list[str]
    calibration_models: dict  # name -> ONNX model or None (the fold could not make it)
    narrow: list[int]
    half: list[int]
    settings: dict  # the LUT's "settings"
    whole_settings: Settings


def _plan(model: nn.Module, example: torch.Tensor, options: ProfileOptions) -> Plan:
    table, proto = build_table(model, example, options.edges, options.gator_no_last_conv)
    if not table.edges:
        raise UserError("the model has no prunable channel group (every group is pinned)")
    # Calibration models: the unpruned one and the one a channel narrower on every edge (see
    # lut.calibrate). Each is timed twice before and once after the layers, the fastest kept,
    # so a burst of load from other processes during one of them does not skew the scales.
    narrow = [max(1, c - 1) for c in table.full_channels()]
    half = [max(1, c // 2) for c in table.full_channels()]
    calibration_models = {"full": proto, "narrow": _narrow_model(proto, table, narrow),
                          "half": _narrow_model(proto, table, half)}
    whole_settings = Settings(warmup=3, repeats=max(20, options.settings.repeats),
                              max_cv=options.settings.max_cv, retries=options.settings.retries)
    settings = {**asdict(options.settings), "fractions": list(options.fractions)}
    return Plan(table, widths_to_measure(table, options.fractions), calibration_models, narrow, half, settings,
                whole_settings)


def check_out_dir(out: Path) -> None:
    """-o must be a folder we can create or write into: checked before any work, so a
    read-only place is one line and nothing is written."""
    if out.exists() and not out.is_dir():
        raise UserError(f"-o {out}: exists and is not a directory")
    if not out.parent.is_dir():
        raise UserError(f"-o {out}: directory {out.parent} does not exist")
    where = out if out.is_dir() else out.parent
    try:  # os.access says yes to root on a read-only mount; creating a file tells the truth
        with tempfile.TemporaryFile(dir=where):
            pass
    except OSError as exc:
        raise UserError(f"-o {out}: cannot write into {where} ({exc.strerror or exc})") from None


def finish(lut: dict, plan: Plan, out: Path, options: ProfileOptions, current_channels: list[int] | None,
           measured: int, resumed: int, start: float) -> ProfileResult:
    """Calibration, Gator's files and the report from a LUT whose entries and whole-model
    timings are complete; removes the partial file."""
    table = plan.table
    timings = lut.pop("whole_models")
    lut.pop("whole_models_after", None)
    observations = [(kernel_sums(lut, None, table), timings["full"]["ms"])]
    if "narrow" in timings:
        observations.append((kernel_sums(lut, plan.narrow, table), timings["narrow"]["ms"]))
        if "half" in timings:
            observations.append((kernel_sums(lut, plan.half, table), timings["half"]["ms"]))
    whole = timings["full"]
    lut["calibration"] = {
        "whole_model_ms": whole["ms"], "whole_model_cv": whole["cv"], "whole_model_unstable": whole["unstable"],
        "whole_model_method": BACKENDS[canonical_name(options.target)].whole_method,
        "narrow_model_ms": timings.get("narrow", {}).get("ms"),
        "half_model_ms": timings.get("half", {}).get("ms"),
        "layer_sum_ms": round(sum(observations[0][0].values()), 5),
        "scales": calibrate(observations)}
    if options.target in ("onnx", "ort"):
        lut["kernel_rule_mismatches"] = sorted(
            k for k, e in lut["entries"].items() if e.get("kernel") != ort_cpu_kernel(parse_key(k)))
    t0, f0, savings = gout.edge_savings(lut, table)
    current_ms = None
    if current_channels is not None and table.edge_source == "gator hyper-edges":
        current_ms = predict(lut, current_channels, table)
        lut["model"]["checkpoint_channels"] = current_channels
        lut["model"]["checkpoint_predicted_ms"] = round(current_ms, 5)

    files = []

    def emit(name: str, text: str) -> None:
        write_text(out / name, text)
        files.append(name)

    emit("lut.json", dumps(lut))
    config = gout.gator_config(savings, options.criteria_weight, options.gradient_multiplier,
                               options.gate_init_prob, options.static_total_cost, options.gator_no_last_conv)
    emit("gator_config.json", json.dumps(config, indent=1))
    emit("edge_multipliers_by_name.json", json.dumps(gout.named_multipliers(savings), indent=1))
    emit("timing.csv", gout.timing_csv(whole["ms"], f0, savings))
    if options.report:
        files += rep.write_plots(out, savings)
        emit("report.html", rep.render_html(lut, savings, ["multipliers.png", "latency_vs_flops.png"], t0))
    (out / PARTIAL).unlink(missing_ok=True)
    unstable = sum(1 for e in lut["entries"].values() if e.get("unstable"))
    return ProfileResult(out, table, lut, whole["ms"], t0, measured, resumed, unstable, files,
                         time.perf_counter() - start, current_ms)


MUST_MATCH = ("target", "threads", "batch", "settings")


def _resume(path: Path, lut: dict) -> int:
    """Load the entries (and whole-model timings) of a partial file made with the same model,
    target and settings into `lut`; the number of entries loaded."""
    if not path.is_file():
        return 0
    try:
        old = json.loads(path.read_text())
        _check_partial(old)
    except (json.JSONDecodeError, UnicodeDecodeError, UserError) as exc:
        raise UserError(f"--resume: {path} is damaged ({str(exc).splitlines()[0]}); delete it to start afresh") \
            from None
    for key in MUST_MATCH:
        if old.get(key) != lut[key]:
            raise UserError(f"--resume: {path} was made with another {key} ({old.get(key)!r}, now {lut[key]!r}); "
                            "delete it or profile into another folder")
    if old.get("runtime", {}).get("version") != lut["runtime"]["version"]:
        raise UserError(f"--resume: {path} was measured with another runtime version")
    if old.get("model", {}).get("input_shape") != lut["model"].get("input_shape") or \
            old.get("table", {}).get("layers") != json.loads(json.dumps(lut["table"]["layers"])):
        raise UserError(f"--resume: {path} was made for another model or input shape")
    lut["entries"].update(old.get("entries", {}))
    for key in ("whole_models", "whole_models_after"):
        if key in old:
            lut[key] = old[key]
    return len(old.get("entries", {}))


def compare_checkpoints(result: ProfileResult, channels: dict[str, list[int]]) -> list[dict]:
    """Several checkpoints of one architecture profiled in one call: each one's gated
    configuration predicted from the one LUT, written as checkpoints.csv and checkpoints.png
    beside it."""
    full = predict(result.lut, None, result.table)
    rows = []
    for name, kept in channels.items():
        ms = predict(result.lut, kept, result.table)
        rows.append({"checkpoint": name, "predicted_ms": round(ms, 5), "ratio": round(ms / full, 4),
                     "channels": sum(kept), "full_channels": sum(result.table.full_channels())})
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["checkpoint", "predicted_ms", "ratio_to_unpruned", "channels", "full_channels"])
    writer.writerows([r["checkpoint"], r["predicted_ms"], r["ratio"], r["channels"], r["full_channels"]]
                     for r in rows)
    write_text(result.out_dir / "checkpoints.csv", text.getvalue())
    rep.write_checkpoint_plot(result.out_dir / "checkpoints.png", rows)
    result.files += ["checkpoints.csv", "checkpoints.png"]
    return rows


def _check_partial(old) -> None:
    if not isinstance(old, dict) or old.get("format") != FORMAT:
        raise UserError(f"not a partial LUT (format {FORMAT})")
    check_entries(old.get("entries"), "entries", keys=True)
    whole = old.get("whole_models", {})
    if not isinstance(whole, dict) or not all(isinstance(m, dict) and valid_ms(m.get("ms")) for m in whole.values()):
        raise UserError("its whole-model timings are not finite and >= 0 ms")
    if old.get("whole_models_after") and "full" not in whole:
        raise UserError("it says the whole models were timed after the layers, but holds no full-model timing")
    for key in ("runtime", "model", "table"):
        if not isinstance(old.get(key, {}), dict):
            raise UserError(f"its {key!r} is not a JSON object")


def _narrow_model(proto, table: ModelTable, narrow: list[int]):
    """The calibration model one channel narrower on every edge, or None if the fold cannot
    make it (then one scale serves all kernels)."""
    try:
        return pruned_model(proto, table, narrow)
    except UserError:
        return None


def _progress(items: list, enabled: bool, unit: str):
    if not enabled or not items:
        return items
    from tqdm import tqdm

    return tqdm(items, unit=unit, desc="profiling", leave=False, dynamic_ncols=True)
