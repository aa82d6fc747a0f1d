"""`gate2deploy export`: checkpoint -> verified, folded/lowered ONNX (or TensorRT engine).

A thin layer over gate2deploy.compile (gate2deploy/api.py): the flags become a
CompileOptions, the compiled model is written atomically with its report, and the layer table
and summary are printed. Targets (gate2deploy/targets.py): `onnx` (portable: standard ops
only), `ort` (custom ops run by gate2deploy's native ONNX Runtime library), `trt` (TensorRT:
always writes `<name>.trt.onnx` + `<name>.trt.json` beside `-o <name>.engine`, verified on ONNX
Runtime CPU; builds and checks the engine where TensorRT and a GPU exist, else exits 3 with
the `gate2deploy build-engine` command to run on a GPU host; cli/build_engine.py).

Batch: every export has a dynamic batch axis (passes/dynamic_batch.py) unless
`--static-batch`; the model is verified at `--input-shape`'s batch N and, when the axis is
dynamic, once more at batch N + 1 (a second size proves the relaxed shapes; PG's dynamic scale
is over the whole batch, in PyTorch too). A model whose batch cannot be relaxed exactly keeps
it static, says why, and records it in the report (`batch`).
"""
from __future__ import annotations

import collections
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import report as rep
from ..api import CompiledModel, compile_with
from ..errors import OptionError
from ..fileio import atomic_path, check_distinct_outputs, check_writable, write_text
from ..frontend import checkpoint_paths, parse_shape
from ..importers.slimmable import population as population_entries
from ..importers.slimmable import uniform_sweep
from ..options import STREAM_CONVS, CompileOptions, from_namespace, replace
from ..passes.stream_weight_convs import SUMMARY as STREAM_CONV_RULE
from ..runtimes import PLUGIN_KINDS
from ..targets import TARGETS
from ..verify import DEFAULT_RTOL, random_inputs
from .args import add_compile_arguments, add_model_arguments


def add_parser(sub) -> None:
    p = sub.add_parser("export", help="compile a gated/pruned checkpoint into a smaller, verified ONNX model")
    add_model_arguments(p)
    p.add_argument("--target", choices=tuple(TARGETS), default="onnx")
    p.add_argument("-o", "--output", required=True, help="output .onnx (or .engine for --target trt)")
    p.add_argument("--report", help="write the export report as JSON here")
    p.add_argument("--no-verify", action="store_true", help="skip the comparison with PyTorch (not recommended)")
    p.add_argument("--rtol", type=float, default=DEFAULT_RTOL,
                   help="verification tolerance: max|onnx - torch| / max|torch| (default %(default)g)")
    p.add_argument("--allow-nonfinite", action="store_true",
                   help="export even when the PyTorch model itself outputs NaN/Inf on the verification inputs "
                        "(the outputs must then still agree, NaN for NaN)")
    p.add_argument("--keep-unfoldable", action="store_true",
                   help="keep masks the fold cannot remove as an exact Mul instead of failing")
    add_compile_arguments(p)
    p.add_argument("--static-batch", action="store_true",
                   help="pin the batch to --input-shape's first dimension (default: a dynamic batch axis)")
    p.add_argument("--batch", metavar="MIN,OPT,MAX",
                   help="--target trt: the engine's optimisation profile batch sizes (default 1,N,max(N,32); "
                        "N,N,N with --static-batch)")
    p.add_argument("--fp16", action="store_true", help="--target trt: build the engine in FP16")
    p.add_argument("--plugins", choices=PLUGIN_KINDS, default="auto",
                   help="--target trt: the gated ops' TensorRT plugins: aot (their Triton kernels compiled into the "
                        "engine; it runs without Python; TensorRT >= 10.9), jit (Python plugins calling the Triton "
                        "kernels) or auto (default: aot where the TensorRT has it); recorded in model.trt.json")
    p.add_argument("--gated-kernels", choices=("native", "measured"), default="native",
                   help="--target ort: native (default): CG/PG/FBS layers run the native kernels; measured: time each "
                        "CG/PG/FBS layer's native kernel against its standard-op form on this machine and keep the "
                        "faster (gate2deploy/kernel_choice.py; choices and timings in the report, cached per CPU)")
    p.add_argument("--kernel-threads", type=int, default=2,
                   help="intra-op threads --gated-kernels measured and --stream-convs auto time with (default %(default)s)")
    p.add_argument("--stream-convs", choices=STREAM_CONVS, default="auto",
                   help=f"--target ort: {STREAM_CONV_RULE} (batch-1 CIFAR VGGs, sensAI's fused groups) as "
                        "StreamConv, which reads each weight once per call and multiplies only the taps inside "
                        "the map; auto (default): kept only where the network measures faster with them on this "
                        "machine (timed with --kernel-threads threads; report: stream_convs); on: always; off: never")
    p.add_argument("--pg-static-scale", action="store_true",
                   help="Precision Gating: replace the per-batch dynamic activation scale by one calibrated "
                        "on --sample-inputs (outputs then no longer depend on the rest of the batch)")
    p.add_argument("--width-sweep", metavar="W1,W2,...",
                   help="slimmable model: export one model per uniform width (e.g. 0.25,0.5,0.75,1.0; "
                        "--population all: one per stored configuration) with a MACs/params/latency table, "
                        "a JSON report and a latency-vs-MACs plot; -o names the files (see README)")
    p.add_argument("--ray", metavar="ADDRESS",
                   help="with --width-sweep / --population all: time the points on a node of a Ray cluster's "
                        "device class (see `profile --ray`; compiled here)")
    p.add_argument("--device-class", action="append", default=[], metavar="NAME",
                   help="with --ray: the device class (resource device:NAME) to time the sweep on")
    p.add_argument("--debug-passes", metavar="DIR",
                   help="write the graph after every pass to DIR and re-check it (onnx checker, shapes)")
    p.set_defaults(func=run)


