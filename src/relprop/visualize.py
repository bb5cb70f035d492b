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
    return _save_figure(fig, path)


def _save_figure(fig, path: str | Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def overlay(image: np.ndarray | torch.Tensor, relevance, cmap: str | Colormap = "bwr",
            alpha: float = 0.6, mode: str = "percentile", percentile: float = 99.5) -> np.ndarray:
    """The heatmap blended over a greyscale copy of the image (H, W, 3) uint8.

    image: (H, W, 3) / (H, W) array in [0, 255] or [0, 1], or a (C, H, W) tensor in [0, 1].
    Opacity follows |relevance|, so irrelevant areas show the image itself.
    """
    img = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if img.ndim == 3 and img.shape[0] in (1, 3) and img.shape[-1] not in (1, 3):
        img = img.transpose(1, 2, 0)
    img = img.astype(np.float64)
    if img.max() > 1.0:
        img = img / 255.0
    grey = img.mean(-1) if img.ndim == 3 else img
    r = normalize(to_map(relevance), mode, percentile)
    rgb = colormap(cmap)((r + 1) / 2)[..., :3]
    weight = alpha * np.abs(r)[..., None]
    out = (1 - weight) * grey[..., None] + weight * rgb
    return (np.clip(out, 0, 1) * 255).round().astype(np.uint8)


def save_png(image: np.ndarray, path: str | Path) -> Path:
    """Write an RGB or greyscale uint8 array as PNG (Pillow)."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)
    return path


def feature_bars(relevance, names: Sequence[str], path: str | Path, title: str = "") -> Path:
    """Relevance of tabular features as a horizontal bar plot (red positive, blue negative)."""
    import matplotlib.pyplot as plt

    r = to_map(relevance).reshape(-1)
    if len(names) != len(r):
        raise ValueError(f"{len(names)} feature names for {len(r)} relevance values")
    order = np.argsort(np.abs(r))
    fig, ax = plt.subplots(figsize=(6, 0.3 * len(r) + 1))
    ax.barh([names[i] for i in order], r[order],
            color=["#c00000" if r[i] > 0 else "#0033cc" for i in order])
    ax.axvline(0, color="k", lw=0.5)
    ax.set_xlabel("relevance")
    if title:
        ax.set_title(title)
    return _save_figure(fig, path)


def sequence_html(tokens: Sequence[str], relevance, cmap: str | Colormap = "bwr") -> str:
    """Tokens (or time steps) as HTML spans coloured by relevance, zero = white."""
    import html

    r = normalize(to_map(relevance).reshape(-1))
    if len(tokens) != len(r):
        raise ValueError(f"{len(tokens)} tokens for {len(r)} relevance values")
    cm = colormap(cmap)
    spans = []
    for tok, v in zip(tokens, r, strict=True):
        red, green, blue = (int(255 * c) for c in cm((v + 1) / 2)[:3])
        spans.append(f'<span title="{v:+.3f}" style="background: rgb({red},{green},{blue})">'
                     f"{html.escape(tok)}</span>")
    return " ".join(spans)
