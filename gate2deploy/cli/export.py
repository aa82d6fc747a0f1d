"""`gate2deploy export`: checkpoint -> verified, folded/lowered ONNX (or TensorRT engine).

Steps: build the gated PyTorch model (frontend) -> capture to ONNX -> the target's pipeline
(gate2deploy.pipeline) -> verify against PyTorch (on by default; a mismatch fails) -> write
the model and the report atomically. Targets: `onnx` (portable: standard ops only),
`ort` (custom ops run by gate2deploy's native ONNX Runtime library), `trt` (TensorRT: always
writes `<name>.trt.onnx` + `<name>.trt.json` beside `-o <name>.engine`, verified on ONNX
Runtime CPU; builds and checks the engine where TensorRT and a GPU exist, else exits 3 with
the `gate2deploy build-engine` command to run on a GPU host; cli/build_engine.py).

Batch: every export has a dynamic batch axis (passes/dynamic_batch.py) unless
`--static-batch`; the model is verified at `--input-shape`'s batch N and, when the axis is
dynamic, once more at batch N + 1 (a second size proves the relaxed shapes; PG's dynamic scale
is over the whole batch, in PyTorch too). A model whose batch cannot be relaxed exactly keeps
it static, says why, and records it in the report (`batch`).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import gate_stats
from .. import report as rep
from ..capture import capture
from ..errors import UserError
from ..fileio import atomic_path, check_writable, write_text
from ..frontend import add_model_arguments, build_gated_model, parse_shape
from ..pipeline import PIPELINES, PassContext, run_pipeline
from ..passes.dynamic_batch import pin_batch
from ..verify import DEFAULT_RTOL, check_export, random_inputs

TARGETS = ("onnx", "ort", "trt")


def add_parser(sub) -> None:
    p = sub.add_parser("export", help="compile a gated/pruned checkpoint into a smaller, verified ONNX model")
    add_model_arguments(p)
    p.add_argument("--target", choices=TARGETS, default="onnx")
    p.add_argument("-o", "--output", required=True, help="output .onnx (or .engine for --target trt)")
    p.add_argument("--report", help="write the export report as JSON here")
    p.add_argument("--no-verify", action="store_true", help="skip the comparison with PyTorch (not recommended)")
    p.add_argument("--rtol", type=float, default=DEFAULT_RTOL,
                   help="verification tolerance: max|onnx - torch| / max|torch| (default %(default)g)")
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
    p.set_defaults(func=run)


def _pipeline_target(target: str) -> str:
    if target not in PIPELINES:
        raise UserError(f"--target {target} is not available in this build")
    return target


def run(args) -> int:
    check_writable(args.output)
    if args.report:
        check_writable(args.report)
    if args.pg_static_scale and not args.sample_inputs:
        raise UserError("--pg-static-scale needs --sample-inputs to calibrate on")
    pipeline = _pipeline_target(args.target)
    trt = _trt_plan(args) if args.target == "trt" else None
    if trt is None and (args.batch or args.fp16):
        raise UserError("--batch and --fp16 are TensorRT build options: only with --target trt")
    gated = build_gated_model(args)
    samples = load_samples(args, gated)
    if args.pg_static_scale:
        gate_stats.calibrate_pg_scales(gated.model, [torch.from_numpy(b) for b in samples])
    batch_note = None if args.static_batch else _other_batch_problem(gated.model, gated.example)
    start = time.perf_counter()
    captured = capture(gated.model, gated.example)
    ctx = PassContext(unfoldable_policy="keep" if args.keep_unfoldable else "error",
                      choose_widths=args.physical_widths == "fast",
                      batch_axis=not args.static_batch and batch_note is None)
    compiled = run_pipeline(captured, pipeline, ctx)
    if trt is not None:  # what is verified below is exactly what model.trt.onnx holds
        from ..runtimes.tensorrt_plugins import prepare_for_tensorrt
        compiled = prepare_for_tensorrt(compiled)
    compile_seconds = time.perf_counter() - start
    shape = tuple(gated.example.shape)
    batch_note = batch_note or ctx.batch_note
    dynamic = not args.static_batch and batch_note is None
    if batch_note:
        print(f"note: the batch stays static at {shape[0]}: {batch_note}")

    check = second = None
    if not args.no_verify:
        check = check_export(gated.model, captured, compiled, shape, args.rtol, samples)
        if check.passed and dynamic:  # the relaxed batch axis, at another size
            other = (shape[0] + 1, *shape[1:])
            second = check_export(gated.model, captured, compiled, other, args.rtol, random_inputs(other, 1))
        for c in (check, second):
            if c is not None and not c.passed:
                raise UserError(f"verification failed: {c.summary()}; nothing written")

    before = rep.model_cost(captured)
    after = rep.model_cost(pin_batch(compiled, shape[0]) if dynamic else compiled)
    layers = rep.compare(before, after)
    summary = {
        "target": args.target,
        "macs_before": before.macs, "macs_after": after.macs,
        "params_before": before.params, "params_after": after.params,
        "max_abs_err": check.output.max_abs_err if check else None,
        "max_rel_err": check.output.max_rel_err if check else None,
        "tolerance": args.rtol if check else None,
        "verification": check.summary() if check else "skipped (--no-verify)",
        "gated_layer_check": check.gated if check else None,
        "compile_seconds": round(compile_seconds, 3),
        "mask_sources": gated.sources,
        "fold": {
            "removed_channels": ctx.fold.removed_channels,
            "constant_folds": ctx.fold.constant_folds,
            "removed_layers": ctx.fold.removed_layers,
            "unfoldable": [vars(u) for u in ctx.fold.unfoldable],
        },
        "sparse_input_convs": ctx.sparse_input_convs,
        "fused_epilogues": ctx.fused_epilogues,
        "layers": layers,
        "batch": {"axis": "dynamic" if dynamic else "static", "captured": shape[0],
                  "verified": [] if check is None else [shape[0]] + ([shape[0] + 1] if second else []),
                  **({"note": batch_note} if batch_note else {})},
        **gated_layer_report(gated, captured, samples),
    }
    if trt is not None:
        return _export_trt(args, trt, gated, compiled, samples, summary, layers)
    import onnx
    with atomic_path(args.output) as tmp:
        onnx.save(compiled, str(tmp))
    _report_and_print(args, summary, layers)
    return 0


def _other_batch_problem(model, example: torch.Tensor) -> str | None:
    """Why the PyTorch model cannot be verified at batch N + 1 (e.g. a torch.export program
    traced at batch N guards it), or None. The export then keeps the static batch: a batch
    axis PyTorch cannot be compared on is not verified."""
    other = torch.randn((example.shape[0] + 1, *example.shape[1:]))
    try:
        with torch.no_grad():
            model(other)
    except Exception as exc:  # noqa: BLE001 - any failure means "not at another batch"
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return f"the PyTorch model does not run at batch {other.shape[0]}: {first}"
    return None


def _report_and_print(args, summary: dict, layers: list) -> None:
    if args.report:
        write_text(args.report, rep.to_json(summary))
    print(rep.format_table(layers, limit=25))
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


def _export_trt(args, plan: _TrtPlan, gated, compiled, samples, summary: dict, layers: list) -> int:
    """Write model.trt.onnx + model.trt.json (always); build and check the engine where
    TensorRT and a GPU exist, else exit code 3 with the command for a GPU host."""
    import json

    import onnx

    from ..runtimes import TensorRTUnavailable, tensorrt_available
    from .build_engine import GPU_HOST, build_config, check_engine, gpu_host_command

    shape = tuple(gated.example.shape)
    static = summary["batch"]["axis"] == "static"
    batch = (shape[0],) * 3 if static else plan.batch  # a batch that could not be relaxed pins it
    config = build_config(plan.onnx_path, plan.engine_path, compiled, shape, batch, args.fp16, args.rtol, static)
    with atomic_path(plan.onnx_path) as tmp:
        onnx.save(compiled, str(tmp))
    write_text(plan.json_path, json.dumps(config, indent=1) + "\n")
    problem = tensorrt_available()
    summary["tensorrt"] = {"onnx": str(plan.onnx_path), "config": str(plan.json_path),
                           "precision": config["precision"], "profile": config["inputs"],
                           "engine": None if problem else str(plan.engine_path), "not_built": problem}
    if problem:
        _report_and_print(args, summary, layers)
        raise TensorRTUnavailable(
            f"{problem}; wrote {plan.onnx_path} and {plan.json_path}; on {GPU_HOST} run: "
            f"{gpu_host_command(plan.onnx_path, plan.engine_path, args.fp16)}")
    from ..runtimes.tensorrt_plugins import build_engine

    name = compiled.graph.input[0].name
    profile = config["inputs"][name]
    build_engine(plan.onnx_path, plan.engine_path, {name: (profile["min"], profile["opt"], profile["max"])},
                 args.fp16)
    if not args.no_verify:
        def reference(x):
            with torch.no_grad():
                out = gated.model(torch.from_numpy(x))
            return [o.numpy() for o in (out if isinstance(out, (tuple, list)) else (out,))]

        inputs = samples if samples else random_inputs(shape, 3)
        summary["tensorrt"]["engine_max_rel_err"] = check_engine(plan.engine_path, reference, inputs, name,
                                                                 config["rtol"])
        summary["tensorrt"]["engine_tolerance"] = config["rtol"]
    _report_and_print(args, summary, layers)
    return 0


def add_compile_arguments(p) -> None:
    """Options shared by `export` and `info` (which reports what `export` would build)."""
    p.add_argument("--physical-widths", choices=("fast", "exact"), default="fast",
                   help="fast (default): round folded layers up to widths ONNX Runtime's blocked CPU kernels "
                        "run fast (zero padding channels, still exact; passes/choose_widths.py); "
                        "exact: every layer exactly as wide as its kept channels")
    p.add_argument("--sample-inputs", help="representative inputs (.npy/.npz/.pt, shape (M, *input shape[1:])) "
                   "for gate statistics of CG/PG/FBS layers and PG calibration; also used for verification")


def load_samples(args, gated):
    if not args.sample_inputs:
        return None
    return gate_stats.load_sample_inputs(args.sample_inputs, tuple(gated.example.shape))


def gated_layer_report(gated, captured, samples) -> dict:
    """Report fields for dynamic gates: each gated node and its PG scale mode; with sample
    inputs, each layer's gate-on fraction and the MACs it implies."""
    nodes = gate_stats.describe_gated_nodes(captured)
    if not nodes:
        return {}
    out = {"gated_layers": nodes, "pg_scales": gate_stats.pg_scale_modes(gated.model)}
    if samples:
        out["gate_statistics"] = gate_stats.gate_report(gated.model, [torch.from_numpy(b) for b in samples])
    return out


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
