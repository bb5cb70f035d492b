"""Conditional relevance (CRP): one input heatmap per concept, from one forward pass.

The forward pass runs once, with a gate (gates.py) on every conditioned layer. The
backward is split at the highest conditioned layer L: the part above it runs once per
target and gives the gradient c arriving at L; the part below runs once per concept,
started at L with the concept's share of c. `concept_batch=G` lays G concepts side by
side in the batch (the input repeated G times in the one forward pass), so that each
backward pass below L serves G concepts.

Two flavours, as in CRP (zennit-crp's `exclude_parallel`):

- `exclude_parallel=True` (default): only relevance that flows through the concept
  reaches the input (through each conditioned layer in turn, for joint conditions);
- `exclude_parallel=False`: what reaches the input along paths beside L (a residual
  skip around it) is added to every concept's map, and lower conditioned layers mask
  only what passes through them.

On a layer every path passes through, the two agree, and the maps of all its channels
add up to the unconditional map.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .. import targets
from ..explain import Explainer, Explanation, _check_inputs, _half_type, _relevance
from ..ledger import Ledger, build_ledger, per_sample
from ..program import Program, RunResult
from ..targets import Target
from ..trace import TRACE_LOCK, preserved
from .conditions import Condition, Row
from .gates import SiteGate
from .sites import ConceptError, Site, bypassed, resolve, unfused


@dataclass
class ConditionalExplanation(Explanation):
    """An explanation per concept: `relevance` is (B, K, *x.shape[1:]) for one target per
    sample, (B, T, K, ...) for T targets. `conditions`: per map, layer -> concept label.
    `concept_relevance`: (B, [T,] K) each concept's relevance at its (highest) layer."""

    conditions: list[dict[str, str]] = field(default_factory=list)
    concept_relevance: Tensor | None = None
    exclude_parallel: bool = True


def explain(explainer: Explainer, x: Tensor | tuple[Tensor, ...], target: Target = None, *,
            condition: Any, exclude_parallel: bool = True, concept_batch: int | None = None,
            output_relevance: Tensor | None = None, start: str = "value",
            record: bool = False, forward_kwargs: dict[str, Any] | None = None,
            position: int | None = None) -> ConditionalExplanation:
    """Conditional heatmaps of `x` (see the module docstring and relprop.concepts)."""
    cond = Condition.parse(condition)
    inputs = _check_inputs(x)
    keywords = dict(forward_kwargs or {})
    targets.check_start(start)
    if concept_batch is not None and (not isinstance(concept_batch, int) or concept_batch < 1):
        raise ConceptError(f"concept_batch={concept_batch!r}: must be a positive integer")
    with torch.inference_mode(False), torch.enable_grad():
        program = explainer._cache.get(inputs, keywords)
    sites = {k: resolve(program, k) for k in cond.keys}
    program = unfused(program, [s.step for s in sites.values()])
    copies = 1 if record else _copies(cond, inputs[0], concept_batch)
    with TRACE_LOCK.shared(), preserved(explainer.model), torch.inference_mode(False), \
            torch.enable_grad():
        expl = _Conditional(explainer, program, inputs, keywords, sites, copies, record,
                            exclude_parallel).explain(cond, target, output_relevance, start,
                                                      position)
    if isinstance(x, Tensor):
        expl.relevance = expl.relevance[0]
        if expl.embeddings is not None:
            expl.embeddings = expl.embeddings[0]
    return expl


