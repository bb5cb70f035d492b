"""Spectral relevance analysis (SpRAy, Lapuschkin et al. 2019) over an explain_dataset run.

Per class, every heatmap is summed over channels and sum-pooled to a small grid (7x7 by
default), the shards read one at a time. CoRelAy's processors then build a symmetric kNN graph
over the pooled maps (euclidean distances), its symmetric normalised Laplacian, and the
Laplacian's smallest eigenvalues and eigenvectors. k-means and agglomerative (ward)
clusterings for several k run on the first k eigenvectors; t-SNE of the eigenvectors is for
display. Results go to an HDF5 file in ViRelAy's analysis layout (so ViRelAy reads it as it
is) with the pooled maps and the settings beside them.

Why these settings, not CoRelAy's defaults (32 eigenvectors, each row normalised to length
1, k-means on all 32): a group of samples that the kNN graph separates from the rest shows
up as one more eigenvalue near 0, and the first k eigenvectors are then constant on each of k
groups (Ng, Jordan and Weiss; von Luxburg 2007). The further eigenvectors describe variation
*inside* the groups (how a digit is slanted), and k-means on all 32 of them splits along that
variation instead (on the planted Clever Hans: adjusted Rand index 1.0 with the first 2,
0.79 with 8, -0.05 with 32). Pooling to a coarse grid makes maps alike when the same
evidence sits a few pixels apart (a stamp that is not pixel-aligned, a shifted digit); at
full resolution such maps share nothing and the kNN graph falls apart into many small pieces
(many eigenvalues at 0), whatever the attribution method. Each pooled map is divided by its
summed |relevance| so that a confident and a hesitant prediction with one strategy match.
docs/analysis.md has the measurements.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import RelpropError
from ._deps import need

FORMAT = "relprop-spray/1"
ANALYSIS_FILE = "spray.h5"


@dataclass(frozen=True)
class SpraySettings:
    """grid: side of the pooled heatmap; n_neighbors: of the kNN graph; n_eigval: eigenvalues
    kept; ks: cluster counts; normalize: divide each pooled map by its summed |relevance|
    (so that a confident and a hesitant prediction with the same strategy look alike)."""

    grid: int = 7
    n_neighbors: int = 10
    n_eigval: int = 8
    ks: tuple[int, ...] = (2, 3, 4, 5)
    normalize: bool = True
    agglomerative: bool = True
    tsne: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if self.grid < 1 or self.n_neighbors < 1 or self.n_eigval < 2:
            raise RelpropError("grid, n_neighbors >= 1 and n_eigval >= 2 are needed")
        if not self.ks or min(self.ks) < 2:
            raise RelpropError(f"ks={self.ks}: cluster counts must be 2 or more")


@dataclass
class ClassAnalysis:
    """One class's SpRAy: its samples (dataset indices), the pooled maps, the Laplacian's
    smallest eigenvalues (ascending) with their eigenvectors, clusterings by name
    ("kmeans-2", "agglomerative-3", ...) and a 2-D t-SNE for display."""

    cls: int
    indices: np.ndarray
    features: np.ndarray
    eigenvalues: np.ndarray
    eigenvectors: np.ndarray
    clusterings: dict[str, np.ndarray] = field(default_factory=dict)
    tsne: np.ndarray | None = None

    @property
    def eigengaps(self) -> np.ndarray:
        """gap[k-1] = eigenvalue k+1 - eigenvalue k (1-based): a large gap after k means k
        well separated groups."""
        return np.diff(self.eigenvalues)

    @property
    def suggested_k(self) -> int:
        """The k after which the eigenvalues jump most (at least 2)."""
        gaps = self.eigengaps[1:]
        return int(np.argmax(gaps)) + 2 if len(gaps) else 2

    def members(self, clustering: str | int = 2) -> dict[int, np.ndarray]:
        """{cluster: dataset indices}; clustering: a name or k (k-means with k clusters)."""
        name = f"kmeans-{clustering}" if isinstance(clustering, int) else clustering
        if name not in self.clusterings:
            raise RelpropError(f"class {self.cls} has no clustering {name!r}; it has "
                               f"{', '.join(self.clusterings)}")
        labels = self.clusterings[name]
        return {int(c): self.indices[labels == c] for c in np.unique(labels)}


@dataclass
class SprayResult:
    """SpRAy per class; `path` is the analysis file (None if not written)."""

    classes: dict[int, ClassAnalysis]
    settings: SpraySettings
    path: Path | None = None
    source: str | None = None
    seconds: float = 0.0

    def __getitem__(self, cls: int) -> ClassAnalysis:
        if cls not in self.classes:
            raise RelpropError(f"no analysis for class {cls}; analysed: {sorted(self.classes)}")
        return self.classes[cls]

    def members(self, cls: int, clustering: str | int = 2) -> dict[int, np.ndarray]:
        """{cluster: dataset indices} of class cls."""
        return self[cls].members(clustering)

    def eigenvalue_plot(self, path: str | Path, classes: Sequence[int] | None = None) -> Path:
        """The smallest Laplacian eigenvalues per class as one PNG: a gap after the k-th
        is the sign of k distinct strategies."""
        return eigenvalue_plot(self, path, classes)


def spray(source: str | Path | Any, out: str | Path | None = None, *,
          classes: Iterable[int] | None = None, by: str = "label",
          settings: SpraySettings | None = None, **options: Any) -> SprayResult:
    """SpRAy on an explain_dataset output folder (or a loaded Explanations).

    classes: which to analyse (default: all); by: group samples by "label" or "target" (the
    explained class). options: SpraySettings fields (grid=7, n_neighbors=10, n_eigval=8,
    ks=(2, 3, 4, 5), normalize=True, agglomerative=True, tsne=True, seed=0). Writes the
    analysis file to `out` (default: OUT_DIR/spray.h5) and returns the result; the shards
    are read one at a time and only the pooled maps are kept in memory."""
    from ..dataset.reader import Explanations, load_explanations

    start = time.perf_counter()
    settings = settings or SpraySettings(**options)
    expl = source if isinstance(source, Explanations) else load_explanations(source)
    wanted = None if classes is None else {int(c) for c in classes}
    pooled = pooled_by_class(expl, settings.grid, by, wanted)
    if not pooled:
        raise RelpropError(f"no samples of classes {sorted(wanted or [])} in {expl.out_dir}")
    result = SprayResult({}, settings, source=str(expl.out_dir))
    for c, (indices, features) in sorted(pooled.items()):
        if len(indices) < max(settings.ks) + 2:
            continue  # too few samples to cluster
        result.classes[c] = analyse_class(c, indices, features, settings)
    out = Path(expl.out_dir) / ANALYSIS_FILE if out is None else Path(out)
    result.seconds = time.perf_counter() - start
    save_spray(result, out)
    return result


def pooled_by_class(expl: Any, grid: int, by: str = "label",
                    wanted: set[int] | None = None) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """{class: (dataset indices, (n, grid*grid) pooled maps)}, one shard in memory at a time."""
    if by not in ("label", "target"):
        raise RelpropError(f"by={by!r}: choose 'label' or 'target'")
    parts: dict[int, list[tuple[Tensor, Tensor]]] = {}
    for shard in expl.shards():
        keys = shard[by]
        pooled = pool_maps(shard["relevance"], grid)
        for c in keys.unique().tolist():
            if wanted is not None and c not in wanted:
                continue
            mask = keys == c
            parts.setdefault(c, []).append((shard["index"][mask], pooled[mask]))
    return {c: (torch.cat([p[0] for p in ps]).numpy(),
                torch.cat([p[1] for p in ps]).double().numpy()) for c, ps in parts.items()}


def pool_maps(relevance: Tensor, grid: int) -> Tensor:
    """(N, [C,] H, W) relevance -> (N, grid*grid): channels summed, then sums over blocks
    (exact when grid divides H and W, else adaptive windows scaled to sums)."""
    r = relevance.float()
    if r.dim() == 4:
        r = r.sum(1)
    if r.dim() != 3:
        raise RelpropError(f"SpRAy needs image relevance (N, C, H, W) or (N, H, W), got "
                           f"{tuple(relevance.shape)}")
    n, h, w = r.shape
    if h % grid == 0 and w % grid == 0:
        out = r.reshape(n, grid, h // grid, grid, w // grid).sum((2, 4))
    else:
        out = F.adaptive_avg_pool2d(r[:, None], grid)[:, 0] * (h * w / grid ** 2)
    return out.reshape(n, grid * grid)


def analyse_class(cls: int, indices: np.ndarray, features: np.ndarray,
                  settings: SpraySettings) -> ClassAnalysis:
    """SpRAy of one class's pooled maps (n, d) with CoRelAy's processors."""
    eigenvalues, eigenvectors = spectral_embedding(features, settings)
    result = ClassAnalysis(cls, np.asarray(indices), features, eigenvalues, eigenvectors)
    result.clusterings = cluster(eigenvectors, settings)
    if settings.tsne:
        result.tsne = tsne(eigenvectors, settings.seed)
    return result


def prepare(features: np.ndarray, normalize: bool) -> np.ndarray:
    x = np.asarray(features, dtype=np.float64).reshape(len(features), -1)
    if normalize:
        x = x / np.maximum(np.abs(x).sum(1, keepdims=True), 1e-12)
    return x


def spectral_embedding(features: np.ndarray, settings: SpraySettings
                       ) -> tuple[np.ndarray, np.ndarray]:
    """The normalised kNN Laplacian's smallest eigenvalues (ascending) and eigenvectors."""
    need("corelay")
    from corelay.pipeline.spectral import SpectralEmbedding
    from corelay.processor.affinity import SparseKNN
    from corelay.processor.distance import SciPyPDist
    from corelay.processor.embedding import EigenDecomposition
    from corelay.processor.laplacian import SymmetricNormalLaplacian

    x = prepare(features, settings.normalize)
    n = len(x)
    m = min(settings.n_eigval, n - 2)
    pipeline = SpectralEmbedding(
        pairwise_distance=SciPyPDist(metric="euclidean"),
        affinity=SparseKNN(n_neighbors=min(settings.n_neighbors, n - 1), symmetric=True),
        laplacian=SymmetricNormalLaplacian(),
        # 'LA': the normalised affinity's largest eigenvalues = the Laplacian's smallest;
        # v0 fixed so that the result does not depend on ARPACK's random start
        embedding=EigenDecomposition(n_eigval=m, which="LA", normalize=False,
                                     kwargs={"v0": np.ones(n) / np.sqrt(n)}),
    )
    eigenvalues, eigenvectors = pipeline(x)
    order = np.argsort(eigenvalues)
    eigenvalues = np.clip(eigenvalues[order], 0.0, None)  # -1e-16 and the like
    return eigenvalues, eigenvectors[:, order]


