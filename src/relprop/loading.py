"""Models and images for the command line: torchvision names or `module:callable`, files
or folders of images, with errors that say what is wrong."""

from __future__ import annotations

import importlib
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .errors import RelpropError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def load_model(arch: str, weights: str | Path | None = None) -> nn.Module:
    """A torchvision architecture by name or `package.module:callable`, in eval mode."""
    if ":" in arch:
        module_name, _, attr = arch.partition(":")
        try:
            factory = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise RelpropError(f"cannot load model {arch!r}: {exc}") from exc
        model = factory()
        if not isinstance(model, nn.Module):
            raise RelpropError(f"{arch!r} returned {type(model).__name__}, not an nn.Module")
    else:
        import torchvision

        if arch not in torchvision.models.list_models(module=torchvision.models):
            raise RelpropError(f"unknown architecture {arch!r}: not a torchvision "
                               "classification model name and not 'module:callable'")
        model = torchvision.models.get_model(arch, weights=None)
    if weights is not None:
        path = Path(weights)
        if not path.is_file():
            raise RelpropError(f"weights file not found: {path}")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise RelpropError(f"cannot read weights {path}: {exc}") from exc
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
        try:
            model.load_state_dict(state)
        except RuntimeError as exc:
            first = str(exc).splitlines()[0:3]
            raise RelpropError(f"weights {path} do not fit {arch}: {' '.join(first)}") from exc
    return model.eval()


def image_files(inputs: list[str | Path]) -> list[Path]:
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


def read_image(path: Path, size: int | None, channels: int = 3) -> np.ndarray:
    """(H, W, C) float array in [0, 1]; resized (shorter side, then centre crop) to size."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img = img.convert("RGB" if channels == 3 else "L")
            if size is not None:
                w, h = img.size
                scale = size / min(w, h)
                img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))),
                                 Image.BILINEAR)
                w, h = img.size
                left, top = (w - size) // 2, (h - size) // 2
                img = img.crop((left, top, left + size, top + size))
            arr = np.asarray(img, dtype=np.float32) / 255.0
    except (UnidentifiedImageError, OSError) as exc:
        raise RelpropError(f"cannot read image {path}: {exc}") from exc
    return arr[..., None] if arr.ndim == 2 else arr


def to_input(images: list[np.ndarray], normalize: bool) -> tuple[torch.Tensor, torch.Tensor,
                                                                torch.Tensor]:
    """Batch (B, C, H, W) and the z-box bounds (the normalised images of 0 and 1)."""
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
    channels = x.shape[1]
    if normalize and channels == 3:
        mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        return (x - mean) / std, (0 - mean) / std, (1 - mean) / std
    return x, torch.zeros(()), torch.ones(())
