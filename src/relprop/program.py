"""The rewritten model: a list of steps that compute the same forward values as
the user's model but carry LRP rules in their backward.

Built once per model and composite (`Program.build`), run for every batch.
Parameters are read from the model at every run (detached), so the program
always explains the model as it is now and never writes to it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx

from .canonize import canonize, mark_nonneg, positive_only, spec
from .composites import Composite, LayerInfo
from .errors import InputError, RelpropError
from .functions import (
    IdentityRule,
    LayerNormRule,
    LayerRuleFunction,
    ShadowIdentity,
    ShadowSum,
    StabilisedRatio,
    Tap,
)
from .fused import RELU, Activation, FusedLayer, LeanMaxPool, ProportionalRelu, fused_direct
from .layers import LayerWeights, fold_batchnorm
from .optable import Kind, OpSpec, node_location
from .recurrent import RecurrentRule, run_aten_cell, run_recurrent
from .rules import BoundLayer, Rule, Tally
from .shadow import MAX_POOLS, Role, is_binary_sum, plan_shadows, zero_preserving
from .trace import TracedModel, attribute


@dataclass(frozen=True)
class _Ref:
    index: int


def _template(value: Any, index: dict[fx.Node, int]) -> Any:
    return fx.node.map_arg(value, lambda n: _Ref(index[n]))  # type: ignore[arg-type]


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


class LayerCall:
    """Runs one linear-like layer with its rule; caches weights per parameter version."""

    def __init__(self, op: OpSpec, rule: Rule, bound_flags: dict[str, Any]) -> None:
        self.op = op
        self.rule = rule
        self.flags = bound_flags
        self._key: list[tuple] | None = None
        self._weights: LayerWeights | None = None

    def weights(self, tensors: tuple[Tensor | None, ...]) -> LayerWeights:
        # Parameters arrive detached (new tensor objects each run): compare storage and
        # version. Holding the old tensors keeps their storage, so addresses cannot recur.
        key = [(t, t.data_ptr(), t._version, t.shape) for t in tensors if t is not None]
        old = self._key
        if old is not None and len(old) == len(key) and all(
                a[1:] == c[1:] for a, c in zip(old, key, strict=True)):
            return self._weights  # type: ignore[return-value]
        w, b, mean, var, gamma, beta = tensors
        with torch.no_grad():
            if mean is not None:
                if w is None:  # a BatchNorm on its own: scale and shift per channel
                    w = torch.ones_like(mean)
                w, b = fold_batchnorm(self.op.kernel, w, b, mean, var, gamma, beta,
                                      self.op.bn_eps)
        self._key, self._weights = key, LayerWeights(w, b)
        return self._weights

    def __call__(self, x: Tensor, w: Tensor | None, b: Tensor | None, mean=None, var=None,
                 gamma=None, beta=None, *, shadow: Tensor | None = None, port: bool = False,
                 tally: Tally | None = None, relu_after: bool = False) -> Any:
        weights = self.weights((w, b, mean, var, gamma, beta))
        bound = BoundLayer(self.op.kernel, weights, **self.flags,
                           recording=tally is not None or port, relu_after=relu_after)
        return LayerRuleFunction.apply(x, shadow, bound, self.rule, tally, port)

    def plain(self, x: Tensor, w: Tensor | None, b: Tensor | None, mean=None, var=None,
              gamma=None, beta=None) -> Tensor:
        """LRP-0 with the bias absorbed is the layer's own gradient: no custom Function."""
        weights = self.weights((w, b, mean, var, gamma, beta))
        return self.op.kernel.forward(x, weights.w, weights.b)

    def fused(self, act: Activation, x: Tensor, w: Tensor | None, b: Tensor | None, mean=None,
              var=None, gamma=None, beta=None) -> Tensor:
        """act(layer(x)) in one Function (relprop.fused): the fast path."""
        weights = self.weights((w, b, mean, var, gamma, beta))
        bound = BoundLayer(self.op.kernel, weights, **self.flags)
        return FusedLayer.apply(x, bound, self.rule, act)


@dataclass
class Step:
    """One node of the rewritten graph."""

    node: fx.Node
    op: str  # fx op: placeholder, get_attr, call_function, call_method, output
    kind: Kind | None  # rule family for input-dependent nodes, None otherwise
    call: Callable[..., Any] | None
    args: Any
    kwargs: Any
    dynamic: bool
    rule: Rule | RecurrentRule | None = None
    role: Role | None = None  # how the step carries the shadow channel (relprop.shadow)
    producer: bool = False  # hands relevance to its input's shadow
    shadow_out: bool = False  # a consumer wants this step's shadow
    fast: Callable[..., Any] | None = None  # replaces `call` when not recording (relprop.fused)
    frees: list[int] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.node.name


