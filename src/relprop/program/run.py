"""The interpreter: `Program` runs the planned steps (plan.py) on a batch, on the
value channel and, where planned, the shadow channel (relprop.shadow), and reads
parameters from the model at every run. A recorded run (record=True) goes
through the same loop with the taps of recording.py switched on.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, fx

from ..composites import Composite
from ..errors import InputError, RelpropError
from ..ops import Kind, node_args, node_location
from ..refs import map_refs
from ..shadow import Shadowed, run_shadowed
from ..trace import TracedModel, attribute
from .plan import plan
from .recording import Observer, Recording, RunResult
from .steps import Step


def _resolve(value: Any, env: list[Any], tap: Callable[[int, Any], Any] | None) -> Any:
    """A step's arguments with each Ref replaced by its value (through a recording's tap)."""
    if tap is None:
        return map_refs(value, lambda r: env[r.index])
    return map_refs(value, lambda r: tap(r.index, env[r.index]))


class Program:
    """Steps in forward order, built from a traced model and a composite."""

    def __init__(self, steps: list[Step], traced: TracedModel, composite: Composite) -> None:
        self.steps = steps
        # what a plain run executes: each step's fused form where it has one
        self.fused = [dataclasses.replace(s, call=s.fast) if s.fast is not None else s
                      for s in steps]
        self.traced = traced
        self.composite = composite
        # explained inputs, in order; keyword inputs fed as constants are not among them
        self.placeholders = [i for i, s in enumerate(steps) if s.op == "placeholder"
                             and s.name not in traced.constants]
        self._casts: dict[str, tuple[tuple, Tensor, Tensor]] = {}
        # embedding lookups of token ids: step -> the position of the input they look up
        self.sources = {i: self._input_of(s.node) for i, s in enumerate(steps)
                        if s.kind is Kind.SOURCE}

    def _input_of(self, node: fx.Node) -> int:
        """The explained input (its position) whose token ids a lookup reads."""
        names = [self.steps[p].name for p in self.placeholders]
        seen, todo, found = set(), [node], set()
        while todo:
            n = todo.pop()
            if n in seen:
                continue
            seen.add(n)
            if n.op == "placeholder" and n.name in names:
                found.add(names.index(n.name))
            todo.extend(node_args(n))
        if len(found) != 1:
            raise InputError(f"the embedding lookup {node_location(node)} reads "
                             f"{len(found)} token-id inputs; relprop explains lookups of one")
        return found.pop()

    @classmethod
    def build(cls, traced: TracedModel, composite: Composite) -> Program:
        return cls(plan(traced, composite), traced, composite)

    def layer_steps(self) -> list[Step]:
        return [s for s in self.steps if s.kind is Kind.LAYER]

    def run(self, inputs: list[Tensor], record: bool = False,
            dtype: torch.dtype | None = None,
            keywords: dict[str, Any] | None = None,
            conditions: dict[int, Callable[[Any, Any], tuple[Any, Any]]] | None = None,
            ) -> RunResult:
        """Forward pass; with record=True every value and gradient is kept for the ledger.

        `dtype`: compute in this floating-point type, parameters and buffers cast
        to it (half-precision models are explained in float32: the rules divide by
        small denominators that float16 cannot hold). `keywords`: the values of the
        keyword inputs traced as constants (by parameter name). `conditions`: step index ->
        a callable given that step's value and shadow, returning what its consumers read
        (relprop.concepts wraps them to mask or capture the gradient there).
        """
        conditions = conditions or {}
        env: list[Any] = [None] * len(self.steps)
        shadows: list[Any] = [None] * len(self.steps)
        rec = Recording(values=env) if record else Observer()
        steps = self.steps if record else self.fused
        sinks: dict[int, Tensor] = {}
        sources: dict[int, list[Tensor]] = {}
        feed = iter(inputs)
        output = None
        for i, step in enumerate(steps):
            if step.op == "placeholder" and step.name in self.traced.constants:
                name = self.traced.constants[step.name]
                value = (keywords or {}).get(name, self.traced.fixed.get(name))
                if isinstance(value, Tensor) and dtype is not None and \
                        value.is_floating_point():
                    value = value.to(dtype)
                env[i] = value
                continue
            if step.op == "placeholder":
                try:
                    env[i] = next(feed)
                except StopIteration:
                    raise InputError(f"the model takes more inputs than the {len(inputs)} "
                                     "given") from None
                if step.shadow_out:
                    sinks[i] = torch.zeros_like(env[i], requires_grad=True)
                    shadows[i] = sinks[i]
                env[i], shadows[i] = rec.tap_input(i, env[i], shadows[i])
                continue
            if step.op == "get_attr":
                env[i] = self._attribute(str(step.node.target), dtype)
                continue
            tap = rec.edge_tap(i, self.steps) if step.dynamic else None
            args = _resolve(step.args, env, tap)
            if dtype is not None and step.half_literal:
                args = _as_dtype(args, dtype)
            if step.op == "output":
                output = args[0] if isinstance(args, tuple) and len(args) == 1 else args
                if self.traced.method == "export" and isinstance(output, tuple | list) and \
                        len(output) == 1:
                    output = output[0]  # export flattens outputs into a tuple
                break
            kwargs = _resolve(step.kwargs, env, tap)
            if dtype is not None and step.half_literal:
                kwargs = _as_dtype(kwargs, dtype)
            try:
                kwargs = rec.with_tally(i, step.kind, kwargs)
                if step.producer or step.shadow_out:
                    value, shadows[i] = run_shadowed(Shadowed(
                        i, step, args, kwargs, self.steps, env, shadows,
                        self.composite.stabilizer, rec.tap_shadow_edge))
                else:
                    value = step.call(*args, **kwargs)
            except RelpropError:
                raise
            except Exception as exc:
                shapes = ", ".join(str(tuple(t.shape)) for t in inputs)
                raise InputError(
                    f"the model failed at {node_location(step.node)} on input of shape "
                    f"{shapes}: {type(exc).__name__}: {exc}") from exc
            if step.kind is Kind.SOURCE:  # token embeddings: the explained leaf
                value = value.detach().to(dtype or value.dtype).requires_grad_(True)
                sources.setdefault(self.sources[i], []).append(value)
            if step.dynamic:
                value, shadows[i] = rec.tap_output(i, value, shadows[i])
            if i in conditions:
                value, shadows[i] = conditions[i](value, shadows[i])
            env[i] = value
            for j in rec.frees(step):
                env[j] = shadows[j] = None
        return RunResult(output, list(inputs), sinks, rec if record else None,
                         self.placeholders, sources)

    def _attribute(self, target: str, dtype: torch.dtype | None) -> Any:
        """A parameter or buffer, detached; cast to `dtype` once per parameter version."""
        value = attribute(self.traced.root, target)
        if not isinstance(value, Tensor):
            return value
        value = value.detach()
        if dtype is None or not value.is_floating_point() or value.dtype == dtype:
            return value
        key = (value.data_ptr(), value._version, value.shape, dtype)
        cached = self._casts.get(target)
        if cached is None or cached[0] != key:
            cached = self._casts[target] = (key, value.to(dtype), value)  # keep the source
        return cached[1]


def _as_dtype(value: Any, dtype: torch.dtype) -> Any:
    """Half-precision dtypes named in a step's arguments, replaced by the compute dtype."""
    return fx.node.map_aggregate(value, lambda v: dtype if v in (
        torch.float16, torch.bfloat16) else v)
