"""Seed-style layer classes, written for the tests as the seeds write them (same class
names, attribute names, parameter/buffer names and eval forward), independent of gate2deploy.
A user's `--model` file that imports the seeds' own classes builds exactly these objects.

- dnn-gating utils/cg_utils.py: `channel_shuffle`, `CGConv2d` (mask, threshold, bn, p,
  shuffle, alpha; forward: shuffle -> partial sum Yp = conv(x, W*mask) -> d = (sigmoid(alpha *
  (bn(Yp) - threshold)) - 0.5 > 0) -> Y*d + Yp*(1-d)).
- dnn-gating utils/pg_utils.py: `PactReLU` (clamp(x, 0, upper_bound)), `TorchBinarize`,
  `TorchRoundToBits`, `TorchTruncate`, `TorchQuantize`, `QuantizedConv2d`, `PGConv2d`
  (out_msb + (sigmoid(alpha * (out_msb - threshold)) > 0.5) * out_lsb).
- dnn-gating model/{cg,pg}_cifar10_resnet.py: the CIFAR ResNet-20 (`LambdaLayer` option-A
  shortcut: F.pad of planes//4 zero channels on both sides), built as the training scripts
  build it (`resnet20(**kwargs)` with the script's kwargs).
- PyTorch-FBS models/custom.py: `ChannelPruning` (contents Sequential, gate Linear, rate;
  k = int(O * (1 - rate)) least salient channels zeroed, the rest renormalised by O / sum).

A small VGG of the same layers is here too (`vgg_cg`, `vgg_pg`, `vgg_fbs`).
"""
import math

import torch
import torch.nn.functional as F
from torch import nn


# ----------------------------------------------------------------- cg_utils.py

def channel_shuffle(x, groups):
    n, c, h, w = x.data.size()
    x = x.view(n, groups, c // groups, h, w)
    return torch.transpose(x, 1, 2).contiguous().view(n, -1, h, w)


class CGConv2d(nn.Conv2d):
    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1,
                 groups=1, bias=False, padding_mode="zeros", sparse_bp=False, use_group=False,
                 shuffle=False, p=4, th=-6.0, alpha=2.0):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
                         bias, padding_mode)
        self.th, self.alpha, self.p, self.shuffle = th, alpha, p, shuffle
        self.bn = nn.BatchNorm2d(out_channels, affine=False)
        ic, oc = int(in_channels / p), int(out_channels / p)
        mask = torch.zeros(out_channels, in_channels, kernel_size, kernel_size)
        if use_group:
            for i in range(p):
                mask[i * oc:(i + 1) * oc, i * ic:(i + 1) * ic] = 1.0
        else:
            mask[:, :ic] = 1.0
        self.mask = nn.Parameter(mask, requires_grad=False)
        self.threshold = nn.Parameter(th * torch.ones(1, out_channels, 1, 1))
        self.num_out = 0
        self.num_full = 0

    def forward(self, x):
        if self.shuffle:
            x = channel_shuffle(x, self.p)
        yp = F.conv2d(x, self.weight * self.mask, self.bias, self.stride, self.padding, self.dilation, self.groups)
        z = torch.sigmoid(self.alpha * (self.bn(yp) - self.threshold)) - 0.5 * torch.ones_like(yp)
        d = torch.gt(z, 0).float()
        self.min_margin = float((self.bn(yp) - self.threshold).abs().min())  # test instrumentation: ties
        y = F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
        return y * d + yp * (torch.ones_like(d) - d)


# ----------------------------------------------------------------- pg_utils.py

class PactReLU(nn.Module):
    def __init__(self, upper_bound=6.0):
        super().__init__()
        self.upper_bound = nn.Parameter(torch.tensor(upper_bound))

    def forward(self, x):
        return torch.clamp(x, 0, self.upper_bound.data)


class TorchBinarize(nn.Module):
    def forward(self, x):
        x = torch.clamp(x, -1.0, 1.0)
        return torch.round((x + 1.0) / 2.0) * 2.0 - 1.0


class TorchRoundToBits(nn.Module):
    def __init__(self, bits=2):
        super().__init__()
        self.bits, self.epsilon = bits, 1e-7

    def forward(self, x):
        sign = torch.sign(x)
        x = torch.abs(x)
        scaling = torch.max(x) + self.epsilon
        x = torch.clamp(x / scaling, 0.0, 1.0)
        x = torch.round(x * (2.0 ** self.bits - 1.0)) / (2.0 ** self.bits - 1.0)
        return x * scaling * sign


