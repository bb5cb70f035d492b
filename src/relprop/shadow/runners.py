"""Running one step on both channels: a table from shadow role to runner.

Each runner takes a `Shadowed` (the step, its resolved arguments, the program's
values and shadows) and returns (value, shadow). The interpreter
(relprop.program.run) calls `run_shadowed` for the steps the shadow plan marked and
knows nothing of the roles.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..ops import Kind, is_op, max_pool_with_indices, spec
from ..passes.classify import is_binary_sum
from ..refs import Ref, map_refs, refs_in
from .functions import ShadowIdentity, ShadowSum
from .roles import Role


@dataclass
class Shadowed:
    """One step about to run on both channels."""

    index: int
    step: Any  # relprop.program.plan.Step
    args: Any  # resolved
    kwargs: Any  # resolved
    steps: list[Any]
    values: list[Any]
    shadows: list[Any]
    stabilizer: float  # the composite's, for sums
    tap: Callable[[int, int, Any], Any] | None = None  # a recording's shadow-edge tap

    def shadow_of(self, src: int) -> Any:
        sh = self.shadows[src]
        if sh is not None and self.tap is not None:
            sh = self.tap(self.index, src, sh)
        return sh

    def first_shadow(self) -> Any:
        x = self.step.args[0] if self.step.args else None
        return self.shadow_of(x.index) if isinstance(x, Ref) else None

    def is_data(self, ref: Any) -> bool:
        """An input-dependent tensor argument (not a size)."""
        if not isinstance(ref, Ref):
            return False
        src = self.steps[ref.index]
        return src.dynamic and src.kind is not Kind.META

    def on_shadows(self, template: Any, fill: Callable[[Any], Any] | None = None) -> Any:
        """The arguments with every data input replaced by its shadow (or zeros), or by
        `fill(value)`."""
        def sub(ref: Ref) -> Any:
            v = self.values[ref.index]
            if not self.is_data(ref):
                return v
            if fill is not None:
                return fill(v)
            sh = self.shadow_of(ref.index)
            return sh if sh is not None else zeros_like(v)

        return map_refs(template, sub)

    def call(self, *args: Any, **kwargs: Any) -> Any:
        """The step's call (its fused form in a plain run: the program hands fused steps)."""
        return self.step.call(*args, **kwargs)


def _layer(s: Shadowed) -> tuple[Any, Any]:
    """Direct relevance joins the layer's input before its rule (the Function's port)."""
    port = s.step.shadow_out
    out = s.call(*s.args, shadow=s.first_shadow(), port=port, **s.kwargs)
    return out if port else (out, None)


def _recurrent(s: Shadowed) -> tuple[Any, Any]:
    """LSTM/GRU: relevance on the input's shadow joins the recurrent rule's sink."""
    sh = s.first_shadow()
    kwargs = {**s.kwargs, "target": sh, "route": "sink"} if sh is not None else s.kwargs
    return s.step.call(*s.args, **kwargs), None


def _identity(s: Shadowed) -> tuple[Any, Any]:
    fn, rest, kwargs = spec(s.step.node).fn, s.args[1:], s.kwargs

    def apply(t: Tensor) -> Tensor:
        return fn(t, *rest, **kwargs)

    port = s.step.shadow_out
    out = ShadowIdentity.apply(s.args[0], s.first_shadow(), apply, port)
    return out if port else (out, None)


def _move(s: Shadowed) -> tuple[Any, Any]:
    """The same op applied to the shadows (padded positions hold no relevance)."""
    value = s.step.call(*s.args, **s.kwargs)
    sh_args, sh_kwargs = s.on_shadows(s.step.args), s.on_shadows(s.step.kwargs)
    if is_op(s.step.node, "pad"):
        sh_args = sh_args[:3]
        sh_kwargs = {k: v for k, v in sh_kwargs.items() if k != "value"}
    return value, s.step.call(*sh_args, **sh_kwargs)


def _scale(s: Shadowed) -> tuple[Any, Any]:
    """Times a constant, or the signal of signal * gate: relevance passes unchanged."""
    value = s.step.call(*s.args, **s.kwargs)
    signal = spec(s.step.node).signal
    src = s.step.args[signal] if signal is not None else next(
        a for a in refs_in(s.step.args) if s.is_data(a))
    sh = s.shadow_of(src.index)
    if sh is None:
        sh = zeros_like(value)
    return value, sh.expand_as(value) if sh.shape != value.shape else sh