@dataclass
class Recording:
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


@dataclass
class RunResult:
    output: Any
    inputs: list[Tensor]
    sinks: dict[int, Tensor]  # placeholder step -> its shadow leaf (direct relevance)
    recording: Recording | None
    placeholder_steps: list[int] = field(default_factory=list)


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

    @classmethod
    def build(cls, traced: TracedModel, composite: Composite) -> Program:
        graph = traced.graph
        dynamic = canonize(graph, traced.root, functional=traced.method == "fx",
                           leaves=traced.leaves, constants=frozenset(traced.constants))
        nonneg = mark_nonneg(graph, dynamic)
        nodes = list(graph.nodes)
        index = {n: i for i, n in enumerate(nodes)}
        layers = [n for n in nodes if spec(n) is not None and spec(n).kind is Kind.LAYER]
        ranked = [n for n in layers if spec(n).kernel.kind != "affine"]
        rank = {n: i for i, n in enumerate(ranked)}
        steps: list[Step] = []
        for node in nodes:
            s = spec(node)
            args, kwargs = _template(node.args, index), _template(node.kwargs, index)
            step = Step(node, node.op, s.kind if s else None, None, args, kwargs,
                        node in dynamic)
            if s is not None and s.kind is Kind.RECURRENT:
                info = LayerInfo(node.name, s.path, s.layer_type, "recurrent", -1, len(ranked))
                step.rule = composite.rule_for_recurrent(info)
                if isinstance(s.module, str):  # aten.lstm_cell / aten.gru_cell (export)
                    step.call = functools.partial(run_aten_cell, s.module, step.rule)
                else:
                    step.call = functools.partial(run_recurrent, s.module, step.rule)
                step.producer = True
            elif s is not None and s.kind is Kind.LAYER:
                info = LayerInfo(node.name, s.path, s.layer_type, s.kernel.kind,
                                 rank.get(node, -1), len(ranked))
                rule = composite.rule_for(info)
                x = node.args[0]
                flags = {"nonneg_input": x in nonneg, "positive_only": positive_only(node),
                         "top_k": composite.top_k}
                step.rule = rule
                step.call = LayerCall(s, rule, flags)
                step.producer = rule.hands_out_directly
            elif s is not None:
                step.call = _step_call(s, composite)
                step.producer = s.kind is Kind.ELEMENTWISE and _revives_zeros(node)
            elif node.op in ("call_function",):
                step.call = node.target  # type: ignore[assignment]
            elif node.op == "call_method":
                name = str(node.target)
                step.call = lambda obj, *a, _n=name, **k: getattr(obj, _n)(*a, **k)
            steps.append(step)
        roles, wanted = plan_shadows(nodes, dynamic, {n for n, st in zip(nodes, steps,
                                                                        strict=True)
                                                      if st.producer})
        for node, step in zip(nodes, steps, strict=True):
            step.role = roles.get(node)
            step.shadow_out = node in wanted
        for node, step in zip(nodes, steps, strict=True):
            if step.kind is Kind.LAYER and any(steps[index[u]].producer or
                                               steps[index[u]].shadow_out for u in node.users):
                # a ReLU on the shadow channel hands relevance also to z <= 0 (R_z = R_a)
                step.call.flags["positive_only"] = False
        _plan_fast_paths(steps, nodes, index, nonneg, composite)
        _plan_frees(steps, nodes, index)
        return cls(steps, traced, composite)

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
        feed = iter(inputs)
        output = None
        for i, step in enumerate(self.steps):
            if step.op == "placeholder" and step.name in self.traced.constants:
                value = (keywords or {}).get(self.traced.constants[step.name])
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
                    env[i] = Tap.apply(env[i], rec.out_grads, i)
                    if shadows[i] is not None:
                        shadows[i] = Tap.apply(shadows[i], rec.shadow_out, i)
                continue
            if step.op == "get_attr":
                env[i] = self._attribute(str(step.node.target), dtype)
                continue
            tap = None
            if rec is not None and step.dynamic:
                rec.edges[i] = []

                def tap(src: int, v: Any, _i: int = i) -> Any:
                    if not self.steps[src].dynamic:
                        return v
                    if isinstance(v, Tensor) and v.requires_grad:
                        key = (_i, len(rec.edges[_i]))
                        rec.edges[_i].append((key, src, None))
                        return Tap.apply(v, rec.edge_grads, key)
                    if isinstance(v, tuple | list):  # chunk / split outputs
                        out = []
                        for j, e in enumerate(v):
                            if isinstance(e, Tensor) and e.requires_grad:
                                key = (_i, len(rec.edges[_i]))
                                rec.edges[_i].append((key, src, j))
                                e = Tap.apply(e, rec.edge_grads, key)
                            out.append(e)
                        return type(v)(out)
                    return v

            args = _resolve(step.args, env, tap)
            if step.op == "output":
                output = args[0] if isinstance(args, tuple) and len(args) == 1 else args
                if self.traced.method == "export" and isinstance(output, tuple | list) and \
                        len(output) == 1:
                    output = output[0]  # export flattens outputs into a tuple
                break
            kwargs = _resolve(step.kwargs, env, tap)
            try:
                if rec is not None and step.kind in (Kind.LAYER, Kind.NORM, Kind.RECURRENT):
                    rec.tallies[i] = Tally()
                    kwargs = {**kwargs, "tally": rec.tallies[i]}
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
            if rec is not None and step.dynamic:
                if isinstance(value, Tensor) and value.requires_grad:
                    value = Tap.apply(value, rec.out_grads, i)
                elif isinstance(value, tuple | list) and any(
                        isinstance(e, Tensor) and e.requires_grad for e in value):
                    value = type(value)(
                        Tap.apply(e, rec.out_grads, (i, j))
                        if isinstance(e, Tensor) and e.requires_grad else e
                        for j, e in enumerate(value))
                if isinstance(shadows[i], Tensor):
                    shadows[i] = Tap.apply(shadows[i], rec.shadow_out, i)
            env[i] = value
            if rec is None:
                for j in step.frees:
                    env[j] = shadows[j] = None
        return RunResult(output, list(inputs), sinks, rec, self.placeholders)

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
            if rec is not None and isinstance(sh, Tensor):
                key = (i, src, len(rec.shadow_edges.setdefault(i, [])))
                rec.shadow_edges[i].append(key)
                sh = Tap.apply(sh, rec.shadow_edge_grads, key)
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


