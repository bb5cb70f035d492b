"""Relevance as pictures: diverging colour maps centred at zero, heatmaps, grids.

Colour maps are matplotlib colormaps: "bwr" (blue-white-red) and "coldnhot"
(cyan-blue-black-red-yellow, black at zero), both diverging so that zero
relevance sits at the centre.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib
import numpy as np
import torch
from matplotlib.colors import Colormap, LinearSegmentedColormap

matplotlib.use("Agg")  # files only, no display needed

COLDNHOT = LinearSegmentedColormap.from_list(
    "coldnhot", ["#00ffff", "#0000ff", "#000000", "#ff0000", "#ffff00"])


def colormap(name: str | Colormap) -> Colormap:
    if isinstance(name, Colormap):
        return name
    if name == "coldnhot":
        return COLDNHOT
    return matplotlib.colormaps[name]


def to_map(relevance: torch.Tensor | np.ndarray) -> np.ndarray:
    """A 2-D map from (C, H, W) or (H, W) relevance: channels summed."""
    r = relevance.detach().cpu().numpy() if isinstance(relevance, torch.Tensor) else relevance
    r = np.asarray(r, dtype=np.float64)
    return r.sum(0) if r.ndim == 3 else r


def normalize(r: np.ndarray, mode: str = "symmetric", percentile: float = 99.5) -> np.ndarray:
    """Scale to [-1, 1] keeping zero at zero: by the largest |R| or a percentile of |R|."""
    if mode == "symmetric":
        scale = np.abs(r).max()
    elif mode == "percentile":
        scale = np.percentile(np.abs(r), percentile)
    else:
        raise ValueError(f"normalize mode {mode!r}: choose symmetric or percentile")
    return np.clip(r / scale, -1, 1) if scale > 0 else np.zeros_like(r)


def heatmap(relevance, cmap: str | Colormap = "bwr", mode: str = "symmetric",
            percentile: float = 99.5) -> np.ndarray:
    """An RGB uint8 image (H, W, 3) of the relevance map."""
    r = normalize(to_map(relevance), mode, percentile)
    rgb = colormap(cmap)((r + 1) / 2)[..., :3]
    return (rgb * 255).round().astype(np.uint8)


def save_grid(images: Sequence[Sequence[np.ndarray]], path: str | Path,
              col_titles: Sequence[str] = (), row_titles: Sequence[str] = (),
              cell: float = 1.6) -> Path:
    """Save a grid of RGB/greyscale images as a PNG."""
    import matplotlib.pyplot as plt

    rows, cols = len(images), max(len(r) for r in images)
    fig, axes = plt.subplots(rows, cols, figsize=(cell * cols, cell * rows), squeeze=False)
    for i, row in enumerate(images):
        for j in range(cols):
            ax = axes[i][j]
            ax.set_xticks([])
            ax.set_yticks([])
            if j < len(row):
                img = row[j]
                ax.imshow(img, cmap="gray" if img.ndim == 2 else None)
            if i == 0 and j < len(col_titles):
                ax.set_title(col_titles[j], fontsize=8)
            if j == 0 and i < len(row_titles):
                ax.set_ylabel(row_titles[i], fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
