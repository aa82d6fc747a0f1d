"""Shared by the fold tests: compile a PyTorch model with the fold pipeline and compare."""
import numpy as np
import onnxruntime as ort
import torch

from gate2deploy import report
from gate2deploy.capture import capture
from gate2deploy.pipeline import PassContext, run_pipeline
from nan_compare import normwise_error

RTOL = 1e-4  # normwise: max|onnx - torch| / max|torch|


def fold(model, shape, policy="error"):
    model = model.eval()
    captured = capture(model, torch.randn(shape))
    ctx = PassContext(unfoldable_policy=policy)
    return captured, run_pipeline(captured, "onnx", ctx), ctx.fold


def max_rel_err(model, onnx_model, shape, seeds=(0, 1)):
    sess = ort.InferenceSession(onnx_model.SerializeToString(), providers=["CPUExecutionProvider"])
    worst = 0.0
    for seed in seeds:
        x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
        with torch.no_grad():
            ref = model(torch.from_numpy(x)).numpy().astype(np.float64)
        got = sess.run(None, {sess.get_inputs()[0].name: x})[0].astype(np.float64)
        assert got.shape == ref.shape
        worst = max(worst, normwise_error(got, ref))  # inf, never NaN, for unmatched NaN/inf
    return worst


def macs(model_proto):
    return report.model_cost(model_proto).macs


def ops(model_proto):
    return [n.op_type for n in model_proto.graph.node]
