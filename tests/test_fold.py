"""The fold pass on targeted cases: each checks equality with PyTorch and the structure."""
import numpy as np
import onnx
import pytest
import torch
from fold_helpers import RTOL, fold, macs, max_rel_err, ops
from models.cifar_nets import randomize_batchnorm
from onnx import numpy_helper
from torch import nn

from gate2deploy.capture import capture
from gate2deploy.errors import UnfoldableError
from gate2deploy.nn import ChannelMask, HardChannelGate
from gate2deploy.passes.cleanup import cleanup
from gate2deploy.passes.ir import export_model, import_graph


def cbr(cin, cout, k=3, groups=1):
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU())


def randomize(model, seed=0):
    return randomize_batchnorm(model, seed, gamma_mean=1.0, gamma_std=0.3, beta_std=0.3)


def mask(n, zeros):
    m = torch.ones(n)
    m[list(zeros)] = 0
    return ChannelMask(m)


def test_no_mask_is_an_exact_no_op():
    model = randomize(nn.Sequential(cbr(3, 8), cbr(8, 16), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5)))
    captured, folded, result = fold(model, (1, 3, 16, 16))
    baseline = export_model(cleanup(import_graph(captured)))
    assert ops(folded) == ops(baseline)
    init = lambda m: {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}  # noqa: E731
    a, b = init(baseline), init(folded)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert result.removed_channels == 0


def test_masked_chain_is_sliced_and_exact():
    model = randomize(nn.Sequential(cbr(3, 8), mask(8, [1, 4, 5]), cbr(8, 16), mask(16, range(8)),
                                    nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5)))
    captured, folded, result = fold(model, (2, 3, 16, 16))
    assert "ChannelMask" not in ops(folded)
    shapes = [numpy_helper.to_array(i).shape for i in folded.graph.initializer if i.dims and len(i.dims) == 4]
    assert sorted(s[:2] for s in shapes) == [(5, 3), (8, 5)]
    assert max_rel_err(model, folded, (2, 3, 16, 16)) <= RTOL
    assert result.removed_channels == 3 + 8


@pytest.mark.parametrize("consumer_k", [1, 3])
def test_constant_channel_from_zero_gamma_is_folded_into_the_consumer(consumer_k):
    """gamma = 0, beta != 0: the channel is the constant relu(beta), not zero. Through a 1x1
    consumer it folds into the bias; through a zero-padded 3x3 into an exact bias map."""
    model = randomize(nn.Sequential(cbr(3, 8), cbr(8, 6, k=consumer_k), nn.Flatten(), nn.Linear(6 * 64, 4)))
    bn = model[0][1]
    bn.weight.data[[2, 6]] = 0
    bn.bias.data[[2, 6]] = torch.tensor([0.7, 1.3])  # relu keeps them: constants 0.7 and 1.3
    captured, folded, result = fold(model, (1, 3, 8, 8))
    assert result.removed_channels == 2
    assert result.constant_folds == ["/1/1.0/Conv"]
    assert ("Add" in ops(folded)) == (consumer_k == 3)
    assert macs(folded) < macs(captured)
    assert max_rel_err(model, folded, (1, 3, 8, 8)) <= RTOL


def test_negative_constant_channel_is_zero_after_relu_and_removed_without_bias_change():
    model = randomize(nn.Sequential(cbr(3, 8), cbr(8, 6)))
    model[0][1].weight.data[3] = 0
    model[0][1].bias.data[3] = -0.5
    _, folded, result = fold(model, (1, 3, 8, 8))
    assert result.removed_channels == 1 and result.constant_folds == []
    assert max_rel_err(model, folded, (1, 3, 8, 8)) <= RTOL


class ResidualWithGatedBranch(nn.Module):
    def __init__(self, branch_mask):
        super().__init__()
        self.stem = cbr(3, 8)
        self.branch = nn.Sequential(cbr(8, 12), ChannelMask(branch_mask), cbr(12, 8))
        self.head = nn.Conv2d(8, 3, 1)

    def forward(self, x):
        x = self.stem(x)
        return self.head(torch.relu(x + self.branch(x)))


def test_fully_masked_branch_is_removed_and_its_constant_kept():
    model = randomize(ResidualWithGatedBranch(torch.zeros(12)))
    captured, folded, result = fold(model, (1, 3, 8, 8))
    assert result.removed_layers == ["/branch/branch.2/branch.2.0/Conv"]
    assert ops(folded).count("Conv") == 2  # stem and head remain
    assert max_rel_err(model, folded, (1, 3, 8, 8)) <= RTOL


def test_depthwise_follows_its_input_channels():
    model = randomize(nn.Sequential(cbr(3, 8), mask(8, [0, 3]), cbr(8, 8, groups=8), cbr(8, 4, k=1)))
    _, folded, result = fold(model, (1, 3, 8, 8))
    dw = next(n for n in folded.graph.node if n.op_type == "Conv" and any(a.name == "group" and a.i > 1 for a in n.attribute))
    assert next(a.i for a in dw.attribute if a.name == "group") == 6
    assert max_rel_err(model, folded, (1, 3, 8, 8)) <= RTOL


