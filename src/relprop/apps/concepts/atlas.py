"""The concept atlas: one self-contained HTML page that answers "what did the model see?"
for one input: the prediction, the top concepts of a layer with their shares, and for
each concept its conditional heatmap, its reference samples (crops around where the
concept's relevance peaks, with their own heatmaps) and its attribution graph.
"""

from __future__ import annotations

import html
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ...concepts.conditional import explain as conditional
from ...concepts.graph import graph
from ...concepts.references import References, receptive_field
from ...concepts.relevance import relevance
from ...explain import Explainer
from ...targets import Target
from ..report import png_data_uri, table_html, write_report

# a reference sample by dataset index: (x (1, C, H, W), the picture (H, W, 3) uint8)
Reader = Callable[[int], tuple[Tensor, np.ndarray]]


def picture(x: Tensor) -> np.ndarray:
    """A (C, H, W) input as an (H, W, 3) uint8 picture, scaled to its own range."""
    a = x.detach().cpu().double()
    a = (a - a.min()) / (a.max() - a.min() + 1e-12)
    a = a.permute(1, 2, 0).numpy() if a.dim() == 3 else a.numpy()
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[..., 0]
    if a.ndim == 2:
        a = np.stack([a] * 3, -1)
    return (a * 255).round().astype(np.uint8)


def dataset_reader(dataset: Any) -> Reader:
    """Reference samples read from an (x, label) dataset, shown scaled to their range."""

    def read(i: int) -> tuple[Tensor, np.ndarray]:
        item = dataset[int(i)]
        x = item[0] if isinstance(item, tuple | list) else item
        x = torch.as_tensor(x)
        return x[None], picture(x)

    return read


def atlas(explainer: Explainer, x: Tensor, out: str | Path, *, layer: str,
          target: Target = None, top: int = 6, references: References | None = None,
          reader: Reader | None = None, n_refs: int = 6, by: str = "relevance",
          lower: Sequence[str] = (), width: int = 2, class_names: Sequence[str] | None = None,
          image: np.ndarray | None = None, title: str | None = None) -> Path:
    """Write the atlas of one input x (1, C, H, W) at `layer` to `out` (an .html file).

    references / reader: a collection (relprop.concepts.load) and how to read its samples
    (dataset_reader(dataset), or what `relprop concepts` builds from image paths); lower:
    layers below `layer` for the attribution graphs. image: the input as a picture."""
    if x.shape[0] != 1:
        raise ValueError("the atlas explains one input: x must have batch size 1")
    with torch.no_grad():
        output = explainer.model(x)
    logits = output.logits if hasattr(output, "logits") else output
    probs = logits.float().softmax(-1)[0]
    if target is None:
        target = int(probs.argmax())
    name = _namer(class_names)
    picture_x = image if image is not None else picture(x[0])
    per = relevance(explainer, x, target, layer)
    chosen = per.top(top)
    expl = conditional(explainer, x, target, condition={layer: [c for c, _, _ in chosen]})
    sections = [("Prediction", _prediction(probs, picture_x, explainer, x, target, name)),
                (f"Top concepts of {layer} for {name(int(target))}",
                 _concept_table(chosen, per.explained, layer))]
    for k, (c, r, share) in enumerate(chosen):
        body = [f"<p>relevance {r:.4g} ({100 * share:.1f}% of the explained "
                f"{float(per.explained[0]):.4g})</p>",
                _images([picture_x, _heatmap(expl.relevance[0, k])],
                        ["input", f"where concept {c} is relevant"])]
        if references is not None and reader is not None:
            body.append(_references(explainer, references, reader, layer, c, n_refs, by,
                                    name))
        if lower:
            g = graph(explainer, x, target, layer=layer, concept=c, lower=list(lower),
                      width=width)
            body.append(f"<h3>Attribution graph</h3>{g.to_svg()}")
        sections.append((f"Concept {c}", "".join(body)))
    return write_report(out, title or f"Concept atlas: {layer}", sections)


def _namer(class_names: Sequence[str] | None) -> Callable[[int], str]:
    def name(c: int) -> str:
        if class_names is not None and 0 <= c < len(class_names):
            return f"{class_names[c]} ({c})"
        return f"class {c}"

    return name


def _heatmap(r: Tensor) -> np.ndarray:
    from ...visualize import heatmap

    return heatmap(r.detach().cpu(), mode="symmetric")


def _images(pictures: Sequence[np.ndarray], captions: Sequence[str]) -> str:
    cells = "".join(f'<figure style="display:inline-block;margin:4px">'
                    f'<img src="{png_data_uri(p)}" alt="{html.escape(c)}" '
                    f'style="width:160px;height:auto"><figcaption>{html.escape(c)}'
                    f"</figcaption></figure>" for p, c in zip(pictures, captions, strict=True))
    return f"<div>{cells}</div>"


def _prediction(probs: Tensor, pic: np.ndarray, explainer: Explainer, x: Tensor,
                target: Target, name: Callable[[int], str]) -> str:
    best = probs.topk(min(5, len(probs)))
    rows = [(name(int(i)), float(p)) for p, i in zip(best.values, best.indices, strict=True)]
    whole = explainer(x, target=target).relevance[0]
    return (_images([pic, _heatmap(whole)], ["input", f"relevance for {name(int(target))}"]) +
            table_html(["class", "probability"], rows))


def _concept_table(chosen: list[tuple[int, float, float]], explained: Tensor,
                   layer: str) -> str:
    rows = [(c, r, f"{100 * s:.1f}%") for c, r, s in chosen]
    return (f"<p>Relevance per channel of {html.escape(layer)}, summed over positions; "
            f"share of the explained value {float(explained[0]):.4g}.</p>" +
            table_html(["concept", "relevance", "share"], rows))


def _references(explainer: Explainer, refs: References, reader: Reader, layer: str, c: int,
                n: int, by: str, name: Callable[[int], str]) -> str:
    """The concept's reference samples: a crop of each around the unit where the concept
    peaks (its receptive field), and the concept's conditional heatmap there."""
    top = refs.top(layer, c, by=by, n=n)
    pictures, captions = [], []
    for i, pos in zip(top.indices.tolist(), top.positions.tolist(), strict=True):
        x, pic = reader(i)
        t = refs.target(i)
        heat = conditional(explainer, x, t, condition={layer: [c]}).relevance[0, 0]
        box = receptive_field(explainer.model, x, layer, c, pos) if x.dim() == 4 else None
        hm = _heatmap(heat)
        if box is not None:
            top_, bottom, left, right = box
            pic, hm = pic[top_:bottom, left:right], hm[top_:bottom, left:right]
        pictures += [pic, hm]
        captions += [f"#{i} ({name(t)})", "its heatmap"]
    return f"<h3>Reference samples (by {html.escape(by)})</h3>" + _images(pictures, captions)
