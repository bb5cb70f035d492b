"""The programs of one model under one composite: traced once per kind of input, with
torch.fx first and torch.export where fx cannot serve, and described in plain terms.

fx needs no example input, so it is tried when the Explainer is built. It can fail
(data-dependent Python), or trace a library function whole that has no rule: then
torch.export, which traces into everything, runs on the first real input. Inputs the
first trace cannot serve (more positional inputs, keyword inputs, token ids, other
sizes for an export trace) get a program of their own, kept for the next batch.
"""

from __future__ import annotations

import types
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..composites import Composite
from ..errors import InputError, RelpropError, TraceError, UnsupportedOperationError
from ..trace import TRACE_LOCK, TracedModel, preserved, serves, sizes, trace_export, trace_fx
from .run import Program

# (positional inputs, keyword names, positions of token-id inputs[, the sizes an export
# trace serves (trace.sizes)[, a count where two serve alike]])
Key = tuple[Any, ...]


class ProgramCache:
    """Programs of `model` under `composite`, by the inputs they serve.

    `first`: the program for plain floating-point inputs (None until one is traced;
    fx's, built at construction, when fx can trace the model). `fx_error`: why fx failed.
    `deferred`: why fx's program could not be built (an fx-wrapped function without a
    rule), so that torch.export is tried straight away.
    """

    def __init__(self, model: nn.Module, composite: Composite,
                 leaves: dict[str, str] | None = None) -> None:
        self.model, self.composite, self.leaves = model, composite, leaves
        self.first: Program | None = None
        self.programs: dict[Key, Program] = {}
        self.fx_error: TraceError | None = None
        self.deferred: UnsupportedOperationError | None = None
        traced = None
        # Under the lock: a trace in another thread puts this model in eval mode meanwhile.
        with TRACE_LOCK, preserved(model):
            try:
                traced = trace_fx(model, leaves)
            except TraceError as exc:
                self.fx_error = exc
        if traced is None:
            return
        wrapped = set() if leaves else _fx_wrapped(traced.graph)
        with preserved(model):
            try:
                self.first = Program.build(traced, composite)
            except UnsupportedOperationError as exc:
                # torchvision's Swin keeps shifted_window_attention as one call (its body
                # branches on sizes): torch.export traces into it. Not with `leaves`, which
                # torch.export cannot honour.
                if not any(f"(graph node '{name}')" in str(exc) for name in wrapped):
                    raise
                self.deferred = exc

    @property
    def program(self) -> Program:
        """The first program; before any input, only where fx could trace the model."""
        if self.first is None:
            raise RelpropError(f"not traced yet: {self.fx_error or self.deferred}")
        return self.first

    def get(self, inputs: tuple[Tensor, ...],
            keywords: dict[str, Any] | None = None) -> Program:
        """The program for these inputs, traced again where no program so far can serve.

        More inputs than the graph takes: parameters with defaults were traced with
        their defaults, so trace again with them as inputs (once per input count);
        keyword inputs fed as constants (`forward_kwargs`) likewise become graph inputs,
        once per set of names. An export trace serves the sizes it left free where its
        guards hold, and those it fixed (trace.serves).
        """
        n, keywords = len(inputs), keywords or {}
        ids = frozenset(i for i, t in enumerate(inputs) if not t.is_floating_point())
        key = (n, frozenset(keywords), ids)
        for k, program in self.programs.items():
            if k[:3] == key and serves(program.traced, inputs, keywords):
                return program
        base = self.first
        if not keywords and not ids and base is not None and len(base.placeholders) >= n \
                and serves(base.traced, inputs, keywords):
            return base
        program = self._build(self._trace(inputs, keywords, ids), ids)
        if self.first is None and not keywords and not ids:
            self.first = program
        served = sizes(program.traced)
        slot = key if served is None else (*key, served)
        if slot in self.programs:  # the same sizes, whose guards these inputs fail
            slot = (*slot, len(self.programs))
        self.programs[slot] = program
        return program

    def _trace(self, inputs: tuple[Tensor, ...], keywords: dict[str, Any],
               ids: frozenset[int]) -> TracedModel:
        """fx again if there are more inputs, keywords or token ids (unless fx's program
        was deferred or the first trace was export's); else, or if fx fails where it
        failed before, torch.export on these inputs."""
        base, error = self.first, self.fx_error or self.deferred
        n = len(inputs)
        if (n > 1 or keywords or ids) and self.deferred is None and (
                base is None or base.traced.method == "fx"):
            try:
                return trace_fx(self.model, self.leaves, inputs=n, keywords=frozenset(keywords))
            except TraceError as exc:
                if base is not None or self.fx_error is None:
                    raise
                error = exc
        try:
            return trace_export(self.model, inputs, keywords)
        except TraceError as exc:
            raise TraceError(f"{error}; and {exc}") from exc

    def _build(self, traced: TracedModel, ids: frozenset[int]) -> Program:
        if ids:  # token ids: explained at the outputs of their embedding lookups
            holders = [nd.name for nd in traced.graph.nodes if nd.op == "placeholder"
                       and nd.name not in traced.constants]
            traced.index_inputs = frozenset(holders[i] for i in ids if i < len(holders))
        try:
            program = Program.build(traced, self.composite)
        except UnsupportedOperationError as exc:
            if self.deferred is None or traced.method != "export":
                raise
            raise UnsupportedOperationError(f"{self.deferred}; and under torch.export: {exc}") \
                from exc
        if ids and not program.sources:
            raise InputError(f"input {min(ids)} holds integers (token ids?) but the model "
                             "looks none of them up in an embedding; relevance needs a "
                             "floating-point input or token ids fed to an nn.Embedding")
        return program


