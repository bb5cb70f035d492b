"""The interpreter: `Program` runs the planned steps (plan.py) on a batch, on the
value channel and, where planned, the shadow channel (relprop.shadow), and reads
parameters from the model at every run. A recorded run (record=True) goes
through the same loop with the taps of recording.py switched on.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx

from ..composites import Composite
from ..errors import InputError, RelpropError
from ..functions import ShadowIdentity, ShadowSum
from ..ops import Kind, node_args, node_location, spec
from ..passes.classify import is_binary_sum
from ..shadow import MAX_POOLS, Role
from ..trace import TracedModel, attribute
from .plan import Step, _Ref, plan
from .recording import Recording, RunResult


def _resolve(value: Any, env: list[Any], tap: Callable[[int, Any], Any] | None) -> Any:
    if isinstance(value, _Ref):
        v = env[value.index]
        return tap(value.index, v) if tap is not None else v
    if isinstance(value, tuple):
        return tuple(_resolve(v, env, tap) for v in value)
    if isinstance(value, list):
        return [_resolve(v, env, tap) for v in value]
    if isinstance(value, dict):
        return {k: _resolve(v, env, tap) for k, v in value.items()}
    if isinstance(value, slice):
        return slice(_resolve(value.start, env, tap), _resolve(value.stop, env, tap),
                     _resolve(value.step, env, tap))
    return value


class Program:
    """Steps in forward order, built from a traced model and a composite."""

    def __init__(self, steps: list[Step], traced: TracedModel, composite: Composite) -> None:
        self.steps = steps
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
            keywords: dict[str, Any] | None = None) -> RunResult:
        """Forward pass; with record=True every value and gradient is kept for the ledger.

        `dtype`: compute in this floating-point type, parameters and buffers cast
        to it (half-precision models are explained in float32: the rules divide by
        small denominators that float16 cannot hold). `keywords`: the values of the
        keyword inputs traced as constants (by parameter name).
        """
        env: list[Any] = [None] * len(self.steps)
        shadows: list[Any] = [None] * len(self.steps)
        rec = Recording(values=env) if record else None
        sinks: dict[int, Tensor] = {}
        sources: dict[int, list[Tensor]] = {}
        feed = iter(inputs)
        output = None
        for i, step in enumerate(self.steps):
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
                if rec is not None:
                    env[i], shadows[i] = rec.tap_input(i, env[i], shadows[i])
                continue
            if step.op == "get_attr":
                env[i] = self._attribute(str(step.node.target), dtype)
                continue
            tap = rec.edge_tap(i, self.steps) if rec is not None and step.dynamic else None
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
                if rec is not None:
                    kwargs = rec.with_tally(i, step.kind, kwargs)
                if step.producer or step.shadow_out:
                    value, shadows[i] = self._run_shadowed(i, step, args, kwargs, env, shadows,
                                                           rec)
                    if step.role in (Role.MOVE, Role.SCALE, Role.POOL) and \
                            not _carries(shadows[i]):
                        # nothing below takes relevance from this shadow (a LayerNorm feeds
                        # it): without one the consumer falls back to gradient form
                        shadows[i] = None
                else:
                    call = step.fast if (rec is None and step.fast is not None) else step.call
                    value = call(*args, **kwargs)
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
            if rec is not None and step.dynamic:
                value, shadows[i] = rec.tap_output(i, value, shadows[i])
            env[i] = value
            if rec is None:
                for j in step.frees:
                    env[j] = shadows[j] = None
        return RunResult(output, list(inputs), sinks, rec, self.placeholders, sources)

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

    def _run_shadowed(self, i: int, step: Step, args: Any, kwargs: Any, env: list[Any],
                      shadows: list[Any], rec: Recording | None) -> tuple[Any, Any]:
        """Run one step on both channels: (value, shadow or None). See relprop.shadow."""
        node = step.node

        def shadow_of(src: int) -> Any:
            sh = shadows[src]
            if sh is None:
                return None
            if rec is not None:
                sh = rec.tap_shadow_edge(i, src, sh)
            return sh

        def first_shadow() -> Any:
            x = step.args[0] if step.args else None
            return shadow_of(x.index) if isinstance(x, _Ref) else None

        def is_data(ref: Any) -> bool:
            return isinstance(ref, _Ref) and self.steps[ref.index].dynamic and \
                self.steps[ref.index].kind is not Kind.META

        def on_shadows(template: Any, fill: Callable[[Any], Any] | None = None) -> Any:
            """The arguments with every data input replaced by its shadow (or zeros), or
            by `fill(value)`."""
            def sub(ref: _Ref) -> Any:
                v = env[ref.index]
                if not is_data(ref):
                    return v
                if fill is not None:
                    return fill(v)
                sh = shadow_of(ref.index)
                return sh if sh is not None else _zeros_like(v)
            return _map_refs(template, sub)

        def summands(template: Any, resolved: Any) -> Any:
            """x + c: the constant summand c carries no shadow and is no contributor."""
            if not is_binary_sum(node):
                return resolved
            return tuple(v if is_data(t) or not isinstance(v, Tensor | int | float) or
                         isinstance(v, bool) else 0 * v
                         for t, v in zip(template[:2], resolved[:2], strict=True)
                         ) + tuple(resolved[2:])

        r = step.role
        port = step.shadow_out
        if r is Role.LAYER:
            call = step.fast if (rec is None and step.fast is not None) else step.call
            out = call(*args, shadow=first_shadow(), port=port, **kwargs)
            return out if port else (out, None)
        if r is Role.RECURRENT:
            sh = first_shadow()
            kw = {**kwargs, "target": sh, "route": "sink"} if sh is not None else kwargs
            return step.call(*args, **kw), None
        s = spec(node)
        if r is Role.IDENTITY:
            rest = args[1:]

            def fn(t: Tensor) -> Tensor:
                return s.fn(t, *rest, **kwargs)

            out = ShadowIdentity.apply(args[0], first_shadow(), fn, port)
            return out if port else (out, None)
        if r is Role.MOVE:
            value = step.call(*args, **kwargs)
            sh_args, sh_kwargs = on_shadows(step.args), on_shadows(step.kwargs)
            if node.target is F.pad:  # padded positions hold no relevance, whatever the fill
                sh_args, sh_kwargs = sh_args[:3], {k: v for k, v in sh_kwargs.items()
                                                   if k != "value"}
            return value, step.call(*sh_args, **sh_kwargs)
        if r is Role.SCALE:
            value = step.call(*args, **kwargs)
            src = step.args[s.signal] if s.signal is not None else next(
                a for a in _refs(step.args) if is_data(a))
            sh = shadow_of(src.index)
            if sh is None:
                sh = _zeros_like(value)
            return value, sh.expand_as(value) if sh.shape != value.shape else sh
        if r is Role.POOL:
            with_indices, ndim, flag = MAX_POOLS[node.target]
            kw = {k: v for k, v in kwargs.items() if k != "return_indices"}
            value, idx = with_indices(args[0], *args[1:flag], **kw)
            sh = first_shadow()
            if sh is None:
                sh = _zeros_like(args[0])
            flat = sh.flatten(-ndim)
            picked = flat.gather(-1, idx.flatten(-ndim).expand(*flat.shape[:-1], -1))
            return value, picked.view_as(value)
        if r is Role.SUM:
            value = s.fn(*args, **kwargs)
            parts = s.fn(*summands(step.args, on_shadows(step.args)), **on_shadows(step.kwargs))
            with torch.no_grad():
                ones = summands(step.args, on_shadows(step.args, _ones_like))
                count = s.fn(*ones, **on_shadows(step.kwargs, _ones_like))
            count = torch.as_tensor(count, dtype=value.dtype).expand_as(value)
            eps = self.composite.stabilizer
            out = ShadowSum.apply(value, parts, count, eps, port)
            return out if port else (out, None)
        return step.call(*args, **kwargs), None


def _as_dtype(value: Any, dtype: torch.dtype) -> Any:
    """Half-precision dtypes named in a step's arguments, replaced by the compute dtype."""
    return fx.node.map_aggregate(value, lambda v: dtype if v in (
        torch.float16, torch.bfloat16) else v)


