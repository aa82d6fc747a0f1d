"""dnn-gating checkpoints (seed 001) load into gate2deploy.models.dnn_gating and export with
both lowerings; FBS ResNet-18 likewise.

The checkpoints are written here with the seed's key layout, produced from the layout itself
(not from gate2deploy's models): `net.state_dict()` of the seed's CIFAR ResNet-20, saved raw
as its `util.save_models` does, optionally with DataParallel's `module.` prefixes.

Equality: every gated layer, fed the exported model's own input of that layer, equals the
PyTorch layer within rtol 1e-4 of the layer's output scale except at flipped gates, which
must sit at ties (decision within 1e-5 * max|decision| of the threshold) and be at most
max(2, 0.1%) of the layer's gates (gate2deploy.gated_verify). CG and FBS networks' outputs
also agree within 1e-4 relative; PG networks' outputs are only reported, because a single
activation at a quantization rounding tie moves by a whole 3-bit level and later layers
amplify it (see gated_verify's docstring).
"""
from __future__ import annotations

from collections import Counter

import numpy as np
import onnxruntime as ort
import pytest
import torch

from gate2deploy.capture import capture
from gate2deploy.gate_stats import gate_statistics, onnx_gate_statistics
from gate2deploy.gated_verify import verify_gated_layers
from gate2deploy.loading import build_model, load_checkpoint, load_weights
from gate2deploy.ops import GATED_OPS
from gate2deploy.pipeline import PassContext, run_pipeline
from gate2deploy.runtimes.ort import open_session

STAGES = [(16, 1), (32, 2), (64, 2)]  # (planes, stride of the first block), 3 blocks each


def _bn(sd, key, c, g):
    sd[f"{key}.weight"] = torch.empty(c).uniform_(0.6, 1.4, generator=g)
    sd[f"{key}.bias"] = torch.empty(c).uniform_(-0.2, 0.2, generator=g)
    sd[f"{key}.running_mean"] = torch.empty(c).uniform_(-0.2, 0.2, generator=g)
    sd[f"{key}.running_var"] = torch.empty(c).uniform_(0.5, 2.0, generator=g)
    sd[f"{key}.num_batches_tracked"] = torch.tensor(100)


def _conv(o, i, k, g):
    return torch.randn(o, i, k, k, generator=g) * (2.0 / (i * k * k)) ** 0.5


