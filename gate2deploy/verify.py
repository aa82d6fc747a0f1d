"""Verification: the exported ONNX model must reproduce the (masked/gated) PyTorch model.

Both are run by Polygraphy's Comparator (PyTorch runner vs an ONNX Runtime runner built by
us, so custom-op libraries can be registered) on the same random inputs drawn from a normal
distribution (negative values included: a gate or ReLU bug must not hide behind [0, 1)
inputs). The error measure is normwise: max|onnx - torch| / max|torch| per output, which
stays meaningful where individual outputs are near zero. The default tolerance 1e-4 is the
contract for folded models (float reassociation in smaller layers and fused BN, nothing
more); a mismatch fails the export.

Non-finite values (NaN is never "equal"): an element where the reference (PyTorch) is finite
and the exported model is not, or the reverse, or where both are non-finite but differ (NaN vs
inf, or infs of opposite sign), is a mismatch and fails verification outright (error inf); an
element that is NaN in both, or the same inf in both, agrees. The errors are measured over the
elements finite in both (`compare_outputs`), so a NaN can never vanish into a maximum. A
PyTorch model that itself produces non-finite outputs on the verification inputs is refused
(`NonFiniteReference`, a UserError) unless the caller allows it (`export --allow-nonfinite`):
such outputs certify nothing about the exported model.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
import torch

from . import ops
from .compare import OutputComparison, compare_outputs, nonfinite_agree, nonfinite_mismatch  # noqa: F401
from .errors import UserError

DEFAULT_RTOL = 1e-4


class NonFiniteReference(UserError):
    """The PyTorch model's own outputs are not finite on the verification inputs."""


@dataclass
class VerifyResult:
    max_abs_err: float
    max_rel_err: float
    rtol: float
    n_inputs: int
    nonfinite_mismatches: int = 0  # elements non-finite on one side only (or different)
    reference_nonfinite: int = 0   # NaN / inf elements in the PyTorch outputs

    @property
    def passed(self) -> bool:
        return (self.nonfinite_mismatches == 0 and bool(np.isfinite(self.max_rel_err))
                and self.max_rel_err <= self.rtol)


def random_inputs(shape, n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(shape).astype(np.float32) for _ in range(n)]


def make_session(model: onnx.ModelProto, threads: int = 2, spinning: bool = True) -> ort.InferenceSession:
    """An ONNX Runtime session with gate2deploy's custom ops registered when the model uses
    them. `spinning=False` stops the intra-op workers from spinning between ops and after a
    run (ONNX Runtime's default is to spin): the setting of hosts that cannot spare the cores
    (gate2deploy/benchmark.py times both)."""
    from gate2deploy.runtimes.ort import open_session  # the library is built only when the model needs it
    config = {} if spinning else {"session.intra_op.allow_spinning": "0"}
    return open_session(model, threads=threads, config=config)


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


def verify(torch_model: torch.nn.Module, model: onnx.ModelProto, inputs: list[np.ndarray],
           rtol: float = DEFAULT_RTOL) -> VerifyResult:
    """Run both models on `inputs` (arrays of the model's input shape) and measure the
    normwise error of every output."""
    from polygraphy.backend.onnxrt import OnnxrtRunner
    from polygraphy.comparator import Comparator
    from polygraphy.logger import G_LOGGER

    G_LOGGER.module_severity = G_LOGGER.ERROR
    input_name = model.graph.input[0].name
    output_names = [o.name for o in model.graph.output]
    runners = [_torch_cpu_runner(torch_model.eval(), input_name, inputs[0].shape, output_names),
               OnnxrtRunner(make_session(model), name="onnxruntime")]
    feeds = [{input_name: x} for x in inputs]
    results = Comparator.run(runners, data_loader=feeds)
    (_, ref_iters), (_, got_iters) = results[0], results[1]
    # Every error below is a number or inf, never NaN (compare_outputs), so max() is safe.
    result = VerifyResult(0.0, 0.0, rtol, len(inputs))
    for ref, got in zip(ref_iters, got_iters):
        for name in output_names:
            r, g = np.asarray(ref[name]), np.asarray(got[name])
            if r.shape != g.shape:
                return VerifyResult(float("inf"), float("inf"), rtol, len(inputs))
            c = compare_outputs(r, g)
            result.max_abs_err = max(result.max_abs_err, c.max_abs_err)
            result.max_rel_err = max(result.max_rel_err, c.max_rel_err)
            result.nonfinite_mismatches += c.nonfinite_mismatches
            result.reference_nonfinite += c.reference_nonfinite
    return result


@dataclass
class ExportCheck:
    """Everything verification found about one export. `passed` decides the export."""

    output: VerifyResult
    gated: dict | None  # layer-wise gate check of CG/PG/FBS layers (gated_verify), if any
    passed: bool

    def summary(self) -> str:
        text = (f"max abs err {self.output.max_abs_err:.3g}, max rel err {self.output.max_rel_err:.3g} "
                f"(tolerance {self.output.rtol:g})")
        if self.output.nonfinite_mismatches:
            text += f"; {self.output.nonfinite_mismatches} NaN/inf outputs not matching PyTorch"
        if self.output.reference_nonfinite:
            text += f"; PyTorch itself gives {self.output.reference_nonfinite} NaN/inf outputs"
        if self.gated is not None:
            text += f"; gated layers: {self.gated['flipped_gates']} flipped gates" + (
                " (all at ties)" if self.passed else " (NOT only at ties)")
        return text


def check_export(torch_model: torch.nn.Module, captured: onnx.ModelProto, compiled: onnx.ModelProto,
                 input_shape, rtol: float = DEFAULT_RTOL, samples: list[np.ndarray] | None = None,
                 allow_nonfinite: bool = False, twins: onnx.ModelProto | None = None) -> ExportCheck:
    """Verify a compiled model against PyTorch (`twins`: see gated_verify.verify_gated_layers).

    Static folds: the output-level normwise error must be <= rtol. Dynamic gates (CG, PG, FBS)
    are discontinuous: a gate decided on the other side of its threshold by float rounding
    (a tie) legitimately changes an output, and with PG one activation at a rounding tie moves
    a whole quantization level that later layers amplify. So for models with gated layers the
    decisive check is layer by layer (`gated_verify`): each gated layer, fed the exported
    model's own input, must agree within rtol, with flipped gates only at ties and rare. The
    output-level error is still measured and reported.

    A PyTorch model with non-finite outputs on the inputs raises NonFiniteReference unless
    `allow_nonfinite`; then its NaN / inf must be matched element for element.
    """
    inputs = samples if samples else random_inputs(input_shape, 3)
    output = verify(torch_model, compiled, inputs, rtol=rtol)
    if output.reference_nonfinite and not allow_nonfinite:
        raise NonFiniteReference(
            f"the PyTorch model itself produces {output.reference_nonfinite} NaN/inf output "
            f"values on the verification inputs (NaN or inf weights?); nothing verified, nothing "
            f"written (--allow-nonfinite exports it anyway, NaN/inf matched element for element)")
    has_gates = any(n.domain == ops.DOMAIN and n.op_type != "ChannelMask" for n in captured.graph.node)
    if not has_gates:
        return ExportCheck(output, None, output.passed)
    from .gated_verify import verify_gated_layers
    gated = verify_gated_layers(torch_model, captured, compiled, inputs, rtol=rtol, twins=twins)
    # A gate flipped at a tie moves finite values only: a NaN/inf where PyTorch has none (or the
    # reverse) fails the export even when every gated layer agrees (it came from elsewhere).
    return ExportCheck(output, gated.as_dict(), gated.passed and output.nonfinite_mismatches == 0)