def _map_refs(value: Any, fn: Callable[[_Ref], Any]) -> Any:
    """`value` with every _Ref replaced by fn(ref)."""
    if isinstance(value, _Ref):
        return fn(value)
    if isinstance(value, tuple | list):
        return type(value)(_map_refs(v, fn) for v in value)
    if isinstance(value, dict):
        return {k: _map_refs(v, fn) for k, v in value.items()}
    if isinstance(value, slice):
        return slice(_map_refs(value.start, fn), _map_refs(value.stop, fn),
                     _map_refs(value.step, fn))
    return value


def _refs(value: Any) -> list[_Ref]:
    found: list[_Ref] = []
    _map_refs(value, lambda r: found.append(r) or r)
    return found


def _carries(shadow: Any) -> bool:
    """Whether relevance put on this shadow reaches anything (it has a backward path)."""
    if isinstance(shadow, Tensor):
        return shadow.requires_grad
    if isinstance(shadow, tuple | list):
        return any(_carries(e) for e in shadow)
    return False


def _filled_like(v: Any, fill: Callable[[Tensor], Tensor]) -> Any:
    """`fill` applied to every tensor in v (a tensor or a tuple / list of them)."""
    if isinstance(v, Tensor):
        return fill(v)
    if isinstance(v, tuple | list):
        return type(v)(_filled_like(e, fill) for e in v)
    return v


def _zeros_like(v: Any) -> Any:
    return _filled_like(v, torch.zeros_like)


def _ones_like(v: Any) -> Any:
    return _filled_like(v, torch.ones_like)