def _cg_extras(sd, key, o, i, p, g):
    """CGConv2d keys: block-diagonal base-path mask (use_group), threshold, internal BN."""
    mask = torch.zeros(o, i, 3, 3)
    for c in range(p):
        mask[c * (o // p):(c + 1) * (o // p), c * (i // p):(c + 1) * (i // p)] = 1
    sd[f"{key}.mask"] = mask
    sd[f"{key}.threshold"] = torch.empty(1, o, 1, 1).uniform_(-0.3, 0.6, generator=g)
    sd[f"{key}.bn.running_mean"] = torch.empty(o).uniform_(-0.1, 0.1, generator=g)
    sd[f"{key}.bn.running_var"] = torch.empty(o).uniform_(0.05, 0.5, generator=g)
    sd[f"{key}.bn.num_batches_tracked"] = torch.tensor(100)


def seed_resnet20_state_dict(kind: str, p: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    """kind: "pg" (PGConv2d conv1 + QuantizedConv2d conv2, PACT), "cg" (CGConv2d conv1),
    "cg_postact" (CGConv2d conv1 and conv2)."""
    g = torch.Generator().manual_seed(seed)
    sd = {"conv1.weight": _conv(16, 3, 3, g)}
    _bn(sd, "bn1", 16, g)
    in_planes = 16
    for s, (planes, stride) in enumerate(STAGES, start=1):
        for b in range(3):
            key = f"layer{s}.{b}"
            sd[f"{key}.conv1.weight"] = _conv(planes, in_planes, 3, g)
            if kind == "pg":
                sd[f"{key}.conv1.threshold"] = torch.empty(1, planes, 1, 1).uniform_(-0.2, 0.5, generator=g)
            else:
                _cg_extras(sd, f"{key}.conv1", planes, in_planes, p, g)
            _bn(sd, f"{key}.bn1", planes, g)
            sd[f"{key}.conv2.weight"] = _conv(planes, planes, 3, g)
            if kind == "cg_postact":
                _cg_extras(sd, f"{key}.conv2", planes, planes, p, g)
            _bn(sd, f"{key}.bn2", planes, g)
            if kind == "pg":
                sd[f"{key}.relu.upper_bound"] = torch.tensor(3.0 + s)
            in_planes = planes
    sd["linear.weight"] = torch.randn(10, 64, generator=g) * 0.1
    sd["linear.bias"] = torch.zeros(10)
    if kind == "pg":
        sd["relu.upper_bound"] = torch.tensor(4.0)
    return sd


CASES = {
    "pg": ("gate2deploy.models.dnn_gating:resnet20_pg", '{"wbits": 8, "abits": 3, "pred_bits": 2}', "PGConv", 9),
    "cg": ("gate2deploy.models.dnn_gating:resnet20_cg", '{"partitions": 4, "shuffle": false}', "CGConv", 9),
    "cg_postact": ("gate2deploy.models.dnn_gating:resnet20_cg_postact", '{"partitions": 2, "shuffle": false}',
                   "CGConv", 18),
}


@pytest.mark.parametrize("kind", list(CASES))
@pytest.mark.parametrize("ddp", [False, True])
def test_seed_checkpoint_loads_and_exports_with_both_lowerings(tmp_path, kind, ddp):
    spec, kwargs, op, count = CASES[kind]
    sd = seed_resnet20_state_dict(kind, p=2 if kind == "cg_postact" else 4)
    if ddp:
        sd = {f"module.{k}": v for k, v in sd.items()}
    path = tmp_path / "model_best.pth"
    torch.save(sd, path)  # the seed's util.save_models saves net.state_dict() as is

    ckpt = load_checkpoint(path)
    model = build_model(spec, kwargs)
    load_weights(model, ckpt.state_dict, str(path))
    model.eval()
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    captured = capture(model, x)
    assert Counter(n.op_type for n in captured.graph.node if n.domain == "gate2deploy") == {op: count}

    ort_ctx = PassContext()
    ort_model = run_pipeline(captured, "ort", ort_ctx)
    assert Counter(n.op_type for n in ort_model.graph.node if n.domain == "gate2deploy"
                   and n.op_type in GATED_OPS) == {op: count}
    # Every gated conv is followed by its BatchNorm, fused into it (with the ReLU after conv1).
    assert len(ort_ctx.fused_epilogues) == count
    # PG: each block's quantized conv2 quantizes its input with the seed's quantizer, fused
    # into one QuantizeActivation node (passes/fuse_activation_quantizer.py)
    assert len(ort_ctx.fused_quantizers) == (count if op == "PGConv" else 0)
    gated_outputs = {n.output[0] for n in ort_model.graph.node if n.op_type in GATED_OPS}
    assert not [n for n in ort_model.graph.node
                if n.op_type == "BatchNormalization" and n.input[0] in gated_outputs]

    ctx = PassContext()
    portable = run_pipeline(captured, "onnx", ctx)
    assert not [n for n in portable.graph.node if n.domain]
    assert len(ctx.lowering.lowered) == count

    inputs = [x.numpy(), torch.randn(2, 3, 32, 32).numpy()]
    session = lambda proto: ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])  # noqa: E731
    result = verify_gated_layers(model, captured, portable, inputs, make_session=session)
    assert len(result.layers) == count
    assert result.passed, [vars(layer) for layer in result.layers if not layer.passed]
    for layer in result.layers:
        assert layer.gates > 0 and layer.max_abs_err_agreeing <= 1e-4 * max(layer.scale, 1.0)
    if kind != "pg":
        assert result.output_max_rel_err <= 1e-4, result.output_max_rel_err
    # The same per-layer check on the ort model (native kernels, fused epilogues): each fused
    # layer's output is compared with the PyTorch layer's output put through its BN (+ ReLU).
    native = verify_gated_layers(model, captured, ort_model, inputs)
    assert native.passed, [vars(layer) for layer in native.layers if not layer.passed]
    assert all(layer.gates > 0 for layer in native.layers)

    stats = gate_statistics(model, torch.from_numpy(inputs[0]))
    assert len(stats) == count and all(0.0 < s.gate_on_fraction < 1.0 for s in stats), \
        "the checkpoint's thresholds switch some gates on and some off"
    assert all(s.expected_macs < (2 if kind == "pg" else 1) * s.dense_macs for s in stats)
    onnx_stats = onnx_gate_statistics(captured, [inputs[0]])
    for a, b in zip(stats, onnx_stats):
        assert abs(a.gate_on_fraction - b.gate_on_fraction) <= 2e-3


def test_wrong_hyper_parameters_fail_with_a_clear_error(tmp_path):
    from gate2deploy.errors import UserError
    sd = seed_resnet20_state_dict("cg")
    model = build_model("gate2deploy.models.dnn_gating:resnet20_cg_postact", '{"partitions": 4, "shuffle": false}')
    with pytest.raises(UserError, match="does not fit the model"):
        load_weights(model, sd, "ckpt")


def test_fbs_resnet18_from_dense_weights_exports_with_both_lowerings():
    import torchvision

    from gate2deploy.importers.fbs import fbs_state_dict_from_dense
    from gate2deploy.models.fbs import fbs_resnet18

    dense = torchvision.models.resnet18(num_classes=10).eval()
    g = torch.Generator().manual_seed(0)
    for m in dense.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1, generator=g)
            m.running_var.uniform_(0.5, 1.5, generator=g)
            m.weight.data.uniform_(0.5, 1.5, generator=g)
            m.bias.data.uniform_(-0.1, 0.1, generator=g)
    sd = fbs_state_dict_from_dense(dense.state_dict())
    x = torch.randn(2, 3, 64, 64)
    # density 1 with a constant predictor is the dense model
    full = fbs_resnet18(num_classes=10, density=1.0).eval()
    load_weights(full, sd, "fbs")
    torch.testing.assert_close(full(x), dense(x), atol=1e-4, rtol=1e-4)
    # an input-dependent predictor at density 0.5
    model = fbs_resnet18(num_classes=10, density=0.5).eval()
    for name, t in sd.items():
        if name.endswith("gate.weight"):
            sd[name] = torch.randn(t.shape, generator=g) * 0.5 / t.shape[1] ** 0.5
    load_weights(model, sd, "fbs")
    captured = capture(model, x)
    assert Counter(n.op_type for n in captured.graph.node if n.domain == "gate2deploy") == {"FBSConv": 9}
    # --target ort: conv2 of each of the 8 blocks reads an FBS output -> SparseInputConv
    ctx = PassContext()
    compiled = run_pipeline(captured, "ort", ctx)
    assert Counter(n.op_type for n in compiled.graph.node
                   if n.domain == "gate2deploy") == {"FBSConv": 9, "SparseInputConv": 8}
    assert sorted(ctx.sparse_input_convs) == sorted(
        n.name for n in compiled.graph.node if n.op_type == "SparseInputConv")
    # ... each with its block's residual Add and ReLU fused in
    fused = [n for n in compiled.graph.node if n.op_type == "SparseInputConv"]
    assert all(len(n.input) == 4 and any(a.s == b"Relu" for a in n.attribute) for n in fused)
    assert Counter(n.op_type for n in compiled.graph.node)["Add"] == 0
    assert Counter(n.op_type for n in captured.graph.node)["Add"] == 8
    native = open_session(compiled).run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        expected = model(x).numpy()
    assert np.abs(native - expected).max() <= 1e-4 * np.abs(expected).max()
    assert Counter(n.op_type for n in run_pipeline(captured, "trt", PassContext()).graph.node
                   if n.domain == "gate2deploy") == {"FBSConv": 9}
    portable = run_pipeline(captured, "onnx", PassContext())
    session = lambda proto: ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])  # noqa: E731
    with torch.no_grad():
        assert torch.isfinite(model(x)).all()
    result = verify_gated_layers(model, captured, portable, [x.numpy()], make_session=session)
    assert result.passed and len(result.layers) == 9, [vars(v) for v in result.layers]
    assert result.output_max_rel_err <= 1e-4
    stats = gate_statistics(model, x)
    for s in stats:  # k = ceil(O/2) per sample, fewer where the saliency ties at 0 (ReLU)
        assert 0.25 < s.gate_on_fraction <= 0.5
    # layers after a gated layer see half of their input channels zero: MACs ~ dense * 0.5 * 0.5
    later = [s for s in stats if s.name != "conv1"]
    assert any(s.details["mean_in_x_out_density"] < 0.5 for s in later)
