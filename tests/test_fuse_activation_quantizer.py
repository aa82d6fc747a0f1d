"""passes/fuse_activation_quantizer.py: the seed's activation quantizer chains of a PG
network become QuantizeActivation nodes for --target ort, with the same outputs bit for bit.

Expected values: the same exported model with those nodes expanded back into the standard
chain (passes/lower_portable.py, which the portable target uses) and the PyTorch model
(through the export's verification).
"""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

import gate2deploy
from gate2deploy import ops
from gate2deploy.gated import QuantizedConv2d
from gate2deploy.models.dnn_gating import resnet20_pg
from gate2deploy.passes import ir
from gate2deploy.passes.fuse_activation_quantizer import expand_quantizers
from gate2deploy.runtimes.ort import open_session


def _pg_resnet20(static_scale: float = 0.0):
    torch.manual_seed(0)
    model = resnet20_pg(wbits=8, abits=3, pred_bits=2).eval()
    if static_scale:
        for m in model.modules():
            if isinstance(m, QuantizedConv2d):
                m.static_scale = static_scale  # a calibrated scale: the chain's s is a constant
    return model


def _unfused(model):
    return ops.finalize(ir.export_model(expand_quantizers(ir.import_graph(model))))


@pytest.mark.parametrize("static_scale", [0.0, 1.5])
def test_pg_resnet20_quantizers_fuse_and_compute_the_chain_bit_for_bit(static_scale):
    model = _pg_resnet20(static_scale)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    compiled = gate2deploy.compile(model, x, target="ort")  # verified against PyTorch
    counts = Counter(n.op_type for n in compiled.onnx_model.graph.node)
    quantized = sum(isinstance(m, QuantizedConv2d) for m in model.modules())
    # Each conv2's quantizer follows its block's PGConv (BatchNorm, Relu, PACT's Min): it
    # then joins that node's epilogue (passes/fuse_gated_epilogue.py) with its attributes.
    quantizers = [{a.name.removeprefix("quantize_") for a in n.attribute}
                  for n in compiled.onnx_model.graph.node
                  if n.op_type == "QuantizeActivation" or any(a.name == "quantize_levels" for a in n.attribute)]
    assert len(quantizers) == quantized == 9 and counts["QuantizeActivation"] == 0
    assert counts["Sign"] == counts["Round"] == counts["ReduceMax"] == 0
    assert len(compiled.report["fused_quantizers"]) == 9
    assert all(("scale" in a) == bool(static_scale) and ("eps" in a) != bool(static_scale) for a in quantizers)
    unfused = _unfused(compiled.onnx_model)
    assert Counter(n.op_type for n in unfused.graph.node)["Sign"] == 9
    fused_s, unfused_s = open_session(compiled.onnx_model), open_session(unfused)
    for seed in range(3):
        xs = np.random.default_rng(seed).standard_normal((2, 3, 32, 32)).astype(np.float32)
        np.testing.assert_array_equal(fused_s.run(None, {"input": xs})[0], unfused_s.run(None, {"input": xs})[0])


def test_a_chain_whose_intermediate_is_read_elsewhere_stays():
    """If another node reads a tensor inside the chain (here: the scale, as a graph output),
    fusing would lose it: the chain is left as it is."""
    model = _pg_resnet20()
    x = torch.randn(1, 3, 32, 32)
    portable = gate2deploy.compile(model, x, target="onnx", verify=False).onnx_model
    from gate2deploy.passes.fuse_activation_quantizer import fuse_activation_quantizer

    graph = ir.import_graph(portable)
    # the scale of the first quantized conv's chain (the portable PGConv lowering has a
    # ReduceMax + Add of its own, not a quantizer chain)
    adds = [n for n in graph.nodes if n.op == "Add" and n.name.startswith("/layer1/layer1.0/conv2/")
            and any(i.inputs and i.inputs[0].op == "ReduceMax" for i in n.inputs)]
    assert len(adds) == 1
    graph.outputs.append(adds[0].outputs[0])
    fused = fuse_activation_quantizer(graph)
    assert len(fused) == 8  # the other eight chains
    assert any(n.op == "ReduceMax" for n in graph.nodes)
