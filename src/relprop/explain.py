"""Explainer, explain() and Explanation: the public entry points.

explain(x, target) = one forward pass through the rewritten model, a seed at
the output (which output, and how much relevance it starts with) and one
backward pass; several targets share the forward, then take one backward
pass each over the kept graph.
"""

from __future__ import annotations

import math
import types
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .composites import Composite, make_composite
from .errors import (
    InputError,
    NoLedgerError,
    RelpropError,
    TargetError,
    TraceError,
    UnsupportedOperationError,
)
from .ledger import Ledger, build_ledger, per_sample
from .program import Program, RunResult
from .progress import batches
from .rules import stabilize
from .trace import TRACE_LOCK, input_shapes, preserved, trace_export, trace_fx

Target = int | tuple[int, ...] | Sequence[int] | Sequence[Sequence[int]] | Tensor | None
STARTS = ("value", "one", "softmax")
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
    `high`, `bias`, `top_k`, `stabilizer`) are keywords. `leaves` maps module
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
        self._program: Program | None = None
        self._fx_error: TraceError | None = None
        # the fx program lacks a rule only for an fx-wrapped library function: torch.export
        # (which traces into it) is tried on the first input; this is why fx fell short
        self._deferred: UnsupportedOperationError | None = None
        self._leaves = leaves
        # by (input count, keyword names): traced again for more inputs or keywords
        self._programs: dict[tuple[int, frozenset[str]], Program] = {}
        traced = None
        # Under the lock: a trace in another thread puts this model in eval mode meanwhile.
        with TRACE_LOCK, preserved(model):
            try:
                traced = trace_fx(model, leaves)
            except TraceError as exc:
                self._fx_error = exc
        if traced is not None:
            wrapped = set() if leaves else _fx_wrapped(traced.graph)
            with preserved(model):
                try:
                    self._program = Program.build(traced, self.composite)
                except UnsupportedOperationError as exc:
                    # torchvision's Swin keeps shifted_window_attention as one call (its
                    # body branches on sizes): torch.export traces into it. Not with
                    # `leaves`, which torch.export cannot honour.
                    if not any(f"(graph node '{name}')" in str(exc) for name in wrapped):
                        raise
                    self._deferred = exc

    @property
    def program(self) -> Program:
        if self._program is None:
            raise RelpropError(f"not traced yet: {self._fx_error or self._deferred}")
        return self._program

    def _ensure_program(self, inputs: tuple[Tensor, ...],
                        keywords: dict[str, Any] | None = None) -> Program:
        """The program for these inputs, traced again where the first trace cannot serve.

        More inputs than the graph takes: parameters with defaults were traced with
        their defaults, so trace again with them as inputs (once per input count);
        keyword inputs fed as constants (`forward_kwargs`) likewise become graph
        inputs, once per set of names. fx failed at construction: fx again if there
        are more inputs or keywords, else (or if that fails too) torch.export on the
        first real input. The fx program lacked a rule only for an fx-wrapped function
        (`_deferred`): torch.export straight away, which traces into it.
        """
        n, keywords = len(inputs), keywords or {}
        ids = frozenset(i for i, t in enumerate(inputs) if not t.is_floating_point())
        shapes = input_shapes(inputs)  # an export trace serves these sizes only
        key = (n, frozenset(keywords), ids)
        for k in (key, (*key, shapes)):
            program = self._programs.get(k)
            if program is not None and program.traced.shapes in (None, shapes):
                return program
        base = self._program
        if not keywords and not ids and base is not None and len(base.placeholders) >= n \
                and base.traced.shapes in (None, shapes):
            return base
        error, traced, deferred = self._fx_error or self._deferred, None, self._deferred
        if (n > 1 or keywords or ids) and deferred is None and (
                base is None or base.traced.method == "fx"):
            try:
                traced = trace_fx(self.model, self._leaves, inputs=n,
                                  keywords=frozenset(keywords))
            except TraceError as exc:
                if base is not None or self._fx_error is None:
                    raise
                error = exc
        if traced is None:
            try:
                traced = trace_export(self.model, inputs, keywords)
            except TraceError as exc:
                raise TraceError(f"{error}; and {exc}") from exc
        if ids:  # token ids: explained at the outputs of their embedding lookups
            holders = [nd.name for nd in traced.graph.nodes if nd.op == "placeholder"
                       and nd.name not in traced.constants]
            traced.index_inputs = frozenset(holders[i] for i in ids if i < len(holders))
        try:
            program = Program.build(traced, self.composite)
        except UnsupportedOperationError as exc:
            if deferred is None or traced.method != "export":
                raise
            raise UnsupportedOperationError(f"{deferred}; and under torch.export: {exc}") \
                from exc
        if ids and not program.sources:
            raise InputError(f"input {min(ids)} holds integers (token ids?) but the model "
                             "looks none of them up in an embedding; relevance needs a "
                             "floating-point input or token ids fed to an nn.Embedding")
        if self._program is None and not keywords and not ids:
            self._program = program
        self._programs[key if traced.shapes is None else (*key, shapes)] = program
        return program

    def __call__(self, x: Tensor | tuple[Tensor, ...], target: Target = None,
                 **kwargs: Any) -> Explanation:
        return self.explain(x, target, **kwargs)

    def explain(self, x: Tensor | tuple[Tensor, ...], target: Target = None, *,
                output_relevance: Tensor | None = None, start: str = "value",
                record: bool | None = None, batch_size: int | None = None,
                progress: bool = False,
                forward_kwargs: dict[str, Any] | None = None,
                position: int | None = None) -> Explanation:
        """Relevance of every input feature for the chosen output(s).

        `forward_kwargs`: keyword inputs of the model's forward that are not explained
        (an attention mask, lengths): passed as constants, relevance flows around them.
        `position`: for sequence outputs (B, T, V), the position whose logits class
        targets index (a causal LM's next-token logits: the last position, the
        default for models that generate); a (position, token) tuple target picks
        its own position, so [[(5, t1), (6, t2)]] explains two generated tokens.
        """
        record = self.record if record is None else record
        inputs = _check_inputs(x)
        forward_kwargs = dict(forward_kwargs or {})
        if start not in STARTS:
            raise RelpropError(f"start={start!r}: choose one of {', '.join(STARTS)}")
        if record and inputs[0].shape[0] > 1:
            # One sample at a time: per-sample balances need no knowledge of where the
            # batch dimension sits in intermediate tensors (seq-first RNN code, say).
            batch_size = 1
        if batch_size is not None:
            return self._explain_chunked(inputs, target, output_relevance, start, record,
                                         batch_size, progress, single=isinstance(x, Tensor),
                                         forward_kwargs=forward_kwargs, position=position)
        with torch.inference_mode(False), torch.enable_grad():
            # may trace (exclusive), so before the shared lock
            self._ensure_program(inputs, forward_kwargs)
        with TRACE_LOCK.shared(), preserved(self.model), torch.inference_mode(False), \
                torch.enable_grad():
            expl = self._explain(inputs, target, output_relevance, start, record,
                                 forward_kwargs, position)
        if isinstance(x, Tensor):
            expl.relevance = expl.relevance[0]
            if expl.embeddings is not None:
                expl.embeddings = expl.embeddings[0]
        return expl

    def _explain(self, inputs: tuple[Tensor, ...], target: Target,
                 output_relevance: Tensor | None, start: str, record: bool,
                 forward_kwargs: dict[str, Any], position: int | None = None) -> Explanation:
        program = self._ensure_program(inputs, forward_kwargs)
        # half precision is explained in float32 (on the same rounded weights) and the
        # results handed back in the input's dtype: float16 cannot hold the rules' ratios
        half = next((t.dtype for t in inputs if t.dtype in _HALF), None) or (
            _parameter_dtype(self.model) if program.sources else None)
        half = half if half in _HALF else None
        compute = torch.float32 if half is not None else None
        # token ids stay as they are: their embedding lookups make the leaves (run.sources)
        leaves = tuple(t.detach().to(compute or t.dtype).clone().requires_grad_(True)
                       if t.is_floating_point() else t for t in inputs)
        run = program.run(list(leaves), record=record, dtype=compute, keywords=forward_kwargs)
        output = run.output
        output = _logits(output)
        batch = inputs[0].shape[0]
        if output.dim() == 0 or output.shape[0] != batch:
            raise RelpropError(f"the output has shape {tuple(output.shape)}; expected the batch "
                               f"size {batch} first")
        flat = output.reshape(batch, -1)
        if position is None and output.dim() == 3 and _generates(self.model):
            position = -1  # a causal LM: the next token's logits
        if position is not None and output_relevance is None:
            target = _at_position(target, output, position)
        index, multi = _resolve_target(target, output, output_relevance)
        seeds = _seeds(flat, index, start, output_relevance)  # (K, B, N)
        explained = (seeds * flat.detach()).sum(-1).T  # (B, K)
        sink_ids = list(run.sinks)  # placeholder steps with a shadow leaf
        wrt = [*(x for x in leaves if x.is_floating_point()),
               *(e for p in range(len(leaves)) for e in run.sources.get(p, ())),
               *(run.sinks[i] for i in sink_ids)]
        K = seeds.shape[0]
        layers = ledger = None
        if record:
            results = []
            for k in range(K):
                grads = torch.autograd.grad(flat, wrt, seeds[k], retain_graph=k < K - 1,
                                            allow_unused=True)
                rel = _relevance(leaves, grads, sink_ids, run)
                led, lay = build_ledger(program, run, batch, explained[:, k],
                                        sum(per_sample(r, batch) for r in rel))
                results.append((rel, led, lay))
                run.recording.clear()
            relevance = tuple(torch.stack([r[0][p] for r in results], 1)
                              for p in range(len(leaves)))
            layers = {name: torch.stack([r[2][name] for r in results], 1)
                      for name in results[0][2]}
            ledger = results[0][1] if K == 1 else _stack_ledgers([r[1] for r in results])
        elif K == 1:
            grads = torch.autograd.grad(flat, wrt, seeds[0], allow_unused=True)
            relevance = tuple(r.unsqueeze(1) for r in _relevance(leaves, grads, sink_ids, run))
        else:
            # One shared forward, then one backward per target over the kept graph.
            # (autograd's is_grads_batched runs convolution backward sample by sample
            # under its legacy vmap, which measured slower than this loop.)
            per_target = []
            for k in range(K):
                grads = torch.autograd.grad(flat, wrt, seeds[k], retain_graph=k < K - 1,
                                            allow_unused=True)
                per_target.append(_relevance(leaves, grads, sink_ids, run))
            relevance = tuple(torch.stack([r[p] for r in per_target], 1)
                              for p in range(len(leaves)))
        if not multi:
            relevance = tuple(r.squeeze(1) for r in relevance)
            index, explained = index[:, 0], explained[:, 0]
            if layers is not None:
                layers = {k: v.squeeze(1) for k, v in layers.items()}
        if half is not None:
            relevance = tuple(r.to(half) for r in relevance)
            output, explained = output.to(half), explained.to(half)
        # token inputs: relevance per token, and per embedding dimension in `embeddings`
        tokens = [not t.is_floating_point() for t in inputs]
        embeddings = tuple(r if tok else None for r, tok in zip(relevance, tokens, strict=True))
        relevance = tuple(r.sum(-1) if tok else r for r, tok in zip(relevance, tokens,
                                                                       strict=True))
        return Explanation(relevance=relevance, output=output.detach(), target=index,
                           explained=explained, composite=self.composite.name,
                           parameters=self.composite.describe(), layers=layers,
                           _ledger=ledger,
                           embeddings=embeddings if any(tokens) else None)

    def _explain_chunked(self, inputs, target, output_relevance, start, record, batch_size,
                         progress, single, forward_kwargs, position=None):
        total = inputs[0].shape[0]
        if batch_size < 1:
            raise InputError(f"batch_size={batch_size}: must be at least 1")
        parts = []
        for lo in batches(total, batch_size, progress):
            sl = slice(lo, lo + batch_size)
            t = _chunk_target(target, sl, total)
            o = output_relevance[sl] if output_relevance is not None else None
            # keyword tensors with one row per sample (a mask) are split with the batch
            kw = {k: v[sl] if isinstance(v, Tensor) and v.dim() and v.shape[0] == total else v
                  for k, v in forward_kwargs.items()}
            part = self.explain(tuple(x[sl] for x in inputs), t, output_relevance=o, start=start,
                                record=record, forward_kwargs=kw, position=position)
            parts.append(part)
        rel = tuple(torch.cat([_as_tuple(p.relevance)[i] for p in parts])
                    for i in range(len(inputs)))
        layers = ledger = None
        if record:
            layers = {k: _join_maps([p.layers[k] for p in parts], batch_size)
                      for k in parts[0].layers}
            ledger = _join_ledgers([p.ledger for p in parts])
        return Explanation(relevance=rel[0] if single else rel,
                           output=torch.cat([p.output for p in parts]),
                           target=torch.cat([p.target for p in parts]),
                           explained=torch.cat([p.explained for p in parts]),
                           composite=self.composite.name,
                           parameters=self.composite.describe(), layers=layers,
                           _ledger=ledger, embeddings=_joined_embeddings(parts, single))


