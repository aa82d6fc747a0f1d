"""Built-in slimmable networks with Joslim's layer semantics (seed 003, enyac-group/Joslim),
for users who have a Joslim checkpoint but not the seed's code.

`resnet20` (and the other CIFAR / ImageNet ResNets) and `mobilenetv2` build module trees whose
state_dict keys and shapes are those of the seed's `model/slim_resnet.py` (`slim_resnet20`,
...) and `model/slim_mbv2.py` (`slim_mobilenetv2`), so `model_state_dict` of a Joslim
checkpoint loads as it is. The layer semantics follow `model/dyn_model.py`
(../shared/spec/gating-semantics.md section 6):

- `SlimConv2d` keeps its full weight and computes with `W[:active_out_ch, :active_in_ch]`;
  a depthwise conv's groups follow its active width. Its bias is stored (the checkpoint has
  it, e.g. the ResNet classifier, a 1x1 SlimConv2d) but never used, as in the seed.
- `SlimBN` slices weight, bias and running statistics to `[:active_ch]`; in training mode
  with `momentum=None` it keeps a cumulative average (Joslim's per-width recalibration).
- The CIFAR ResNet stem is a bare 1x1 SlimConv2d (no BN, no ReLU); a stride-2 CIFAR stage
  adds its input to the block output through a stride-2 subsampling zero-padded to the
  block's width. MobileNetV2's first 3x3 conv and its last 1x1 conv (to 1280) are conv + BN
  without activation (`SlimConvBN`), and its classifier is Dropout + Linear.

The models also carry what the importer (gate2deploy/importers/slimmable.py) needs:
`channel_space` (the full channel count per search dimension), `search_dim`, and
`set_real_ch(real_ch)` which sets every layer's active width from the decoded per-layer
counts, the interface of the seed's `DynModel`. Decoding width vectors lives in the importer.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn



def _kaiming_init(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")


def _chain_widths(features: nn.Sequential, real_ch) -> int:
    """features[0] is the stem (width real_ch[0]); features[i] takes real_ch[i] as its output
    widths and the previous one's last width as its input (the seeds' set_real_ch). Returns the
    last stage's output width."""
    features[0].set_out_ch(real_ch[0])
    prev = real_ch[0]
    for i, ch in enumerate(real_ch[1:], start=1):
        features[i].set_out_ch(ch)
        features[i].set_in_ch(prev)
        prev = ch[-1]
    return prev

