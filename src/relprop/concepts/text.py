"""Reference sentences for the neurons of a text encoder: where each neuron's relevance
peaks over a set of sentences, with the token map of its share (CRP's reference samples,
for token ids).

Ranking takes one forward and one backward pass per batch of sentences (stopped at the
layer); the maps one conditional pass per neuron over its n references. A sentence
encoder has no head: `PooledProjection` explains its mean-pooled embedding projected on
a fixed direction (e.g. a query sentence's unit embedding, `query_direction`): linear
after the encoder, so the explained value is conserved through the head as it is, and
each sentence is explained alone (a pair's cosine similarity would split the relevance
between two sentences, and its normalisation is no rule of relprop's).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..explain import Explainer
from ..targets import Target
from .conditional import explain as conditional_explain
from .relevance import capture
from .sites import ConceptError

TEXT_MEASURES = ("relevance", "relevance_max")


class PooledProjection(nn.Module):
    """forward(input_ids, attention_mask) -> (B, 1): the encoder's mean-pooled embedding
    (sentence-transformers' pooling) projected on `direction` (D,)."""

    def __init__(self, encoder: nn.Module, direction: Tensor) -> None:
        super().__init__()
        self.encoder = encoder
        self.register_buffer("direction", direction.detach().reshape(-1, 1).clone())

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        out = self.encoder(input_ids=input_ids, attention_mask=attention_mask)
        return mean_pool(out.last_hidden_state, attention_mask) @ self.direction


def mean_pool(hidden: Tensor, mask: Tensor) -> Tensor:
    """Mean of the hidden states over the tokens the attention mask keeps
    (sentence-transformers' pooling for all-MiniLM-L6-v2; relprop.apps.text uses it)."""
    m = mask[..., None].to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)


def query_direction(encoder: nn.Module, tokenizer: Any, text: str) -> Tensor:
    """The unit mean-pooled embedding of `text` (D,): a direction for PooledProjection
    whose projection is a sentence's cosine similarity to `text` times its norm."""
    enc = tokenizer([text], return_tensors="pt")
    with torch.no_grad():
        out = encoder(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
        e = mean_pool(out.last_hidden_state, enc["attention_mask"])[0]
    return e / e.norm()


@dataclass
class TextReference:
    """One reference of a neuron: `sentence` (row of the ids), `score` (the neuron's
    relevance in it: summed over tokens, or at the peak token), `position` (the token where
    the neuron's relevance peaks), `tokens` (T,) the sentence's token map conditioned on
    the neuron (padded tokens 0), `at_layer` the neuron's relevance the map starts from."""

    sentence: int
    score: float
    position: int
    tokens: Tensor
    at_layer: float


@dataclass
class TextReferences:
    """References per neuron of `layer` (`node`: its graph node, as the ledger names it);
    `scores` (N, C) and `positions` (N, C) hold every sentence's measure and peak token for
    every neuron."""

    layer: str
    node: str
    measure: str
    scores: Tensor
    positions: Tensor
    references: dict[int, list[TextReference]]

    def top(self, neuron: int) -> list[TextReference]:
        if neuron not in self.references:
            raise ConceptError(f"neuron {neuron} was not asked for; have "
                               f"{sorted(self.references)[:10]}...")
        return self.references[neuron]


def text_references(explainer: Explainer, ids: Tensor, masks: Tensor, target: Target,
                    layer: str, neurons: list[int] | None = None, n: int = 5, *,
                    measure: str = "relevance", batch_size: int = 16,
                    maps: bool = True) -> TextReferences:
    """For each neuron of `layer` (module path or ledger node; `PATH:input` for a dense
    layer's input: `encoder.layer.3.output.dense:input` is block 3's MLP neurons), the n
    sentences of `ids` (N, T) / `masks` (N, T) with the largest relevance of that neuron.

    `measure`: "relevance" (the neuron's relevance summed over the sentence's tokens) or
    "relevance_max" (at its peak token). `target`: one target for all sentences (an int,
    or None for the largest output). `neurons`: which to keep references for (default:
    all; their maps cost one conditional pass each, `maps=False` skips them)."""
    if measure not in TEXT_MEASURES:
        raise ConceptError(f"measure={measure!r}: choose from {TEXT_MEASURES}")
    if isinstance(target, Tensor) and target.dim() > 0 or isinstance(target, list | tuple):
        raise ConceptError("text_references takes one target for all sentences (int/None)")
    if ids.shape != masks.shape or ids.dim() != 2:
        raise ConceptError(f"ids {tuple(ids.shape)} and masks {tuple(masks.shape)}: both (N, T)")
    N = ids.shape[0]
    per_token = []  # (N, T, C): each neuron's relevance at each token
    node = ""
    for lo in range(0, N, batch_size):
        b_ids, b_mask = _padded(ids[lo:lo + batch_size], batch_size), \
            _padded(masks[lo:lo + batch_size], batch_size)
        got = capture(explainer, (b_ids,), target, [layer],
                      forward_kwargs={"attention_mask": b_mask})
        if got.multi:
            raise ConceptError("text_references explains one target per sentence")
        site = got.sites[layer]
        node = site.name
        gate, c = got.gates[site.step], got.grads[0][site.step]
        assert gate.value is not None
        r = gate.value * c[0] if c[0] is not None else torch.zeros_like(gate.value)
        if len(c) > 1 and c[1] is not None:
            r = r + c[1]
        r = r.movedim(gate.axis, -1)
        if r.dim() != 3 or r.shape[1] != ids.shape[1]:
            raise ConceptError(f"{layer!r}: its value is {tuple(gate.value.shape)}; name a "
                               "layer with one feature vector per token")
        per_token.append(r[:min(batch_size, N - lo)].detach())
    tokens = torch.cat(per_token)
    tokens = tokens * masks[..., None].to(tokens.dtype)  # padded tokens are no reference
    scores = tokens.sum(1) if measure == "relevance" else tokens.max(1).values
    positions = tokens.argmax(1)
    wanted = list(range(tokens.shape[-1])) if neurons is None else [int(k) for k in neurons]
    references = {}
    for k in wanted:
        order = torch.sort(scores[:, k], descending=True, stable=True).indices[:n]
        refs = [TextReference(int(i), float(scores[i, k]), int(positions[i, k]),
                              torch.zeros(ids.shape[1]), float("nan")) for i in order]
        if maps and refs:
            rows = order.tolist()
            expl = conditional_explain(explainer, ids[rows], target, condition={layer: [k]},
                                       forward_kwargs={"attention_mask": masks[rows]})
            for j, ref in enumerate(refs):
                ref.tokens = expl.relevance[j, 0].detach()
                assert expl.concept_relevance is not None
                ref.at_layer = float(expl.concept_relevance[j, 0])
        references[k] = refs
    return TextReferences(layer, node, measure, scores, positions, references)


def _padded(t: Tensor, rows: int) -> Tensor:
    """The last batch filled up with copies of its first row: one traced shape for all."""
    if t.shape[0] == rows:
        return t
    return torch.cat([t, t[:1].expand(rows - t.shape[0], *t.shape[1:])])