def run(args) -> int:
    if args.width_sweep is not None or str(args.population).lower() == "all":
        return run_sweep(args)
    if args.ray or args.device_class:
        raise OptionError("--ray / --device-class time a sweep: only with --width-sweep or --population all")
    for flag, path in (("-o", args.output), ("--report", args.report)):
        if path and (str(path).endswith(("/", os.sep)) or Path(path).is_dir()):
            raise OptionError(f"{flag} {path}: names a folder; give a file name")
    check_writable(args.output)
    if args.report:
        check_writable(args.report)
    plan = _trt_plan(args) if args.target == "trt" else None  # checked before any expensive work
    outputs = ({"-o": args.output} if plan is None else
               {"-o": plan.engine_path, "the TensorRT model": plan.onnx_path, "its build config": plan.json_path})
    check_distinct_outputs({**outputs, "--report": args.report}, _inputs_of(args))
    opts = from_namespace(CompileOptions, args)
    compiled = compile_with(None, None, opts)
    if compiled.report["batch"].get("note"):
        print(f"note: the batch stays static at {compiled.input_shape[0]}: {compiled.report['batch']['note']}")
    if plan is not None:
        return _export_trt(args, plan, compiled)
    compiled.save(args.output)
    try:
        _report_and_print(args, compiled.report)
    except BaseException:  # the report could not be written (a full disk): no model without it
        Path(args.output).unlink(missing_ok=True)
        raise
    return 0


def _inputs_of(args) -> dict:
    """The command's arguments that may name input files (everything but its outputs)."""
    return {("checkpoint" if k == "checkpoint" else "--" + k.replace("_", "-")): v for k, v in vars(args).items()
            if k not in ("output", "report", "func", "command", "debug_passes")}


def _report_and_print(args, summary: dict) -> None:
    if args.report:
        write_text(args.report, rep.to_json(summary))
    print(rep.format_table(summary["layers"], limit=25))
    print_summary(summary)


@dataclass
class _TrtPlan:
    onnx_path: Path  # model.trt.onnx beside -o model.engine
    json_path: Path  # model.trt.json
    engine_path: Path
    batch: tuple[int, int, int]  # the optimisation profile's min, opt, max batch


