"""`gate2deploy export`: checkpoint -> verified, folded/lowered ONNX (or TensorRT engine).

Steps: build the gated PyTorch model (frontend) -> capture to ONNX -> the target's pipeline
(gate2deploy.pipeline) -> verify against PyTorch (on by default; a mismatch fails) -> write
the model and the report atomically. Targets: `onnx` (portable: standard ops only),
`ort` (custom ops run by gate2deploy's native ONNX Runtime library), `trt` (TensorRT engine;
needs TensorRT and a GPU, refused cleanly otherwise).
"""
from __future__ import annotations

import time

from .. import report as rep
from ..capture import capture
from ..errors import UserError
from ..fileio import atomic_path, check_writable, write_text
from ..frontend import add_model_arguments, build_gated_model
from ..pipeline import PIPELINES, PassContext, run_pipeline
from ..verify import DEFAULT_RTOL, verify

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
    p.set_defaults(func=run)


def _pipeline_target(target: str) -> str:
    if target == "trt":
        from ..runtimes import tensorrt_available  # import-guarded, never imports TensorRT eagerly
        problem = tensorrt_available()
        if problem:
            raise UserError(f"--target trt: {problem}")
        return "ort"
    if target not in PIPELINES:
        raise UserError(f"--target {target} is not available in this build")
    return target


def run(args) -> int:
    check_writable(args.output)
    if args.report:
        check_writable(args.report)
    pipeline = _pipeline_target(args.target)
    gated = build_gated_model(args)
    start = time.perf_counter()
    captured = capture(gated.model, gated.example)
    ctx = PassContext(unfoldable_policy="keep" if args.keep_unfoldable else "error")
    compiled = run_pipeline(captured, pipeline, ctx)
    compile_seconds = time.perf_counter() - start

    result = None
    if not args.no_verify:
        result = verify(gated.model, compiled, tuple(gated.example.shape), rtol=args.rtol)
        if not result.passed:
            raise UserError(f"verification failed: max relative error {result.max_rel_err:.3g} > {args.rtol:g} "
                            f"(max abs {result.max_abs_err:.3g}); nothing written")

    before, after = rep.model_cost(captured), rep.model_cost(compiled)
    layers = rep.compare(before, after)
    summary = {
        "target": args.target,
        "macs_before": before.macs, "macs_after": after.macs,
        "params_before": before.params, "params_after": after.params,
        "max_abs_err": result.max_abs_err if result else None,
        "max_rel_err": result.max_rel_err if result else None,
        "tolerance": args.rtol if result else None,
        "compile_seconds": round(compile_seconds, 3),
        "mask_sources": gated.sources,
        "fold": {
            "removed_channels": ctx.fold.removed_channels,
            "constant_folds": ctx.fold.constant_folds,
            "removed_layers": ctx.fold.removed_layers,
            "unfoldable": [vars(u) for u in ctx.fold.unfoldable],
        },
        "layers": layers,
    }
    if args.target == "trt":
        from ..runtimes.tensorrt_plugins import build_engine
        with atomic_path(args.output) as tmp:
            build_engine(compiled, tmp)
    else:
        import onnx
        with atomic_path(args.output) as tmp:
            onnx.save(compiled, str(tmp))
    if args.report:
        write_text(args.report, rep.to_json(summary))
    print(rep.format_table(layers, limit=25))
    print_summary(summary)
    return 0


def print_summary(s: dict) -> None:
    ratio = lambda a, b: a / b if b else 1.0  # noqa: E731
    print(f"MACs   {s['macs_before']:,} -> {s['macs_after']:,} ({ratio(s['macs_after'], s['macs_before']):.3f}x)")
    print(f"params {s['params_before']:,} -> {s['params_after']:,} ({ratio(s['params_after'], s['params_before']):.3f}x)")
    if s["max_abs_err"] is not None:
        print(f"verified vs PyTorch: max abs err {s['max_abs_err']:.3g}, max rel err {s['max_rel_err']:.3g} "
              f"(tolerance {s['tolerance']:g})")
    for u in s["fold"]["unfoldable"]:
        print(f"kept as Mul (not foldable): {u['source']}: {u['channels']} channels: {u['reason']}")
    print(f"compile time {s['compile_seconds']:.2f} s")