def cluster(eigenvectors: np.ndarray, settings: SpraySettings) -> dict[str, np.ndarray]:
    """k-means (and ward agglomerative) with k clusters on the first k eigenvectors."""
    need("corelay")
    from corelay.processor.clustering import AgglomerativeClustering, KMeans

    out: dict[str, np.ndarray] = {}
    for k in settings.ks:
        if k > eigenvectors.shape[1]:
            continue
        first = eigenvectors[:, :k]
        kmeans = KMeans(n_clusters=k, kwargs={"n_init": 10, "random_state": settings.seed})
        out[f"kmeans-{k}"] = np.asarray(kmeans(first), dtype=np.int64)
        if settings.agglomerative:
            agglo = AgglomerativeClustering(n_clusters=k, linkage="ward")
            out[f"agglomerative-{k}"] = np.asarray(agglo(first), dtype=np.int64)
    return out


def tsne(eigenvectors: np.ndarray, seed: int = 0) -> np.ndarray:
    """2-D t-SNE of the spectral embedding, for display only."""
    need("corelay")
    from corelay.processor.embedding import TSNEEmbedding

    n = len(eigenvectors)
    perplexity = float(min(30.0, max(2.0, (n - 1) / 3)))
    return np.asarray(TSNEEmbedding(n_components=2, perplexity=perplexity,
                                    kwargs={"random_state": seed})(eigenvectors))