def explain(model: nn.Module, x: Tensor | tuple[Tensor, ...], target: Target = None, *,
            composite: str | Composite = DEFAULT_COMPOSITE,
            output_relevance: Tensor | None = None,
            start: str = "value", record: bool = False, batch_size: int | None = None,
            progress: bool = False, forward_kwargs: dict[str, Any] | None = None,
            position: int | None = None, **params: Any) -> Explanation:
    """One-shot: build an Explainer and explain x (build an Explainer to reuse the trace)."""
    return Explainer(model, composite, **params).explain(
        x, target, output_relevance=output_relevance, start=start, record=record,
        batch_size=batch_size, progress=progress, forward_kwargs=forward_kwargs,
        position=position)


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


def _resolve_target(target: Target, output: Tensor,
                    output_relevance: Tensor | None) -> tuple[Tensor, bool]:
    """(B, K) indices into the flattened output, and whether K maps per sample were asked.

    Captum's convention: an int (or a tuple indexing a multi-dimensional output) for
    every sample; a list, or a 1-d tensor, of B entries: one per sample; a (B, K) or
    (1, K) tensor or nested list: K per sample, sharing one forward.
    """
    batch = output.shape[0]
    inner = tuple(output.shape[1:])
    n = math.prod(inner)
    device = output.device
    if output_relevance is not None:
        if target is not None:
            raise TargetError("give either target= or output_relevance=, not both")
        return torch.full((batch, 1), -1, dtype=torch.long, device=device), False
    if target is None:
        return output.detach().reshape(batch, -1).argmax(1, keepdim=True), False
    if isinstance(target, bool) or (isinstance(target, Tensor) and (
            target.is_floating_point() or target.dtype == torch.bool)):
        kind = f"a tensor of dtype {target.dtype}" if isinstance(target, Tensor) else "a bool"
        raise TargetError(f"target is {kind}; give class indices (an int, a list of ints, "
                          "a torch.long tensor)")
    if isinstance(target, tuple):  # one position in a multi-dimensional output, all samples
        index = torch.full((batch, 1), _flat_position(target, inner), dtype=torch.long,
                           device=device)
        return index, False
    if isinstance(target, int):
        index = torch.full((batch, 1), target, dtype=torch.long, device=device)
        multi = False
    elif isinstance(target, list):
        if not target:
            raise TargetError("target=[] is empty: give one target per sample")
        if all(isinstance(t, list) for t in target):  # nested: K per sample
            t = _as_index(target, device, inner)
            multi = True
        else:
            t = torch.tensor([_flat_position(v, inner) if isinstance(v, tuple) else v
                              for v in target], dtype=torch.long, device=device)
            multi = False
        index = _per_sample(t, batch, multi, target)
    elif isinstance(target, Tensor):
        t = target.to(device=device, dtype=torch.long)
        if t.dim() > 2:
            raise TargetError(f"target has shape {tuple(target.shape)}; expected (), (B,), "
                              "(B, K) or (1, K)")
        multi = t.dim() == 2
        index = t.expand(batch)[:, None] if t.dim() == 0 else _per_sample(t, batch, multi,
                                                                           target)
    else:
        raise TargetError(f"target={target!r}: give None (the predicted class), an int, a "
                          "list or 1-d tensor of one index per sample, or a (B, K) tensor")
    bad = (index < 0) | (index >= n)
    if bad.any():
        v = index[bad][0].item()
        raise TargetError(f"target {v} is out of range: the model has {n} outputs "
                          f"(valid targets 0..{n - 1})")
    return index, multi


