"""What a recorded run (record=True) keeps for the ledger, and the taps that capture
it: every value's and every edge's gradient, both channels, and each rule's tally.
The interpreter calls these taps only when recording; the plain run never
touches them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..ops import Kind
from ..rules import Tally

_TALLIED = (Kind.LAYER, Kind.NORM, Kind.RECURRENT)  # steps whose rule books bias/stabilizer


class Tap(torch.autograd.Function):
    """Identity that stores the gradient passing through it (for recording relevance)."""

    @staticmethod
    def forward(ctx: Any, t: Tensor, store: dict, key: Any) -> Tensor:  # type: ignore[override]
        ctx.store, ctx.key = store, key
        return t.view_as(t)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        prev = ctx.store.get(ctx.key)
        ctx.store[ctx.key] = grad if prev is None else prev + grad
        return grad, None, None


class Observer:
    """The taps of a plain run: they let values pass and free what no step reads again.
    `Recording` overrides them, so the interpreter's loop is the same for both."""

    tap_shadow_edge: Callable[[int, int, Any], Any] | None = None

    def tap_input(self, i: int, value: Any, shadow: Any) -> tuple[Any, Any]:
        return value, shadow

    def edge_tap(self, i: int, steps: Sequence[Any]) -> Callable[[int, Any], Any] | None:
        return None

    def with_tally(self, i: int, kind: Kind | None, kwargs: Any) -> Any:
        return kwargs

    def tap_output(self, i: int, value: Any, shadow: Any) -> tuple[Any, Any]:
        return value, shadow

    def frees(self, step: Any) -> tuple[int, ...]:
        return step.frees


@dataclass
class Recording(Observer):
    """Gradients captured during one backward pass (record=True)."""

    values: list[Any] = field(default_factory=list)
    out_grads: dict[int, Tensor] = field(default_factory=dict)
    edge_grads: dict[tuple[int, int], Tensor] = field(default_factory=dict)
    edges: dict[int, list[tuple[int, int]]] = field(default_factory=dict)  # step -> (key, src)
    tallies: dict[int, Tally] = field(default_factory=dict)
    # the shadow channel: relevance itself, not divided by the value
    shadow_out: dict[Any, Tensor] = field(default_factory=dict)  # step -> at its shadow
    shadow_edges: dict[int, list[Any]] = field(default_factory=dict)  # step -> keys
    shadow_edge_grads: dict[Any, Tensor] = field(default_factory=dict)

    def clear(self) -> None:
        """Forget the gradients of one backward pass (the next target reuses the graph)."""
        for store in (self.out_grads, self.edge_grads, self.shadow_out, self.shadow_edge_grads):
            store.clear()
        for t in self.tallies.values():
            t.bias = t.stabilizer = None

    def tap_input(self, i: int, value: Any, shadow: Any) -> tuple[Any, Any]:
        """A model input and its shadow leaf, their gradients recorded."""
        value = Tap.apply(value, self.out_grads, i)
        if shadow is not None:
            shadow = Tap.apply(shadow, self.shadow_out, i)
        return value, shadow

    def edge_tap(self, i: int, steps: Sequence[Any]) -> Callable[[int, Any], Any]:
        """A tap for the arguments of step i: records the gradient along every edge from
        an input-dependent step (`steps[src].dynamic`)."""
        self.edges[i] = []

        def tap(src: int, v: Any, _i: int = i) -> Any:
            if not steps[src].dynamic:
                return v
            if isinstance(v, Tensor) and v.requires_grad:
                key = (_i, len(self.edges[_i]))
                self.edges[_i].append((key, src, None))
                return Tap.apply(v, self.edge_grads, key)
            if isinstance(v, tuple | list):  # chunk / split outputs
                out = []
                for j, e in enumerate(v):
                    if isinstance(e, Tensor) and e.requires_grad:
                        key = (_i, len(self.edges[_i]))
                        self.edges[_i].append((key, src, j))
                        e = Tap.apply(e, self.edge_grads, key)
                    out.append(e)
                return type(v)(out)
            return v

        return tap

    def with_tally(self, i: int, kind: Kind | None, kwargs: Any) -> Any:
        """The keyword arguments of step i, with a fresh Tally where its rule keeps one."""
        if kind in _TALLIED:
            self.tallies[i] = Tally()
            kwargs = {**kwargs, "tally": self.tallies[i]}
        return kwargs

    def tap_output(self, i: int, value: Any, shadow: Any) -> tuple[Any, Any]:
        """Step i's value (or each tensor of a tuple value) and shadow, gradients recorded."""
        if isinstance(value, Tensor) and value.requires_grad:
            value = Tap.apply(value, self.out_grads, i)
        elif isinstance(value, tuple | list) and any(
                isinstance(e, Tensor) and e.requires_grad for e in value):
            value = type(value)(
                Tap.apply(e, self.out_grads, (i, j))
                if isinstance(e, Tensor) and e.requires_grad else e
                for j, e in enumerate(value))
        if isinstance(shadow, Tensor):
            shadow = Tap.apply(shadow, self.shadow_out, i)
        return value, shadow

    def frees(self, step: Any) -> tuple[int, ...]:
        return ()  # the ledger reads every value

    def tap_shadow_edge(self, i: int, src: int, shadow: Any) -> Any:  # type: ignore[override]
        """The shadow of step src as step i reads it, its gradient recorded."""
        if isinstance(shadow, Tensor):
            key = (i, src, len(self.shadow_edges.setdefault(i, [])))
            self.shadow_edges[i].append(key)
            shadow = Tap.apply(shadow, self.shadow_edge_grads, key)
        return shadow


@dataclass
class RunResult:
    output: Any
    inputs: list[Tensor]
    sinks: dict[int, Tensor]  # placeholder step -> its shadow leaf (direct relevance)
    recording: Recording | None
    placeholder_steps: list[int] = field(default_factory=list)
    # token-id inputs: input position -> the leaves made of its embedding lookups' outputs
    sources: dict[int, list[Tensor]] = field(default_factory=dict)
