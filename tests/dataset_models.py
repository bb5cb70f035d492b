"""A tiny seeded CNN for the explain-dataset tests (importable by torchrun's processes)."""

from __future__ import annotations

import torch
from torch import nn


def tiny_cnn() -> nn.Module:
    """3-channel images of any size -> 3 classes; the same weights in every process."""
    gen = torch.Generator().manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
        nn.Flatten(), nn.Linear(24, 3))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return model.eval()
