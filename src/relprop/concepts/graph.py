"""The attribution graph: how a concept builds on lower ones (CRP's AttributionGraph).

From a concept (layer, channel), its relevance is followed down to each lower layer in
turn: the relevance that reaches the lower layer's channels through the concept (and
through the graph's root, as zennit-crp conditions it) picks the `width` strongest lower
concepts, which become the next level's nodes. One forward pass; a backward pass per
node over the kept graph, started at the root's layer.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .. import targets
from ..explain import Explainer, _check_inputs
from ..targets import Target
from ..trace import TRACE_LOCK, preserved
from .gates import SiteGate
from .sites import ConceptError, resolve, unfused


@dataclass(frozen=True)
class Node:
    layer: str
    concept: int
    relevance: float  # at its layer, through its parent (the root: of the explained value)


@dataclass(frozen=True)
class Edge:
    source: tuple[str, int]  # the upper concept
    target: tuple[str, int]  # the lower concept
    relevance: float  # what reaches the lower concept through the upper one
    share: float  # as a fraction of the upper concept's relevance


@dataclass
class AttributionGraph:
    nodes: list[Node] = field(default_factory=list)
    edges: list[Edge] = field(default_factory=list)
    explained: float = 0.0

    def to_dot(self) -> str:
        """Graphviz source (dot -Tsvg)."""
        lines = ["digraph concepts {", "  rankdir=TB;"]
        for n in self.nodes:
            lines.append(f'  "{n.layer}:{n.concept}" [label="{n.layer}\\n{n.concept}"];')
        for e in self.edges:
            lines.append(f'  "{e.source[0]}:{e.source[1]}" -> "{e.target[0]}:{e.target[1]}" '
                         f'[label="{100 * e.share:.0f}%"];')
        return "\n".join(lines + ["}"])

    def to_svg(self, width: int = 640, row: int = 90) -> str:
        """A layered drawing, one row per layer, edges as wide as their share."""
        layers = list(dict.fromkeys(n.layer for n in self.nodes))
        place: dict[tuple[str, int], tuple[float, float]] = {}
        for i, layer in enumerate(layers):
            row_nodes = list(dict.fromkeys(n.concept for n in self.nodes if n.layer == layer))
            for j, c in enumerate(row_nodes):
                place[layer, c] = (width * (j + 1) / (len(row_nodes) + 1), 30 + i * row)
        parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" '
                 f'height="{30 + len(layers) * row}" font-family="sans-serif" font-size="11">']
        for e in self.edges:
            (x1, y1), (x2, y2) = place[e.source], place[e.target]
            color = "#c0392b" if e.relevance >= 0 else "#2e6bb0"
            parts.append(f'<line x1="{x1:.0f}" y1="{y1:.0f}" x2="{x2:.0f}" y2="{y2:.0f}" '
                         f'stroke="{color}" stroke-width="{1 + 8 * min(abs(e.share), 1):.1f}" '
                         f'opacity="0.6"><title>{100 * e.share:.1f}%</title></line>')
        for (_, c), (x, y) in place.items():
            parts.append(f'<circle cx="{x:.0f}" cy="{y:.0f}" r="16" fill="#fff" '
                         f'stroke="#333"/><text x="{x:.0f}" y="{y + 4:.0f}" '
                         f'text-anchor="middle">{c}</text>')
        for i, layer in enumerate(layers):
            parts.append(f'<text x="4" y="{34 + i * row}">{html.escape(layer)}</text>')
        return "".join(parts) + "</svg>"


def graph(explainer: Explainer, x: Tensor, target: Target = None, *, layer: str,
          concept: int, lower: Sequence[str], width: Sequence[int] | int = 3,
          by: str = "relevance") -> AttributionGraph:
    """The attribution graph of `concept` at `layer` for one sample x (1, ...): `lower`
    layers from top to bottom, `width` concepts kept per node at each (an int: the same at
    every level). by="abs" keeps the lower concepts of largest |relevance|."""
    inputs = _check_inputs(x)
    if inputs[0].shape[0] != 1:
        raise ConceptError("graph explains one sample: x must have batch size 1")
    widths = [width] * len(lower) if isinstance(width, int) else list(width)
    if len(widths) != len(lower):
        raise ConceptError(f"{len(lower)} lower layers but {len(widths)} widths")
    with torch.inference_mode(False), torch.enable_grad():
        program = explainer._cache.get(inputs, {})
    names = [layer, *lower]
    sites = [resolve(program, k) for k in names]
    if len({s.step for s in sites}) < len(sites):
        raise ConceptError("the graph's layers must be different layers")
    program = unfused(program, [s.step for s in sites])
    gates = {s.step: SiteGate(s) for s in sites}
    with TRACE_LOCK.shared(), preserved(explainer.model), torch.inference_mode(False), \
            torch.enable_grad():
        leaves = [t.detach().clone().requires_grad_(True) if t.is_floating_point() else t
                  for t in inputs]
        run = program.run(leaves, conditions=dict(gates))
        s = targets.seeding(explainer.model, run.output, 1, target,
                            explained_input=inputs[0])
        flat, seed = s.flat, s.seeds[0]
        top = gates[sites[0].step]
        c_top = list(torch.autograd.grad(flat, top.outputs, seed, retain_graph=True,
                                         allow_unused=True))
        root = _one_hot(top, concept)
        top.set(root)
        out = AttributionGraph(explained=float((seed * flat.detach()).sum()))
        out.nodes.append(Node(layer, concept, float(top.relevance(c_top)[0])))
        frontier = [(names[0], concept)]
        for level, (name, w) in enumerate(zip(lower, widths, strict=True)):
            gate = gates[sites[level + 1].step]
            nxt = []
            for upper_name, c in frontier:
                upper = gates[sites[names.index(upper_name)].step]
                rel, upper_rel = _through(top, c_top, upper, c, gate)
                score = rel.abs() if by == "abs" else rel
                for j in score.argsort(descending=True)[:w].tolist():
                    share = float(rel[j]) / upper_rel if upper_rel else 0.0
                    out.edges.append(Edge((upper_name, c), (name, j), float(rel[j]), share))
                    if (name, j) not in nxt:
                        nxt.append((name, j))
                        out.nodes.append(Node(name, j, float(rel[j])))
            frontier = nxt
        for g in gates.values():
            g.clear()
    return out


def _one_hot(gate: SiteGate, c: int) -> Tensor:
    if not 0 <= c < gate.width:
        raise ConceptError(f"concept {c} does not exist: {gate.site.key} has {gate.width}")
    assert gate.value is not None
    v = torch.zeros(1, gate.width, dtype=gate.value.dtype, device=gate.value.device)
    v[0, c] = 1
    return v


def _through(top: SiteGate, c_top: list[Tensor | None], upper: SiteGate, c: int,
             lower: SiteGate) -> tuple[Tensor, float]:
    """Relevance per channel at `lower` through the root concept and concept c of `upper`,
    and c's own relevance at `upper` (through the root)."""
    grad = list(c_top)
    if upper is top:
        arrived = grad
    else:
        arrived = _grad(top.outputs, upper.outputs, grad)  # through the root's mask
        upper.set(_one_hot(upper, c))
    upper_rel = float(upper.relevance(arrived)[0])
    got = _grad(upper.outputs, lower.outputs, arrived)
    if upper is not top:
        upper.clear()
    return lower.per_feature(got)[0], upper_rel


def _grad(start: list[Tensor], wrt: list[Tensor], grad: list[Tensor | None]
          ) -> list[Tensor | None]:
    pairs = [(s, g) for s, g in zip(start, grad, strict=True) if g is not None]
    if not pairs:
        return [None] * len(wrt)
    return list(torch.autograd.grad([s for s, _ in pairs], wrt, [g for _, g in pairs],
                                    retain_graph=True, allow_unused=True))
