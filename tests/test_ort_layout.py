"""The session-time layout pass (runtimes/ort_layout.py): an FBS network opened by
`open_session` runs its FBSConv / SparseInputConv layers in ONNX Runtime's blocked layout,
with the same outputs bit for bit as the NCHW session ONNX Runtime makes of the same model,
and without the conversions the pass removes.

Expected values: the NCHW session of the same exported model (the kernel tests in
test_native_ops.py check each op against the reference in both layouts) and the PyTorch
module, which the export's verification already compares within tolerance.
"""
from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import pytest
import torch

import gate2deploy
from gate2deploy.runtimes.ort import custom_ops_library_path, open_session
from gate2deploy.runtimes.ort_layout import BLOCKED_OPS, NCHWC_DOMAIN, nchwc_block, rewrite

BLOCK = nchwc_block(custom_ops_library_path())
pytestmark = pytest.mark.skipif(BLOCK == 0, reason="no NCHWc layout on this CPU")


def _fbs_resnet18_export(density: float, seed: int):
    """An FBS ResNet-18 (10 classes) at `density` with input-dependent saliency (random
    predictor and BatchNorm, as a trained one differs per input), exported for --target ort:
    (the PyTorch module, the ONNX model)."""
    import torchvision

    from gate2deploy.importers.fbs import fbs_state_dict_from_dense
    from gate2deploy.loading import load_weights
    from gate2deploy.models.fbs import fbs_resnet18
    from models.cifar_nets import randomize_batchnorm

    # BN scales around 1 (the FBS saliency of a dense ResNet: torchvision's all-ones would tie)
    dense = randomize_batchnorm(torchvision.models.resnet18(num_classes=10), seed=0, gamma_mean=1.0,
                                gamma_std=0.25)
    sd = fbs_state_dict_from_dense(dense.state_dict())
    g = torch.Generator().manual_seed(seed)
    for name, t in sd.items():
        if name.endswith("gate.weight"):
            sd[name] = torch.randn(t.shape, generator=g) * 0.5 / t.shape[1] ** 0.5
    model = fbs_resnet18(num_classes=10, density=density).eval()
    load_weights(model, sd, "fbs")
    x = torch.randn(1, 3, 64, 64, generator=g)
    return model, gate2deploy.compile(model, x, target="ort").onnx_model


@pytest.fixture(scope="module")
def fbs_export():
    """The FBS ResNet-18 at density 0.5."""
    return _fbs_resnet18_export(0.5, seed=0)


def _optimized(model, tmp_path, layout):
    path = tmp_path / f"{layout}.onnx"
    session = open_session(model, threads=2, layout=layout, optimized_path=str(path))
    return session, onnx.load(str(path))


def test_fbs_network_runs_blocked_with_the_nchw_outputs(fbs_export, tmp_path):
    torch_model, model = fbs_export
    blocked, graph_b = _optimized(model, tmp_path, "auto")
    nchw, graph_n = _optimized(model, tmp_path, "nchw")
    rng = np.random.default_rng(1)
    for _ in range(3):  # inputs whose active channels differ
        x = rng.standard_normal((1, 3, 64, 64)).astype(np.float32)
        y_b = blocked.run(None, {"input": x})[0]
        np.testing.assert_array_equal(y_b, nchw.run(None, {"input": x})[0])
        with torch.no_grad():
            y_t = torch_model(torch.from_numpy(x)).numpy()
        assert np.abs(y_b - y_t).max() <= 1e-3 * np.abs(y_t).max()
    ops = [n for n in graph_b.graph.node if n.domain == "gate2deploy" and n.op_type in BLOCKED_OPS]
    assert len(ops) == 17  # 9 FBSConv + 8 SparseInputConv
    blocks = {n.name: {a.name: a.i for a in n.attribute if a.name.endswith("_block")} for n in ops}
    assert all(b.get("output_block") == BLOCK for b in blocks.values()), blocks
    # every layer but the stem (its input is the 3-channel image) reads X blocked
    assert [name for name, b in blocks.items() if b.get("input_block") != BLOCK] == ["/conv1/FBSConv"]
    reorders = {g: sum(n.domain == NCHWC_DOMAIN and n.op_type.startswith("Reorder") for n in m.graph.node)
                for g, m in (("blocked", graph_b), ("nchw", graph_n))}
    assert reorders["blocked"] < reorders["nchw"], reorders


def test_the_pass_leaves_a_single_op_as_it_is(fbs_export):
    """One FBSConv between the graph's NCHW input and output: blocking it would only move its
    conversion into a ReorderOutput, so `rewrite` declines."""
    _, model = fbs_export
    node = next(n for n in model.graph.node if n.op_type == "FBSConv" and n.name != "/conv1/FBSConv")
    inits = {i.name: i for i in model.graph.initializer}
    single = onnx.helper.make_model(
        onnx.helper.make_graph([node], "one", [onnx.helper.make_tensor_value_info(node.input[0], 1, None)],
                               [onnx.helper.make_tensor_value_info(node.output[0], 1, None)],
                               [inits[i] for i in node.input[1:] if i in inits]),
        opset_imports=list(model.opset_import))
    assert rewrite(single, BLOCK) is None
    assert Counter(n.op_type for n in rewrite(model, BLOCK).graph.node)["ReorderOutput"] >= 1


