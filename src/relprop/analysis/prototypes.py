"""Prototypical concept explanations (PCX, Dreyer et al. 2024): a Gaussian mixture per class
over per-sample concept-relevance vectors of one layer.

A concept is a channel of the layer, its relevance the layer's relevance summed over
positions: relprop.concepts.relevance (issue 20) computes it in one batched pass; without
that package, relprop.explain(..., record=True) records it one sample at a time. Each vector
keeps its positive part (what the decision used; counter-evidence is left out) divided by its
sum, so that prototypes compare how a decision is made, not how confident it is.

Per sample: its prototype, its log-likelihood under the mixture (low: an outlier, suspect),
and the concepts it uses more or less than its prototype. Per prototype: its most typical
samples (highest likelihood first).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import RelpropError
from ._deps import need


def concept_vectors(model: nn.Module, x: Tensor, layer: str, target: Any = None, *,
                    composite: str = "epsilon_plus", batch_size: int = 256,
                    **params: Any) -> Tensor:
    """(N, C): the relevance at `layer` (a module path such as "features.2"), summed over
    positions per channel, explaining `target` (a class, per-sample classes, or None: the
    prediction) with `composite` and its parameters."""
    from ..explain import Explainer

    explainer = Explainer(model, composite, **params)
    try:
        from ..concepts import relevance
    except ImportError:  # pragma: no cover - relprop.concepts ships with relprop
        relevance = None
    parts = []
    for i in range(0, len(x), batch_size):
        t = target[i:i + batch_size] if isinstance(target, Tensor) and target.dim() else target
        if relevance is not None:
            parts.append(relevance(explainer, x[i:i + batch_size], t, layer).relevance.detach())
            continue
        expl = explainer(x[i:i + batch_size], target=t, record=True)
        node = layer.replace(".", "_")
        if node not in expl.layers:
            raise RelpropError(f"no node {node!r} recorded; nodes: {', '.join(expl.layers)}")
        r = expl.layers[node].detach()
        parts.append(r.flatten(2).sum(2) if r.dim() > 2 else r)
    return torch.cat(parts)


@dataclass
class ClassPrototypes:
    """One class's mixture: weights (k,), means (k, C) and variances (k, C) of the normalised
    concept vectors; per sample (rows of `indices`): assignment, log_likelihood, and
    deviation (the vector minus its prototype's mean, in its prototype's standard deviations);
    typical[j]: dataset indices of prototype j, most typical first."""

    cls: int
    indices: np.ndarray
    vectors: np.ndarray
    weights: np.ndarray
    means: np.ndarray
    variances: np.ndarray
    assignment: np.ndarray
    log_likelihood: np.ndarray
    typical: list[np.ndarray] = field(default_factory=list)

    @property
    def deviation(self) -> np.ndarray:
        m = self.means[self.assignment]
        return (self.vectors - m) / np.sqrt(self.variances[self.assignment])

    def usage(self, index: int, top: int = 3) -> dict[str, list[int]]:
        """The concepts (channels) sample `index` (a dataset index) uses most above and below
        its prototype."""
        where = np.flatnonzero(self.indices == index)
        if not len(where):
            raise RelpropError(f"sample {index} is not in class {self.cls}'s prototypes")
        d = self.deviation[where[0]]
        order = np.argsort(d)
        return {"over": order[::-1][:top].tolist(), "under": order[:top].tolist()}

    def outliers(self, n: int = 10) -> np.ndarray:
        """Dataset indices of the n least likely samples."""
        return self.indices[np.argsort(self.log_likelihood)[:n]]


@dataclass
class PrototypeResult:
    classes: dict[int, ClassPrototypes]
    layer: str | None = None


def prototypes(vectors: Tensor | np.ndarray, labels: Tensor | np.ndarray,
               indices: Tensor | np.ndarray | None = None, *, n_prototypes: int | str = 2,
               max_prototypes: int = 6, layer: str | None = None,
               seed: int = 0) -> PrototypeResult:
    """PCX: per class, a diagonal Gaussian mixture over the (normalised) concept vectors.

    vectors: (N, C) concept relevance (concept_vectors); labels: (N,) class of each;
    indices: their dataset indices (default 0..N-1); n_prototypes: per class, or "bic" to
    choose 1..max_prototypes by the Bayesian information criterion."""
    need("sklearn")
    from sklearn.mixture import GaussianMixture

    v = np.clip(np.asarray(vectors, dtype=np.float64).reshape(len(vectors), -1), 0.0, None)
    v = v / np.maximum(v.sum(1, keepdims=True), 1e-12)
    y = np.asarray(labels).reshape(-1)
    idx = np.arange(len(v)) if indices is None else np.asarray(indices).reshape(-1)
    out: dict[int, ClassPrototypes] = {}
    for c in np.unique(y).tolist():
        rows = np.flatnonzero(y == c)
        if len(rows) < 4:
            continue
        x = v[rows]
        if n_prototypes == "bic":
            fits = [GaussianMixture(k, covariance_type="diag", random_state=seed,
                                    reg_covar=1e-6).fit(x)
                    for k in range(1, min(max_prototypes, len(rows) // 2) + 1)]
            gmm = min(fits, key=lambda g: g.bic(x))
        else:
            k = min(int(n_prototypes), len(rows) // 2)
            gmm = GaussianMixture(k, covariance_type="diag", random_state=seed,
                                  reg_covar=1e-6, n_init=3).fit(x)
        assignment = gmm.predict(x)
        loglik = gmm.score_samples(x)
        typical = [idx[rows][assignment == j][np.argsort(-loglik[assignment == j])]
                   for j in range(gmm.n_components)]
        out[int(c)] = ClassPrototypes(int(c), idx[rows], x, gmm.weights_, gmm.means_,
                                      gmm.covariances_, assignment, loglik, typical)
    return PrototypeResult(out, layer)
