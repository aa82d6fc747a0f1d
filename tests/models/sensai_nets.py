"""sensAI's CIFAR models and its per-group pruning, re-implemented for the tests (not the
seed's code; the seed's files are cited). Group models built here are saved as sensAI saves
them, whole pickled modules (`torch.save(model)`), so these classes must stay importable
(`models.sensai_nets`, tests/ being on sys.path).

- `VGG` after sensAI models/cifar/vgg.py: `features` (Conv-BN-ReLU, MaxPool) and a single
  Linear `classifier` on the flattened 1x1 map; forward(x, features_only=False).
- `ResNet` / `Bottleneck` after models/cifar/resnet.py (depth 9n+2, widths 16/32/64 x4).
- `prune_vgg` after prune_and_get_model.py `prune_vgg`: every conv loses its candidate
  output channels (with its BN and the next conv's inputs); the last conv's removal also
  removes the classifier's inputs.
- `prune_resnet` after prune_and_get_model.py `prune_resnet`: only block-internal widths
  (conv1 -> conv2, conv2 -> conv3); the candidates are indexed per ReLU call: stem 0, then
  per block three calls (after bn1, after bn2, after the residual add, the last not pruned).
- `prune_head` after prune_utils/layer_prune.py `prune_output_linear_layer_`: rows
  [0] + group classes, row 0's weight re-drawn N(0, 0.01); single-class (bce): the one row.
"""
from __future__ import annotations

import torch
from torch import nn