def _trt_plan(args) -> _TrtPlan:
    """--target trt's outputs and profile, checked before any expensive work."""
    from .build_engine import parse_batch_profile, trt_paths

    onnx_path, json_path = trt_paths(args.output)
    for path in (onnx_path, json_path):
        check_writable(path)
    batch = parse_batch_profile(args.batch, parse_shape(args.input_shape)[0], args.static_batch)
    return _TrtPlan(onnx_path, json_path, Path(args.output), batch)


def _export_trt(args, plan: _TrtPlan, compiled: CompiledModel) -> int:
    """Write model.trt.onnx + model.trt.json (always); build and check the engine where
    TensorRT and a GPU exist, else exit code 3 with the command for a GPU host."""
    from ..runtimes import TensorRTUnavailable, tensorrt_available
    from .build_engine import GPU_HOST, build_config, check_engine, gpu_host_command

    summary, shape, model = compiled.report, compiled.input_shape, compiled.onnx_model
    static = summary["batch"]["axis"] == "static"
    batch = (shape[0],) * 3 if static else plan.batch  # a batch that could not be relaxed pins it
    config = build_config(plan.onnx_path, plan.engine_path, model, shape, batch, args.fp16, args.rtol, static,
                          args.plugins)
    compiled.save(plan.onnx_path)
    write_text(plan.json_path, json.dumps(config, indent=1) + "\n")
    problem = tensorrt_available()
    summary["tensorrt"] = {"onnx": str(plan.onnx_path), "config": str(plan.json_path),
                           "precision": config["precision"], "profile": config["inputs"],
                           "engine": None if problem else str(plan.engine_path), "not_built": problem}
    if problem:
        _report_and_print(args, summary)
        raise TensorRTUnavailable(
            f"{problem}; wrote {plan.onnx_path} and {plan.json_path}; on {GPU_HOST} run: "
            f"{gpu_host_command(plan.onnx_path, plan.engine_path, args.fp16, args.plugins)}")
    from ..runtimes.tensorrt_plugins import build_engine

    name = model.graph.input[0].name
    profile = config["inputs"][name]
    summary["tensorrt"]["plugins"] = build_engine(
        plan.onnx_path, plan.engine_path, {name: (profile["min"], profile["opt"], profile["max"])}, args.fp16,
        plugins=args.plugins)
    if not args.no_verify:
        def reference(x):
            with torch.no_grad():
                out = compiled.torch_model(torch.from_numpy(x))
            return [o.numpy() for o in (out if isinstance(out, (tuple, list)) else (out,))]

        inputs = compiled.samples if compiled.samples else random_inputs(shape, 3)
        summary["tensorrt"]["engine_max_rel_err"] = check_engine(plan.engine_path, reference, inputs, name,
                                                                 config["rtol"])
        summary["tensorrt"]["engine_tolerance"] = config["rtol"]
    _report_and_print(args, summary)
    return 0


def print_summary(s: dict) -> None:
    ratio = lambda a, b: a / b if b else 1.0  # noqa: E731
    print(f"MACs   {s['macs_before']:,} -> {s['macs_after']:,} ({ratio(s['macs_after'], s['macs_before']):.3f}x)")
    print(f"params {s['params_before']:,} -> {s['params_after']:,} ({ratio(s['params_after'], s['params_before']):.3f}x)")
    print(f"verified vs PyTorch: {s['verification']}")
    b = s["batch"]
    print(f"batch axis: {b['axis']}" + (f" (verified at batch {', '.join(map(str, b['verified']))})"
                                        if b["verified"] else ""))
    if s.get("gate_statistics"):
        g = s["gate_statistics"]["summary"]
        print(f"gated layers: {g['gated_layers']}, expected MACs {g['expected_over_dense']:.3f}x of dense "
              f"on the sample inputs")
    twin = (s.get("kernel_choice") or {}).get("dense_twin")
    if twin:
        print(f"gated vs dense twin (measured here, {twin['threads']} threads): {twin['gated_ms']:.3f} vs "
              f"{twin['dense_ms']:.3f} ms ({twin['speedup']:.2f}x)")
        if twin["slower"]:
            print(f"warning: the gated network ran at {twin['speedup']:.2f}x the speed of its dense twin "
                  "(the same graph with plain convs) on this machine: its gates cost more than they skip "
                  "here (report: kernel_choice.dense_twin)", file=sys.stderr)
    stream = s.get("stream_convs") or {}
    if stream.get("convs"):
        n = len(stream["convs"])
        timed = (f" (measured here, {stream['machine'].rsplit('| ', 1)[-1]}: {stream['stream_ms']:.3f} vs "
                 f"{stream['plain_ms']:.3f} ms as Conv" + (", cached" if stream.get("cached") else "") + ")"
                 if "stream_ms" in stream else "")
        print(f"StreamConv: {n} conv{'s' * (n > 1)} ({STREAM_CONV_RULE}) "
              + ("kept" if stream["kept"] else "left as Conv") + timed)
    if s["mask_sources"].get("slimmable"):
        print(slimmable_summary(s["mask_sources"]["slimmable"]))
    for u in s["fold"]["unfoldable"]:
        print(f"kept as Mul (not foldable): {u['source']}: {u['channels']} channels: {u['reason']}")
    pinned = collections.Counter((o["op"], o["reason"]) for o in s["fold"]["pinned_ops"])
    for (op, reason), n in pinned.items():
        print(f"channels kept around {n} {op} node{'s' * (n > 1)} (the fold cannot reason about them: "
              f"{reason}; listed in the report's fold.pinned_ops)")
    print(f"compile time {s['compile_seconds']:.2f} s")


