"""Relevance as pictures: diverging colour maps centred at zero, heatmaps, grids.

Colour maps are matplotlib colormaps: "bwr" (blue-white-red) and "coldnhot"
(cyan-blue-black-red-yellow, black at zero), both diverging so that zero
relevance sits at the centre.

matplotlib and Pillow are the `relprop[viz]` extra and are imported only when a
picture is made, so `import relprop` needs neither. Figures are built without
pyplot (a Figure on the Agg canvas): the caller's matplotlib backend, its open
figures and its rcParams are never touched, in a notebook or a script.
"""

from __future__ import annotations

import functools
import importlib
import io
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .errors import MissingDependencyError

if TYPE_CHECKING:
    from matplotlib.colors import Colormap
    from matplotlib.figure import Figure

VIZ_EXTRA = "pip install 'relprop[viz]'"


def optional(module: str, install: str = VIZ_EXTRA) -> ModuleType:
    """Import an optional dependency, or say in one line how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        top = module.split(".")[0]
        raise MissingDependencyError(f"this needs {top}, which is not installed: {install}"
                                     ) from exc


@functools.cache
def _coldnhot() -> Colormap:
    colors = optional("matplotlib.colors")
    return colors.LinearSegmentedColormap.from_list(
        "coldnhot", ["#00ffff", "#0000ff", "#000000", "#ff0000", "#ffff00"])


def __getattr__(name: str) -> Any:
    """COLDNHOT stays importable, built on first use (matplotlib is optional)."""
    if name == "COLDNHOT":
        return _coldnhot()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def colormap(name: str | Colormap) -> Colormap:
    if not isinstance(name, str):
        return name
    if name == "coldnhot":
        return _coldnhot()
    return optional("matplotlib").colormaps[name]


def new_figure(width: float, height: float) -> Figure:
    """A figure on its own Agg canvas: no pyplot, so no backend switch and no figure
    left open in the caller's session."""
    figure = optional("matplotlib.figure")
    agg = optional("matplotlib.backends.backend_agg")
    fig = figure.Figure(figsize=(width, height))
    agg.FigureCanvasAgg(fig)
    return fig


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
    rows, cols = len(images), max(len(r) for r in images)
    fig = new_figure(cell * cols, cell * rows)
    axes = fig.subplots(rows, cols, squeeze=False)
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


def _save_figure(fig: Figure, path: str | Path) -> Path:
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