CFG_E = [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"]
CFG_SMALL = [16, "M", 24, "M", 32, "M", 32, "M", 48, "M"]


class VGG(nn.Module):
    def __init__(self, cfg=CFG_SMALL, num_classes: int = 10):
        super().__init__()
        layers, c = [], 3
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                layers += [nn.Conv2d(c, v, kernel_size=3, padding=1), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
                c = v
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(c, num_classes)

    def forward(self, x, features_only=False):
        x = self.features(x)
        x = x.view(x.size(0), -1)
        if not features_only:
            x = self.classifier(x)
        return x


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        residual = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            residual = self.downsample(x)
        out += residual
        return self.relu(out)


class ResNet(nn.Module):
    def __init__(self, depth: int = 29, num_classes: int = 10):
        super().__init__()
        n = (depth - 2) // 9
        self.inplanes = 16
        self.conv1 = nn.Conv2d(3, 16, kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(16, n)
        self.layer2 = self._make_layer(32, n, stride=2)
        self.layer3 = self._make_layer(64, n, stride=2)
        self.avgpool = nn.AvgPool2d(8)
        self.fc = nn.Linear(64 * 4, num_classes)

    def _make_layer(self, planes, blocks, stride=1):
        downsample = None
        if stride != 1 or self.inplanes != planes * 4:
            downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes * 4, kernel_size=1, stride=stride, bias=False),
                                       nn.BatchNorm2d(planes * 4))
        layers = [Bottleneck(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * 4
        layers += [Bottleneck(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x, features_only=False):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = self.avgpool(x)
        x = x.view(x.size(0), -1)
        return x if features_only else self.fc(x)


def randomize(model: nn.Module, seed: int) -> nn.Module:
    """Trained-looking BatchNorm statistics and scales (fresh ones are identities)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.weight.data = torch.rand(c, generator=g) + 0.5
            m.bias.data = torch.randn(c, generator=g) * 0.1
            m.running_mean.data = torch.randn(c, generator=g) * 0.1
            m.running_var.data = torch.rand(c, generator=g) + 0.5
    return model.eval()


def _keep(n: int, drop) -> list[int]:
    drop = set(int(i) for i in drop)
    return [i for i in range(n) if i not in drop]


def _prune_out(conv: nn.Conv2d, bn: nn.BatchNorm2d, keep: list[int]) -> None:
    conv.weight.data = conv.weight.data[keep]
    if conv.bias is not None:
        conv.bias.data = conv.bias.data[keep]
    conv.out_channels = len(keep)
    for name in ("weight", "bias", "running_mean", "running_var"):
        getattr(bn, name).data = getattr(bn, name).data[keep]
    bn.num_features = len(keep)


def _prune_in(conv: nn.Conv2d, keep: list[int]) -> None:
    conv.weight.data = conv.weight.data[:, keep]
    conv.in_channels = len(keep)


def prune_head(linear: nn.Linear, group: list[int], bce: bool, seed: int = 0) -> None:
    rows = list(group) if bce else [0] + list(group)
    linear.weight.data = linear.weight.data[rows].clone()
    linear.bias.data = linear.bias.data[rows].clone()
    if not bce:
        linear.weight.data[0] = torch.randn(linear.in_features, generator=torch.Generator().manual_seed(seed)) * 0.01
    linear.out_features = len(rows)


def prune_vgg(model: VGG, candidates: list[list[int]], group: list[int], bce: bool = False) -> VGG:
    feats = model.features
    convs = [i for i, m in enumerate(feats) if isinstance(m, nn.Conv2d)]
    assert len(convs) == len(candidates)
    for k, i in enumerate(convs):
        keep = _keep(feats[i].out_channels, candidates[k])
        _prune_out(feats[i], feats[i + 1], keep)
        if k + 1 < len(convs):
            _prune_in(feats[convs[k + 1]], keep)
        else:  # the classifier reads the flattened 1x1 map: one input per channel
            model.classifier.weight.data = model.classifier.weight.data[:, keep]
            model.classifier.in_features = len(keep)
    prune_head(model.classifier, group, bce)
    return model


def prune_resnet(model: ResNet, candidates: list[list[int]], group: list[int], bce: bool = False) -> ResNet:
    index = 1
    for stage in (model.layer1, model.layer2, model.layer3):
        for block in stage:
            keep = _keep(block.conv1.out_channels, candidates[index])
            _prune_out(block.conv1, block.bn1, keep)
            _prune_in(block.conv2, keep)
            keep = _keep(block.conv2.out_channels, candidates[index + 1])
            _prune_out(block.conv2, block.bn2, keep)
            _prune_in(block.conv3, keep)
            index += 3
    prune_head(model.fc, group, bce)
    return model


def relu_widths(model: nn.Module) -> list[int]:
    """Channels seen by each ReLU call, in call order (the seed's candidate list layout)."""
    widths = []
    hooks = [m.register_forward_hook(lambda m, i, o: widths.append(o.shape[1]))
             for m in model.modules() if isinstance(m, nn.ReLU)]
    with torch.no_grad():
        model(torch.zeros(1, 3, 32, 32))
    for h in hooks:
        h.remove()
    return widths


def random_candidates(model: nn.Module, seed: int, fraction: float = 0.4,
                      layer_fractions: list[float] | None = None) -> list[list[int]]:
    """Random prune candidates per ReLU call: a number drawn from [0, fraction * width], or,
    with `layer_fractions`, that fraction of the layer +- `fraction` (a layer's sparsity is
    mostly the layer's, the groups differing a little, as APoZ pruning tends to give)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, w in enumerate(relu_widths(model)):
        if layer_fractions is None:
            k = int(torch.randint(0, max(1, int(w * fraction)) + 1, (1,), generator=g))
        else:
            f = layer_fractions[i] + (float(torch.rand(1, generator=g)) * 2 - 1) * fraction
            k = min(w - 1, max(0, round(w * f)))
        out.append(torch.randperm(w, generator=g)[:k].tolist())
    return out


def group_models(arch: str, groups: list[list[int]], num_classes: int, seed: int = 0,
                 layer_spread: float | None = None, **kwargs) -> list[nn.Module]:
    """One pruned group model per group from one base model, as prune_and_get_model.py does
    (random candidates stand in for the APoZ ones; `layer_spread`: per-layer fractions in
    [0.3, 0.7] shared by the groups, each group +- layer_spread)."""
    import copy

    base = randomize(VGG(num_classes=num_classes, **kwargs) if arch == "vgg" else
                     ResNet(num_classes=num_classes, **kwargs), seed)
    bce = all(len(g) == 1 for g in groups)
    prune = prune_vgg if arch == "vgg" else prune_resnet
    fractions = None
    if layer_spread is not None:
        gen = torch.Generator().manual_seed(seed + 7)
        fractions = (torch.rand(len(relu_widths(base)), generator=gen) * 0.4 + 0.3).tolist()
    models = []
    for i, group in enumerate(groups):
        m = copy.deepcopy(base)
        cands = (random_candidates(base, seed * 100 + i) if fractions is None else
                 random_candidates(base, seed * 100 + i, layer_spread, fractions))
        prune(m, cands, group, bce)
        models.append(m.eval())
    return models
