"""`gate2deploy run`: run or benchmark an ONNX model in ONNX Runtime (CPU), with gate2deploy's
custom ops (CGConv, PGConv, FBSConv) registered when the model uses them.

    gate2deploy run model.onnx                         # one run on random inputs, print outputs
    gate2deploy run model.onnx --input-shape 1x3x32x32 --bench 100 --threads 2
    gate2deploy run model.onnx --input x=input.npy --save-outputs out.npz

Inputs are standard-normal random (seed 0) unless given as .npy files; symbolic dimensions
need --input-shape. --bench N times N runs after --warmup runs and prints the median and the
10th/90th percentiles in milliseconds.
"""
from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np

from .. import memory
from ..errors import UserError
from ..fileio import cast_values, read_array
from ..frontend import MAX_INPUT_ELEMENTS, check_input_elements

ONNX_TO_NUMPY = {"tensor(float)": np.float32, "tensor(double)": np.float64,
                 "tensor(float16)": np.float16, "tensor(int64)": np.int64,
                 "tensor(int32)": np.int32, "tensor(int8)": np.int8, "tensor(uint8)": np.uint8,
                 "tensor(bool)": np.bool_}


def add_parser(sub) -> None:
    p = sub.add_parser("run", help="run or benchmark an ONNX model in ONNX Runtime with gate2deploy's custom ops")
    p.add_argument("model", help="the .onnx file")
    p.add_argument("--input-shape", action="append", default=[], metavar="[NAME=]DIMS",
                   help="input shape like 1x3x32x32 (or name=1x3x32x32, repeatable); "
                        "required for symbolic dimensions")
    p.add_argument("--input", action="append", default=[], metavar="NAME=FILE.npy",
                   help="feed this input from a .npy file (repeatable)")
    p.add_argument("--bench", type=int, default=0, metavar="N", help="time N runs (after --warmup)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--threads", type=int, default=2, help="intra-op threads (default %(default)s)")
    p.add_argument("--max-input-elements", type=int, default=MAX_INPUT_ELEMENTS,
                   help="refuse an input with more elements than this before allocating (default %(default)s)")
    p.add_argument("--max-memory", type=float, metavar="GIB",
                   help="refuse a run estimated (weights, inputs, every intermediate tensor by ONNX shape "
                        "inference) above this many GiB (default: the memory available on this machine)")
    p.add_argument("--save-outputs", metavar="FILE.npz", help="write the outputs of one run here")
    p.set_defaults(func=run)


def _parse_dims(text: str, max_elements: int) -> tuple[int, ...]:
    try:
        dims = tuple(int(d) for d in text.lower().replace(",", "x").split("x"))
    except ValueError:
        raise UserError(f"--input-shape {text!r}: expected dimensions like 1x3x32x32") from None
    if not dims or min(dims) < 0:
        raise UserError(f"--input-shape {text!r}: dimensions must be non-negative integers")
    check_input_elements(dims, max_elements)
    return dims


def _open(model_path: str, threads: int):
    import onnx

    path = Path(model_path)
    if not path.is_file():
        raise UserError(f"model file {path} does not exist")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - protobuf errors vary
        raise UserError(f"{path} is not a readable ONNX model: {str(exc).splitlines()[0] if str(exc) else exc}") from None
    if threads < 1:
        raise UserError("--threads must be >= 1")
    from ..runtimes.ort import open_session
    # log severity 4: errors are reported by `run` itself, on one line
    return open_session(path, threads=threads, log_severity=4)


