"""Property: for random small CNNs (residual, concat, depthwise, squeeze-excitation,
flatten -> linear) with random channel masks and random dead/constant channels, the folded
ONNX model equals the masked PyTorch model (normwise relative error <= 1e-4), never costs
more MACs, and removes every mask it does not report as unfoldable."""
import torch
from fold_helpers import RTOL, fold, macs, max_rel_err, ops
from models.cifar_nets import randomize_batchnorm
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from torch import nn

from gate2deploy.nn import ChannelMask

BLOCKS = ("conv", "residual", "concat", "depthwise", "se", "pool")


class RandomCNN(nn.Module):
    def __init__(self, draw):
        super().__init__()
        self.layers = nn.ModuleList()
        self.kinds = []
        c = 3
        for _ in range(draw(st.integers(2, 5))):
            kind = draw(st.sampled_from(BLOCKS))
            block, c = self._block(kind, c, draw)
            self.layers.append(block)
            self.kinds.append(kind)
        self.pool_head = draw(st.booleans())
        self.spatial = 1 if self.pool_head else 4
        self.fc = nn.Linear(c * self.spatial * self.spatial, draw(st.integers(2, 6)))

    @staticmethod
    def _mask(c, draw):
        bits = draw(st.lists(st.sampled_from([0.0, 1.0, 1.0]), min_size=c, max_size=c))
        return ChannelMask(torch.tensor(bits))

    def _block(self, kind, c, draw):
        w = draw(st.integers(2, 10))
        k = draw(st.sampled_from([1, 3]))
        masked = draw(st.booleans())
        def cbr(cin, cout, kk=k, groups=1):
            return [nn.Conv2d(cin, cout, kk, padding=kk // 2, groups=groups, bias=draw(st.booleans())),
                    nn.BatchNorm2d(cout), nn.ReLU()]
        if kind == "conv":
            mods = cbr(c, w) + ([self._mask(w, draw)] if masked else [])
            return nn.Sequential(*mods), w
        if kind == "depthwise":
            mods = cbr(c, c, 3, groups=c) + cbr(c, w, 1) + ([self._mask(w, draw)] if masked else [])
            return nn.Sequential(*mods), w
        if kind == "pool":
            return nn.Sequential(nn.MaxPool2d(3, 1, 1)), c
        if kind == "residual":
            mid = cbr(c, w) + [self._mask(w, draw)] + [nn.Conv2d(w, c, k, padding=k // 2), nn.BatchNorm2d(c)]
            return Residual(nn.Sequential(*mid)), c
        if kind == "concat":
            w2 = draw(st.integers(2, 6))
            a = nn.Sequential(*cbr(c, w), self._mask(w, draw))
            b = nn.Sequential(*cbr(c, w2, 1), *([self._mask(w2, draw)] if masked else []))
            return Concat(a, b), w + w2
        # squeeze-excitation on a masked conv output
        body = nn.Sequential(*cbr(c, w), self._mask(w, draw))
        return SE(body, w), w

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        x = nn.functional.adaptive_avg_pool2d(x, self.spatial)
        return self.fc(torch.flatten(x, 1))


class Residual(nn.Module):
    def __init__(self, branch):
        super().__init__()
        self.branch = branch

    def forward(self, x):
        return torch.relu(x + self.branch(x))


class Concat(nn.Module):
    def __init__(self, a, b):
        super().__init__()
        self.a, self.b = a, b

    def forward(self, x):
        return torch.cat([self.a(x), self.b(x)], 1)


class SE(nn.Module):
    def __init__(self, body, c):
        super().__init__()
        self.body, self.fc1, self.fc2 = body, nn.Conv2d(c, 3, 1), nn.Conv2d(3, c, 1)

    def forward(self, x):
        x = self.body(x)
        return x * torch.sigmoid(self.fc2(torch.relu(self.fc1(x.mean((2, 3), keepdim=True)))))


def randomize(model, draw):
    return randomize_batchnorm(model, draw(st.integers(0, 2**16)), gamma_mean=1.0, gamma_std=0.3,
                               beta_std=0.5, dead_fraction=0.15)


@settings(max_examples=200, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.data())
def test_fold_equals_masked_model_on_random_cnns(data):
    torch.manual_seed(data.draw(st.integers(0, 1000)))
    model = randomize(RandomCNN(data.draw), data.draw)
    shape = (data.draw(st.integers(1, 2)), 3, 8, 8)
    captured, folded, result = fold(model, shape, policy="keep")
    event(f"channels removed: {result.removed_channels > 0}; constants folded: {bool(result.constant_folds)}; "
          f"unfoldable masks: {bool(result.unfoldable)}")
    assert max_rel_err(model, folded, shape) <= RTOL
    assert macs(folded) <= macs(captured)
    assert "ChannelMask" not in ops(folded)
    assert ops(folded).count("Mul") <= ops(captured).count("Mul") + len(result.unfoldable)