def corelay_default_clusters(features: np.ndarray, k: int = 2) -> np.ndarray:
    """k-means as CoRelAy's SpectralClustering pipeline does it with its defaults (raw
    features, 10-NN graph, 32 eigenvalues of largest magnitude, rows normalised, k-means on
    all 32): the comparison docs/analysis.md reports."""
    need("corelay")
    from corelay.pipeline.spectral import SpectralClustering
    from corelay.processor.clustering import KMeans

    x = np.asarray(features, dtype=np.float64).reshape(len(features), -1)
    kmeans = KMeans(n_clusters=k, is_output=True, kwargs={"n_init": 10, "random_state": 0})
    return np.asarray(SpectralClustering(clustering=kmeans)(x)[-1])


# -- the analysis file ------------------------------------------------------------------

def save_spray(result: SprayResult, path: str | Path) -> Path:
    """ViRelAy's analysis layout: a group per class (named by its index) with index,
    embedding/spectral (eigenvalues as its attribute), embedding/tsne and cluster/<name>;
    relprop adds the pooled maps (features) and the settings (file attributes)."""
    h5py = need("h5py")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with h5py.File(tmp, "w") as f:
        f.attrs["format"] = FORMAT
        f.attrs["settings"] = json.dumps(result.settings.__dict__)
        f.attrs["source"] = result.source or ""
        f.attrs["seconds"] = result.seconds
        for c, a in result.classes.items():
            g = f.create_group(str(c))
            g["index"] = a.indices.astype(np.int64)
            g["features"] = a.features.astype(np.float32)
            emb = g.create_group("embedding")
            spectral = emb.create_dataset("spectral", data=a.eigenvectors.astype(np.float32))
            spectral.attrs["eigenvalue"] = a.eigenvalues
            if a.tsne is not None:
                t = emb.create_dataset("tsne", data=a.tsne.astype(np.float32))
                t.attrs["embedding"] = "spectral"
            clusters = g.create_group("cluster")
            for name, labels in a.clusterings.items():
                d = clusters.create_dataset(name, data=labels.astype(np.int64))
                d.attrs["embedding"] = "spectral"
                d.attrs["k"] = int(labels.max()) + 1
    tmp.replace(path)
    result.path = path
    return path