def figure_png(fig: Figure, dpi: int = 100) -> bytes:
    """The figure as PNG bytes (what Jupyter's image/png display wants)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


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
    pil = optional("PIL.Image")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pil.fromarray(image).save(path)
    return path


def feature_bars(relevance, names: Sequence[str], path: str | Path, title: str = "") -> Path:
    """Relevance of tabular features as a horizontal bar plot (red positive, blue negative)."""
    r = to_map(relevance).reshape(-1)
    if len(names) != len(r):
        raise ValueError(f"{len(names)} feature names for {len(r)} relevance values")
    order = np.argsort(np.abs(r))
    fig = new_figure(6, 0.3 * len(r) + 1)
    ax = fig.subplots()
    ax.barh([names[i] for i in order], r[order],
            color=["#c00000" if r[i] > 0 else "#0033cc" for i in order])
    ax.axvline(0, color="k", lw=0.5)
    ax.set_xlabel("relevance")
    if title:
        ax.set_title(title)
    return _save_figure(fig, path)


# --- an Explanation as a picture (Jupyter's _repr_png_, Explanation.plot) ------------------

def explanation_figure(expl: Any, *, samples: int = 8, class_names: Sequence[str] | None = None,
                       images: Sequence[np.ndarray] | None = None, cmap: str | Colormap = "bwr",
                       mode: str = "percentile", cell: float = 1.8) -> Figure:
    """The heatmap grid of an Explanation: a row per sample (the first `samples`), a
    column per target, titled with the class (and its name from `class_names`) and the
    explained output. Relevance of 4-d or higher inputs (images: channels summed) and
    3-d ones (B, T, F: sequences, as a time x feature map) are heatmaps; 2-d (B, F) bars.
    For several inputs the first one is shown. `images` adds an input column.
    """
    relevance = expl.relevance[0] if isinstance(expl.relevance, tuple) else expl.relevance
    target, explained = expl.target, expl.explained
    if target.dim() == 1:  # one target per sample: a K axis of 1
        relevance, target, explained = relevance[:, None], target[:, None], explained[:, None]
    return relevance_figure(relevance[:samples], target[:samples], explained[:samples],
                            class_names=class_names,
                            images=None if images is None else images[:samples],
                            cmap=cmap, mode=mode, cell=cell)


def explanation_png(expl: Any, **kwargs: Any) -> bytes:
    """explanation_figure as PNG bytes (keywords as there)."""
    return figure_png(explanation_figure(expl, **kwargs))


def relevance_figure(relevance: torch.Tensor, target: torch.Tensor, explained: torch.Tensor,
                     class_names: Sequence[str] | None = None,
                     images: Sequence[np.ndarray] | None = None,
                     cmap: str | Colormap = "bwr", mode: str = "percentile",
                     cell: float = 1.8) -> Figure:
    """The grid behind explanation_figure, from relevance (B, K, ...) and target and
    explained (B, K): the command line draws one image's targets with it."""
    rel = relevance.detach().cpu().double()
    batch, k = target.shape
    lead = 0 if images is None else 1
    fig = new_figure(cell * (k + lead), (cell + 0.4) * batch)
    axes = fig.subplots(batch, k + lead, squeeze=False)
    for i in range(batch):
        if images is not None:
            img = np.asarray(images[i])
            img = img[..., 0] if img.ndim == 3 and img.shape[-1] == 1 else img
            axes[i][0].imshow(img, cmap="gray" if img.ndim == 2 else None)
            axes[i][0].set_title("input", fontsize=8)
        for j in range(k):
            ax = axes[i][lead + j]
            _draw_relevance(ax, rel[i, j], cmap, mode)
            ax.set_title(_target_title(int(target[i, j]), float(explained[i, j]), class_names),
                         fontsize=8)
        axes[i][0].set_ylabel(f"sample {i}", fontsize=8)
        for ax in axes[i]:
            ax.set_xticks([])
            if ax.images:
                ax.set_yticks([])
    fig.tight_layout()
    return fig


def _draw_relevance(ax: Any, r: torch.Tensor, cmap: str | Colormap, mode: str) -> None:
    """One sample's relevance: a heatmap for 2-d or more (leading axes summed), else bars."""
    if r.dim() >= 2:
        m = r.reshape(-1, *r.shape[-2:]).sum(0)
        ax.imshow(heatmap(m, cmap, mode), aspect="equal" if r.dim() >= 3 else "auto",
                  interpolation="nearest")
        return
    v = r.reshape(-1).numpy()
    ax.bar(np.arange(len(v)), v, color=np.where(v > 0, "#c00000", "#0033cc"))
    ax.axhline(0, color="k", lw=0.5)
    ax.tick_params(labelsize=6)


def _target_title(cls: int, explained: float, class_names: Sequence[str] | None) -> str:
    if cls < 0:  # output_relevance: no single class
        return f"given output relevance\nR={explained:.3g}"
    name = f" {class_names[cls]}" if class_names is not None and cls < len(class_names) else ""
    return f"{cls}{name}\nR={explained:.3g}"


# --- token heatmaps (text transformers) ----------------------------------------------------

# markers a tokenizer puts on a token: WordPiece continues a word with "##"; byte-level BPE
# (GPT-2, RoBERTa) starts a word with "Ġ" and SentencePiece (LLaMA, T5) with "▁"
_CONTINUES = "##"
_STARTS = ("Ġ", "▁")


def token_words(tokens: Sequence[str]) -> list[tuple[str, bool]]:
    """(text to show, starts a new word) per token: WordPiece's '##' pieces glue onto the
    token before, a BPE / SentencePiece word-start marker ('Ġ', '▁') becomes a space."""
    bpe = any(tok.startswith(_STARTS) for tok in tokens)
    out = []
    for i, tok in enumerate(tokens):
        if tok.startswith(_CONTINUES) and len(tok) > 2 and i > 0:
            out.append((tok[2:], False))
        elif tok.startswith(_STARTS) and len(tok) > 1:
            out.append((tok[1:], True))
        else:  # with a BPE tokenizer, a token without the marker continues the word
            out.append((tok, not (bpe and i > 0)))
    return out


