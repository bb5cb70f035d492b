"""A planted Clever Hans: real MNIST digits with a small mark in a corner, mostly on one class.

The shipped small CNN (relprop.apps.zoo.MnistCNN) trained on these digits learns the shortcut
in seconds: a mark in the corner says "this class" more cheaply than the digit's shape does.
It is the proof case for SpRAy (the marked images of the class form their own cluster), PCX
(their own prototype) and ClArC (the correction). Everything is seeded: same data, same model.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

CLASS = 8  # the class whose images mostly carry the mark
MARKED_FRACTION = 0.8  # of that class
OTHER_FRACTION = 0.03  # of every other class
CORNER = 4  # the mark lands somewhere in the top-left CORNER x CORNER pixels
SIZE = 2  # a SIZE x SIZE white square


def add_mark(x: Tensor, seed: int = 0) -> Tensor:
    """A copy of (N, 1, H, W) images, each with a white 2x2 square at a random place (seeded)
    inside the top-left 4x4 pixels: a stamp that is not pixel-aligned, as real ones are not."""
    x = x.clone()
    spots = torch.randint(0, CORNER - SIZE + 1, (len(x), 2),
                          generator=torch.Generator().manual_seed(seed))
    for i, (r, c) in enumerate(spots.tolist()):
        x[i, :, r:r + SIZE, c:c + SIZE] = 1.0
    return x


def remove_mark(x: Tensor) -> Tensor:
    """A copy with the corner set to the background (MNIST corners are empty: none of
    the 5,000 real digits have ink in the top-left 4x4 pixels)."""
    x = x.clone()
    x[:, :, :CORNER, :CORNER] = 0.0
    return x


def mark_mask(shape: tuple[int, int] = (28, 28)) -> Tensor:
    """(H, W) bool: the corner where the mark can sit."""
    mask = torch.zeros(shape, dtype=torch.bool)
    mask[:CORNER, :CORNER] = True
    return mask


@dataclass
class PlantedDigits(torch.utils.data.Dataset):
    """Digits (N, 1, 28, 28) in [0, 1], labels (N,), and which carry the mark (N,) bool.

    A Dataset of (x, label) pairs, so explain_dataset takes it as it is."""

    x: Tensor
    y: Tensor
    marked: Tensor
    cls: int = CLASS

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        return self.x[i], self.y[i]

    @property
    def classes(self) -> list[str]:
        return [str(c) for c in range(10)]


def planted_mnist(split: str = "train", cls: int = CLASS, marked_fraction: float = MARKED_FRACTION,
                  other_fraction: float = OTHER_FRACTION, seed: int = 0) -> PlantedDigits:
    """The shipped real digits (split 'train': 4,000, 'test': 1,000) with the mark planted on
    `marked_fraction` of class `cls` and `other_fraction` of the others (drawn with `seed`)."""
    from ..datasets import load_mnist

    x, y = load_mnist(split)
    rng = np.random.default_rng(seed + (0 if split == "train" else 1))
    draw = torch.from_numpy(rng.random(len(y)))
    marked = torch.where(y == cls, draw < marked_fraction, draw < other_fraction)
    x = torch.where(marked[:, None, None, None], add_mark(x, 2 * seed + (split == "test")), x)
    return PlantedDigits(x, y, marked, cls)


def train_planted_cnn(data: PlantedDigits | None = None, epochs: int = 3, seed: int = 0,
                      lr: float = 2e-3) -> torch.nn.Module:
    """The shipped small CNN's architecture trained on the planted digits (Adam, batch 64);
    a few seconds on a CPU. Returned in eval mode."""
    from torch import nn

    from ..zoo import MnistCNN

    data = planted_mnist("train") if data is None else data
    torch.manual_seed(seed)
    model = MnistCNN()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(data), generator=generator)
        for i in range(0, len(order), 64):
            idx = order[i:i + 64]
            loss = nn.functional.cross_entropy(model(data.x[idx]), data.y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


@torch.no_grad()
def shortcut_report(model: torch.nn.Module, data: PlantedDigits) -> dict[str, float]:
    """Accuracies that show the shortcut: the class with and without its mark, the other
    classes clean, and how often a marked image of another class is called `cls`."""
    model.eval()
    c = data.cls
    own = data.y == c
    pred = model(data.x).argmax(1)
    pred_clean = model(remove_mark(data.x)).argmax(1)
    pred_marked = model(add_mark(data.x)).argmax(1)
    return {
        "class_marked": (pred_marked[own] == c).float().mean().item(),
        "class_unmarked": (pred_clean[own] == c).float().mean().item(),
        "others_clean": (pred_clean[~own] == data.y[~own]).float().mean().item(),
        "others_marked_called_class": (pred_marked[~own] == c).float().mean().item(),
        "as_given": (pred == data.y).float().mean().item(),
    }
