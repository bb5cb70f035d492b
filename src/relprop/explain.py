"""Explainer, explain() and Explanation: the public entry points.

explain(x, target) = one forward pass through the rewritten model, a seed at
the output (which output, and how much relevance it starts with: relprop.targets)
and one backward pass per target over the kept graph. The programs, traced once
per kind of input, are kept by relprop.program.cache.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from . import keyword_rows, targets
from .composites import Composite, make_composite
from .errors import InputError, NoLedgerError, RelpropError
from .ledger import Ledger, build_ledger, per_sample
from .program import Program, RunResult
from .program.cache import Description, ProgramCache, describe
from .progress import batches
from .targets import STARTS, Target
from .trace import TRACE_LOCK, preserved

__all__ = ["DEFAULT_COMPOSITE", "STARTS", "Explainer", "Explanation", "Target", "explain"]

_HALF = (torch.float16, torch.bfloat16)
# The default needs no input bounds, so it works on every model: z-plus on
# convolutions (clear image heatmaps), epsilon on dense, recurrent and other layers.
# With known input bounds (normalised pixels), "epsilon_gamma_box" is the tutorials'
# choice for image CNNs.
DEFAULT_COMPOSITE = "epsilon_plus"


@dataclass
class Explanation:
    """The result of one explanation.

    relevance: like x, or (B, K, *x.shape[1:]) for a list of K targets (a tuple
    of these for a model with several inputs). output: the model's output.
    target: (B,) or (B, K) indices into the flattened output. explained: the
    relevance put at the output per sample (and target). layers / ledger: with
    record=True.
    """

    relevance: Tensor | tuple[Tensor, ...]
    output: Tensor
    target: Tensor
    explained: Tensor
    composite: str
    layers: dict[str, Tensor] | None = None
    # every rule of the composite with the values used (Composite.describe())
    parameters: dict[str, Any] | None = None
    _ledger: Ledger | None = field(default=None, repr=False)
    # token-id inputs: relevance per embedding dimension, (B, [K,] T, D) per input (None for
    # the others); `relevance` holds its sum over D, one value per token
    embeddings: Tensor | tuple[Tensor | None, ...] | None = None
    # what made it (explainer, input, keywords), for concepts()
    _source: tuple[Any, Any, dict[str, Any]] | None = field(default=None, repr=False,
                                                             compare=False)

    def concepts(self, layer: str, *, concepts: Any = None) -> Any:
        """Relevance per concept (channel, neuron; `concepts`: relprop.concepts.heads(n) or
        directions(matrix)) at `layer` for the same input and targets: a
        relprop.concepts.ConceptRelevance, (B, C) summed over positions, with its top
        concepts and their shares. Costs one more forward and backward pass."""
        if self._source is None:
            raise RelpropError("this explanation does not know its model: use "
                               "relprop.concepts.relevance(explainer, x, target, layer)")
        from .concepts.relevance import relevance

        explainer, x, keywords = self._source
        return relevance(explainer, x, layers=layer, concepts=concepts, **keywords)

    def plot(self, **kwargs: Any) -> Any:
        """The heatmap grid as a matplotlib Figure (needs `relprop[viz]`); keywords as
        relprop.visualize.explanation_figure (samples=, class_names=, images=, cmap=)."""
        from .visualize import explanation_figure

        return explanation_figure(self, **kwargs)

    def _repr_png_(self) -> bytes | None:
        """Jupyter shows an Explanation as its heatmap grid (nothing without matplotlib)."""
        try:
            from .visualize import explanation_png

            return explanation_png(self)
        except ImportError:
            return None

    @property
    def ledger(self) -> Ledger:
        if self._ledger is None:
            raise NoLedgerError("no ledger: explain with record=True to keep per-node "
                                "relevance")
        return self._ledger


class Explainer:
    """Explains one model with one composite; traces once, reused for every batch.

    Parameters of the composite (`epsilon`, `gamma`, `alpha`, `beta`, `low`,
    `high`, `bias`, `top_k`, `stabilizer`, `routing` for mixture-of-experts routers)
    are keywords. `leaves` maps module
    paths to a rule family ("identity", "gradient", "proportional"): that
    submodule is one operation, not traced into (see relprop.registry). The model is never
    modified: no hooks, no parameter swaps, no change of train/eval mode.
    Explanations always use inference semantics (dropout off, BatchNorm with
    running statistics), whatever mode the model is in.
    """

    def __init__(self, model: nn.Module, composite: str | Composite = DEFAULT_COMPOSITE, *,
                 record: bool = False, leaves: dict[str, str] | None = None,
                 **params: Any) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        self.composite = make_composite(composite, **params)
        self.record = record
        self._cache = ProgramCache(model, self.composite, leaves)

    @property
    def program(self) -> Program:
        return self._cache.program

    # read by tests and benchmarks written before describe()
    _program = property(lambda self: self._cache.first)
    _programs = property(lambda self: self._cache.programs)
    _ensure_program = property(lambda self: self._cache.get)

    def describe(self, x: Tensor | tuple[Tensor, ...] | None = None, *,
                 forward_kwargs: dict[str, Any] | None = None) -> Description:
        """The traced program in plain terms: how it was traced ("fx" or "export"), its
        inputs, and every operation's name, op, kind, rule, module path and fusion.

        With `x`: the program that explains these inputs (traced on them if need be, as
        torch.export is when fx could not trace the model)."""
        if x is None:
            return describe(self._cache.program)
        with torch.inference_mode(False), torch.enable_grad():
            return describe(self._cache.get(_check_inputs(x), dict(forward_kwargs or {})))

    def __call__(self, x: Tensor | tuple[Tensor, ...], target: Target = None,
                 **kwargs: Any) -> Explanation:
        return self.explain(x, target, **kwargs)

    def explain(self, x: Tensor | tuple[Tensor, ...], target: Target = None, *,
                output_relevance: Tensor | None = None, start: str = "value",
                record: bool | None = None, batch_size: int | None = None,
                progress: bool = False,
                forward_kwargs: dict[str, Any] | None = None,
                position: int | None = None, condition: Any = None,
                exclude_parallel: bool = True) -> Explanation:
        """Relevance of every input feature for the chosen output(s).

        `forward_kwargs`: keyword inputs of the model's forward that are not explained
        (an attention mask, lengths): passed as constants, relevance flows around them.
        `position`: for sequence outputs (B, T, V), the position whose logits class
        targets index (a causal LM's next-token logits: the last position, the
        default for models that generate); a (position, token) tuple target picks
        its own position, so [[(5, t1), (6, t2)]] explains two generated tokens.
        `condition`: one map per concept, {"features.28": [3, 7]} (relprop.concepts).
        """
        expl = self._explain_any(x, target, output_relevance, start, record, batch_size,
                                 progress, forward_kwargs, position, condition,
                                 exclude_parallel)
        expl._source = (self, x, {"target": target, "output_relevance": output_relevance,
                                  "start": start, "forward_kwargs": forward_kwargs,
                                  "position": position})
        return expl

    def explain_generation(self, input_ids: Tensor, max_new_tokens: int, *,
                           attention_mask: Tensor | None = None,
                           eos_token_id: int | list[int] | None = None,
                           pad_token_id: int | None = None) -> Any:
        """Greedy generation, each new token explained from one forward: a
        relprop.Generation (relprop.generation.explain_generation)."""
        from .generation import generate_explained

        return generate_explained(self, input_ids, max_new_tokens, attention_mask,
                                  eos_token_id, pad_token_id)

    def _explain_any(self, x: Tensor | tuple[Tensor, ...], target: Target,
                     output_relevance: Tensor | None, start: str, record: bool | None,
                     batch_size: int | None, progress: bool,
                     forward_kwargs: dict[str, Any] | None, position: int | None,
                     condition: Any, exclude_parallel: bool) -> Explanation:
        record = self.record if record is None else record
        if condition is not None:
            from .concepts.conditional import explain as conditional

            return conditional(self, x, target, condition=condition, record=record,
                               exclude_parallel=exclude_parallel, start=start,
                               output_relevance=output_relevance,
                               forward_kwargs=forward_kwargs, position=position)
        inputs = _check_inputs(x)
        forward_kwargs = dict(forward_kwargs or {})
        targets.check_start(start)
        if record and inputs[0].shape[0] > 1:
            # One sample at a time: per-sample balances need no knowledge of where the
            # batch dimension sits in intermediate tensors (seq-first RNN code, say).
            batch_size = 1
        if batch_size is not None:
            return self._explain_chunked(inputs, target, output_relevance, start, record,
                                         batch_size, progress, isinstance(x, Tensor),
                                         forward_kwargs, position)
        with torch.inference_mode(False), torch.enable_grad():
            # may trace (exclusive), so before the shared lock
            program = self._cache.get(inputs, forward_kwargs)
        with TRACE_LOCK.shared(), preserved(self.model), torch.inference_mode(False), \
                torch.enable_grad():
            expl = self._explain(program, inputs, target, output_relevance, start, record,
                                 forward_kwargs, position)
        if isinstance(x, Tensor):
            expl.relevance = expl.relevance[0]
            if expl.embeddings is not None:
                expl.embeddings = expl.embeddings[0]
        return expl

    def _explain(self, program: Program, inputs: tuple[Tensor, ...], target: Target,
                 output_relevance: Tensor | None, start: str, record: bool,
                 forward_kwargs: dict[str, Any], position: int | None) -> Explanation:
        """One forward pass, the seeds at the output, one backward pass per target."""
        # half precision is explained in float32 (on the same rounded weights) and the
        # results handed back in the input's dtype: float16 cannot hold the rules' ratios
        half = _half_type(inputs, self.model, program)
        compute = torch.float32 if half is not None else None
        # token ids stay as they are: their embedding lookups make the leaves (run.sources)
        leaves = tuple(t.detach().to(compute or t.dtype).clone().requires_grad_(True)
                       if t.is_floating_point() else t for t in inputs)
        run = program.run(list(leaves), record=record, dtype=compute, keywords=forward_kwargs)
        s = targets.seeding(self.model, run.output, inputs[0].shape[0], target,
                            output_relevance, start, position, inputs[0])
        relevance, layers, ledger = _backward(program, run, leaves, s.flat, s.seeds,
                                              s.explained, record)
        return _explanation(self.composite, inputs, s.output, s.index, s.explained, relevance,
                            layers, ledger, s.multi, half)

    def _explain_chunked(self, inputs: tuple[Tensor, ...], target: Target,
                         output_relevance: Tensor | None, start: str, record: bool,
                         batch_size: int, progress: bool, single: bool,
                         forward_kwargs: dict[str, Any], position: int | None) -> Explanation:
        """Explanations of `batch_size` samples at a time, joined along the batch."""
        total = inputs[0].shape[0]
        if batch_size < 1:
            raise InputError(f"batch_size={batch_size}: must be at least 1")
        parts = []
        rows = keyword_rows.per_row(self.model, inputs, forward_kwargs) \
            if batch_size < total else set()  # which keywords go with the rows: a mask
        for lo in batches(total, batch_size, progress):
            sl = slice(lo, lo + batch_size)
            o = output_relevance[sl] if output_relevance is not None else None
            kw = keyword_rows.split(forward_kwargs, rows, sl)
            parts.append(self.explain(tuple(x[sl] for x in inputs),
                                      targets.chunk(target, sl, total), output_relevance=o,
                                      start=start, record=record, forward_kwargs=kw,
                                      position=position))
        return _joined(parts, len(inputs), single, batch_size, record)


def explain(model: nn.Module, x: Tensor | tuple[Tensor, ...], target: Target = None, *,
            composite: str | Composite = DEFAULT_COMPOSITE,
            output_relevance: Tensor | None = None,
            start: str = "value", record: bool = False, batch_size: int | None = None,
            progress: bool = False, forward_kwargs: dict[str, Any] | None = None,
            position: int | None = None, condition: Any = None, exclude_parallel: bool = True,
            **params: Any) -> Explanation:
    """One-shot: build an Explainer and explain x (build an Explainer to reuse the trace)."""
    return Explainer(model, composite, **params).explain(
        x, target, output_relevance=output_relevance, start=start, record=record,
        batch_size=batch_size, progress=progress, forward_kwargs=forward_kwargs,
        position=position, condition=condition, exclude_parallel=exclude_parallel)


# ----------------------------------------------------------------- helpers

def _check_inputs(x: Tensor | tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    inputs = (x,) if isinstance(x, Tensor) else tuple(x)
    for i, t in enumerate(inputs):
        name = "x" if len(inputs) == 1 else f"input {i}"
        if not isinstance(t, Tensor):
            raise InputError(f"{name} must be a tensor, got {type(t).__name__}")
        if not t.is_floating_point() and (t.dtype == torch.bool or t.is_complex()):
            raise InputError(f"{name} has dtype {t.dtype}; relevance needs a floating-point "
                             "input (convert with .float()) or integer token ids")
        if t.dim() == 0:
            raise InputError(f"{name} is a scalar; give a batch (B, ...) of inputs")
        if t.shape[0] == 0:
            raise InputError(f"the batch is empty: {name} has shape {tuple(t.shape)}; give at "
                             "least one sample")
        if not torch.isfinite(t).all():
            bad = (~torch.isfinite(t)).nonzero()[0].tolist()
            raise InputError(f"{name} contains NaN or Inf (first at index {tuple(bad)})")
    if len({t.shape[0] for t in inputs}) > 1:
        raise InputError("all inputs must have the same batch size")
    return inputs


def _backward(program: Program, run: RunResult, leaves: tuple[Tensor, ...], flat: Tensor,
              seeds: Tensor, explained: Tensor, record: bool
              ) -> tuple[tuple[Tensor, ...], dict[str, Tensor] | None, Ledger | None]:
    """Per input (B, K, ...) relevance, and with `record` the per-node maps (B, K, ...) and
    the ledger: one backward pass per target over the graph of the one forward pass.

    (autograd's is_grads_batched runs convolution backward sample by sample under its
    legacy vmap, which measured slower than this loop.)"""
    batch, K = flat.shape[0], seeds.shape[0]
    sink_ids = list(run.sinks)  # placeholder steps with a shadow leaf
    wrt = [*(x for x in leaves if x.is_floating_point()),
           *(e for p in range(len(leaves)) for e in run.sources.get(p, ())),
           *(run.sinks[i] for i in sink_ids)]
    rels, maps, ledgers = [], [], []
    for k in range(K):
        grads = torch.autograd.grad(flat, wrt, seeds[k], retain_graph=k < K - 1,
                                    allow_unused=True)
        rels.append(_relevance(leaves, grads, sink_ids, run))
        if record:
            ledger, layers = build_ledger(program, run, batch, explained[:, k],
                                          sum(per_sample(r, batch) for r in rels[-1]))
            ledgers.append(ledger)
            maps.append(layers)
            run.recording.clear()
    relevance = tuple(_by_target([r[p] for r in rels]) for p in range(len(leaves)))
    if not record:
        return relevance, None, None
    layers = {name: _by_target([m[name] for m in maps]) for name in maps[0]}
    return relevance, layers, ledgers[0] if K == 1 else Ledger.stack(ledgers)


def _explanation(composite: Composite, inputs: tuple[Tensor, ...], output: Tensor,
                 index: Tensor, explained: Tensor, relevance: tuple[Tensor, ...],
                 layers: dict[str, Tensor] | None, ledger: Ledger | None, multi: bool,
                 half: torch.dtype | None) -> Explanation:
    """The Explanation of one batch: without a target dimension where one target per
    sample was asked, in the half type the input came in, token relevance summed over
    the embedding (kept per dimension in `embeddings`)."""
    if not multi:
        relevance = tuple(r.squeeze(1) for r in relevance)
        index, explained = index[:, 0], explained[:, 0]
        if layers is not None:
            layers = {k: v.squeeze(1) for k, v in layers.items()}
    if half is not None:
        relevance = tuple(r.to(half) for r in relevance)
        output, explained = output.to(half), explained.to(half)
    tokens = [not t.is_floating_point() for t in inputs]
    embeddings = tuple(r if tok else None for r, tok in zip(relevance, tokens, strict=True))
    relevance = tuple(r.sum(-1) if tok else r for r, tok in zip(relevance, tokens, strict=True))
    return Explanation(relevance=relevance, output=output.detach(), target=index,
                       explained=explained, composite=composite.name,
                       parameters=composite.describe(), layers=layers, _ledger=ledger,
                       embeddings=embeddings if any(tokens) else None)


def _by_target(parts: list[Tensor]) -> Tensor:
    """K per-target tensors (B, ...) as one (B, K, ...)."""
    return parts[0].unsqueeze(1) if len(parts) == 1 else torch.stack(parts, 1)


def _relevance(leaves: tuple[Tensor, ...], grads: Sequence[Tensor | None], sink_ids: list[int],
               run: RunResult) -> tuple[Tensor, ...]:
    """Per input: x * grad plus the relevance that reached its shadow leaf
    (relprop.shadow); for token ids, embedding * grad summed over its lookups.

    `grads` are in the order of `wrt`: floating-point inputs, lookups, shadow leaves."""
    floats = [p for p, x in enumerate(leaves) if x.is_floating_point()]
    lookups = [(p, e) for p in range(len(leaves)) for e in run.sources.get(p, ())]
    at = {p: grads[k] for k, p in enumerate(floats)}
    rel = []
    for p, x in enumerate(leaves):
        if not x.is_floating_point():
            parts = [e.detach() * g for k, (q, e) in enumerate(lookups)
                     if q == p and (g := grads[len(floats) + k]) is not None]
            r = sum(parts[1:], parts[0]) if parts else torch.zeros(
                *x.shape, run.sources[p][0].shape[-1])
            rel.append(r.detach())
            continue
        g = at[p]
        r = x.detach() * g if g is not None else torch.zeros_like(x)
        placeholder = run.placeholder_steps[p]
        if placeholder in sink_ids:
            sg = grads[len(floats) + len(lookups) + sink_ids.index(placeholder)]
            if sg is not None:
                r = r + sg
        rel.append(r.detach())
    return tuple(rel)


def _joined(parts: list[Explanation], inputs: int, single: bool, chunk: int,
            record: bool) -> Explanation:
    """Explanations of consecutive chunks of one batch as one."""
    rel = tuple(torch.cat([_as_tuple(p.relevance)[i] for p in parts]) for i in range(inputs))
    layers = ledger = None
    if record:
        layers = {k: _join_maps([p.layers[k] for p in parts], chunk) for k in parts[0].layers}
        ledger = Ledger.concat([p.ledger for p in parts])
    embeddings = None
    if parts[0].embeddings is not None:
        per_input = [_as_tuple(p.embeddings) for p in parts]
        embeddings = tuple(None if e is None else torch.cat([q[i] for q in per_input])
                           for i, e in enumerate(per_input[0]))
        embeddings = embeddings[0] if single else embeddings
    return Explanation(relevance=rel[0] if single else rel,
                       output=torch.cat([p.output for p in parts]),
                       target=torch.cat([p.target for p in parts]),
                       explained=torch.cat([p.explained for p in parts]),
                       composite=parts[0].composite, parameters=parts[0].parameters,
                       layers=layers, _ledger=ledger, embeddings=embeddings)


def _join_maps(maps: list[Tensor], chunk: int) -> Tensor:
    """Chunks' relevance maps: batch-first ones are concatenated; any other layout (a
    seq-first intermediate) is stacked with a new leading sample dimension."""
    if all(m.shape[0] == min(chunk, m.shape[0]) for m in maps) and maps[0].shape[0] == chunk:
        return torch.cat(maps)
    if chunk == 1 and all(m.shape[0] == 1 for m in maps):
        return torch.cat(maps)
    return torch.stack(maps)


def _half_type(inputs: tuple[Tensor, ...], model: nn.Module,
               program: Program) -> torch.dtype | None:
    """The half type an explanation is handed back in: the first half-precision input's,
    or for token ids (program.sources) the model's first floating parameter's; else None."""
    half = next((t.dtype for t in inputs if t.dtype in _HALF), None) or (
        next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
        if program.sources else None)
    return half if half in _HALF else None


def _as_tuple(r: Tensor | tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    return (r,) if isinstance(r, Tensor) else r
