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

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import report as rep
from ..api import CompiledModel, compile_with
from ..errors import OptionError
from ..fileio import check_writable, write_text
from ..frontend import parse_shape
from ..options import CompileOptions, from_namespace
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
    p.add_argument("--pg-static-scale", action="store_true",
                   help="Precision Gating: replace the per-batch dynamic activation scale by one calibrated "
                        "on --sample-inputs (outputs then no longer depend on the rest of the batch)")
    p.add_argument("--debug-passes", metavar="DIR",
                   help="write the graph after every pass to DIR and re-check it (onnx checker, shapes)")
    p.set_defaults(func=run)


def run(args) -> int:
    for flag, path in (("-o", args.output), ("--report", args.report)):
        if path and (str(path).endswith(("/", os.sep)) or Path(path).is_dir()):
            raise OptionError(f"{flag} {path}: names a folder; give a file name")
    check_writable(args.output)
    if args.report:
        check_writable(args.report)
        if Path(args.report).resolve() == Path(args.output).resolve():
            raise OptionError(f"--report {args.report} is the model's own path (-o); give the report another name")
    opts = from_namespace(CompileOptions, args)
    plan = _trt_plan(args) if args.target == "trt" else None  # checked before any expensive work
    compiled = compile_with(None, None, opts)
    if compiled.report["batch"].get("note"):
        print(f"note: the batch stays static at {compiled.input_shape[0]}: {compiled.report['batch']['note']}")
    if plan is not None:
        return _export_trt(args, plan, compiled)
    compiled.save(args.output)
    _report_and_print(args, compiled.report)
    return 0


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
    config = build_config(plan.onnx_path, plan.engine_path, model, shape, batch, args.fp16, args.rtol, static)
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
            f"{gpu_host_command(plan.onnx_path, plan.engine_path, args.fp16)}")
    from ..runtimes.tensorrt_plugins import build_engine

    name = model.graph.input[0].name
    profile = config["inputs"][name]
    build_engine(plan.onnx_path, plan.engine_path, {name: (profile["min"], profile["opt"], profile["max"])},
                 args.fp16)
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
    for u in s["fold"]["unfoldable"]:
        print(f"kept as Mul (not foldable): {u['source']}: {u['channels']} channels: {u['reason']}")
    print(f"compile time {s['compile_seconds']:.2f} s")