def _logits(output: Any) -> Tensor:
    """The tensor to explain: the output itself, or the `logits` of an output object
    (Hugging Face's ModelOutput, a dict with "logits")."""
    if isinstance(output, Tensor):
        return output
    logits = output.get("logits") if isinstance(output, dict) else getattr(output, "logits",
                                                                              None)
    if isinstance(logits, Tensor):
        return logits
    raise RelpropError(f"the model returned {type(output).__name__}, not a tensor (nor an "
                       "object with a `logits` tensor); wrap it so that it returns the tensor "
                       "to explain")


def _chunk_target(target: Target, sl: slice, total: int) -> Target:
    """The targets of samples `sl`: per-sample ones (B entries) are split with the batch,
    targets for every sample (an int, a tuple, a (1, K) row) are not."""
    if isinstance(target, Tensor | list) and len(target) == total and not (
            isinstance(target, Tensor) and target.dim() == 0):
        return target[sl]
    return target


def _generates(model: nn.Module) -> bool:
    """A Hugging Face model that generates text (its (B, T, V) logits predict the next
    token at every position)."""
    can = getattr(model, "can_generate", None)
    try:
        return bool(can()) if callable(can) else False
    except Exception:
        return False


def _at_position(target: Target, output: Tensor, position: int) -> Target:
    """Class targets of a sequence output (B, T, V) as (position, class) tuples."""
    if output.dim() != 3:
        raise TargetError(f"position={position}: the output has shape "
                          f"{tuple(output.shape)}, not a sequence of logits (B, T, V)")
    T = output.shape[1]
    if not -T <= position < T:
        raise TargetError(f"position={position} is out of range for a sequence of {T}")

    def at(t: Any) -> Any:
        if isinstance(t, list):
            return [at(e) for e in t]
        if isinstance(t, int) and not isinstance(t, bool):
            return (position, t)
        return t  # a (position, class) tuple keeps its own position

    if target is None:
        return output.detach()[:, position].argmax(-1).tolist()
    if isinstance(target, Tensor):
        target = target.tolist()
    if isinstance(target, int) and not isinstance(target, bool):
        return (position, target)
    return at(target) if isinstance(target, list) else target


