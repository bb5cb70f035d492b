"""A folder of images as a Dataset: ImageFolder layout (one sub-folder per class) or flat.

Reading and normalising image files live here; relprop.apps.loading (the `relprop explain`
path) uses the same functions, so both commands see the same pixels. Decoding happens in the
DataLoader's worker processes.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from ..errors import RelpropError
from ..visualize import optional

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ImageFiles(Dataset):
    """(x, label) per image: x (C, H, W) as `relprop explain` feeds it, label the class
    folder's position in `classes` (-1 for a flat folder). `samples` lists (path, label)
    like torchvision's ImageFolder, `bounds` the z-box bounds of the normalisation.

    preprocessing: an object with read(path) -> (H, W, C) array and batch(arrays) ->
    (x, low, high), such as the one a model's weights declare (relprop.apps.loading); without
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


# --- reading images (shared with relprop.apps.loading, the `relprop explain` path) ---------

def image_files(inputs: Sequence[str | Path]) -> list[Path]:
    """Image paths from files and folders (sorted within a folder)."""
    files: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise RelpropError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {p}")
            files.extend(found)
        elif p.is_file():
            files.append(p)
        else:
            raise RelpropError(f"no such file or folder: {p}")
    return files


def open_image(path: Path, mode: str = "RGB") -> Any:
    """The file as a PIL image in `mode`, or one line that says why not."""
    pil = optional("PIL.Image")
    try:
        with pil.open(path) as img:
            return img.convert(mode)
    except (pil.UnidentifiedImageError, OSError) as exc:
        raise RelpropError(f"cannot read image {path}: {exc}") from exc


def read_image(path: Path, size: int | None, channels: int = 3) -> np.ndarray:
    """(H, W, C) float array in [0, 1]; resized (shorter side, then centre crop) to size."""
    arr = resize_crop(open_image(path, "RGB" if channels == 3 else "L"), size)
    return arr[..., None] if arr.ndim == 2 else arr


def resize_crop(img: Any, size: int | None) -> np.ndarray:
    if size is not None:
        pil = optional("PIL.Image")
        w, h = img.size
        scale = size / min(w, h)
        img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))),
                         pil.BILINEAR)
        w, h = img.size
        left, top = (w - size) // 2, (h - size) // 2
        img = img.crop((left, top, left + size, top + size))
    return np.asarray(img, dtype=np.float32) / 255.0


def to_input(images: list[np.ndarray], normalize: bool) -> tuple[torch.Tensor, torch.Tensor,
                                                                torch.Tensor]:
    """Batch (B, C, H, W) and the z-box bounds (the normalised images of 0 and 1)."""
    return normalized_batch(images, IMAGENET_MEAN if normalize else None,
                  IMAGENET_STD if normalize else None)


def normalized_batch(images: Sequence[np.ndarray], mean: tuple[float, ...] | None,
           std: tuple[float, ...] | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    arrays = [a[..., None] if a.ndim == 2 else a for a in images]
    x = torch.from_numpy(np.stack(arrays)).float().permute(0, 3, 1, 2).contiguous()
    channels = x.shape[1]
    if mean is None or std is None or len(mean) not in (1, channels):
        return x, torch.zeros(()), torch.ones(())
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return (x - m) / s, (0 - m) / s, (1 - m) / s
