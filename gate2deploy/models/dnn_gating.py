"""The CIFAR-10 ResNet-20 of dnn-gating (seed 001) with PG or CG, state-dict keys as the seed.

Architecture (He et al.'s CIFAR ResNet, option A shortcuts by default): stem conv 3->16 + BN +
ReLU, three stages of three BasicBlocks (16, 32, 64 channels; stride 2 entering stages 2 and
3), global average pool, `linear` 64->classes. Keys: `conv1.weight`, `bn1.*`,
`layer{1,2,3}.{0,1,2}.conv1.*`, `.bn1.*`, `.conv2.*`, `.bn2.*` (and `.shortcut.{0,1}.*` with
option B), `linear.weight/bias`; PACT adds `relu.upper_bound` and `layerX.Y.relu.upper_bound`.

- `resnet20_pg`: conv1 of each block is a `PGConv2d` (+ `threshold`), conv2 a statically
  quantized `QuantizedConv2d` (weights wbits, activations abits with a per-tensor scale), stem and
  linear float; ReLUs are PACT (`pact=True`, the seed script's `-pact`). The seed's PG recipe
  (scripts/train_pg_pact.sh) trains with `-w 8 -a 3 -pb 2 -pact`; pg-cifar10.py's own argparse
  defaults are `--wbits 0 --abits 0 --pbits 4` without PACT (a checkpoint trained without PACT
  lacks the `relu.upper_bound` keys: pass `pact=False`).
- `resnet20_cg`: conv1 of each block is a `CGConv2d` (9 gated layers), conv2 plain.
- `resnet20_cg_postact`: both convs of each block are `CGConv2d` and the block is
  relu(bn2(conv2(.))) + shortcut (no ReLU after the addition).

The seed saves `net.state_dict()` (with `module.` prefixes under DataParallel; the loader strips
them). Hyper-parameters that are not in the checkpoint and decide the output have no default
and must be passed (`--model-kwargs`), as given to the seed's training script: `partitions`
and `shuffle` for CG (cg-cifar10.py `-pt`, `-shuffle`), `wbits`, `abits`, `pred_bits` for PG
(pg-cifar10.py `-w`, `-a`, `-pb`); a build without them is refused naming them. The others
keep the seed scripts' defaults because a loaded checkpoint fixes or overrides them: the
base-path `mask` (so `use_group`) and `threshold` (so `ginit`) are in the checkpoint, `pact`
and `option` change the checkpoint's keys (a mismatch is a load error), `alpha` only scales
the gate's sigmoid (the decision is z > 0 for any alpha > 0), `sparse_bp` is training-only.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..gated import CGConv2d, PactReLU, PGConv2d, QuantizedConv2d
from . import require_stated


class _ChannelZeroPad(torch.autograd.Function):
    """F.pad of `pad` zero channels on both sides of axis 1, exported as ONE ONNX Pad with
    constant pads (the exporter's generic F.pad lowering computes the pads with shape ops,
    which leaves every later shape unknown in the captured model)."""

    @staticmethod
    def forward(ctx, x, pad):
        ctx.pad = pad
        return F.pad(x, (0, 0, 0, 0, pad, pad), "constant", 0)

    @staticmethod
    def backward(ctx, grad):
        return grad[:, ctx.pad:grad.shape[1] - ctx.pad], None

    @staticmethod
    def symbolic(g, x, pad):
        pads = g.op("Constant", value_t=torch.tensor([0, pad, 0, 0, 0, pad, 0, 0], dtype=torch.int64))
        return g.op("Pad", x, pads, mode_s="constant")


class ShortcutA(nn.Module):
    """Option A shortcut: subsample by 2 and zero-pad the channels (no parameters)."""

    def __init__(self, planes: int):
        super().__init__()
        self.pad = planes // 4

    def forward(self, x):
        return _ChannelZeroPad.apply(x[:, :, ::2, ::2], self.pad)


def _shortcut(in_planes, planes, stride, option, conv_factory):
    if stride == 1 and in_planes == planes:
        return nn.Sequential()
    if option == "A":
        return ShortcutA(planes)
    if option == "B":
        return nn.Sequential(conv_factory(in_planes, planes, 1, stride, 0), nn.BatchNorm2d(planes))
    raise ValueError(f"shortcut option must be 'A' or 'B', not {option!r}")


def _kaiming_init(module: nn.Module) -> None:
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        nn.init.kaiming_normal_(module.weight)


class PGBasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes, planes, stride=1, option="A", *, wbits, abits, pred_bits, pact,
                 sparse_bp=False):
        super().__init__()
        self.conv1 = PGConv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False,
                              wbits=wbits, abits=abits, pred_bits=pred_bits, sparse_bp=sparse_bp)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = QuantizedConv2d(planes, planes, 3, stride=1, padding=1, bias=False,
                                     wbits=wbits, abits=abits)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = PactReLU() if pact else nn.ReLU()
        self.shortcut = _shortcut(in_planes, planes, stride, option, lambda i, o, k, s, p: QuantizedConv2d(
            i, o, k, stride=s, padding=p, bias=False, wbits=wbits, abits=abits))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = out + self.shortcut(x)
        return self.relu(out)


class CGBasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes, planes, stride=1, option="A", *, partitions, ginit, alpha,
                 use_group, shuffle, sparse_bp=False, postact=False):
        super().__init__()

        def cg(i, o, s):
            return CGConv2d(i, o, 3, stride=s, padding=1, bias=False, p=partitions, th=ginit,
                            alpha=alpha, use_group=use_group, shuffle=shuffle, sparse_bp=sparse_bp)

        self.postact = postact
        self.conv1 = cg(in_planes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = cg(planes, planes, 1) if postact else nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU()
        self.shortcut = _shortcut(in_planes, planes, stride, option,
                                  lambda i, o, k, s, p: nn.Conv2d(i, o, k, s, p, bias=False))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        if self.postact:
            return self.relu(self.bn2(self.conv2(out))) + self.shortcut(x)
        out = self.bn2(self.conv2(out)) + self.shortcut(x)
        return self.relu(out)


class CifarResNet(nn.Module):
    def __init__(self, make_block, num_blocks=(3, 3, 3), num_classes=10, pact=False):
        super().__init__()
        self.in_planes = 16
        self.conv1 = nn.Conv2d(3, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = self._make_layer(make_block, 16, num_blocks[0], 1)
        self.layer2 = self._make_layer(make_block, 32, num_blocks[1], 2)
        self.layer3 = self._make_layer(make_block, 64, num_blocks[2], 2)
        self.linear = nn.Linear(64, num_classes)
        self.relu = PactReLU() if pact else nn.ReLU()
        self.apply(_kaiming_init)

    def _make_layer(self, make_block, planes, blocks, stride):
        layers = []
        for s in [stride] + [1] * (blocks - 1):
            layers.append(make_block(self.in_planes, planes, s))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.avg_pool2d(out, out.size()[3])
        return self.linear(out.view(out.size(0), -1))


def resnet20_pg(num_classes: int = 10, wbits: int | None = None, abits: int | None = None,
                pred_bits: int | None = None, pact: bool = True, sparse_bp: bool = False,
                option: str = "A") -> CifarResNet:
    """dnn-gating ResNet-20 with Precision Gating (the seed's train_pg_pact.sh: wbits 8, abits
    3, pred_bits 2, PACT)."""
    require_stated("dnn_gating:resnet20_pg", '{"wbits": 8, "abits": 3, "pred_bits": 2}',
                   wbits=wbits, abits=abits, pred_bits=pred_bits)
    return CifarResNet(lambda i, o, s: PGBasicBlock(i, o, s, option, wbits=wbits, abits=abits,
                                                    pred_bits=pred_bits, pact=pact, sparse_bp=sparse_bp),
                       num_classes=num_classes, pact=pact)


def resnet20_cg(num_classes: int = 10, partitions: int | None = None, ginit: float = 0.0,
                alpha: float = 2.0, use_group: bool = True, shuffle: bool | None = None,
                sparse_bp: bool = False, option: str = "A") -> CifarResNet:
    """dnn-gating ResNet-20 with Channel Gating on conv1 of each block (train_cg.sh: -pt 4
    --use_group, no -shuffle)."""
    require_stated("dnn_gating:resnet20_cg", '{"partitions": 4, "shuffle": false}',
                   partitions=partitions, shuffle=shuffle)
    return CifarResNet(lambda i, o, s: CGBasicBlock(i, o, s, option, partitions=partitions, ginit=ginit,
                                                    alpha=alpha, use_group=use_group, shuffle=shuffle,
                                                    sparse_bp=sparse_bp),
                       num_classes=num_classes)


def resnet20_cg_postact(num_classes: int = 10, partitions: int | None = None, ginit: float = 0.0,
                        alpha: float = 2.0, use_group: bool = True, shuffle: bool | None = None,
                        sparse_bp: bool = False, option: str = "A") -> CifarResNet:
    """Post-activated ResNet-20 with Channel Gating on both convs of each block
    (train_cg_postact.sh: -pt 2 --use_group, no -shuffle)."""
    require_stated("dnn_gating:resnet20_cg_postact", '{"partitions": 2, "shuffle": false}',
                   partitions=partitions, shuffle=shuffle)
    return CifarResNet(lambda i, o, s: CGBasicBlock(i, o, s, option, partitions=partitions, ginit=ginit,
                                                    alpha=alpha, use_group=use_group, shuffle=shuffle,
                                                    sparse_bp=sparse_bp, postact=True),
                       num_classes=num_classes)