class SlimConv2d(nn.Conv2d):
    """A conv that runs on its first `active_in_ch` inputs and `active_out_ch` filters."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, groups=1, bias=True):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, groups=groups, bias=bias)
        self.active_in_ch, self.active_out_ch, self.active_groups = in_channels, out_channels, groups

    def set_in_ch(self, ch: int) -> None:
        self.active_in_ch = ch

    def set_out_ch(self, ch: int) -> None:
        self.active_out_ch = ch

    def set_groups(self, groups: int) -> None:
        self.active_groups = groups

    def forward(self, x):
        # the bias is deliberately not applied: Joslim's SlimConv2d passes None
        w = self.weight[:self.active_out_ch, :self.active_in_ch]
        return F.conv2d(x, w, None, self.stride, self.padding, self.dilation, self.active_groups)


class SlimBN(nn.BatchNorm2d):
    """BatchNorm over the first `active_ch` channels (affine, tracking running statistics)."""

    def __init__(self, num_features):
        super().__init__(num_features)
        self.active_ch = num_features

    def set_out_ch(self, ch: int) -> None:
        self.active_ch = ch

    def forward(self, x):
        k = self.active_ch
        factor = 0.0
        if self.training:
            self.num_batches_tracked += 1
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        return F.batch_norm(x, self.running_mean[:k], self.running_var[:k], self.weight[:k], self.bias[:k],
                            self.training, factor, self.eps)


# --- ResNet -------------------------------------------------------------------------------

class ZeroPadShortcut(nn.Module):
    """CIFAR shortcut of a stride-2 stage: subsample by 2 (the seed's AvgPool2d of kernel 1),
    zero-pad channels to the block's output width (no parameters). The widths are plain ints
    (set_in_ch / set_out_ch), so the captured Pad is static."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.in_channels, self.out_channels, self.stride = in_channels, out_channels, stride

    def set_out_ch(self, ch: int) -> None:
        self.out_channels = ch

    def set_in_ch(self, ch: int) -> None:
        self.in_channels = ch

    def forward(self, x):
        if self.out_channels < self.in_channels:  # the decode raises residual widths stage by stage
            raise ValueError(f"a shortcut cannot narrow {self.in_channels} channels to {self.out_channels}")
        x = x[:, :self.in_channels, ::self.stride, ::self.stride]
        return _PadChannels.apply(x, self.out_channels - self.in_channels)


class _PadChannels(torch.autograd.Function):
    """Zero channels appended to an NCHW tensor. Its own symbolic: the exporter's F.pad builds
    the pads with runtime ops, which leaves every later shape unknown to ONNX shape inference
    (and the report's cost of the captured graph short); here the pads are one constant."""

    @staticmethod
    def forward(ctx, x, extra: int):  # noqa: D401 - torch API
        return F.pad(x, (0, 0, 0, 0, 0, extra))

    @staticmethod
    def symbolic(g, x, extra: int):
        pads = g.op("Constant", value_t=torch.tensor([0, 0, 0, 0, 0, extra, 0, 0], dtype=torch.int64))
        return g.op("Pad", x, pads)


class ConvShortcut(nn.Module):
    """ImageNet shortcut: 1x1 strided SlimConv2d + SlimBN."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.conv = SlimConv2d(in_channels, out_channels, 1, stride=stride)
        self.bn = SlimBN(out_channels)

    def set_out_ch(self, ch: int) -> None:
        self.conv.set_out_ch(ch)
        self.bn.set_out_ch(ch)

    def set_in_ch(self, ch: int) -> None:
        self.conv.set_in_ch(ch)

    def forward(self, x):
        return self.bn(self.conv(x))


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv = nn.Sequential(
            SlimConv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False), SlimBN(planes), nn.ReLU(),
            SlimConv2d(planes, planes, 3, padding=1, bias=False), SlimBN(planes))
        self.downsample = downsample

    def set_out_ch(self, ch) -> None:
        inner, out = ch
        self.conv[0].set_out_ch(inner)
        self.conv[1].set_out_ch(inner)
        self.conv[3].set_in_ch(inner)
        self.conv[3].set_out_ch(out)
        self.conv[4].set_out_ch(out)
        if self.downsample is not None:
            self.downsample.set_out_ch(out)

    def set_in_ch(self, ch: int) -> None:
        self.conv[0].set_in_ch(ch)
        if self.downsample is not None:
            self.downsample.set_in_ch(ch)

    def forward(self, x):
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(self.conv(x) + shortcut)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        # the seed's bottleneck convs are built with a bias (stored, unused)
        self.conv1 = SlimConv2d(in_planes, planes, 1)
        self.bn1 = SlimBN(planes)
        self.conv2 = SlimConv2d(planes, planes, 3, stride=stride, padding=1)
        self.bn2 = SlimBN(planes)
        self.conv3 = SlimConv2d(planes, planes * self.expansion, 1)
        self.bn3 = SlimBN(planes * self.expansion)
        self.downsample = downsample

    def set_out_ch(self, ch) -> None:
        inner, out = ch
        for m in (self.conv1, self.bn1, self.conv2, self.bn2):
            m.set_out_ch(inner)
        self.conv2.set_in_ch(inner)
        self.conv3.set_in_ch(inner)
        self.conv3.set_out_ch(out)
        self.bn3.set_out_ch(out)
        if self.downsample is not None:
            self.downsample.set_out_ch(out)

    def set_in_ch(self, ch: int) -> None:
        self.conv1.set_in_ch(ch)
        if self.downsample is not None:
            self.downsample.set_in_ch(ch)

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(y + shortcut)


class Stage(nn.Module):
    """A first block (`head`, may change width/stride) and `tail` blocks. Widths come as
    [inner_0, residual, inner_1, residual, ...]: two per block."""

    def __init__(self, blocks: list[nn.Module]):
        super().__init__()
        self.head = blocks[0]
        self.tail = nn.Sequential(*blocks[1:])

    def set_in_ch(self, ch: int) -> None:
        self.head.set_in_ch(ch)

    def set_out_ch(self, ch) -> None:
        if len(ch) != 2 * (len(self.tail) + 1):
            raise ValueError(f"a stage of {len(self.tail) + 1} blocks takes {2 * (len(self.tail) + 1)} widths, not {len(ch)}")
        self.head.set_out_ch(ch[0:2])
        for j, block in enumerate(self.tail):
            block.set_in_ch(ch[2 * j + 1])
            block.set_out_ch(ch[2 * j + 2:2 * j + 4])

    def forward(self, x):
        return self.tail(self.head(x))


class ImageNetStem(nn.Module):
    def __init__(self, out_channels: int):
        super().__init__()
        self.conv = SlimConv2d(3, out_channels, 7, stride=2, padding=3, bias=False)
        self.norm = SlimBN(out_channels)
        self.act = nn.ReLU()
        self.pool = nn.MaxPool2d(3, stride=2, padding=1)

    def set_out_ch(self, ch: int) -> None:
        self.conv.set_out_ch(ch)
        self.norm.set_out_ch(ch)

    def forward(self, x):
        return self.pool(self.act(self.norm(self.conv(x))))


class SlimResNet(nn.Module):
    """Three stages (16/32/64, CIFAR, 1x1 stem) or four (64..512, ImageNet, 7x7 stem)."""

    family = "resnet"

    def __init__(self, block, layers: list[int], num_classes: int = 10):
        super().__init__()
        self.block = block
        self.bottleneck = block is Bottleneck
        cifar = len(layers) == 3
        widths = [16, 32, 64] if cifar else [64, 128, 256, 512]
        # one search dimension per block's inner width plus one for the stage's residual width
        # (bottleneck stage 1 also lists its stem width first, which the decode skips)
        self.channel_space = []
        for i, n in enumerate(layers):
            first = [widths[i], widths[i] * block.expansion] if (i == 0 and self.bottleneck) else [widths[i] * block.expansion]
            self.channel_space.append(first + [widths[i]] * n)
        self.search_dim = sum(len(s) for s in self.channel_space)

        features: list[nn.Module] = [SlimConv2d(3, widths[0], 1, bias=False) if cifar else ImageNetStem(widths[0])]
        in_ch = widths[0]
        for i, n in enumerate(layers):
            stride = 1 if i == 0 else 2
            out = widths[i] * block.expansion
            shortcut = None
            if stride != 1 or in_ch != out:
                shortcut = ZeroPadShortcut(in_ch, out, stride) if cifar else ConvShortcut(in_ch, out, stride)
            blocks = [block(in_ch, widths[i], stride, shortcut)] + [block(out, widths[i]) for _ in range(n - 1)]
            features.append(Stage(blocks))
            in_ch = out
        features.append(nn.AdaptiveAvgPool2d(1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(SlimConv2d(in_ch, num_classes, 1))  # bias stored, unused
        self.num_classes = num_classes
        _kaiming_init(self)

    def set_real_ch(self, real_ch) -> None:
        """real_ch: [stem, stage_1 widths, ..., stage_n widths] (importers/slimmable.py)."""
        self.classifier[0].set_in_ch(_chain_widths(self.features, real_ch))

    def forward(self, x):
        return self.classifier(self.features(x)).flatten(1)


# --- MobileNetV2 --------------------------------------------------------------------------

class ConvBN(nn.Module):
    """conv + BN, no activation (the seed's SlimConvBN)."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int):
        super().__init__()
        self.conv = SlimConv2d(in_ch, out_ch, kernel, stride=stride, padding=kernel // 2, bias=False)
        self.norm = SlimBN(out_ch)

    def set_out_ch(self, ch: int) -> None:
        self.conv.set_out_ch(ch)
        self.norm.set_out_ch(ch)

    def set_in_ch(self, ch: int) -> None:
        self.conv.set_in_ch(ch)

    def forward(self, x):
        return self.norm(self.conv(x))


def _depthwise(conv: SlimConv2d, bn: SlimBN, ch: int) -> None:
    conv.set_in_ch(ch)
    conv.set_out_ch(ch)
    conv.set_groups(ch)
    bn.set_out_ch(ch)


class DepthwiseSeparable(nn.Module):
    """3x3 depthwise + BN + ReLU6, 1x1 + BN; its depthwise width is its input width."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1):
        super().__init__()
        self.residual = stride == 1 and in_ch == out_ch
        self.conv = nn.Sequential(
            SlimConv2d(in_ch, in_ch, 3, stride, 1, groups=in_ch, bias=False), SlimBN(in_ch), nn.ReLU6(),
            SlimConv2d(in_ch, out_ch, 1, bias=False), SlimBN(out_ch))

    def set_out_ch(self, ch) -> None:
        (out,) = ch
        self.conv[3].set_out_ch(out)
        self.conv[4].set_out_ch(out)

    def set_in_ch(self, ch: int) -> None:
        _depthwise(self.conv[0], self.conv[1], ch)
        self.conv[3].set_in_ch(ch)

    def forward(self, x):
        y = self.conv(x)
        return x + y if self.residual else y


class InvertedResidual(nn.Module):
    """1x1 expand + BN + ReLU6, 3x3 depthwise + BN + (SE slot) + ReLU6, 1x1 project + BN.
    Widths [expanded, out]; the residual is static (stride 1 and equal full widths)."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, mid: int):
        super().__init__()
        self.residual = stride == 1 and in_ch == out_ch
        self.conv = nn.Sequential(
            SlimConv2d(in_ch, mid, 1, bias=False), SlimBN(mid), nn.ReLU6(),
            SlimConv2d(mid, mid, 3, stride, 1, groups=mid, bias=False), SlimBN(mid),
            nn.Identity(),  # the seed's SE slot (empty in MobileNetV2), kept for index parity
            nn.ReLU6(),
            SlimConv2d(mid, out_ch, 1, bias=False), SlimBN(out_ch))

    def set_out_ch(self, ch) -> None:
        mid, out = ch
        self.conv[0].set_out_ch(mid)
        self.conv[1].set_out_ch(mid)
        _depthwise(self.conv[3], self.conv[4], mid)
        self.conv[7].set_in_ch(mid)
        self.conv[7].set_out_ch(out)
        self.conv[8].set_out_ch(out)

    def set_in_ch(self, ch: int) -> None:
        self.conv[0].set_in_ch(ch)

    def forward(self, x):
        y = self.conv(x)
        return x + y if self.residual else y


MBV2_SETTING = [  # expansion t, channels c, blocks n, stride s
    (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]


class SlimMobileNetV2(nn.Module):
    family = "mobilenetv2"

    def __init__(self, num_classes: int = 1000, last_channel: int = 1280):
        super().__init__()
        features: list[nn.Module] = [ConvBN(3, 32, 3, 2), DepthwiseSeparable(32, 16)]
        # search dimensions: stem, the separable block's output, then per stage its output
        # (residual) width first and each block's expanded width
        self.channel_space: list = [32, [16]]
        in_ch = 16
        for t, c, n, s in MBV2_SETTING:
            blocks = [InvertedResidual(in_ch, c, s, in_ch * t)] + [InvertedResidual(c, c, 1, c * t) for _ in range(n - 1)]
            features.append(Stage(blocks))
            self.channel_space.append([c, in_ch * t] + [c * t] * (n - 1))
            in_ch = c
        features += [ConvBN(in_ch, last_channel, 1, 1), nn.AdaptiveAvgPool2d(1)]
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(), nn.Linear(last_channel, num_classes))
        self.search_dim = 1 + sum(len(s) for s in self.channel_space[1:])
        _kaiming_init(self)

    def set_real_ch(self, real_ch) -> None:
        """real_ch: [stem, [separable out], stage widths...] (importers/slimmable.py)."""
        # the last 1x1 ConvBN after the stages: its output stays full
        self.features[len(real_ch)].set_in_ch(_chain_widths(self.features, real_ch))

    def forward(self, x):
        return self.classifier(self.features(x).flatten(1))


def resnet20(num_classes: int = 10) -> SlimResNet:
    return SlimResNet(BasicBlock, [3, 3, 3], num_classes)


def resnet32(num_classes: int = 10) -> SlimResNet:
    return SlimResNet(BasicBlock, [5, 5, 5], num_classes)


def resnet44(num_classes: int = 10) -> SlimResNet:
    return SlimResNet(BasicBlock, [7, 7, 7], num_classes)


def resnet56(num_classes: int = 10) -> SlimResNet:
    return SlimResNet(BasicBlock, [9, 9, 9], num_classes)


def resnet18(num_classes: int = 1000) -> SlimResNet:
    return SlimResNet(BasicBlock, [2, 2, 2, 2], num_classes)


def resnet34(num_classes: int = 1000) -> SlimResNet:
    return SlimResNet(BasicBlock, [3, 4, 6, 3], num_classes)


def resnet50(num_classes: int = 1000) -> SlimResNet:
    return SlimResNet(Bottleneck, [3, 4, 6, 3], num_classes)


def mobilenetv2(num_classes: int = 1000) -> SlimMobileNetV2:
    return SlimMobileNetV2(num_classes)


__all__ = ["SlimConv2d", "SlimBN", "SlimResNet", "SlimMobileNetV2", "resnet20", "resnet32", "resnet44",
           "resnet56", "resnet18", "resnet34", "resnet50", "mobilenetv2"]
