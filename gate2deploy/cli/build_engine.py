"""`gate2deploy build-engine model.trt.onnx`: build (and check) a TensorRT engine from what
`gate2deploy export --target trt` wrote, on a host with TensorRT and an NVIDIA GPU.

    gate2deploy export ckpt.pt --model m.py:net --input-shape 1,3,224,224 --target trt -o model.engine
        -> model.trt.onnx, model.trt.json (and model.engine where TensorRT and a GPU exist; else
           exit code 3 and the build-engine command to run on a GPU host)
    gate2deploy build-engine model.trt.onnx [-o model.engine] [--fp16] [--batch 1,8,32]

`model.trt.json` (written beside `model.trt.onnx`, `FORMAT`) holds what the build needs and the
ONNX file cannot say: the plugin registration (namespace, version, the Python module whose
`register_plugins()` registers the JIT plugins), the input profile (min/opt/max shapes of the
one optimisation profile), the precision and the tolerance. File names in it are relative to
its own folder, so the pair can be copied to the GPU host as they are.

Decisions: the engine built here is checked against ONNX Runtime CPU running the same
`model.trt.onnx` with gate2deploy's native custom ops (which `export` verified against
PyTorch before writing it) on random normal inputs at the profile's `opt` batch; `export`,
which has the PyTorch model, checks the engine against PyTorch directly. The FP16 engine's
tolerance is `FP16_RTOL` (1e-2), FP32's the export's `--rtol`. Where TensorRT or a GPU is
missing: one line naming what is missing and the command to run elsewhere, exit code 3.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ..errors import UserError
from ..fileio import check_writable, read_json
from ..runtimes import PLUGIN_KINDS

FORMAT = "gate2deploy.trt/1"
FP16_RTOL = 1e-2  # half precision keeps 11 significant bits; products and sums round there
GPU_HOST = "a host with TensorRT >= 10.6 and an NVIDIA GPU"


def add_parser(sub) -> None:
    p = sub.add_parser("build-engine", help="build a TensorRT engine from export --target trt's model.trt.onnx")
    p.add_argument("onnx", help="model.trt.onnx (model.trt.json must be beside it)")
    p.add_argument("-o", "--output", help="engine file (default: the name model.trt.json gives)")
    p.add_argument("--fp16", action="store_true", help="build in FP16 (default: the precision model.trt.json gives)")
    p.add_argument("--batch", help="optimisation profile min,opt,max batch (default: model.trt.json's)")
    p.add_argument("--rtol", type=float, help="tolerance of the engine check (default: model.trt.json's)")
    p.add_argument("--plugins", choices=PLUGIN_KINDS,
                   help="aot (the gated ops' Triton kernels compiled into the engine; TensorRT >= 10.9), jit (Python "
                        "plugins) or auto (aot where this TensorRT has it) (default: model.trt.json's)")
    p.add_argument("--no-verify", action="store_true", help="skip the engine check against ONNX Runtime")
    p.set_defaults(func=run)


# --------------------------------------------------------------------------------------------
# Shared with `export --target trt`
# --------------------------------------------------------------------------------------------
def trt_paths(output: str | Path) -> tuple[Path, Path]:
    """model.engine -> (model.trt.onnx, model.trt.json), beside the engine."""
    out = Path(output)
    stem = out.name[: -len(out.suffix)] if out.suffix else out.name
    return out.with_name(f"{stem}.trt.onnx"), out.with_name(f"{stem}.trt.json")


def config_path(onnx_path: str | Path) -> Path:
    """model.trt.onnx -> model.trt.json"""
    return Path(onnx_path).with_suffix(".json")


def parse_batch_profile(text: str | None, captured: int, static: bool) -> tuple[int, int, int]:
    """`--batch min,opt,max` checked against the captured batch. Default: (1, N, max(N, 32))
    for a dynamic batch axis, (N, N, N) for a static one. The verification batch N must lie
    in the profile (the engine is run on it)."""
    if text is None:
        return (captured,) * 3 if static else (1, captured, max(captured, 32))
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise UserError(f"--batch {text!r} is not min,opt,max (three integers)") from None
    if len(values) != 3 or not 1 <= values[0] <= values[1] <= values[2]:
        raise UserError(f"--batch {text!r}: need three integers 1 <= min <= opt <= max")
    if static and values != (captured,) * 3:
        raise UserError(f"--batch {text!r}: the model's batch is static ({captured}); "
                        f"use {captured},{captured},{captured} or drop --static-batch")
    if not values[0] <= captured <= values[2]:
        raise UserError(f"--batch {text!r} does not contain the verification batch {captured} "
                        "(--input-shape's first dimension)")
    return values


def profile_shapes(shape, batch: tuple[int, int, int]) -> dict:
    return {key: [b, *shape[1:]] for key, b in zip(("min", "opt", "max"), batch)}


def build_config(onnx_path: Path, engine_path: Path, model, input_shape, batch, fp16: bool,
                 rtol: float, static: bool, plugins: str = "auto") -> dict:
    from ..runtimes import MIN_TENSORRT
    from ..runtimes import tensorrt_plugins as tp

    ops = sorted({n.op_type for n in model.graph.node if n.domain == tp.NAMESPACE})
    return {
        "format": FORMAT,
        "onnx": onnx_path.name,
        "engine": engine_path.name,
        "plugins": {"namespace": tp.NAMESPACE, "version": tp.VERSION, "ops": ops,
                    "implementation": plugins,
                    "kind": "aot: the Triton kernels compiled into the engine (tensorrt.plugin.aot_impl, "
                            "runtimes/tensorrt_aot.py); jit: Python tensorrt.plugin calling them; auto: aot where "
                            "the TensorRT has it",
                    "registration_module": tp.REGISTRATION_MODULE,
                    "register_function": tp.REGISTER_FUNCTION, "min_tensorrt": MIN_TENSORRT},
        "inputs": {model.graph.input[0].name: profile_shapes(input_shape, batch)},
        "batch_axis": "static" if static else "dynamic",
        "verification_shape": list(input_shape),
        "precision": "fp16" if fp16 else "fp32",
        "rtol": max(rtol, FP16_RTOL) if fp16 else rtol,
    }


def gpu_host_command(onnx_path: Path, engine_path: Path, fp16: bool, plugins: str = "auto") -> str:
    return (f"gate2deploy build-engine {onnx_path} -o {engine_path}" + (" --fp16" if fp16 else "")
            + (f" --plugins {plugins}" if plugins != "auto" else ""))


def normwise_error(ref: list, got: list) -> float:
    """max|got - ref| / max|ref| over all outputs (inf on a shape mismatch; NaN is never equal)."""
    worst = 0.0
    for r, g in zip(ref, got):
        r, g = np.asarray(r, np.float64), np.asarray(g, np.float64)
        if r.shape != g.shape:
            return float("inf")
        err = float(np.max(np.abs(r - g))) if r.size else 0.0
        scale = float(np.max(np.abs(r))) if r.size else 0.0
        rel = err / scale if scale > 0 else err
        worst = max(worst, rel if np.isfinite(rel) else float("inf"))
    return worst


def check_engine(engine_path: Path, reference, inputs: list, input_name: str, rtol: float) -> float:
    """Run the engine on `inputs` and compare with `reference(x) -> [outputs]`; on a mismatch
    the engine is deleted and a UserError raised. Returns the worst normwise error."""
    from ..runtimes.tensorrt_plugins import run_engine

    worst = 0.0
    for x in inputs:
        worst = max(worst, normwise_error(reference(x), run_engine(engine_path, {input_name: x})))
    if not worst <= rtol:
        Path(engine_path).unlink(missing_ok=True)
        raise UserError(f"engine check failed: max rel err {worst:.3g} > {rtol:g}; engine deleted")
    return worst


# --------------------------------------------------------------------------------------------
# The subcommand
# --------------------------------------------------------------------------------------------
def _load(onnx_path: Path):
    import onnx

    if not onnx_path.is_file():
        raise UserError(f"{onnx_path} does not exist")
    try:
        model = onnx.load(str(onnx_path))
    except Exception as exc:  # noqa: BLE001 - protobuf raises several types on bad files
        raise UserError(f"{onnx_path} is not an ONNX model: {(str(exc).splitlines() or ['?'])[0]}") from None
    cfg_path = config_path(onnx_path)
    cfg = read_json(cfg_path, "build configuration")
    if not isinstance(cfg, dict) or cfg.get("format") != FORMAT:
        raise UserError(f"{cfg_path} is not a gate2deploy TensorRT build configuration "
                        f"(format {FORMAT}; written by export --target trt)")
    inputs = cfg.get("inputs")
    names = [i.name for i in model.graph.input]
    if not isinstance(inputs, dict) or sorted(inputs) != sorted(names):
        raise UserError(f"{cfg_path}: its inputs {sorted(inputs or {})} are not the model's {names}")
    _check_config(cfg, cfg_path)
    return model, cfg, cfg_path


def _dims(value) -> bool:
    return isinstance(value, list) and bool(value) and all(
        isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in value)


def _check_config(cfg: dict, cfg_path: Path) -> None:
    """The fields `run` reads, each of the type export --target trt writes (a file edited by
    hand is one line naming the field, not a KeyError or TypeError)."""
    def bad(field, why):
        raise UserError(f"{cfg_path}: {field} {cfg.get(field)!r} {why}; re-export with --target trt or mend it")
    engine = cfg.get("engine")
    if not isinstance(engine, str) or not engine or Path(engine).name != engine or engine in (".", ".."):
        bad("engine", "is not a file name beside the configuration")
    if cfg.get("precision", "fp32") not in ("fp32", "fp16"):
        bad("precision", "is not fp32 or fp16")
    rtol = cfg.get("rtol", 1e-4)
    if isinstance(rtol, bool) or not isinstance(rtol, (int, float)) or not math.isfinite(rtol) or rtol <= 0:
        bad("rtol", "is not a finite number > 0")
    if not isinstance(cfg.get("plugins", {}), dict):
        bad("plugins", "is not a JSON object")
    if "verification_shape" in cfg and not _dims(cfg["verification_shape"]):
        bad("verification_shape", "is not a list of positive integers")
    for name, shapes in cfg["inputs"].items():
        if not isinstance(shapes, dict) or not all(_dims(shapes.get(k)) for k in ("min", "opt", "max")):
            raise UserError(f"{cfg_path}: input {name}'s shapes {shapes!r} are not min/opt/max lists of positive "
                            "integers; re-export with --target trt or mend it")


def run(args) -> int:
    from ..runtimes import TensorRTUnavailable, tensorrt_available

    onnx_path = Path(args.onnx)
    model, cfg, cfg_path = _load(onnx_path)
    engine_path = Path(args.output) if args.output else cfg_path.with_name(cfg["engine"])
    check_writable(engine_path)
    fp16 = args.fp16 or cfg.get("precision") == "fp16"
    rtol = args.rtol if args.rtol is not None else float(cfg.get("rtol", 1e-4))
    if fp16:
        rtol = max(rtol, FP16_RTOL)
    name = model.graph.input[0].name
    shapes = cfg["inputs"][name]
    static = cfg.get("batch_axis") == "static"
    if args.batch:
        if "verification_shape" not in cfg:
            raise UserError(f"{cfg_path}: --batch needs its verification_shape (the captured batch); re-export "
                            "with --target trt")
        captured = int(cfg["verification_shape"][0])
        shapes = profile_shapes(shapes["opt"], parse_batch_profile(args.batch, captured, static))
    plugins = args.plugins or (cfg.get("plugins") or {}).get("implementation", "auto")
    if plugins not in PLUGIN_KINDS:
        raise UserError(f"{cfg_path}: plugins.implementation {plugins!r} is not one of {', '.join(PLUGIN_KINDS)}")
    problem = tensorrt_available()
    if problem:
        raise TensorRTUnavailable(f"{problem}; run on {GPU_HOST}: "
                                  f"{gpu_host_command(onnx_path, engine_path, fp16, plugins)}")
    from ..runtimes.tensorrt_plugins import build_engine

    kind = build_engine(onnx_path, engine_path, {name: (shapes["min"], shapes["opt"], shapes["max"])}, fp16,
                        plugins=plugins)
    print(f"wrote {engine_path} ({'fp16' if fp16 else 'fp32'}, batch {shapes['min'][0]}..{shapes['max'][0]}, "
          f"opt {shapes['opt'][0]}, {kind} plugins)")
    if args.no_verify:
        print("engine check skipped (--no-verify)")
        return 0
    from ..verify import make_session, random_inputs

    session = make_session(model)
    worst = check_engine(engine_path, lambda x: session.run(None, {name: x}), random_inputs(shapes["opt"], 2),
                         name, rtol)
    print(f"engine vs ONNX Runtime CPU (native custom ops): max rel err {worst:.3g} (tolerance {rtol:g})")
    return 0