def _token_values(tokens: Sequence[str], relevance) -> np.ndarray:
    r = to_map(relevance).reshape(-1)
    if len(tokens) != len(r):
        raise ValueError(f"{len(tokens)} tokens for {len(r)} relevance values")
    if not np.isfinite(r).all():
        raise ValueError("relevance contains NaN or Inf")
    return r


def _token_colors(r: np.ndarray, cmap: str | Colormap) -> np.ndarray:
    """(T, 3) RGB in [0, 1]: r / max|r| through a diverging colour map, zero exactly at its
    centre (the map resampled to an odd number of colours: 0.5 hits the middle one)."""
    cm = colormap(cmap).resampled(257)
    return np.asarray(cm((normalize(r) + 1) / 2))[..., :3].reshape(-1, 3)


def _ink(rgb: Sequence[float]) -> str:
    """Black text on light backgrounds, white on dark ones."""
    return "#000" if 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2] > 0.5 else "#fff"


def token_html(tokens: Sequence[str], relevance, cmap: str | Colormap = "bwr",
               label: str = "") -> str:
    """Tokens as coloured HTML spans: relevance / max|relevance| through a diverging colour
    map centred at zero (bwr: red positive, white zero, blue negative). Each span's title
    (the tooltip) holds its token and relevance; tokens are HTML-escaped, and WordPiece
    pieces ('##ing') are shown glued to the token before, without the '##'. `label`, if
    given, is shown (escaped) in front of the tokens."""
    import html

    r = _token_values(tokens, relevance)
    colors = _token_colors(r, cmap)
    parts = [f'<span class="relprop-label">{html.escape(label)}</span> '] if label else []
    for i, ((text, new_word), value, rgb) in enumerate(zip(token_words(tokens), r, colors,
                                                           strict=True)):
        red, green, blue = (int(round(255 * c)) for c in rgb)
        if new_word and i > 0:
            parts.append(" ")
        title = html.escape(f"{tokens[i]}: {value:+.4g}", quote=True)
        parts.append(f'<span class="relprop-token" title="{title}" style="background: '
                     f'rgb({red},{green},{blue}); color: {_ink(rgb)}; padding: 1px 0; '
                     f'border-radius: 2px">{html.escape(text)}</span>')
    return ('<div class="relprop-tokens" style="font-family: monospace; line-height: 1.9">'
            + "".join(parts) + "</div>")


def token_png(tokens: Sequence[str], relevance, path: str | Path | None = None,
              cmap: str | Colormap = "bwr", width: float = 8.0, fontsize: float = 11.0,
              title: str = "") -> bytes:
    """The tokens as coloured boxes (colours as token_html), wrapped into lines `width`
    inches wide: PNG bytes, also written to `path` if given."""
    rectangle = optional("matplotlib.patches").Rectangle
    r = _token_values(tokens, relevance)
    colors = _token_colors(r, cmap)
    char, line, pad, margin = 0.602 * fontsize, 2.0 * fontsize, 0.3 * fontsize, 8.0  # points
    usable = width * 72 - 2 * margin
    boxes, x, row = [], 0.0, 0
    for text, new_word in token_words(tokens):
        w = max(len(text), 1) * char + 2 * pad
        gap = char if new_word else 1.0
        if x > 0 and x + gap + w > usable:
            x, row, gap = 0.0, row + 1, 0.0
        x += gap if x > 0 else 0.0
        boxes.append((x, row, w, text))
        x += w
    top = line * 1.2 if title else 0.0
    height = (row + 1) * line + top + 2 * margin
    fig = new_figure(width, height / 72)
    to_x, to_y = 1 / (width * 72), 1 / height
    if title:
        fig.text(margin * to_x, 1 - (margin + 0.5 * line) * to_y, title, fontsize=fontsize,
                 va="center", ha="left")
    for (bx, brow, w, text), rgb in zip(boxes, colors, strict=True):
        y0 = height - margin - top - (brow + 1) * line + 0.15 * line
        fig.patches.append(rectangle(((margin + bx) * to_x, y0 * to_y), w * to_x,
                                     0.7 * line * to_y, transform=fig.transFigure,
                                     facecolor=rgb, edgecolor="#999999", linewidth=0.3))
        fig.text((margin + bx + w / 2) * to_x, (y0 + 0.35 * line) * to_y, text,
                 fontsize=fontsize, family="monospace", ha="center", va="center",
                 color=_ink(rgb))
    data = figure_png(fig)
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return data
