"""`gate2deploy export`: checkpoint -> verified, folded/lowered ONNX (or TensorRT engine).

A thin layer over gate2deploy.compile (gate2deploy/api.py): the flags become a
CompileOptions, the compiled model is written atomically with its report, and the layer table
and summary are printed. Targets (gate2deploy/targets.py): `onnx` (portable: standard ops
only), `ort` (custom ops run by gate2deploy's native ONNX Runtime library), `trt` (TensorRT
engine; needs TensorRT and a GPU, exit 3 otherwise).
"""
from __future__ import annotations

from .. import report as rep
from ..api import compile_with
from ..fileio import check_writable, write_text
from ..options import CompileOptions, from_namespace
from ..targets import TARGETS
from ..verify import DEFAULT_RTOL
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
    p.add_argument("--keep-unfoldable", action="store_true",
                   help="keep masks the fold cannot remove as an exact Mul instead of failing")
    add_compile_arguments(p)
    p.add_argument("--pg-static-scale", action="store_true",
                   help="Precision Gating: replace the per-batch dynamic activation scale by one calibrated "
                        "on --sample-inputs (outputs then no longer depend on the rest of the batch)")
    p.add_argument("--debug-passes", metavar="DIR",
                   help="write the graph after every pass to DIR and re-check it (onnx checker, shapes)")
    p.set_defaults(func=run)


def run(args) -> int:
    check_writable(args.output)
    if args.report:
        check_writable(args.report)
    opts = from_namespace(CompileOptions, args)
    compiled = compile_with(None, None, opts)
    compiled.save(args.output)
    if args.report:
        write_text(args.report, rep.to_json(compiled.report))
    print(rep.format_table(compiled.report["layers"], limit=25))
    print_summary(compiled.report)
    return 0


def print_summary(s: dict) -> None:
    ratio = lambda a, b: a / b if b else 1.0  # noqa: E731
    print(f"MACs   {s['macs_before']:,} -> {s['macs_after']:,} ({ratio(s['macs_after'], s['macs_before']):.3f}x)")
    print(f"params {s['params_before']:,} -> {s['params_after']:,} ({ratio(s['params_after'], s['params_before']):.3f}x)")
    print(f"verified vs PyTorch: {s['verification']}")
    if s.get("gate_statistics"):
        g = s["gate_statistics"]["summary"]
        print(f"gated layers: {g['gated_layers']}, expected MACs {g['expected_over_dense']:.3f}x of dense "
              f"on the sample inputs")
    if s["mask_sources"].get("slimmable"):
        print(slimmable_summary(s["mask_sources"]["slimmable"]))
    for u in s["fold"]["unfoldable"]:
        print(f"kept as Mul (not foldable): {u['source']}: {u['channels']} channels: {u['reason']}")
    print(f"compile time {s['compile_seconds']:.2f} s")


def slimmable_summary(sl: dict) -> str:
    sel = sl["selection"]
    what = {"uniform": lambda: f"uniform width {sel['width']:g}",
            "vector": lambda: f"width vector {sel['path']}",
            "population": lambda: f"population entry {sel['index']} (loss {sel['loss']}, ratio {sel['ratio']})"}[sel["kind"]]()
    return (f"slimmable {sl['family']}: {what}; conv MACs {sl['conv_macs']:,} per sample = "
            f"{sl['conv_macs_ratio']:.3f}x full width; BatchNorm statistics: {sl['bn_statistics']}")