class TorchTruncate(nn.Module):
    def __init__(self, b=8, bh=4):
        super().__init__()
        self.b, self.bh, self.epsilon = b, bh, 1e-7

    def forward(self, x):
        sign = torch.sign(x)
        x = torch.abs(x)
        scaling = torch.max(x) + self.epsilon
        x = torch.clamp(x / scaling, 0.0, 1.0)
        x = torch.round(x * (2.0 ** self.b - 1.0))
        x = torch.floor(x / (2 ** (self.b - self.bh) * 1.0))
        x = x * (2 ** (self.b - self.bh) * 1.0)
        x = x / (2.0 ** self.b - 1.0)
        return x * scaling * sign


class TorchQuantize(nn.Module):
    def __init__(self, bits=0):
        super().__init__()
        self.quantize = nn.Identity() if bits == 0 else TorchBinarize() if bits == 1 else TorchRoundToBits(bits)

    def forward(self, x):
        return self.quantize(x)


class QuantizedConv2d(nn.Conv2d):
    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1,
                 groups=1, bias=True, padding_mode="zeros", wbits=0, abits=0):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
                         bias, padding_mode)
        self.quantize_w = TorchQuantize(wbits)
        self.quantize_a = TorchQuantize(abits)
        self.weight_rescale = math.sqrt(1.0 / (kernel_size ** 2 * in_channels)) if wbits == 1 else 1.0

    def forward(self, x):
        return F.conv2d(self.quantize_a(x), self.quantize_w(self.weight) * self.weight_rescale,
                        self.bias, self.stride, self.padding, self.dilation, self.groups)


class PGConv2d(nn.Conv2d):
    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1,
                 groups=1, bias=False, padding_mode="zeros", wbits=8, abits=8, pred_bits=4,
                 sparse_bp=False, alpha=5):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
                         bias, padding_mode)
        self.quantize_w = TorchQuantize(wbits)
        self.quantize_a = TorchQuantize(abits)
        self.trunc_a = TorchTruncate(b=abits, bh=pred_bits)
        self.weight_rescale = math.sqrt(1.0 / (kernel_size ** 2 * in_channels)) if wbits == 1 else 1.0
        self.alpha = alpha
        self.threshold = nn.Parameter(torch.zeros(1, out_channels, 1, 1))
        self.num_out = 0
        self.num_high = 0

    def forward(self, x):
        w = self.quantize_w(self.weight) * self.weight_rescale
        out_msb = F.conv2d(self.trunc_a(x), w, self.bias, self.stride, self.padding, self.dilation, self.groups)
        mask = torch.gt(torch.sigmoid(self.alpha * (out_msb - self.threshold)), 0.5).float()
        self.min_margin = float((out_msb - self.threshold).abs().min())  # test instrumentation: ties
        out_lsb = F.conv2d(self.quantize_a(x) - self.trunc_a(x), w, self.bias, self.stride, self.padding,
                           self.dilation, self.groups)
        return out_msb + mask * out_lsb


# ----------------------------------------------------------------- model/*_cifar10_resnet.py

class LambdaLayer(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes, planes, stride=1, option="A", **kw):
        super().__init__()
        if "partitions" in kw:  # cg_cifar10_resnet.py
            self.conv1 = CGConv2d(in_planes, planes, 3, stride, 1, bias=False, p=kw["partitions"],
                                  th=kw["ginit"], alpha=kw["alpha"], use_group=kw["use_group"],
                                  shuffle=kw["shuffle"], sparse_bp=kw["sparse_bp"])
            self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
            self.relu = nn.ReLU()
        else:  # pg_cifar10_resnet.py
            self.conv1 = PGConv2d(in_planes, planes, 3, stride, 1, bias=False, wbits=kw["wbits"],
                                  abits=kw["abits"], pred_bits=kw["pred_bits"], sparse_bp=kw["sparse_bp"])
            self.conv2 = QuantizedConv2d(planes, planes, 3, 1, 1, bias=False, wbits=kw["wbits"], abits=kw["abits"])
            self.relu = PactReLU() if kw["pact"] else nn.ReLU()
        self.bn1 = nn.BatchNorm2d(planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = LambdaLayer(
                lambda x: F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, planes // 4, planes // 4), "constant", 0))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += self.shortcut(x)
        return self.relu(out)


class ResNet(nn.Module):
    def __init__(self, num_blocks=(3, 3, 3), num_classes=10, **kw):
        super().__init__()
        self.in_planes = 16
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = self._make_layer(16, num_blocks[0], 1, **kw)
        self.layer2 = self._make_layer(32, num_blocks[1], 2, **kw)
        self.layer3 = self._make_layer(64, num_blocks[2], 2, **kw)
        self.linear = nn.Linear(64, num_classes)
        self.relu = PactReLU() if kw.get("pact") else nn.ReLU()

    def _make_layer(self, planes, n, stride, **kw):
        layers = []
        for s in [stride] + [1] * (n - 1):
            layers.append(BasicBlock(self.in_planes, planes, s, **kw))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.avg_pool2d(out, out.size()[3])
        return self.linear(out.view(out.size(0), -1))


def resnet20_cg(**kw):
    """cg-cifar10.py generate_model: partitions, ginit, use_group, sparse_bp, shuffle, alpha."""
    return ResNet(**kw)


def resnet20_pg(**kw):
    """pg-cifar10.py generate_model: wbits, abits, pred_bits, sparse_bp, pact."""
    return ResNet(**kw)


# ----------------------------------------------------------------- small VGGs

def _vgg(conv, widths=(16, "M", 32, 32, "M", 64), num_classes=10, act=nn.ReLU):
    layers, c = [nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), act()], 16
    for v in widths[1:]:
        if v == "M":
            layers.append(nn.MaxPool2d(2))
        else:
            layers += [conv(c, v), nn.BatchNorm2d(v), act()]
            c = v
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, num_classes))


