"""Concept relevance (CRP, Achtibat et al. 2023): what the model saw, not only where.

- `explain(explainer, x, target, condition={"features.28": [3, 7, 11]})`: one input heatmap
  per concept (conditional relevance), from one forward pass (conditional.py);
- `relevance(explainer, x, target, "features.28")`: relevance per channel at a layer, with
  the top concepts and their shares (relevance.py);
- `heads(n)`, `directions(matrix)`: attention heads and user directions as concepts;
- `graph(explainer, x, target, layer=, concept=, lower=, width=)`: the attribution graph
  (graph.py);
- `collect(model, dataset, layers, out)` and `load(out).top(layer, channel)`: reference
  samples per channel over a dataset (collect.py, references.py);
- `text_references(explainer, ids, masks, target, layer)`: reference sentences per neuron
  of a text encoder, with each one's token map (text.py).

Layers are named by module path or by the ledger's node names (sites.py).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from ..composites import Composite
from ..explain import DEFAULT_COMPOSITE, Explainer
from ..targets import Target
from .collect import MEASURES, CollectSummary, collect
from .conditional import ConditionalExplanation
from .conditional import explain as _explain
from .conditions import Channels, ConceptSet, Directions, Heads, directions, heads
from .graph import AttributionGraph, Edge, Node, graph
from .references import References, Top, load, receptive_field
from .relevance import ConceptRelevance, relevance
from .sites import ConceptError
from .text import PooledProjection, TextReference, TextReferences, query_direction, text_references

__all__ = ["MEASURES", "AttributionGraph", "Channels", "CollectSummary", "ConceptError",
           "ConceptRelevance", "ConceptSet", "ConditionalExplanation", "Directions", "Edge",
           "Heads", "Node", "References", "Top", "collect", "directions", "explain", "graph",
           "heads", "load", "receptive_field", "relevance"]
__all__ += ["PooledProjection", "TextReference", "TextReferences", "query_direction",
            "text_references"]


def explain(model: nn.Module | Explainer, x: Tensor | tuple[Tensor, ...], target: Target = None,
            *, condition: Any, exclude_parallel: bool = True,
            composite: str | Composite = DEFAULT_COMPOSITE, concept_batch: int | None = None,
            **kwargs: Any) -> ConditionalExplanation:
    """Conditional heatmaps: (B, K, *x.shape[1:]) for K concepts and one target per sample.

    `model`: an Explainer (its composite is used) or a model (explained with `composite`
    and its parameters among the keywords). Other keywords as Explainer.explain
    (output_relevance, start, record, forward_kwargs, position)."""
    if not isinstance(model, Explainer):
        params = {k: kwargs.pop(k) for k in list(kwargs) if k not in _EXPLAIN_KEYWORDS}
        model = Explainer(model, composite, **params)
    return _explain(model, x, target, condition=condition, exclude_parallel=exclude_parallel,
                    concept_batch=concept_batch, **kwargs)


_EXPLAIN_KEYWORDS = ("output_relevance", "start", "record", "forward_kwargs", "position")