def _joined_embeddings(parts: list[Explanation], single: bool) -> Any:
    if parts[0].embeddings is None:
        return None
    per_input = [_as_tuple(p.embeddings) for p in parts]
    joined = tuple(None if per_input[0][i] is None else torch.cat([e[i] for e in per_input])
                   for i in range(len(per_input[0])))
    return joined[0] if single else joined


def _as_index(nested: list, device: torch.device, inner: tuple[int, ...] = ()) -> Tensor:
    if inner and any(isinstance(e, tuple) for row in nested for e in row):
        nested = [[_flat_position(e, inner) if isinstance(e, tuple) else e for e in row]
                  for row in nested]
    try:
        return torch.tensor(nested, dtype=torch.long, device=device)
    except (TypeError, ValueError) as exc:
        raise TargetError(f"target={nested!r}: a nested list must be rectangular, of ints "
                          "(B rows of K classes, or one row for every sample)") from exc


def _per_sample(t: Tensor, batch: int, multi: bool, given: Any) -> Tensor:
    """(B, K) from B per-sample targets, or from (B, K) / (1, K) several per sample."""
    if not multi:
        if t.shape[0] != batch:
            raise TargetError(
                f"target has {t.shape[0]} entries but the batch has {batch} samples: a list "
                "or 1-d tensor gives one target per sample (Captum's convention); for several "
                f"classes per sample give a (B, K) or (1, K) tensor or nested list, e.g. "
                f"[{list(given)[:3]}] for those classes in every sample")
        return t[:, None]
    if t.shape[0] not in (1, batch):
        raise TargetError(f"target has shape {tuple(t.shape)}; expected ({batch}, K) or (1, K)")
    return t.expand(batch, -1)