@dataclass(frozen=True)
class StepInfo:
    """One operation of a program: its graph node, op, rule family (Kind's value), the
    rule the composite chose (None for rule-less families), the module it belongs to
    ("" = the model itself), and whether it runs fused with its activation."""

    name: str
    op: str
    kind: str
    rule: str | None
    path: str
    fused: bool


@dataclass(frozen=True)
class Description:
    """A program in plain terms: how it was traced ("fx" or "export"), its explained
    inputs (graph placeholder names) and its operations in forward order."""

    traced: str
    inputs: tuple[str, ...]
    steps: tuple[StepInfo, ...]

    def __str__(self) -> str:
        rows = [f"traced with {self.traced}; inputs {', '.join(self.inputs)}"]
        rows += [f"{s.name:<28} {s.op[:24]:<24} {s.kind:<12} {(s.rule or '-')[:16]:<16} "
                 f"{s.path}{' (fused)' if s.fused else ''}" for s in self.steps]
        return "\n".join(rows)


def describe(program: Program) -> Description:
    """Every operation relprop classified (the nodes with an OpSpec), in forward order."""
    steps = []
    for step in program.steps:
        spec = step.node.meta.get("relprop")
        if spec is None or step.op == "placeholder":
            continue
        steps.append(StepInfo(step.name, spec.label, spec.kind.value,
                              step.rule.describe() if step.rule is not None else None,
                              spec.path, getattr(step, "fast", None) is not None))
    return Description(program.traced.method,
                       tuple(program.steps[p].name for p in program.placeholders),
                       tuple(steps))


def _fx_wrapped(graph: torch.fx.Graph) -> set[str]:
    """Nodes calling a plain Python function of a library other than torch, kept whole by
    torch.fx.wrap, with no registered rule (relprop.register_function)."""
    from ..registry import function_family

    names = set()
    for node in graph.nodes:
        fn = node.target
        module = getattr(fn, "__module__", None) or ""
        if node.op == "call_function" and isinstance(fn, types.FunctionType) and not (
                module == "torch" or module.startswith(("torch.", "_operator"))) and \
                function_family(fn) is None:
            names.add(node.name)
    return names

