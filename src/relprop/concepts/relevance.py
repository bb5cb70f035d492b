"""Per-concept relevance at a layer: how much of the explained value each channel (neuron,
head, direction) carries, from one forward pass and one backward pass per target that
stops at the lowest named layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .. import targets
from ..explain import Explainer, _check_inputs
from ..targets import Target
from ..trace import TRACE_LOCK, preserved
from .conditions import ConceptSet, Directions, Heads
from .gates import SiteGate
from .sites import ConceptError, Site, resolve, unfused


@dataclass
class ConceptRelevance:
    """Relevance per concept at one layer: `relevance` (B, C), or (B, T, C) for several
    targets per sample; `explained` (B,) / (B, T) the value explained at the output;
    `labels` one name per concept."""

    layer: str
    relevance: Tensor
    explained: Tensor
    labels: list[str]

    @property
    def shares(self) -> Tensor:
        """Each concept's relevance as a fraction of the explained value."""
        e = self.explained.unsqueeze(-1)
        return self.relevance / torch.where(e == 0, torch.ones_like(e), e)

    def top(self, k: int = 5, sample: int = 0, target: int = 0, by: str = "relevance"
            ) -> list[tuple[int, float, float]]:
        """The k concepts of one sample with the most relevance (by="abs": magnitude), as
        (concept, relevance, share) with the largest first."""
        if by not in ("relevance", "abs"):
            raise ConceptError(f"by={by!r}: choose 'relevance' or 'abs'")
        r, s = self.relevance[sample], self.shares[sample]
        if r.dim() == 2:
            r, s = r[target], s[target]
        order = (r.abs() if by == "abs" else r).argsort(descending=True)[:k]
        return [(int(i), float(r[i]), float(s[i])) for i in order]

    def table(self, k: int = 10, sample: int = 0, target: int = 0) -> str:
        rows = [f"{'concept':<14} {'relevance':>12} {'share':>8}"]
        for i, r, s in self.top(k, sample, target):
            rows.append(f"{self.labels[i]:<14} {r:>12.5g} {100 * s:>7.1f}%")
        return "\n".join(rows)

    def __str__(self) -> str:
        return f"{self.layer}:\n{self.table()}"


def relevance(explainer: Explainer, x: Tensor | tuple[Tensor, ...], target: Target = None,
              layers: str | Sequence[str] = (), *, concepts: Any = None,
              output_relevance: Tensor | None = None, start: str = "value",
              forward_kwargs: dict[str, Any] | None = None,
              position: int | None = None) -> ConceptRelevance | dict[str, ConceptRelevance]:
    """Relevance per channel at each of `layers` (one name: one ConceptRelevance, several:
    a dict). `concepts`: relprop.concepts.heads(n) or directions((K, C)) to group or
    project the features instead of taking channels one by one."""
    names = [layers] if isinstance(layers, str) else list(layers)
    if not names:
        raise ConceptError("name at least one layer")
    got = capture(explainer, _check_inputs(x), target, names, output_relevance=output_relevance,
                  start=start, forward_kwargs=forward_kwargs, position=position)
    out = {}
    for key, site in got.sites.items():
        gate = got.gates[site.step]
        r = torch.stack([_grouped(gate, c[site.step], concepts) for c in got.grads], 1)
        if not got.multi:
            r = r[:, 0]
        explained = got.explained if got.multi else got.explained[:, 0]
        out[key] = ConceptRelevance(key, r.detach(), explained.detach(),
                                    _labels(gate, concepts))
    return out[names[0]] if isinstance(layers, str) else out


@dataclass
class Captured:
    """One forward pass with gates on named layers and one backward per target down to
    the lowest of them: `grads[t][step]` the gradients at each gate's value (and shadow)."""

    sites: dict[str, Site]
    gates: dict[int, SiteGate]
    grads: list[dict[int, list[Tensor | None]]]
    explained: Tensor  # (B, T)
    target: Tensor  # (B, T)
    output: Tensor
    multi: bool


def capture(explainer: Explainer, inputs: tuple[Tensor, ...], target: Target,
            names: Sequence[str], *, output_relevance: Tensor | None = None,
            start: str = "value", forward_kwargs: dict[str, Any] | None = None,
            position: int | None = None) -> Captured:
    keywords = dict(forward_kwargs or {})
    targets.check_start(start)
    with torch.inference_mode(False), torch.enable_grad():
        program = explainer._cache.get(inputs, keywords)
    sites = {k: resolve(program, k) for k in names}
    program = unfused(program, [s.step for s in sites.values()])
    gates = {s.step: SiteGate(s) for s in sites.values()}
    half = any(t.dtype in (torch.float16, torch.bfloat16) for t in inputs)
    with TRACE_LOCK.shared(), preserved(explainer.model), torch.inference_mode(False), \
            torch.enable_grad():
        leaves = [t.detach().to(torch.float32 if half else t.dtype).clone().requires_grad_(True)
                  if t.is_floating_point() else t for t in inputs]
        run = program.run(leaves, dtype=torch.float32 if half else None, keywords=keywords,
                          conditions=dict(gates))
        s = targets.seeding(explainer.model, run.output, inputs[0].shape[0], target,
                            output_relevance, start, position, inputs[0])
        flat, seeds, explained, multi, index = s.flat, s.seeds, s.explained, s.multi, s.index
        wanted = [t for g in gates.values() for t in g.outputs]
        grads = []
        for k in range(seeds.shape[0]):
            got = torch.autograd.grad(flat, wanted, seeds[k], retain_graph=k < len(seeds) - 1,
                                      allow_unused=True)
            at, per = 0, {}
            for step, gate in gates.items():
                n = len(gate.outputs)
                per[step] = [None if g is None else g.detach() for g in got[at:at + n]]
                at += n
            grads.append(per)
    for gate in gates.values():  # keep the values, not the graph
        gate.value = None if gate.value is None else gate.value.detach()
        gate.wrapped = gate.wrapped_shadow = None
    return Captured(sites, gates, grads, explained.detach(), index, s.output.detach(), multi)


def _grouped(gate: SiteGate, c: list[Tensor | None], concepts: Any) -> Tensor:
    """(B, K): relevance per channel, or per head / direction."""
    if concepts is None:
        return gate.per_feature(c)
    if not isinstance(concepts, ConceptSet):
        raise ConceptError("concepts= takes relprop.concepts.heads(...) or directions(...)")
    assert gate.value is not None
    rows = concepts.rows(gate.width, gate.value.dtype, gate.value.device)
    out = []
    for row in rows:
        gate.set(row.vector.expand(gate.value.shape[0], -1),
                 torch.full((gate.value.shape[0],), row.kind == "direction",
                            device=gate.value.device))
        out.append(gate.relevance(c))
    gate.clear()
    return torch.stack(out, 1)


def _labels(gate: SiteGate, concepts: Any) -> list[str]:
    if concepts is None:
        return [str(i) for i in range(gate.width)]
    if isinstance(concepts, Heads | Directions):
        assert gate.value is not None
        return [r.label for r in concepts.rows(gate.width, gate.value.dtype, gate.value.device)]
    return []
