"""A tiny seeded CNN and a dataset that counts reads, for the explain-dataset tests
(importable by the subprocesses and torchrun's ranks)."""

from __future__ import annotations

import time

import torch
from torch import nn

from relprop.dataset import ImageFiles


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


class CountingFiles(ImageFiles):
    """ImageFiles that notes which samples were read (and may read them slowly)."""

    def __init__(self, root, size: int = 16, delay: float = 0.0) -> None:
        super().__init__(root, size=size)
        self.delay = delay
        self.seen: list[int] = []

    def __getitem__(self, i: int):
        self.seen.append(i)
        if self.delay:
            time.sleep(self.delay)
        return super().__getitem__(i)