@pytest.mark.parametrize("zeros,kept_in", [([0, 5], 6), ([0, 1], 8)])
def test_grouped_conv_keeps_equal_channel_counts_per_group(zeros, kept_in):
    """groups=2 over 8 channels: masking one channel in each group slices both groups to 3;
    masking two in one group pads it back to the other group's 4 (zero reads, exact)."""
    model = randomize(nn.Sequential(cbr(3, 8), mask(8, zeros), cbr(8, 8, groups=2)))
    _, folded, result = fold(model, (1, 3, 8, 8))
    grouped = next(n for n in folded.graph.node if n.op_type == "Conv"
                   and any(a.name == "group" and a.i == 2 for a in n.attribute))
    weight = next(numpy_helper.to_array(i) for i in folded.graph.initializer if i.name == grouped.input[1])
    assert weight.shape[1] * 2 == kept_in
    assert "ChannelMask" not in ops(folded) and not result.unfoldable
    assert max_rel_err(model, folded, (1, 3, 8, 8)) <= RTOL


def test_channels_on_the_graph_output_are_reported_not_folded():
    model = randomize(nn.Sequential(cbr(3, 8), mask(8, [0])))
    with pytest.raises(UnfoldableError, match="graph output"):
        fold(model, (1, 3, 8, 8))
    _, folded, result = fold(model, (1, 3, 8, 8), policy="keep")
    assert len(result.unfoldable) == 1 and "Mul" in ops(folded)
    assert max_rel_err(model, folded, (1, 3, 8, 8)) <= RTOL


class SqueezeExcite(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.body = nn.Sequential(cbr(3, c), mask(c, [1, 2, 7]))
        self.fc1, self.fc2 = nn.Conv2d(c, 4, 1), nn.Conv2d(4, c, 1)
        self.out = nn.Linear(c * 16, 3)

    def forward(self, x):
        x = self.body(x)
        s = torch.sigmoid(self.fc2(torch.relu(self.fc1(x.mean((2, 3), keepdim=True)))))
        return self.out(torch.flatten(x * s, 1))


def test_squeeze_excitation_and_flatten_to_linear():
    model = randomize(SqueezeExcite(8))
    captured, folded, result = fold(model, (2, 3, 4, 4))
    assert result.removed_channels == 3
    gemm_w = next(numpy_helper.to_array(i) for i in folded.graph.initializer if i.name.startswith("/out/Gemm"))
    assert gemm_w.shape == (3, 5 * 16)
    assert max_rel_err(model, folded, (2, 3, 4, 4)) <= RTOL


class Branches(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(cbr(3, 6), mask(6, [0, 5]))
        self.b = nn.Sequential(cbr(3, 4, k=1), mask(4, [2]))
        self.head = cbr(10, 5)

    def forward(self, x):
        return self.head(torch.nn.functional.max_pool2d(torch.cat([self.a(x), self.b(x)], 1), 2))


def test_concat_of_masked_branches():
    model = randomize(Branches())
    _, folded, result = fold(model, (1, 3, 8, 8))
    assert result.removed_channels == 3
    assert max_rel_err(model, folded, (1, 3, 8, 8)) <= RTOL


def test_hard_channel_gate_exports_its_deterministic_mask():
    gate = HardChannelGate(8)
    gate.gating_weights.data[[1, 2]] = -1.0  # gated off
    gate.active_channels_mask[5] = False  # pruned permanently earlier
    model = randomize(nn.Sequential(cbr(3, 8), gate, cbr(8, 4)))
    _, folded, result = fold(model, (1, 3, 8, 8))
    assert result.removed_channels == 3
    assert max_rel_err(model, folded, (1, 3, 8, 8)) <= RTOL


def test_mask_as_plain_mul_by_constant_is_folded_too():
    """A mask written as `x * buffer` (what torch.export leaves of a mask) is recognised."""
    class MulMask(nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.head = cbr(3, 8), cbr(8, 4)
            self.register_buffer("m", torch.tensor([1., 0, 1, 1, 0, 1, 1, 1]).view(1, 8, 1, 1))

        def forward(self, x):
            return self.head(self.body(x) * self.m)

    model = randomize(MulMask())
    _, folded, result = fold(model, (1, 3, 8, 8))
    assert result.removed_channels == 2
    assert max_rel_err(model, folded, (1, 3, 8, 8)) <= RTOL


def test_torch_export_program_checkpoint(tmp_path, cli):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.head = cbr(3, 8), nn.Conv2d(8, 4, 1)
            self.register_buffer("m", torch.tensor([1., 0, 1, 1, 0, 0, 1, 1]).view(1, 8, 1, 1))

        def forward(self, x):
            return self.head(self.body(x) * self.m)

    model = randomize(Net())
    program = torch.export.export(model, (torch.randn(1, 3, 8, 8),))
    path = tmp_path / "net.pt2"
    torch.export.save(program, str(path))
    out, report = tmp_path / "net.onnx", tmp_path / "r.json"
    code, _, err = cli("export", path, "-o", out, "--input-shape", "1,3,8,8", "--report", report,
                       "--physical-widths", "exact")  # 5 of 8 channels would round back up to 8
    assert code == 0, err
    import json
    r = json.loads(report.read_text())
    assert r["mask_sources"]["format"] == "torch.export"
    assert r["macs_after"] < r["macs_before"] and r["max_rel_err"] <= RTOL