def vgg_cg(partitions, shuffle, use_group, alpha=2.0):
    return _vgg(lambda i, o: CGConv2d(i, o, 3, 1, 1, p=partitions, th=0.0, alpha=alpha,
                                      use_group=use_group, shuffle=shuffle))


def vgg_pg(wbits, abits, pred_bits):
    return _vgg(lambda i, o: PGConv2d(i, o, 3, 1, 1, wbits=wbits, abits=abits, pred_bits=pred_bits),
                act=PactReLU)


# ----------------------------------------------------------------- PyTorch-FBS models/custom.py

class ChannelPruning(nn.Module):
    def __init__(self, *layers):
        super().__init__()
        self.contents = nn.Sequential(*layers)
        # custom.py get_in_channels / get_out_channels (the latter reads each layer's input
        # width, so conv + bn gives the BN's width, O)
        widths = [getattr(m, "in_channels", getattr(m, "num_features", None)) for m in layers]
        widths = [w for w in widths if w is not None]
        self.in_channels, self.out_channels = widths[0], widths[-1]
        self.rate = 1.0
        self.loss = None
        self.gate = nn.Linear(self.in_channels, self.out_channels, bias=True)

    def forward(self, x):
        y = self.contents(x)
        k = int(self.out_channels * (1.0 - self.rate))
        if k > 0:
            s = F.adaptive_avg_pool2d(torch.abs(x), (1, 1)).view(x.size()[0], -1)
            g = F.relu(self.gate(s))
            i = (-g).topk(k, 1)[1]
            t = g.scatter(1, i, 0)
            t = t / torch.sum(t, dim=1).unsqueeze(1) * self.out_channels
            y = y * t.unsqueeze(2).unsqueeze(3)
        return y


def vgg_fbs(rate=None):
    """A small VGG of PyTorch-FBS blocks (conv3x3 + bn + relu in a ChannelPruning each, as
    models/resnet.py's conv3x3 builds them). `rate` is set as the seed's main.py sets it
    (after construction); None leaves the constructor's 1.0."""
    def block(i, o):
        return ChannelPruning(nn.Conv2d(i, o, 3, 1, 1, bias=False), nn.BatchNorm2d(o), nn.ReLU())
    net = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                        block(16, 32), nn.MaxPool2d(2), block(32, 32), block(32, 64),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))
    if rate is not None:
        for m in net.modules():
            if hasattr(m, "rate"):
                m.rate = rate
    return net


# ----------------------------------------------------------------- look-alikes that must not be lowered

class CGConv2dNoShuffle(CGConv2d):
    """Looks like cg_utils.CGConv2d (same state and attributes, shuffle=True) but its forward
    ignores `shuffle`: lowering it by its attributes would change the output."""

    def forward(self, x):
        shuffle, self.shuffle = self.shuffle, False
        try:
            return super().forward(x)
        finally:
            self.shuffle = shuffle


def vgg_cg_noshuffle():
    return _vgg(lambda i, o: CGConv2dNoShuffle(i, o, 3, 1, 1, p=2, th=0.0, use_group=True, shuffle=True))


class MyGatedConv(nn.Conv2d):
    """A user's own gated conv (a learned per-channel threshold on the output magnitude)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.threshold = nn.Parameter(torch.zeros(1, self.out_channels, 1, 1))

    def forward(self, x):
        y = super().forward(x)
        return y * (y.abs() > self.threshold).float()


def vgg_mygated():
    return _vgg(lambda i, o: MyGatedConv(i, o, 3, 1, 1, bias=False))
