"""The fold on real torchvision classification models (random weights, nothing downloaded),
and the passes it relies on for them: static shapes, channel Slice, channel shuffle,
LayerNorm, grouped convolutions, physical width padding.

Tolerance everywhere: max |ORT(folded) - masked PyTorch| / max |masked PyTorch| <= 1e-4 on
random normal inputs. Masks: random 50% on every BatchNorm output (or equivalent, see
tools/bench_fold_torchvision.py, which shares the model zoo and mask placement).
"""
import collections
import importlib.util
import sys
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
import torch
from onnx import numpy_helper
from torch import nn
from torchvision.models.shufflenetv2 import channel_shuffle

from fold_helpers import RTOL, macs, max_rel_err, ops
from gate2deploy import report
from gate2deploy.capture import capture
from gate2deploy.errors import UnfoldableError
from gate2deploy.nn import ChannelMask, MaskSpec, attach_masks
from gate2deploy.passes import ir
from gate2deploy.passes.canonicalize_channel_shuffle import canonicalize_channel_shuffle
from gate2deploy.passes.choose_widths import BLOCK, choose_padding
from gate2deploy.passes.cleanup import cleanup
from gate2deploy.passes.resolve_static_shapes import resolve_static_shapes
from gate2deploy.pipeline import PassContext, run_pipeline

_spec = importlib.util.spec_from_file_location(
    "bench_fold_torchvision", Path(__file__).parents[1] / "tools" / "bench_fold_torchvision.py")
zoo = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = zoo  # dataclasses look their module up there
_spec.loader.exec_module(zoo)


def _run(proto, policy="keep", choose_widths=False):
    ctx = PassContext(unfoldable_policy=policy, choose_widths=choose_widths)
    return run_pipeline(proto, "onnx", ctx), ctx.fold


def _initializers(model):
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}


def _conv_out_channels(model) -> dict[str, int]:
    inits = _initializers(model)
    return {n.name: inits[n.input[1]].shape[0] for n in model.graph.node
            if n.op_type == "Conv" and n.input[1] in inits}


def _layer_widths(model) -> dict[str, int]:
    return {name: layer.out_channels for name, layer in report.model_cost(model).layers.items()}


def _masked_layer_widths(proto) -> dict[str, int]:
    """Layer name -> kept channels, for every mask whose input comes from exactly one
    Conv/Gemm/MatMul through channel-wise ops (BN, activations, transposes)."""
    graph = cleanup(ir.import_graph(proto))
    out = {}
    for node in graph.nodes:
        if node.op != "ChannelMask":
            continue
        frontier, layers = [node.inputs[0]], set()
        for _ in range(8):
            upstream = []
            for t in frontier:
                producer = t.inputs[0] if t.inputs else None
                if producer is None:
                    continue
                if producer.op in ("Conv", "Gemm", "MatMul"):
                    layers.add(producer.name)
                elif producer.op in ("Concat", "Split", "Slice", "Gather"):
                    layers.add(None)  # several layers' channels: not one layer's width
                else:
                    upstream += [i for i in producer.inputs if isinstance(i, gs.Variable)]
            frontier = upstream
        if len(layers) == 1 and None not in layers:
            out[layers.pop()] = int(ir.const_value(node.inputs[1]).sum())
    return out


def _grouped_convs(proto) -> set[str]:
    return {n.name for n in proto.graph.node if n.op_type == "Conv"
            and any(a.name == "group" and a.i > 1 for a in n.attribute)}


# --------------------------------------------------------------------------------------
# Every listed family: exact, every mask folded, widths = kept channels
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(zoo.CASES))
def test_torchvision_model_folds_exactly(name):
    size = zoo.CASES[name].test_size
    prepared = zoo.prepare(name, size, coupled=True, small_head=True)
    shape = (1, 3, size, size)
    folded, result = _run(prepared.proto)
    assert max_rel_err(prepared.model, folded, shape) <= RTOL
    # Masks that agree inside their coupled groups are all folded: none left behind.
    assert result.unfoldable == []
    assert "ChannelMask" not in ops(folded)
    # MACs drop where the masks allow: each masked conv keeps exactly its kept channels
    # (grouped convs and their producers may keep padding for equal counts per group).
    widths = _layer_widths(folded)
    expected = _masked_layer_widths(prepared.proto)
    assert expected, "the zoo put no mask on a layer's output"
    grouped_related = bool(_grouped_convs(prepared.proto))
    for conv, kept in expected.items():
        if conv not in widths:
            assert kept == 0  # a fully masked layer becomes its constant
            continue
        assert widths[conv] >= kept
        if not grouped_related:
            assert widths[conv] == kept, conv
    assert macs(folded) < 0.75 * macs(prepared.proto)
    # The same with physical width padding: still exact, widths multiples of the block.
    padded, _ = _run(prepared.proto, choose_widths=True)
    assert max_rel_err(prepared.model, padded, shape, seeds=(2,)) <= RTOL
    assert "ChannelMask" not in ops(padded)
    full = _layer_widths(prepared.proto)
    block = BLOCK
    for conv, width in _layer_widths(padded).items():
        if conv in expected and conv in full and full[conv] >= block and not grouped_related:
            assert width % block == 0 or width == full[conv], (conv, width)


