"""A tiny network with every gated op TensorRT gets a plugin for (CG, PG, FBS), a static
channel mask the fold removes, and a batch-dependent flatten (`x.view(x.size(0), -1)`, which
the capture bakes in as a Reshape to [N, -1]): loaded in tests via
`--model tests/models/gated_tiny.py:gated_tiny` on inputs of shape (N, 3, 8, 8)."""
import torch
from torch import nn

from gate2deploy.gated import CGConv2d, FBSConv2d, PGConv2d
from gate2deploy.nn import ChannelMask


class GatedTiny(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.mask = ChannelMask(torch.tensor([1, 0, 1, 1, 0, 1, 1, 1], dtype=torch.float32))
        self.mid = nn.Conv2d(8, 8, 1, bias=False)  # reads the masked channels: the fold narrows it
        self.cg = CGConv2d(8, 8, 3, padding=1, p=4)
        self.pg = PGConv2d(8, 8, 3, stride=2, padding=1, abits=4, pred_bits=2)
        self.fbs = FBSConv2d(8, 12, 3, padding=1, density=0.5)
        self.fc = nn.Linear(12 * 4 * 4, num_classes)

    def forward(self, x):
        x = self.mask(torch.relu(self.bn(self.stem(x))))
        x = torch.relu(self.cg(self.mid(x)))
        x = torch.relu(self.pg(x))
        x = self.fbs(x)
        return self.fc(x.view(x.size(0), -1))


def gated_tiny(num_classes: int = 10) -> nn.Module:
    return GatedTiny(num_classes)