def _step_call(s: OpSpec, composite: Composite) -> Callable[..., Any]:
    fn = s.fn
    assert fn is not None
    if s.kind is Kind.PROPORTIONAL and composite.stabilizer > 0:
        eps = composite.stabilizer

        def proportional(*args: Any, **kwargs: Any) -> Any:
            return StabilisedRatio.apply(fn(*args, **kwargs), eps)

        return proportional
    if s.kind is Kind.NORM:
        eps_rule = composite.stabilizer

        def layer_norm(x: Tensor, shape: Any, weight: Tensor | None = None,
                       bias: Tensor | None = None, eps: float = 1e-5, *rest: Any,
                       tally: Tally | None = None) -> Tensor:
            return LayerNormRule.apply(x, shape, weight, bias, eps, eps_rule, tally)

        return layer_norm
    if s.kind is Kind.ELEMENTWISE:

        def identity_rule(x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
            return IdentityRule.apply(x, lambda t: fn(t, *args, **kwargs))

        return identity_rule
    return fn


def _plan_fast_paths(steps: list[Step], nodes: list[fx.Node], index: dict[fx.Node, int],
                     nonneg: set[fx.Node], composite: Composite) -> None:
    """Give layers (with the activation after them) and sum -> ReLU pairs a fused Function.

    Not when recording (the ledger wants every node apart), with a relevance
    filter, or on steps that carry the shadow channel (relprop.shadow).
    """
    if composite.top_k is not None:
        return
    shadowed = {i for i, s in enumerate(steps) if s.producer or s.shadow_out}
    for i, step in enumerate(steps):
        if step.fast is not None or (i in shadowed and step.rule is None):
            continue
        if step.op == "call_function" and step.node.target in MAX_POOLS:
            step.fast = _lean_max_pool(step.node)
            continue
        if step.kind is Kind.PROPORTIONAL and composite.stabilizer > 0:
            relu = _sole_activation(nodes[i])
            if relu is not None and relu[1] == RELU and index[relu[0]] not in shadowed:
                step.fast = functools.partial(_sum_then_relu, spec(nodes[i]).fn,
                                              composite.stabilizer)
                steps[index[relu[0]]].fast = _passthrough
            continue
        if step.kind is not Kind.LAYER:
            continue
        if step.shadow_out:
            continue
        rule = step.rule
        node = nodes[i]
        follower = _sole_activation(node)
        if follower is not None and index[follower[0]] in shadowed:
            follower = None
        if step.producer and rule.takes_relu_inside:  # z-box at the input: its ReLU joins it
            if follower is not None and follower[1] == RELU:
                step.fast = functools.partial(step.call, relu_after=True)
                steps[index[follower[0]]].fast = _passthrough
            continue
        if rule.is_plain_gradient:
            step.fast = step.call.plain  # LRP-0: the plain gradient, exactly
            continue
        if not rule.fusable(node.args[0] in nonneg) or spec(node).kernel.kind == "affine":
            continue
        fused = functools.partial(step.call.fused, None if follower is None else follower[1])
        # flat, w-square: relevance to the input's shadow (relprop.fused.fused_direct)
        step.fast = functools.partial(fused_direct, step.call, fused) if step.producer else fused
        if follower is not None:
            steps[index[follower[0]]].fast = _passthrough


def _sole_activation(node: fx.Node) -> tuple[fx.Node, Activation] | None:
    """The node's only user, if it is a ReLU or a sign-preserving identity-rule activation."""
    users = list(node.users)
    if len(users) != 1:
        return None
    act = users[0]
    s = spec(act)
    if s is None or not act.args or act.args[0] is not node or \
            any(isinstance(a, fx.Node) for a in _args_of(act) if a is not node):
        return None
    if s.kind is Kind.GRADIENT and s.zero_below and len(act.args) == 1:
        return act, RELU
    if s.kind is not Kind.ELEMENTWISE or s.fn is None:
        return None
    fn, rest, kwargs = s.fn, act.args[1:], dict(act.kwargs)

    def apply(z: Tensor) -> Tensor:
        return fn(z, *rest, **kwargs)

    if not _zero_and_sign_preserving(apply):
        return None
    return act, apply


def _zero_and_sign_preserving(act: Callable[[Tensor], Tensor]) -> bool:
    """f(0) = 0 (relevance at z = 0 is lost in gradient form; fusing must not revive it)
    and sign(f(z)) = sign(z) or f(z) = 0 (the fused rules read the side of z from the
    sign of their factor), checked on a grid from -1e6 to 1e6."""
    magnitudes = 10 ** torch.linspace(-6, 6, 601, dtype=torch.float64)
    probe = torch.cat([-magnitudes, magnitudes, torch.zeros(1, dtype=torch.float64)])
    try:
        out = act(probe)
    except Exception:
        return False
    return bool(out[-1] == 0) and bool((out * probe >= 0).all())


def _lean_max_pool(node: fx.Node) -> Callable[..., Any] | None:
    """Max pooling that saves int32 argmax positions only (relprop.fused.LeanMaxPool)."""
    with_indices, ndim, flag = MAX_POOLS[node.target]
    wants_indices = node.args[flag] if len(node.args) > flag else node.kwargs.get(
        "return_indices", False)
    if wants_indices is not False:
        return None

    def pool(x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        kwargs.pop("return_indices", None)
        args = args[:flag - 1]
        return LeanMaxPool.apply(x, lambda t: with_indices(t, *args, **kwargs), ndim)

    return pool


def _sum_then_relu(fn: Callable[..., Tensor], eps: float, *args: Any, **kwargs: Any) -> Tensor:
    return ProportionalRelu.apply(fn(*args, **kwargs), eps)


def _passthrough(x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
    return x


def _plan_frees(steps: list[Step], nodes: list[fx.Node], index: dict[fx.Node, int]) -> None:
    """Drop each value from the environment after its last use (autograd keeps what it needs)."""
    last: dict[int, int] = {}
    for i, node in enumerate(nodes):
        for a in _args_of(node):
            last[index[a]] = i
    for src, i in last.items():
        if steps[src].op != "placeholder":
            steps[i].frees.append(src)


def _args_of(node: fx.Node) -> list[fx.Node]:
    found: list[fx.Node] = []
    fx.node.map_arg((node.args, node.kwargs), lambda n: found.append(n) or n)
    return found



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


def _revives_zeros(node: fx.Node) -> bool:
    """An identity-rule activation with f(0) != 0 whose output carries relevance (not only
    a gate): relevance reaching an input that is exactly 0 needs the shadow channel."""
    s = spec(node)
    if s is None or s.fn is None or any(isinstance(a, fx.Node) for a in _args_of(node)
                                        if a is not node.args[0]):
        return False
    if zero_preserving(lambda t: s.fn(t, *node.args[1:], **node.kwargs)):
        return False
    return not all(spec(u) is not None and spec(u).signal is not None and
                   u.args[spec(u).signal] is not node for u in node.users)