def slimmable_summary(sl: dict) -> str:
    sel = sl["selection"]
    what = {"uniform": lambda: f"uniform width {sel['width']:g}",
            "vector": lambda: f"width vector {sel['path']}",
            "population": lambda: f"population entry {sel['index']} (loss {sel['loss']}, ratio {sel['ratio']})"}[sel["kind"]]()
    return (f"slimmable {sl['family']}: {what}; conv MACs {sl['conv_macs']:,} per sample = "
            f"{sl['conv_macs_ratio']:.3f}x full width; BatchNorm statistics: {sl['bn_statistics']}")


SWEEP_RUNS = 60  # timed runs per model (benchmark.time_sessions, alternating blocks)


def sweep_paths(output: str, report: str | None) -> tuple[Path, Path, Path]:
    """`-o r20.onnx` -> the per-point models r20_<point>.onnx, r20_sweep.json (or --report)
    and r20_sweep.png."""
    out = Path(output)
    stem = out.with_suffix("")
    return stem, Path(report) if report else Path(f"{stem}_sweep.json"), Path(f"{stem}_sweep.png")


def run_sweep(args) -> int:
    """One model per width (or population entry), all compiled and verified before anything
    is written, then the models, the table, the JSON report and the plot."""
    from ..benchmark import latencies_ms
    from ..loading import load_checkpoint
    from ..profiling.measure import machine_info

    if args.width is not None or args.width_vector is not None:
        raise OptionError("--width-sweep / --population all choose the widths; drop --width / --width-vector")
    if args.width_sweep is not None and args.population is not None:
        raise OptionError("--width-sweep and --population both choose the widths; give one")
    stem, report_path, plot_path = sweep_paths(args.output, args.report)
    opts = from_namespace(CompileOptions, args)
    if args.width_sweep is not None:
        widths = uniform_sweep(args.width_sweep)
        check_decodes(opts, widths)
        points = [(f"w{w:g}", {"width": w, "population": None}) for w in widths]
    else:
        entries = population_entries(load_checkpoint(checkpoint_paths(opts)[0], trust_pickle=args.trust_pickle).meta)
        if not entries:
            raise OptionError("--population all: the checkpoint holds no population_data entries")
        points = [(f"pop{e['index']}", {"population": e["index"], "width": None}) for e in entries]
    files = [Path(f"{stem}_{label}{Path(args.output).suffix or '.onnx'}") for label, _ in points]
    for path in files + [report_path, plot_path]:
        check_writable(path)
    check_distinct_outputs({**{f"point {label}": f for (label, _), f in zip(points, files)},
                            "the sweep report": report_path, "the sweep plot": plot_path}, _inputs_of(args))
    fleet = device = None
    if args.ray:  # connected and the class checked before anything is compiled
        from ..profiling.fleet import Fleet
        if opts.target == "trt":
            raise OptionError("--ray times a sweep with ONNX Runtime: not with --target trt")
        fleet = Fleet.connect(args.ray, args.device_class, opts.target)
        fleet.one_class("--width-sweep / --population all")
    elif args.device_class:
        raise OptionError("--device-class needs --ray ADDRESS")
    try:
        compiled = [compile_with(None, None, replace(opts, **change)) for _, change in points]
    except BaseException:
        if fleet is not None:
            fleet.close()
        raise
    input_shape = parse_shape(args.input_shape)
    median = minimum = {}
    models = {label: c.onnx_model for (label, _), c in zip(points, compiled)}
    if fleet is not None:
        median, minimum, device = fleet.time_models(models, input_shape, SWEEP_RUNS)
    elif opts.target != "trt":
        median, minimum = latencies_ms(models, input_shape, runs=SWEEP_RUNS)
    rows = []
    for (label, change), c, path in zip(points, compiled, files):
        sl = c.report["mask_sources"]["slimmable"]
        rows.append({"point": label, **{k: v for k, v in change.items() if v is not None},
                     "file": str(path), "channels": sl["channels"], "macs": c.report["macs_after"],
                     "conv_macs_per_sample": sl["conv_macs"], "conv_macs_ratio": sl["conv_macs_ratio"],
                     "params": c.report["params_after"], "latency_ms_median": median.get(label),
                     "latency_ms_min": minimum.get(label), "verification": c.report["verification"],
                     "bn_statistics": sl["bn_statistics"],
                     "checkpoint_flops": sl["selection"].get("checkpoint_flops"),
                     "loss": sl["selection"].get("loss")})
    sweep = {"input_shape": list(input_shape), "target": opts.target,
             "latency": {"runs_per_model": SWEEP_RUNS, "method": "gate2deploy/benchmark.py time_sessions "
                         "(alternating blocks, ONNX Runtime CPU, 2 threads)",
                         "device": device or machine_info()} if median else None,
             "points": rows, "reports": [c.report for c in compiled]}
    for c, path in zip(compiled, files):
        c.save(path)
    write_text(report_path, rep.to_json(sweep))
    if median:
        write_plot(rows, plot_path, checkpoint_paths(opts)[0])
    print(format_sweep(rows))
    print(f"wrote {len(files)} models ({files[0].name} ...), {report_path}" + (f", {plot_path}" if median else ""))
    return 0