def test_a_failing_layout_step_leaves_the_session_as_onnx_runtime_makes_it(fbs_export, monkeypatch, caplog):
    """Writing ONNX Runtime's optimized graph can fail (a model over protobuf's 2 GB): the
    session then opens in ONNX Runtime's own layout, with the same outputs, and the failure
    is logged (one line naming it)."""
    from gate2deploy.runtimes import ort as ort_runtime

    def fail(*args, **kwargs):
        raise RuntimeError("cannot save the optimized model")

    _, model = fbs_export
    monkeypatch.setattr(ort_runtime, "optimized_and_rewritten", fail)
    x = np.random.default_rng(2).standard_normal((1, 3, 64, 64)).astype(np.float32)
    with caplog.at_level("WARNING", logger="gate2deploy.runtimes.ort"):
        fallback = ort_runtime.open_session(model, threads=1)
    assert [r.getMessage() for r in caplog.records] == [
        "blocked layout not used, ONNX Runtime lays the model out: cannot save the optimized model"]
    np.testing.assert_array_equal(fallback.run(None, {"input": x})[0],
                                  open_session(model, threads=1, layout="nchw").run(None, {"input": x})[0])


def test_another_library_build_runs_the_blocked_network(fbs_export, tmp_path):
    """open_session(library=...) (the benchmarks' --baseline-library) registers that build of
    the native library, and lays the network out for it, instead of this checkout's: a copy at
    another path is a separate library instance, so its own counter of blocked-layout samples
    counts the runs and this checkout's stays where it was; the outputs are the same."""
    import ctypes
    import shutil

    _, model = fbs_export
    copy = tmp_path / "libgate2deploy_copy.so"
    shutil.copy(custom_ops_library_path(), copy)
    counters = {}
    for name, path in (("this", custom_ops_library_path()), ("copy", copy)):
        counters[name] = ctypes.CDLL(str(path)).G2DBlockedLayoutRuns
        counters[name].restype = ctypes.c_int64
    before = {name: counter() for name, counter in counters.items()}
    x = np.random.default_rng(3).standard_normal((1, 3, 64, 64)).astype(np.float32)
    y_copy = open_session(model, threads=1, library=copy).run(None, {"input": x})[0]
    assert counters["copy"]() - before["copy"] == 17  # every FBSConv and SparseInputConv, blocked
    assert counters["this"]() == before["this"]
    np.testing.assert_array_equal(y_copy, open_session(model, threads=1).run(None, {"input": x})[0])


@pytest.fixture(scope="module")
def fbs_dense_export():
    """The FBS ResNet-18 at density 1 (every output active in every sample: the blocked convs
    read every input channel)."""
    return _fbs_resnet18_export(1.0, seed=3)


def test_a_batch_of_dense_samples_shares_the_delegate_calls_with_the_same_bits(fbs_dense_export):
    """At density 1 the blocked FBSConv / SparseInputConv of consecutive samples run as one
    batch of ONNX Runtime's NCHWc conv (SubsetConv::RunBlockedSamples). Expected values, bit for
    bit: each sample run alone in the same session (one sample per delegate call), and the NCHW
    session (per-sample planes, another code path); a NaN sample in the middle splits the batch
    (it takes the reference path alone) and leaves the others' bits as they are."""
    import ctypes

    torch_model, model = fbs_dense_export
    batched = ctypes.CDLL(str(custom_ops_library_path())).G2DBatchedBlockedRuns
    batched.restype = ctypes.c_int64
    blocked = open_session(model, threads=2)
    nchw = open_session(model, threads=2, layout="nchw")
    x = np.random.default_rng(5).standard_normal((5, 3, 64, 64)).astype(np.float32)
    x[2, 1, 7, 9] = np.nan
    before = batched()
    y = blocked.run(None, {"input": x})[0]
    assert batched() - before >= 2 * 17, "no layer ran its samples as a batch"
    alone = np.concatenate([blocked.run(None, {"input": x[i:i + 1]})[0] for i in range(5)])
    np.testing.assert_array_equal(y, alone)
    np.testing.assert_array_equal(y, nchw.run(None, {"input": x})[0])
    assert np.isnan(y[2]).all() and np.isfinite(y[[0, 1, 3, 4]]).all()
    with torch.no_grad():
        y_t = torch_model(torch.from_numpy(x[[0, 1, 3, 4]])).numpy()
    assert np.abs(y[[0, 1, 3, 4]] - y_t).max() <= 1e-3 * np.abs(y_t).max()