def load_spray(path: str | Path) -> SprayResult:
    """A SprayResult back from its analysis file (an OUT_DIR is read at OUT_DIR/spray.h5)."""
    h5py = need("h5py")
    path = Path(path)
    if path.is_dir():
        path = path / ANALYSIS_FILE
    if not path.exists():
        raise RelpropError(f"{path} does not exist; run relprop analyze (or spray) first")
    with h5py.File(path, "r") as f:
        if f.attrs.get("format") != FORMAT:
            raise RelpropError(f"{path} is not a relprop SpRAy file")
        raw = json.loads(f.attrs["settings"])
        settings = SpraySettings(**{**raw, "ks": tuple(raw["ks"])})
        classes = {}
        for name in f:
            g = f[name]
            spectral = g["embedding"]["spectral"]
            a = ClassAnalysis(int(name), g["index"][()], g["features"][()].astype(np.float64),
                              np.asarray(spectral.attrs["eigenvalue"]), spectral[()])
            a.clusterings = {k: v[()] for k, v in g["cluster"].items()}
            if "tsne" in g["embedding"]:
                a.tsne = g["embedding"]["tsne"][()]
            classes[a.cls] = a
        return SprayResult(classes, settings, path, str(f.attrs["source"]) or None,
                           float(f.attrs["seconds"]))


def eigenvalue_plot(result: SprayResult, path: str | Path,
                    classes: Sequence[int] | None = None) -> Path:
    from ..visualize import new_figure

    classes = list(result.classes) if classes is None else list(classes)
    fig = new_figure(6.4, 3.6)
    ax = fig.add_subplot(1, 1, 1)
    for c in classes:
        a = result[c]
        ax.plot(np.arange(1, len(a.eigenvalues) + 1), a.eigenvalues, "o-", ms=3,
                label=f"class {c} (n={len(a.indices)})")
    ax.set_xlabel("k")
    ax.set_ylabel("eigenvalue of the normalised kNN Laplacian")
    ax.set_title("SpRAy spectrum: a gap after k = k distinct strategies")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path
