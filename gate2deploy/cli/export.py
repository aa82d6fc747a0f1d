"""`gate2deploy export`: checkpoint -> verified, folded/lowered ONNX (or TensorRT engine).

Steps: build the gated PyTorch model (frontend) -> capture to ONNX -> the target's pipeline
(gate2deploy.pipeline) -> verify against PyTorch (on by default; a mismatch fails) -> write
the model and the report atomically. Targets: `onnx` (portable: standard ops only),
`ort` (custom ops run by gate2deploy's native ONNX Runtime library), `trt` (TensorRT engine;
needs TensorRT and a GPU, refused cleanly otherwise).
"""
from __future__ import annotations

import collections
import time

import torch

from .. import gate_stats
from .. import report as rep
from ..capture import capture
from ..errors import UserError
from ..fileio import atomic_path, check_writable, write_text
from ..frontend import add_model_arguments, build_gated_model
from ..pipeline import PIPELINES, PassContext, run_pipeline
from ..verify import DEFAULT_RTOL, check_export

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
    p.add_argument("--pg-static-scale", action="store_true",
                   help="Precision Gating: replace the per-batch dynamic activation scale by one calibrated "
                        "on --sample-inputs (outputs then no longer depend on the rest of the batch)")
    p.set_defaults(func=run)


def _pipeline_target(target: str) -> str:
    if target == "trt":
        from ..runtimes import tensorrt_available  # import-guarded, never imports TensorRT eagerly
        problem = tensorrt_available()
        if problem:
            raise UserError(f"--target trt: {problem}")
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
    gated = build_gated_model(args)
    samples = load_samples(args, gated)
    if args.pg_static_scale:
        gate_stats.calibrate_pg_scales(gated.model, [torch.from_numpy(b) for b in samples])
    start = time.perf_counter()
    captured = capture(gated.model, gated.example)
    ctx = PassContext(unfoldable_policy="keep" if args.keep_unfoldable else "error",
                      choose_widths=args.physical_widths == "fast")
    compiled = run_pipeline(captured, pipeline, ctx)
    compile_seconds = time.perf_counter() - start

    check = None
    if not args.no_verify:
        check = check_export(gated.model, captured, compiled, tuple(gated.example.shape), args.rtol, samples)
        if not check.passed:
            raise UserError(f"verification failed: {check.summary()}; nothing written")

    before, after = rep.model_cost(captured), rep.model_cost(compiled)
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
            "pinned_ops": [vars(o) for o in ctx.fold.pinned_ops],
        },
        "sparse_input_convs": ctx.sparse_input_convs,
        "fused_epilogues": ctx.fused_epilogues,
        "layers": layers,
        **gated_layer_report(gated, captured, samples),
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
    if s.get("gate_statistics"):
        g = s["gate_statistics"]["summary"]
        print(f"gated layers: {g['gated_layers']}, expected MACs {g['expected_over_dense']:.3f}x of dense "
              f"on the sample inputs")
    for u in s["fold"]["unfoldable"]:
        print(f"kept as Mul (not foldable): {u['source']}: {u['channels']} channels: {u['reason']}")
    pinned = collections.Counter((o["op"], o["reason"]) for o in s["fold"]["pinned_ops"])
    for (op, reason), n in pinned.items():
        print(f"channels kept around {n} {op} node{'s' * (n > 1)} (the fold cannot reason about them: "
              f"{reason}; listed in the report's fold.pinned_ops)")
    print(f"compile time {s['compile_seconds']:.2f} s")