def _feeds(sess, shapes: list[str], files: list[str], max_elements: int = MAX_INPUT_ELEMENTS) -> dict[str, np.ndarray]:
    inputs = sess.get_inputs()
    names = [i.name for i in inputs]
    given: dict[str, tuple[int, ...]] = {}
    for spec in shapes:
        name, _, dims = spec.rpartition("=")
        if not name:
            if len(inputs) != 1:
                raise UserError(f"--input-shape {spec}: the model has {len(inputs)} inputs; "
                                "write name=DIMS")
            name = names[0]
        if name not in names:
            raise UserError(f"--input-shape {spec}: no input named {name!r} (inputs: {', '.join(names)})")
        given[name] = _parse_dims(dims, max_elements)
    loaded: dict[str, np.ndarray] = {}
    for spec in files:
        name, sep, file = spec.partition("=")
        if not sep or name not in names:
            raise UserError(f"--input {spec}: expected NAME=FILE.npy with NAME one of {', '.join(names)}")
        loaded[name] = read_array(file, f"--input {name}:", kinds=(".npy", ".npz"))
    rng = np.random.default_rng(0)
    feeds = {}
    for inp in inputs:
        dtype = ONNX_TO_NUMPY.get(inp.type)
        if dtype is None:
            raise UserError(f"input {inp.name} has type {inp.type}, which `run` cannot generate")
        if inp.name in loaded:
            feeds[inp.name] = cast_values(loaded[inp.name], dtype, f"--input {inp.name}")
            continue
        if inp.name in given:
            shape = given[inp.name]
            declared = inp.shape
            if len(declared) != len(shape) or any(isinstance(d, int) and d != s for d, s in zip(declared, shape)):
                raise UserError(f"--input-shape for {inp.name}: {shape} does not fit the model's {declared}")
        elif all(isinstance(d, int) for d in inp.shape):
            shape = tuple(inp.shape)
            check_input_elements(shape, max_elements)  # a declared shape is as big as any given one
        else:
            raise UserError(f"input {inp.name} has symbolic shape {inp.shape}: give --input-shape")
        if np.issubdtype(dtype, np.floating):
            feeds[inp.name] = rng.standard_normal(shape).astype(dtype)
        else:
            feeds[inp.name] = np.zeros(shape, dtype)
    return feeds


def _write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """np.savez's file (an uncompressed zip of NAME.npy members), written member by member:
    np.savez takes the names as keyword arguments, so an output named `file` or
    `allow_pickle` collided with its own parameters."""
    import zipfile

    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name, value in arrays.items():
            with zf.open(f"{name}.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.asanyarray(value), allow_pickle=False)


def _run_once(sess, feeds):
    try:
        return sess.run(None, feeds)
    except Exception as exc:  # noqa: BLE001 - ORT raises its own exception classes
        raise UserError(f"ONNX Runtime failed: {str(exc).strip().splitlines()[0]}") from None


def run(args) -> int:
    if args.bench < 0 or args.warmup < 0:
        raise UserError("--bench and --warmup must be >= 0")
    if args.save_outputs:
        from ..fileio import check_writable
        check_writable(args.save_outputs)
    sess = _open(args.model, args.threads)
    feeds = _feeds(sess, args.input_shape, args.input, args.max_input_elements)
    memory.check_onnx_run(args.model, feeds, args.max_memory)
    outputs = _run_once(sess, feeds)
    names = [o.name for o in sess.get_outputs()]
    for name, value in zip(names, outputs):
        value = np.asarray(value)
        stats = ""
        if value.size and np.issubdtype(value.dtype, np.number):
            stats = (f" min {value.min():.6g} max {value.max():.6g} mean {value.mean():.6g}"
                     f" zeros {np.count_nonzero(value == 0) / value.size:.1%}")
        print(f"output {name}: {value.dtype} {list(value.shape)}{stats}")
    if args.save_outputs:
        from ..fileio import atomic_path
        with atomic_path(args.save_outputs) as tmp:
            _write_npz(tmp, dict(zip(names, outputs)))
        print(f"outputs written to {args.save_outputs}")
    if args.bench:
        for _ in range(args.warmup):
            _run_once(sess, feeds)
        times = []
        for _ in range(args.bench):
            start = time.perf_counter()
            _run_once(sess, feeds)
            times.append((time.perf_counter() - start) * 1e3)
        times.sort()
        pct = lambda q: times[min(len(times) - 1, int(q * len(times)))]  # noqa: E731
        print(f"latency over {args.bench} runs ({args.threads} threads): median "
              f"{statistics.median(times):.3f} ms, p10 {pct(0.1):.3f} ms, p90 {pct(0.9):.3f} ms")
    return 0