# --------------------------------------------------------------------------------------
# What cannot be folded is reported by node name and left dense
# --------------------------------------------------------------------------------------
def test_disagreeing_residual_masks_are_reported_and_kept():
    prepared = zoo.prepare("resnet18", 64, coupled=False)  # independent masks
    folded, result = _run(prepared.proto)
    assert max_rel_err(prepared.model, folded, (1, 3, 64, 64)) <= RTOL
    mask_nodes = {n.name for n in prepared.proto.graph.node if n.op_type == "ChannelMask"}
    reported = {u.node for u in result.unfoldable}
    assert reported and reported <= mask_nodes
    # The residual stream's masks (bn2 of each block, downsample BNs) disagree with each
    # other; the masks inside blocks (bn1) do not and are folded.
    sources = {u.source for u in result.unfoldable}
    assert all(".bn1" not in s for s in sources)
    assert any(".bn2" in s for s in sources)
    assert all("coupled" in u.reason for u in result.unfoldable)
    # Left in place as an exact Mul, one per reported mask; the rest still folded.
    assert ops(folded).count("Mul") == len(reported)
    assert macs(folded) < macs(prepared.proto)
    with pytest.raises(UnfoldableError, match="cannot fold mask"):
        _run(prepared.proto, policy="error")


def test_mask_before_layernorm_over_channels_is_reported():
    model = zoo.build_model("convnext_tiny").eval()
    mask = (torch.rand(96) < 0.5).float()
    attach_masks(model, [MaskSpec("features.0.1", "out", mask, "stem norm")])
    proto = capture(model, torch.randn(1, 3, 64, 64))
    folded, result = _run(proto)
    assert max_rel_err(model, folded, (1, 3, 64, 64)) <= RTOL
    assert len(result.unfoldable) == 1
    assert "LayerNormalization" in result.unfoldable[0].reason
    assert result.unfoldable[0].node in {n.name for n in proto.graph.node}


# --------------------------------------------------------------------------------------
# Passes and rules, one by one
# --------------------------------------------------------------------------------------
class Shuffle(nn.Module):
    def __init__(self, masked: bool):
        super().__init__()
        self.a = nn.Conv2d(3, 12, 3, padding=1)
        self.mask = ChannelMask((torch.arange(12) % 3 != 1).float()) if masked else nn.Identity()
        self.b = nn.Conv2d(12, 5, 1)

    def forward(self, x):
        return self.b(channel_shuffle(self.mask(torch.relu(self.a(x))), 3))


def test_channel_shuffle_becomes_one_gather():
    model = Shuffle(masked=False).eval()
    proto = capture(model, torch.randn(1, 3, 8, 8))
    graph = canonicalize_channel_shuffle(resolve_static_shapes(cleanup(ir.import_graph(proto))))
    kinds = [n.op for n in graph.nodes]
    assert "Transpose" not in kinds and kinds.count("Gather") == 1
    gather = next(n for n in graph.nodes if n.op == "Gather")
    assert gather.attrs["axis"] == 1
    assert ir.const_value(gather.inputs[1]).tolist() == [0, 4, 8, 1, 5, 9, 2, 6, 10, 3, 7, 11]
    assert max_rel_err(model, ir.export_model(graph), (1, 3, 8, 8)) <= RTOL