def _flat_position(position: Any, inner: tuple[int, ...]) -> int:
    """A tuple index into one sample's output, as an index into its flattened output."""
    if isinstance(position, int) and not isinstance(position, bool):
        return position
    if not isinstance(position, tuple) or len(position) != len(inner) or not all(
            isinstance(p, int) and not isinstance(p, bool) for p in position):
        raise TargetError(f"target {position!r}: a tuple indexes one output position and "
                          f"needs {len(inner)} ints for an output of shape (B, "
                          f"{', '.join(map(str, inner))})")
    flat = 0
    for p, size in zip(position, inner, strict=True):
        if not -size <= p < size:
            raise TargetError(f"target {position!r} is out of range for an output of shape "
                              f"(B, {', '.join(map(str, inner))})")
        flat = flat * size + p % size
    return flat


def _seeds(flat: Tensor, index: Tensor, start: str,
           output_relevance: Tensor | None) -> Tensor:
    """c at the output for each target: (K, B, N). Relevance there is c * output."""
    out = flat.detach()
    batch = out.shape[0]
    if output_relevance is not None:
        r = output_relevance.to(out).reshape(batch, -1) if output_relevance.numel() == \
            out.numel() else None
        if r is None:
            raise TargetError(f"output_relevance has shape {tuple(output_relevance.shape)}; "
                              f"expected the output's shape {tuple(out.shape)}")
        if ((out == 0) & (r != 0)).any():
            raise TargetError("output_relevance puts relevance on an output whose value is 0; "
                              "relevance cannot start there in gradient form")
        return (r / torch.where(out == 0, 1.0, out))[None]
    one_hot = torch.zeros((index.shape[1], *out.shape), dtype=out.dtype, device=out.device)
    one_hot.scatter_(2, index.T[:, :, None], 1.0)
    if start == "value":
        return one_hot
    scale = 1.0 / stabilize(out, 1e-12)
    if start == "softmax":
        scale = scale * out.softmax(1)
    return one_hot * scale


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


