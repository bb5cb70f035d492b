"""A folder of images as a Dataset: ImageFolder layout (one sub-folder per class) or flat.

Reading and normalising reuse relprop.loading (the `relprop explain` path), so both
commands see the same pixels; decoding happens in the DataLoader's worker processes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from ..errors import RelpropError
from ..loading import IMAGE_SUFFIXES, image_files, read_image, to_input


class ImageFiles(Dataset):
    """(x, label) per image: x (C, H, W) as `relprop explain` feeds it, label the class
    folder's position in `classes` (-1 for a flat folder). `samples` lists (path, label)
    like torchvision's ImageFolder, `bounds` the z-box bounds of the normalisation.

    preprocessing: an object with read(path) -> (H, W, C) array and batch(arrays) ->
    (x, low, high), such as the one a model's weights declare (relprop.loading); without
    it, size and normalize decide (shorter side, centre crop, ImageNet statistics)."""

    def __init__(self, root: str | Path, size: int | None = 224, normalize: bool = True,
                 preprocessing: Any = None) -> None:
        root = Path(root).absolute()  # paths in the manifest work from anywhere
        if not root.is_dir():
            raise RelpropError(f"no such folder: {root}")
        self.root, self.size, self.normalize = root, size, normalize
        self.preprocessing = preprocessing
        subdirs = sorted(d for d in root.iterdir() if d.is_dir() and _has_images(d))
        if subdirs:
            self.classes = [d.name for d in subdirs]
            self.samples = [(str(f), c) for c, d in enumerate(subdirs)
                            for f in image_files([d])]
        else:
            self.classes = []
            self.samples = [(str(f), -1) for f in image_files([root])]
        if not self.samples:
            raise RelpropError(f"no images in {root}")
        self._bounds: tuple[Tensor, Tensor] | None = None

    @property
    def bounds(self) -> tuple[Tensor, Tensor]:
        """The z-box bounds: the normalised images of 0 and 1 (from the first image)."""
        if self._bounds is None:
            _, low, high = self._batch([self._read(Path(self.samples[0][0]))])
            self._bounds = (low, high)
        return self._bounds

    def _read(self, path: Path) -> np.ndarray:
        if self.preprocessing is not None:
            return self.preprocessing.read(path)
        return read_image(path, self.size)

    def _batch(self, images: list[np.ndarray]) -> tuple[Tensor, Tensor, Tensor]:
        if self.preprocessing is not None:
            return self.preprocessing.batch(images)
        return to_input(images, self.normalize)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        path, label = self.samples[i]
        x, _, _ = self._batch([self._read(Path(path))])
        return x[0], label


def _has_images(folder: Path) -> bool:
    return any(f.suffix.lower() in IMAGE_SUFFIXES for f in folder.iterdir())


def sample_paths(dataset: Dataset) -> list[str] | None:
    """Each sample's file, where the dataset says (`samples` / `imgs` like ImageFolder,
    or `paths`); None otherwise."""
    samples = getattr(dataset, "samples", None) or getattr(dataset, "imgs", None)
    if isinstance(samples, list | tuple) and samples and isinstance(samples[0], tuple | list):
        return [str(s[0]) for s in samples]
    paths = getattr(dataset, "paths", None)
    if isinstance(paths, list | tuple):
        return [str(p) for p in paths]
    return None


def class_names(dataset: Dataset) -> list[str]:
    classes = getattr(dataset, "classes", None)
    return [str(c) for c in classes] if isinstance(classes, list | tuple) else []


class Indexed(Dataset):
    """(index, x, label) from any dataset of (x, label), (x, label, ...) or x alone."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> tuple[int, Tensor, int]:
        item = self.dataset[i]
        if isinstance(item, tuple | list):
            x, label = item[0], (item[1] if len(item) > 1 else -1)
        else:
            x, label = item, -1
        if not isinstance(x, Tensor):
            x = torch.as_tensor(np.asarray(x))
        if isinstance(label, Tensor):
            label = label.item() if label.numel() == 1 else -1
        try:
            label = int(label)
        except (TypeError, ValueError):
            label = -1
        return i, x, label
