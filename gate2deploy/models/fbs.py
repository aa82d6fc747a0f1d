"""An ImageNet ResNet-18 with Feature Boosting and Suppression (FBS, seed 000's
`models/gate/resnet18.yaml`, policy `parametric`, threshold `online`).

Mayo is a TensorFlow code base, so there is no PyTorch checkpoint layout to match; this model
keeps torchvision's ResNet-18 names wherever a layer is unchanged. Gated layers (an
`FBSConv2d`, which contains the conv, its BatchNorm and the ReLU): the stem conv and conv1 of
each BasicBlock (9 layers). conv2 of each block stays a plain conv + BN (the layout this
builder's checkpoints have); Mayo's own gated ResNet-18 also gates conv2 and the downsample
shortcut, which `FBSConv2d(activation=None)` expresses (no ReLU before the residual add).
The saliency pools the unpadded input here, where Mayo's YAML pads first (`padding: 3` /
`padding: 1`, numeric padding) and pools the zeros too: weights trained in Mayo go through
`--mayo-model` (importers/mayo.py), which reproduces that (`pool_pads`), not this builder.

Keys: `conv1.conv.weight`, `conv1.bn.running_mean/var/num_batches_tracked`, `conv1.beta`,
`conv1.gate.weight/bias`; `layerS.B.conv1.*` likewise; `layerS.B.conv2.weight`, `.bn2.*`,
`.downsample.{0,1}.*`, `fc.*` as torchvision. `gate2deploy.importers.fbs` converts a dense
torchvision ResNet-18 state dict into this layout.
"""
from __future__ import annotations

from torch import nn

from ..gated import FBSConv2d
from . import require_stated


class FBSBasicBlock(nn.Module):
    def __init__(self, inplanes, planes, stride, density, pool):
        super().__init__()
        self.conv1 = FBSConv2d(inplanes, planes, 3, stride, 1, density=density, pool=pool)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False),
                                            nn.BatchNorm2d(planes))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.bn2(self.conv2(self.conv1(x)))
        return self.relu(out + identity)


class FBSResNet(nn.Module):
    def __init__(self, layers=(2, 2, 2, 2), num_classes=1000, density=1.0, pool="avg"):
        super().__init__()
        self.conv1 = FBSConv2d(3, 64, 7, 2, 3, density=density, pool=pool)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        inplanes = 64
        for index, (planes, blocks) in enumerate(zip((64, 128, 256, 512), layers), start=1):
            stride = 1 if index == 1 else 2
            stage = []
            for b in range(blocks):
                stage.append(FBSBasicBlock(inplanes, planes, stride if b == 0 else 1, density, pool))
                inplanes = planes
            setattr(self, f"layer{index}", nn.Sequential(*stage))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x):
        x = self.maxpool(self.conv1(x))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.avgpool(x).flatten(1))


def fbs_resnet18(num_classes: int = 1000, density: float | None = None, pool: str = "avg") -> FBSResNet:
    """FBS ResNet-18; `density` (required: not in the checkpoint, decides the output) is the
    fraction of output channels kept per sample; `pool` defaults to the seed config's `avg`
    (models/gate/resnet18.yaml `_gate.pool`)."""
    require_stated("fbs:fbs_resnet18", '{"density": 0.5}', density=density)
    return FBSResNet((2, 2, 2, 2), num_classes, density, pool)