def _pool(s: Shadowed) -> tuple[Any, Any]:
    """Max pooling: the shadow is gathered at the value's argmax (winner takes all)."""
    op = spec(s.step.node).op
    if op.returns_indices:  # ATen's max pooling (export) gives (values, argmax)
        value, idx = s.step.call(*s.args, **s.kwargs)
    else:
        with_indices, flag = max_pool_with_indices(op)
        kwargs = {k: v for k, v in s.kwargs.items() if k != "return_indices"}
        value, idx = with_indices(s.args[0], *s.args[1:flag], **kwargs)
    sh = s.first_shadow()
    if sh is None:
        sh = zeros_like(s.args[0])
    flat = sh.flatten(-op.pool_dims)
    picked = flat.gather(-1, idx.flatten(-op.pool_dims).expand(*flat.shape[:-1], -1))
    picked = picked.view_as(value)
    return ((value, idx), (picked, None)) if op.returns_indices else (value, picked)


def _sum(s: Shadowed) -> tuple[Any, Any]:
    """Proportional split; where the sum is exactly 0, an equal split of the shadow."""
    fn = spec(s.step.node).fn
    value = fn(*s.args, **s.kwargs)
    parts = fn(*_summands(s, s.on_shadows(s.step.args)), **s.on_shadows(s.step.kwargs))
    with torch.no_grad():
        ones = _summands(s, s.on_shadows(s.step.args, ones_like))
        count = fn(*ones, **s.on_shadows(s.step.kwargs, ones_like))
    count = torch.as_tensor(count, dtype=value.dtype).expand_as(value)
    port = s.step.shadow_out
    out = ShadowSum.apply(value, parts, count, s.stabilizer, port)
    return out if port else (out, None)


def _summands(s: Shadowed, resolved: Any) -> Any:
    """x + c: the constant summand c carries no shadow and is no contributor."""
    if not is_binary_sum(s.step.node):
        return resolved
    template = s.step.args
    return tuple(v if s.is_data(t) or not isinstance(v, Tensor | int | float) or
                 isinstance(v, bool) else 0 * v
                 for t, v in zip(template[:2], resolved[:2], strict=True)) + tuple(resolved[2:])


RUNNERS: dict[Role, Callable[[Shadowed], tuple[Any, Any]]] = {
    Role.LAYER: _layer, Role.RECURRENT: _recurrent, Role.IDENTITY: _identity,
    Role.MOVE: _move, Role.SCALE: _scale, Role.POOL: _pool, Role.SUM: _sum,
}
# roles whose shadow is dropped when nothing below takes relevance from it
_PASSING = (Role.MOVE, Role.SCALE, Role.POOL)


def run_shadowed(s: Shadowed) -> tuple[Any, Any]:
    """Run one step on both channels: (value, shadow or None)."""
    runner = RUNNERS.get(s.step.role)
    if runner is None:
        return s.step.call(*s.args, **s.kwargs), None
    value, shadow = runner(s)
    if s.step.role in _PASSING and not carries(shadow):
        # nothing below takes relevance from this shadow (a LayerNorm feeds it): without
        # one the consumer falls back to gradient form
        shadow = None
    return value, shadow


def carries(shadow: Any) -> bool:
    """Whether relevance put on this shadow reaches anything (it has a backward path)."""
    if isinstance(shadow, Tensor):
        return shadow.requires_grad
    if isinstance(shadow, tuple | list):
        return any(carries(e) for e in shadow)
    return False


def _filled_like(v: Any, fill: Callable[[Tensor], Tensor]) -> Any:
    """`fill` applied to every tensor in v (a tensor or a tuple / list of them)."""
    if isinstance(v, Tensor):
        return fill(v)
    if isinstance(v, tuple | list):
        return type(v)(_filled_like(e, fill) for e in v)
    return v


def zeros_like(v: Any) -> Any:
    return _filled_like(v, torch.zeros_like)


def ones_like(v: Any) -> Any:
    return _filled_like(v, torch.ones_like)