def test_other_transposes_are_not_taken_for_a_shuffle():
    class NotShuffle(nn.Module):
        def forward(self, x):  # swaps spatial axes inside the 5-D view: not a shuffle
            n, c, h, w = x.shape
            return x.view(n, 2, c // 2, h, w).transpose(3, 4).reshape(n, c, w, h)
    proto = capture(NotShuffle(), torch.randn(1, 4, 3, 5))
    graph = canonicalize_channel_shuffle(cleanup(ir.import_graph(proto)))
    assert "Gather" not in [n.op for n in graph.nodes]


def test_masked_channel_shuffle_folds():
    model = Shuffle(masked=True).eval()
    proto = capture(model, torch.randn(1, 3, 8, 8))
    folded, result = _run(proto, policy="error")
    assert max_rel_err(model, folded, (1, 3, 8, 8)) <= RTOL
    assert _conv_out_channels(folded)[next(n.name for n in proto.graph.node if n.op_type == "Conv")] == 8


class Chunked(nn.Module):
    """ShuffleNetV2's split: chunk along channels, each half masked differently."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 16, 3, padding=1)
        self.mask = ChannelMask(torch.tensor([1, 0, 1, 1, 0, 0, 1, 0, 0, 1, 1, 1, 0, 1, 0, 0.]))
        self.b1, self.b2 = nn.Conv2d(8, 4, 1), nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x):
        left, right = self.mask(self.a(x)).chunk(2, dim=1)
        return torch.cat([self.b1(left), self.b2(right)], 1)


def test_chunk_becomes_constant_slices_and_folds():
    model = Chunked().eval()
    proto = capture(model, torch.randn(1, 3, 8, 8))
    assert "Shape" in ops(proto)  # the exporter computes the chunk bounds at run time
    graph = resolve_static_shapes(cleanup(ir.import_graph(proto)))
    slices = [n for n in graph.nodes if n.op == "Slice"]
    assert "Shape" not in [n.op for n in graph.nodes] and len(slices) == 2
    assert all(ir.const_value(t) is not None for n in slices for t in n.inputs[1:])
    folded, result = _run(proto, policy="error")
    assert max_rel_err(model, folded, (1, 3, 8, 8)) <= RTOL
    widths = sorted(_conv_out_channels(folded).values())
    assert widths == [4, 4, 8]  # the producer keeps its 8 live channels
    inits = _initializers(folded)
    assert sorted(inits[n.input[1]].shape[1] for n in folded.graph.node if n.op_type == "Conv") == [3, 4, 4]


def test_resolve_static_shapes_leaves_shape_free_graphs_alone():
    proto = capture(nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU()).eval(), torch.randn(1, 3, 4, 4))
    graph = cleanup(ir.import_graph(proto))
    assert resolve_static_shapes(graph) is graph


class Grouped(nn.Module):
    def __init__(self, in_mask, out_mask):
        super().__init__()
        self.a = nn.Conv2d(3, 16, 1)
        self.in_mask = ChannelMask(in_mask)
        self.g = nn.Conv2d(16, 8, 3, padding=1, groups=4)
        self.out_mask = ChannelMask(out_mask)
        self.b = nn.Conv2d(8, 5, 1)

    def forward(self, x):
        return self.b(torch.relu(self.out_mask(self.g(torch.relu(self.in_mask(self.a(x)))))))


def test_grouped_conv_with_equal_counts_per_group_is_sliced():
    in_mask = torch.tensor([1, 0, 1, 0] * 4).float()  # 2 of 4 in every group
    out_mask = torch.tensor([0, 1] * 4).float()  # 1 of 2 in every group
    model = Grouped(in_mask, out_mask).eval()
    folded, result = _run(capture(model, torch.randn(1, 3, 8, 8)), policy="error")
    assert max_rel_err(model, folded, (1, 3, 8, 8)) <= RTOL
    inits = _initializers(folded)
    conv = next(n for n in folded.graph.node if n.name in _grouped_convs(folded))
    assert inits[conv.input[1]].shape[:2] == (4, 2)
    assert next(a.i for a in conv.attribute if a.name == "group") == 4


@pytest.mark.parametrize("seed", range(6))
def test_grouped_conv_with_random_masks_pads_groups_exactly(seed):
    g = torch.Generator().manual_seed(seed)
    in_mask = (torch.rand(16, generator=g) < 0.5).float()
    out_mask = (torch.rand(8, generator=g) < 0.5).float()
    model = Grouped(in_mask, out_mask).eval()
    torch.nn.init.normal_(model.a.bias, 0, 1)  # masked channels become live constants too
    folded, result = _run(capture(model, torch.randn(1, 3, 8, 8)), policy="error")
    assert result.unfoldable == []
    assert max_rel_err(model, folded, (1, 3, 8, 8)) <= RTOL
    inits = _initializers(folded)
    conv = next(n for n in folded.graph.node if n.name in _grouped_convs(folded))
    per_group_in = in_mask.view(4, 4).sum(1)
    assert inits[conv.input[1]].shape[1] == max(int(per_group_in.max()), 1) or not in_mask.any()


def test_width_padding_is_exact_and_rounds_to_the_block():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.BatchNorm2d(64), ChannelMask((torch.rand(64) < 0.4).float()),
                          nn.ReLU(), nn.Conv2d(64, 48, 3, padding=1), ChannelMask((torch.rand(48) < 0.6).float()),
                          nn.Sigmoid(),  # sigmoid(0) = 0.5: padding channels carry a non-zero constant
                          nn.Conv2d(48, 7, 1)).eval()
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1)
    proto = capture(model, torch.randn(1, 3, 8, 8))
    plain, _ = _run(proto, policy="error")
    padded, _ = _run(proto, policy="error", choose_widths=True)
    assert max_rel_err(model, padded, (1, 3, 8, 8)) <= RTOL
    assert "ChannelMask" not in ops(padded) and "Mul" not in ops(padded)
    for width in list(_conv_out_channels(padded).values())[:2]:
        assert width % BLOCK == 0
    assert macs(plain) < macs(padded) <= macs(proto)


def test_choose_padding_only_names_removable_channels():
    from gate2deploy.passes.channel_analysis import analyze
    model = nn.Sequential(nn.Conv2d(3, 40, 1), ChannelMask((torch.arange(40) % 4 == 0).float()), nn.Conv2d(40, 3, 1))
    graph = cleanup(ir.import_graph(capture(model.eval(), torch.randn(1, 3, 4, 4))))
    ana = analyze(graph)
    first = next(n for n in graph.nodes if n.op == "Conv")
    roots = ana.roots_of(first.outputs[0].name)
    removable = set(roots[np.arange(40) % 4 != 0].tolist())
    padding = choose_padding(ana, removable, block=8)
    assert padding <= removable
    assert len(padding) == 16 - 10  # 10 kept, rounded up to 16


def test_union_find_roots_follow_later_unions():
    from gate2deploy.passes.channel_analysis import UnionFind
    uf = UnionFind()
    a, b = uf.fresh(3), uf.fresh(3)
    assert uf.roots(b).tolist() == b.tolist()  # cached table ...
    uf.union(int(a[1]), int(b[2]))
    uf.union(int(b[2]), int(b[0]))
    assert uf.roots(b).tolist() == [a[1], b[1], a[1]]  # ... refreshed after a union
    c = uf.fresh(2)
    assert uf.roots(np.concatenate([a, c])).tolist() == [*a.tolist(), *c.tolist()]


def _ort_optimized_ops(model) -> collections.Counter:
    """Op kinds of the graph ONNX Runtime actually runs (CPU, all optimisations)."""
    import tempfile

    import onnxruntime as ort
    with tempfile.TemporaryDirectory() as tmp:
        opts = ort.SessionOptions()
        opts.optimized_model_filepath, opts.log_severity_level = f"{tmp}/opt.onnx", 3
        ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        return collections.Counter(f"{n.domain}:{n.op_type}" for n in onnx.load(f"{tmp}/opt.onnx").graph.node)


@pytest.mark.parametrize("name", ["resnext50_32x4d", "regnet_y_400mf", "mobilenet_v2"])
def test_padded_widths_keep_ort_fusions_and_blocked_kernels(name):
    """With physical width padding, ONNX Runtime fuses and blocks the folded model at least
    as well as the dense one: no more unblocked convs (`FusedConv`/plain `Conv`: im2col
    kernels), and no activation or residual Add left unfused."""
    size = zoo.CASES[name].test_size
    prepared = zoo.prepare(name, size)
    padded, _ = _run(prepared.proto, choose_widths=True)
    dense = _ort_optimized_ops(capture(zoo.build_model(name), torch.randn(1, 3, size, size)))
    folded = _ort_optimized_ops(padded)
    for kind in ("com.microsoft:FusedConv", ":Conv", ":Relu", ":Add", ":Clip"):
        assert folded[kind] <= dense[kind], (kind, folded[kind], dense[kind])
    assert folded["com.microsoft.nchwc:Conv"] >= dense["com.microsoft.nchwc:Conv"]