def _fx_wrapped(graph: torch.fx.Graph) -> set[str]:
    """Nodes calling a plain Python function of a library other than torch, kept whole by
    torch.fx.wrap, with no registered rule (relprop.register_function)."""
    from .registry import function_family

    names = set()
    for node in graph.nodes:
        fn = node.target
        module = getattr(fn, "__module__", None) or ""
        if node.op == "call_function" and isinstance(fn, types.FunctionType) and not (
                module == "torch" or module.startswith(("torch.", "_operator"))) and \
                function_family(fn) is None:
            names.add(node.name)
    return names


def _parameter_dtype(model: nn.Module) -> torch.dtype | None:
    """The floating-point type of the model's first floating parameter."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), None)


def _as_tuple(r: Tensor | tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    return (r,) if isinstance(r, Tensor) else r


def _join_maps(maps: list[Tensor], chunk: int) -> Tensor:
    """Chunks' relevance maps: batch-first ones are concatenated; any other layout (a
    seq-first intermediate) is stacked with a new leading sample dimension."""
    if all(m.shape[0] == min(chunk, m.shape[0]) for m in maps) and maps[0].shape[0] == chunk:
        return torch.cat(maps)
    if chunk == 1 and all(m.shape[0] == 1 for m in maps):
        return torch.cat(maps)
    return torch.stack(maps)


def _join_ledgers(ledgers: list[Ledger]) -> Ledger:
    """Chunks' ledgers, one after the other along the batch."""
    return _combine_ledgers(ledgers, torch.cat)


def _stack_ledgers(ledgers: list[Ledger]) -> Ledger:
    """Per-target ledgers side by side: (B, K) balances."""
    return _combine_ledgers(ledgers, lambda ts: torch.stack(ts, 1))


def _combine_ledgers(ledgers: list[Ledger], join) -> Ledger:
    from .ledger import LedgerEntry

    entries = []
    for parts in zip(*(lg.entries for lg in ledgers), strict=True):
        e = parts[0]
        entries.append(LedgerEntry(
            e.node, e.op, e.path, e.rule,
            *(join([getattr(q, f) for q in parts])
              for f in ("relevance_in", "relevance_out", "bias", "stabilizer"))))
    return Ledger(entries, join([lg.explained for lg in ledgers]),
                  join([lg.at_input for lg in ledgers]))
