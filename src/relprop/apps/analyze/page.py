"""relprop's own static HTML summary of a SpRAy (and PCX) analysis: one self-contained file
for users without a server. Per class: the eigenvalue spectrum, the t-SNE, each cluster's mean
heatmap with thumbnails of its members, and, with PCX, the prototypes and the outliers.

The cluster means are summed shard by shard (one shard in memory at a time).
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ...analysis.spray import SprayResult


def summary_page(result: SprayResult, path: str | Path, *, source: str | Path | Any = None,
                 dataset: Any = None, prototypes: Any = None,
                 clustering: dict[int, str] | None = None, thumbnails: int = 8) -> Path:
    """Write the page to `path`. source: the explain_dataset folder (default: the one the
    analysis was made from); dataset: the explained Dataset, for input thumbnails;
    prototypes: a PrototypeResult; clustering: {class: clustering name} (default: k-means
    with the eigengap's k)."""
    from ...dataset.reader import Explanations, load_explanations
    from ..report import figure_data_uri, table_html, write_report

    src = source if source is not None else result.source
    expl = src if isinstance(src, Explanations) else load_explanations(src)
    chosen = {c: (clustering or {}).get(c, f"kmeans-{a.suggested_k}")
              for c, a in result.classes.items()}
    maps = _cluster_maps(expl, result, chosen, thumbnails)
    overview = []
    ranked = sorted(result.classes.items(), key=lambda item: item[1].eigenvalues[1])
    for c, a in ranked:
        sizes = ", ".join(str(len(v)) for v in a.members(chosen[c]).values())
        overview.append([str(c), len(a.indices), a.suggested_k, float(a.eigenvalues[1]),
                         float(a.eigenvalues[2]), chosen[c], sizes])
    sections = [("Overview", "<p>SpRAy per class: heatmaps sum-pooled to "
                 f"{result.settings.grid}x{result.settings.grid}, a {result.settings.n_neighbors}"
                 "-nearest-neighbour graph, k-means on the first k eigenvectors of its "
                 "normalised Laplacian. A small second eigenvalue and a gap after it mean two "
                 "distinct strategies in one class; classes are listed by their second "
                 "eigenvalue, smallest (most suspect) first.</p>" + table_html(
                     ["class", "samples", "eigengap k", "eigenvalue 2", "eigenvalue 3",
                      "clustering", "cluster sizes"], overview))]
    for c, a in ranked:
        body = [f'<img class="plot" src="{figure_data_uri(_spectrum(a))}" alt="spectrum">']
        if a.tsne is not None:
            body.append(f'<img class="plot" src="{figure_data_uri(_scatter(a, chosen[c]))}" '
                        'alt="t-SNE">')
        body.append(_clusters_html(c, a, chosen[c], maps, dataset))
        if prototypes is not None and c in prototypes.classes:
            body.append(_prototypes_html(prototypes.classes[c], maps, dataset))
        sections.append((f"Class {c}", "".join(body)))
    return write_report(path, "relprop analysis: SpRAy" + (" and PCX" if prototypes else ""),
                        sections)


def _cluster_maps(expl: Any, result: SprayResult, chosen: dict[int, str],
                  thumbnails: int) -> dict[str, Any]:
    """Sums per (class, cluster) and the first `thumbnails` maps of each cluster, plus every
    map the prototypes section may show, read in one pass over the shards."""
    where: dict[int, tuple[int, int]] = {}  # dataset index -> (class, cluster)
    for c, a in result.classes.items():
        for k, idx in a.members(chosen[c]).items():
            for i in idx.tolist():
                where[i] = (c, k)
    sums: dict[tuple[int, int], torch.Tensor] = {}
    thumbs: dict[tuple[int, int], list[tuple[int, torch.Tensor]]] = {}
    for shard in expl.shards():
        rel = shard["relevance"].float()
        rel = rel.sum(1) if rel.dim() == 4 else rel
        for j, i in enumerate(shard["index"].tolist()):
            key = where.get(i)
            if key is None:
                continue
            sums[key] = sums[key] + rel[j].double() if key in sums else rel[j].double()
            kept = thumbs.setdefault(key, [])
            if len(kept) < thumbnails:
                kept.append((i, rel[j].clone()))
    return {"sums": sums, "thumbs": thumbs, "expl": expl}


def _clusters_html(c: int, a: Any, name: str, maps: dict[str, Any], dataset: Any) -> str:
    from ...visualize import heatmap
    from ..report import png_data_uri

    rows = []
    for k, idx in a.members(name).items():
        mean = maps["sums"][(c, k)] / len(idx)
        cells = [f'<td><img src="{png_data_uri(heatmap(mean.float(), cmap="bwr"))}" '
                 f'alt="mean of cluster {k}"></td>']
        for i, m in maps["thumbs"].get((c, k), []):
            cells.append(_thumb_cell(i, m, dataset))
        rows.append(f"<tr><th>cluster {k}<br>{len(idx)} samples</th>{''.join(cells)}</tr>")
    head = "<tr><th></th><th>mean heatmap</th><th colspan='99'>members</th></tr>"
    return (f"<h3>{html.escape(name)}</h3><table class='grid'>{head}{''.join(rows)}</table>")


def _thumb_cell(i: int, rel: torch.Tensor, dataset: Any) -> str:
    from ...visualize import heatmap
    from ..report import png_data_uri

    pics = []
    if dataset is not None:
        x = torch.as_tensor(dataset[i][0]).float()
        img = x.mean(0) if x.dim() == 3 else x
        lo, hi = float(img.min()), float(img.max())
        grey = ((img - lo) / max(hi - lo, 1e-12) * 255).round().to(torch.uint8).numpy()
        pics.append(f'<img src="{png_data_uri(grey)}" alt="input {i}">')
    pics.append(f'<img src="{png_data_uri(heatmap(rel, cmap="bwr"))}" alt="heatmap {i}">')
    return f"<td title='sample {i}'>{''.join(pics)}<br>#{i}</td>"


def _prototypes_html(p: Any, maps: dict[str, Any], dataset: Any) -> str:
    from ..report import table_html

    rows = [[j, int((p.assignment == j).sum()), float(p.weights[j]),
             ", ".join(str(i) for i in p.typical[j][:6])] for j in range(len(p.weights))]
    out = ["<h3>PCX prototypes</h3>", table_html(
        ["prototype", "samples", "weight", "most typical samples"], rows)]
    expl = maps["expl"]
    for j in range(len(p.weights)):
        cells = "".join(_thumb_cell(int(i), _summed(expl[int(i)]["relevance"]), dataset)
                        for i in p.typical[j][:6])
        out.append(f"<p>prototype {j}</p><table class='grid'><tr>{cells}</tr></table>")
    low = np.argsort(p.log_likelihood)[:6]
    cells = "".join(_thumb_cell(int(p.indices[i]), _summed(expl[int(p.indices[i])]["relevance"]),
                                dataset) for i in low)
    out.append("<h3>Outliers (least likely under their prototype)</h3>"
               f"<table class='grid'><tr>{cells}</tr></table>")
    return "".join(out)


def _summed(rel: torch.Tensor) -> torch.Tensor:
    rel = rel.float()
    return rel.sum(0) if rel.dim() == 3 else rel


def _spectrum(a: Any):
    from ...visualize import new_figure

    fig = new_figure(3.6, 2.6)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(np.arange(1, len(a.eigenvalues) + 1), a.eigenvalues, "o-", ms=4)
    ax.set_xlabel("k")
    ax.set_ylabel("eigenvalue")
    ax.set_title(f"class {a.cls}: spectrum (eigengap k={a.suggested_k})", fontsize=9)
    fig.tight_layout()
    return fig


def _scatter(a: Any, name: str):
    from ...visualize import new_figure

    fig = new_figure(3.6, 2.6)
    ax = fig.add_subplot(1, 1, 1)
    labels = a.clusterings[name]
    for k in np.unique(labels):
        pts = a.tsne[labels == k]
        ax.scatter(pts[:, 0], pts[:, 1], s=6, label=f"cluster {k}")
    ax.set_title(f"class {a.cls}: t-SNE, {name}", fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig
