"""Verification: the exported ONNX model must reproduce the (masked/gated) PyTorch model.

Both are run by Polygraphy's Comparator (PyTorch runner vs an ONNX Runtime runner built by
us, so custom-op libraries can be registered) on the same random inputs drawn from a normal
distribution (negative values included: a gate or ReLU bug must not hide behind [0, 1)
inputs). The error measure is normwise: max|onnx - torch| / max|torch| per output, which
stays meaningful where individual outputs are near zero. The default tolerance 1e-4 is the
contract for folded models (float reassociation in smaller layers and fused BN, nothing
more); a mismatch fails the export.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
import torch

DEFAULT_RTOL = 1e-4


@dataclass
class VerifyResult:
    max_abs_err: float
    max_rel_err: float
    rtol: float
    n_inputs: int

    @property
    def passed(self) -> bool:
        return bool(np.isfinite(self.max_rel_err)) and self.max_rel_err <= self.rtol


def random_inputs(shape, n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(shape).astype(np.float32) for _ in range(n)]


def make_session(model: onnx.ModelProto, threads: int = 2) -> ort.InferenceSession:
    """An ONNX Runtime session with gate2deploy's custom ops registered when the model uses them."""
    uses_custom = any(n.domain == "gate2deploy" for n in model.graph.node)
    if uses_custom:
        from gate2deploy.runtimes import ort as g2d_ort  # built on demand; only when needed
        return g2d_ort.open_session(model, threads=threads)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def _torch_cpu_runner(torch_model: torch.nn.Module, input_name: str, input_shape, output_names: list[str]):
    """A Polygraphy runner for a PyTorch module on the CPU (Polygraphy's own PytRunner
    moves inputs to CUDA, which this project cannot assume)."""
    from polygraphy.backend.base import BaseRunner
    from polygraphy.common import TensorMetadata

    class TorchCpuRunner(BaseRunner):
        def activate_impl(self):
            pass

        def deactivate_impl(self):
            pass

        def get_input_metadata_impl(self):
            return TensorMetadata().add(input_name, np.float32, tuple(input_shape))

        def infer_impl(self, feed_dict):
            start = time.perf_counter()
            with torch.no_grad():
                out = torch_model(torch.from_numpy(feed_dict[input_name]))
            self.inference_time = time.perf_counter() - start  # Comparator sums it
            outs = out if isinstance(out, (tuple, list)) else (out,)
            return {n: o.numpy() for n, o in zip(output_names, outs)}

    return TorchCpuRunner(name="pytorch")


def verify(torch_model: torch.nn.Module, model: onnx.ModelProto, input_shape, n_inputs: int = 3,
           rtol: float = DEFAULT_RTOL, seed: int = 0) -> VerifyResult:
    from polygraphy.backend.onnxrt import OnnxrtRunner
    from polygraphy.comparator import Comparator
    from polygraphy.logger import G_LOGGER

    G_LOGGER.module_severity = G_LOGGER.ERROR
    input_name = model.graph.input[0].name
    output_names = [o.name for o in model.graph.output]
    runners = [_torch_cpu_runner(torch_model.eval(), input_name, input_shape, output_names),
               OnnxrtRunner(make_session(model), name="onnxruntime")]
    feeds = [{input_name: x} for x in random_inputs(input_shape, n_inputs, seed)]
    results = Comparator.run(runners, data_loader=feeds)
    (_, ref_iters), (_, got_iters) = results[0], results[1]
    max_abs, max_rel = 0.0, 0.0
    for ref, got in zip(ref_iters, got_iters):
        for name in output_names:
            r, g = np.asarray(ref[name], np.float64), np.asarray(got[name], np.float64)
            if r.shape != g.shape:
                return VerifyResult(float("inf"), float("inf"), rtol, n_inputs)
            abs_err = float(np.max(np.abs(r - g))) if r.size else 0.0
            scale = float(np.max(np.abs(r))) if r.size else 0.0
            max_abs = max(max_abs, abs_err)
            max_rel = max(max_rel, abs_err / scale if scale > 0 else abs_err)
    return VerifyResult(max_abs, max_rel, rtol, n_inputs)
