"""Gator's 3-stage CIFAR ResNets as Gator defines them (gator/models/cifar_resnet.py
`CifarResnet`, `resnet56`): torchvision's BasicBlock, a 3x3 stem of 16 channels without max
pool, stages of 16/32/64 channels, a 1x1 conv + BN downsample where the shape changes, global
average pool and fc. Written here from that description, for tests that load a Gator CIFAR
checkpoint with `--model tests/models/gator_cifar.py:resnet56`."""
from torch import nn
from torchvision.models.resnet import BasicBlock


class CifarResnet(nn.Module):
    def __init__(self, layers, num_classes=10):
        super().__init__()
        self.inplanes = 16
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._stage(16, layers[0], 1)
        self.layer2 = self._stage(32, layers[1], 2)
        self.layer3 = self._stage(64, layers[2], 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)

    def _stage(self, planes, blocks, stride):
        down = None
        if stride != 1 or self.inplanes != planes:
            down = nn.Sequential(nn.Conv2d(self.inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))
        out = [BasicBlock(self.inplanes, planes, stride, down)]
        self.inplanes = planes
        out += [BasicBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*out)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.avgpool(x).flatten(1))


def resnet56(num_classes=10):
    return CifarResnet([9, 9, 9], num_classes)


def resnet20(num_classes=10):
    return CifarResnet([3, 3, 3], num_classes)


def vgg11_bn_small(num_classes=10):
    """torchvision's VGG-11-BN with a CIFAR head: global pool and one Linear (Gator's naive
    mapper reads only the convs)."""
    import torchvision

    net = torchvision.models.vgg11_bn()
    net.avgpool = nn.AdaptiveAvgPool2d(1)
    net.classifier = nn.Linear(512, num_classes)
    return net
