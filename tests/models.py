"""Small models shared by the tests: module and functional twins."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SeedMLP(nn.Module):
    """The seed's sample network: 10-32-16-1, ReLU, sigmoid output."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(),
                                 nn.Linear(16, 1), nn.Sigmoid())

    def forward(self, x):
        return self.net(x)


class SeedMLPFunctional(nn.Module):
    """The same network written with functional calls and operators."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(10, 32), nn.Linear(32, 16), nn.Linear(16, 1)

    def forward(self, x):
        x = torch.relu(self.fc1(x))
        x = F.relu(F.linear(x, self.fc2.weight, self.fc2.bias))
        return torch.sigmoid(self.fc3(x))


class ModuleCNN(nn.Module):
    """A residual CNN written with modules only."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.relu2 = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.conv3 = nn.Conv2d(8, 16, 3, padding=1)
        self.relu3 = nn.ReLU()
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(16 + 8, 5)

    def forward(self, x):
        a = self.relu1(self.conv1(x))
        b = self.relu2(self.conv2(a))
        s = self.pool(a + b)
        c = self.relu3(self.conv3(s))
        feats = torch.cat([self.flatten(self.gap(c)), self.flatten(self.gap(s))], dim=1)
        return self.fc(feats)


class FunctionalCNN(ModuleCNN):
    """The same CNN with functional ops: torch.relu, x + y, torch.flatten, torch.cat."""

    def forward(self, x):
        a = torch.relu(self.conv1(x))
        b = F.relu(F.conv2d(a, self.conv2.weight, self.conv2.bias, padding=1))
        s = F.max_pool2d(a + b, 2)
        c = self.conv3(s).relu()
        g1 = torch.flatten(F.adaptive_avg_pool2d(c, 1), 1)
        g2 = s.mean(dim=(2, 3))
        return self.fc(torch.cat([g1, g2], 1))


def without_biases(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        for m in model.modules():
            if getattr(m, "bias", None) is not None:
                m.bias.zero_()
    return model


def with_biases(model: nn.Module, std: float = 0.1) -> nn.Module:
    with torch.no_grad():
        for m in model.modules():
            if getattr(m, "bias", None) is not None:
                m.bias.normal_(0, std)
    return model


class BottleneckSiLUNet(nn.Module):
    """Layers the fast path fuses without a ReLU: a residual branch ending in conv+BN
    (signed relevance at z), SiLU and GELU after convs, a depthwise conv, a dense head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.branch1 = nn.Conv2d(8, 8, 1)
        self.branch2 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.pw = nn.Conv2d(8, 12, 1)
        self.fc = nn.Linear(12, 5)
        with torch.no_grad():
            self.bn.running_mean.normal_(0, 0.1)
            self.bn.running_var.uniform_(0.5, 2.0)
            self.bn.weight.normal_(1, 0.2)

    def forward(self, x):
        a = torch.relu(self.stem(x))
        r = self.bn(self.branch2(torch.relu(self.branch1(a))))
        s = torch.relu(a + r)
        d = F.silu(self.dw(s))
        p = F.gelu(self.pw(d))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(p, 1), 1))