def _copies(cond: Condition, x: Tensor, concept_batch: int | None) -> int:
    """How many concepts share a backward pass: `concept_batch`, at most the number of maps
    where it is known; by default 8 on the CPU (64 VGG16 maps: 2.5x faster than one by one,
    benchmarks/bench_concepts.py) and 32 on a GPU, divided by the batch size."""
    counts = [[s.count() for s in part.values()] for part in cond.parts]
    known = all(c is not None for part in counts for c in part)
    if cond.joint:
        maps = len(cond.parts)
    else:
        maps = 1
        for c in counts[0]:
            maps *= c or 1
    wanted = concept_batch if concept_batch is not None else max(
        1, (32 if x.is_cuda else 8) // x.shape[0])
    return max(1, min(wanted, maps) if known else wanted)


class _Conditional:
    """One conditional explanation: the forward pass, then the backward passes."""

    def __init__(self, explainer: Explainer, program: Program, inputs: tuple[Tensor, ...],
                 keywords: dict[str, Any], sites: dict[str, Site], copies: int, record: bool,
                 exclude_parallel: bool) -> None:
        self.explainer, self.program, self.inputs = explainer, program, inputs
        self.sites, self.G, self.record = sites, copies, record
        self.exclude = exclude_parallel
        self.B = inputs[0].shape[0]
        self.gates = {s.step: SiteGate(s) for s in sites.values()}
        half = _half_type(inputs, explainer.model, program)
        self.half = half
        compute = torch.float32 if half is not None else None
        G, B = self.G, self.B
        rep = tuple(t.repeat(G, *([1] * (t.dim() - 1))) for t in inputs)
        self.leaves = tuple(t.detach().to(compute or t.dtype).clone().requires_grad_(True)
                            if t.is_floating_point() else t for t in rep)
        kw = {k: v.repeat(G, *([1] * (v.dim() - 1)))
              if isinstance(v, Tensor) and v.dim() and v.shape[0] == B else v
              for k, v in keywords.items()}
        self.run: RunResult = program.run(list(self.leaves), record=record, dtype=compute,
                                          keywords=kw, conditions=dict(self.gates))
        self.sink_ids = list(self.run.sinks)
        self.wrt = [*(x for x in self.leaves if x.is_floating_point()),
                    *(e for p in range(len(self.leaves)) for e in self.run.sources.get(p, ())),
                    *(self.run.sinks[i] for i in self.sink_ids)]
        self._upper: dict[tuple[int, int, bool], tuple[list[Tensor | None], Any]] = {}

    def explain(self, cond: Condition, target: Target, output_relevance: Tensor | None,
                start: str, position: int | None) -> ConditionalExplanation:
        B, G = self.B, self.G
        output = targets.logits(self.run.output, self.inputs[0])
        self.flat = targets.flat(output, G * B)  # G copies of the batch, one per concept group
        s = targets.seeding(self.explainer.model, output[:B], B, target, output_relevance,
                            start, position)
        index, multi, explained = s.index, s.multi, s.explained
        self.seeds = s.seeds  # (T, B, N)
        T = self.seeds.shape[0]
        first = next(iter(self.gates.values()))
        assert first.value is not None
        widths = {k: self.gates[s.step].width for k, s in self.sites.items()}
        maps = cond.maps(widths, first.value.dtype, first.value.device)
        for m in maps:
            steps = [self.sites[k].step for k in m]
            if len(set(steps)) < len(steps):
                raise ConceptError(f"two names in one condition mean the same layer: "
                                   f"{', '.join(m)}")
        M = len(maps)
        rel: dict[tuple[int, int], tuple[Tensor, ...]] = {}
        at_layer = torch.zeros(B, T, M, dtype=explained.dtype, device=explained.device)
        ledgers: dict[tuple[int, int], Ledger] = {}
        layers: dict[tuple[int, int], dict[str, Tensor]] = {}
        groups: dict[tuple[int, ...], list[int]] = {}
        for m, mp in enumerate(maps):
            key = tuple(sorted({self.sites[k].step for k in mp}, reverse=True))
            groups.setdefault(key, []).append(m)
        for steps, members in groups.items():
            jobs = [(t, m) for t in range(T) for m in members]
            for lo in range(0, len(jobs), G):
                chunk = jobs[lo:lo + G]
                parts, r_layer = self._chunk(steps, chunk, maps)
                for g, (t, m) in enumerate(chunk):
                    rel[t, m] = tuple(p[g * B:(g + 1) * B] for p in parts)
                    at_layer[:, t, m] = r_layer[g * B:(g + 1) * B].to(at_layer.dtype)
                    if self.record:
                        at_input = sum(per_sample(r, B) for r in rel[t, m])
                        ledgers[t, m], layers[t, m] = build_ledger(
                            self.program, self.run, B, explained[:, t], at_input)
                        self.run.recording.clear()
        relevance = tuple(torch.stack([torch.stack([rel[t, m][p] for m in range(M)], 1)
                                       for t in range(T)], 1) for p in range(len(self.inputs)))
        ledger = layer_maps = None
        if self.record:
            order = [(t, m) for t in range(T) for m in range(M)]
            ledger = Ledger.stack([ledgers[j] for j in order])
            layer_maps = {name: torch.stack([layers[j][name] for j in order], 1)
                          for name in layers[order[0]]}
        return self._finish(output, index, explained, relevance, at_layer, maps, multi,
                            ledger, layer_maps)

    # ----------------------------------------------------------------- backward passes

    def _chunk(self, steps: tuple[int, ...], chunk: list[tuple[int, int]],
               maps: list[dict[str, Row]]) -> tuple[tuple[Tensor, ...], Tensor]:
        """Input relevance (rows g*B..) and the relevance at the top layer of G jobs."""
        B, G = self.B, self.G
        top = self.gates[steps[0]]
        for gate in self.gates.values():
            gate.clear()
        single = all(len(maps[m]) == 1 for _, m in chunk)
        around = not self.exclude and bypassed(self.program, steps[0])
        mode = "chain" if self.exclude else (
            "full" if around and (self.record or not single or
                                  self.explainer.composite.top_k is not None)
            else "split+bypass" if around else "split")
        c_rows: list[Tensor | None] = [None] * len(top.outputs)
        bypass = []
        for g in range(G):  # each job's gradient at the top layer, from its target
            t = chunk[g][0] if g < len(chunk) else chunk[0][0]
            c, around_t = self._above(t, top, mode == "split+bypass")
            for i, ci in enumerate(c):
                if ci is None:
                    continue
                part = ci[g * B:(g + 1) * B]
                if c_rows[i] is None:
                    c_rows[i] = torch.zeros_like(ci)
                c_rows[i][g * B:(g + 1) * B] = part if g < len(chunk) else 0
            bypass.append(around_t)
        for step in steps:  # each job's concept at each of its layers
            self._set(self.gates[step], chunk, maps)
        if mode == "full":
            seed = torch.cat([self.seeds[chunk[min(g, len(chunk) - 1)][0]] *
                              (1.0 if g < len(chunk) else 0.0) for g in range(G)])
            grads = torch.autograd.grad(self.flat, self.wrt, seed, retain_graph=True,
                                        allow_unused=True)
        else:
            start, grad = top.outputs, c_rows
            if mode == "chain":
                for step in steps[1:]:
                    gate = self.gates[step]
                    got = self._grad(start, gate.outputs, grad)
                    if all(gi is None for gi in got):
                        raise ConceptError(f"{gate.site.key!r} lies on no path below "
                                           f"{top.site.key!r}; with exclude_parallel=True the "
                                           "layers of one condition must lie on one path")
                    start, grad = gate.outputs, list(got)
            grads = self._grad(start, self.wrt, grad)
        rel = _relevance(self.leaves, grads, self.sink_ids, self.run)
        if mode == "split+bypass":
            rel = tuple(r + torch.cat([b[p] for b in bypass]) for p, r in enumerate(rel))
        return rel, top.relevance(c_rows)

    def _above(self, t: int, top: SiteGate, with_bypass: bool
               ) -> tuple[list[Tensor | None], Any]:
        """The gradient arriving at the top layer for target t (all rows), and with
        `with_bypass` the input relevance along paths beside it. Kept per target, except
        when recording (each job's recording holds its own pass)."""
        key = (t, top.site.step, with_bypass)
        if key in self._upper and not self.record:
            return self._upper[key]
        seed = self.seeds[t].repeat(self.G, 1)
        if with_bypass:
            rows, directions, zero = top.rows, top.directions, top.zero
            top.set(None, zero=True)
            grads = torch.autograd.grad(self.flat, [*top.outputs, *self.wrt], seed,
                                        retain_graph=True, allow_unused=True)
            top.set(rows, directions, zero)
            n = len(top.outputs)
            rel = _relevance(self.leaves, grads[n:], self.sink_ids, self.run)
            bypass = tuple(r[:self.B] for r in rel)
            found = (list(grads[:n]), bypass)
        else:
            grads = torch.autograd.grad(self.flat, top.outputs, seed, retain_graph=True,
                                        allow_unused=True)
            found = (list(grads), None)
        if not self.record:
            self._upper[key] = found
        return found

    def _grad(self, start: list[Tensor], wrt: list[Tensor], grad: Sequence[Tensor | None]
              ) -> tuple[Tensor | None, ...]:
        pairs = [(s, g) for s, g in zip(start, grad, strict=True) if g is not None]
        if not pairs:
            return (None,) * len(wrt)
        return torch.autograd.grad([s for s, _ in pairs], wrt, [g for _, g in pairs],
                                   retain_graph=True, allow_unused=True)

    def _set(self, gate: SiteGate, chunk: list[tuple[int, int]],
             maps: list[dict[str, Row]]) -> None:
        """The gate's concept for each row of the chunk (rows of unused copies: nothing)."""
        key = next(k for k, s in self.sites.items() if s.step == gate.site.step)
        keys = [k for k, s in self.sites.items() if s.step == gate.site.step]
        rows, dirs = [], []
        width = gate.width
        for g in range(self.G):
            row = None
            if g < len(chunk):
                mp = maps[chunk[g][1]]
                row = next((mp[k] for k in keys if k in mp), None)
            if row is None:  # this map does not condition the layer: all passes
                vec = torch.ones(width, dtype=gate.value.dtype, device=gate.value.device)
                if g >= len(chunk):
                    vec = torch.zeros_like(vec)
                row = Row("mask", vec, key)
            rows.append(row.vector)
            dirs.append(row.kind == "direction")
        v = torch.stack(rows).repeat_interleave(self.B, 0)
        d = torch.tensor(dirs, device=v.device).repeat_interleave(self.B, 0)
        gate.set(v, d if bool(d.any()) else None)

    # ----------------------------------------------------------------- the result

    def _finish(self, output: Tensor, index: Tensor, explained: Tensor,
                relevance: tuple[Tensor, ...], at_layer: Tensor, maps: list[dict[str, Row]],
                multi: bool, ledger: Ledger | None,
                layers: dict[str, Tensor] | None) -> ConditionalExplanation:
        B = self.B
        output = output[:B]
        if not multi:
            relevance = tuple(r[:, 0] for r in relevance)
            index, explained, at_layer = index[:, 0], explained[:, 0], at_layer[:, 0]
            if layers is not None:
                layers = {k: v.unflatten(1, (-1, len(maps)))[:, 0] for k, v in layers.items()}
        elif layers is not None:
            layers = {k: v.unflatten(1, (-1, len(maps))) for k, v in layers.items()}
        if self.half is not None:
            relevance = tuple(r.to(self.half) for r in relevance)
            output, explained = output.to(self.half), explained.to(self.half)
        tokens = [not t.is_floating_point() for t in self.inputs]
        embeddings = tuple(r if tok else None for r, tok in zip(relevance, tokens, strict=True))
        relevance = tuple(r.sum(-1) if tok else r for r, tok in
                          zip(relevance, tokens, strict=True))
        composite = self.explainer.composite
        return ConditionalExplanation(
            relevance=relevance, output=output.detach(), target=index, explained=explained,
            composite=composite.name, parameters=composite.describe(), layers=layers,
            _ledger=ledger, embeddings=embeddings if any(tokens) else None,
            conditions=[{k: r.label for k, r in mp.items()} for mp in maps],
            concept_relevance=at_layer, exclude_parallel=self.exclude)