def check_decodes(opts: CompileOptions, widths: list[float]) -> None:
    """Every width decodes to channels on the architecture, before any point is compiled."""
    from ..importers.slimmable import decode, is_slimmable, search_dim
    from ..loading import build_model

    if not opts.model:
        return  # a pickled module: each point is checked when it is compiled
    arch = build_model(opts.model, opts.model_kwargs, opts.model_path)
    if not is_slimmable(arch):
        raise OptionError(f"--width-sweep needs a slimmable model (Joslim's channel_space and set_real_ch); "
                          f"{type(arch).__name__} is not one")
    for w in widths:
        decode(arch, [w] * search_dim(arch))


def format_sweep(rows: list[dict]) -> str:
    head = f"{'point':>8} {'MACs':>14} {'conv ratio':>10} {'params':>10} {'median ms':>10} {'min ms':>8}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lat = (f"{r['latency_ms_median']:>10.3f} {r['latency_ms_min']:>8.3f}" if r["latency_ms_median"] is not None
               else f"{'-':>10} {'-':>8}")
        lines.append(f"{r['point']:>8} {r['macs']:>14,} {r['conv_macs_ratio']:>10.3f} {r['params']:>10,} {lat}")
    return "\n".join(lines)


def write_plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    macs = [r["macs"] / 1e6 for r in rows]
    lat = [r["latency_ms_median"] for r in rows]
    ax.plot(macs, lat, "o-" if len(rows) < 20 else "o")
    for r, x, y in zip(rows, macs, lat):
        ax.annotate(r["point"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("MACs (millions, per inference)")
    ax.set_ylabel("latency, median (ms)")
    ax.set_title(f"{Path(title).name}: latency vs MACs", fontsize=9)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
