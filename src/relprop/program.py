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
from .functions import IdentityRule, LayerNormRule, LayerRuleFunction, StabilisedRatio, Tap
from .fused import RELU, Activation, FusedLayer, LeanMaxPool, ProportionalRelu, fusable
from .layers import LayerWeights, fold_batchnorm
from .optable import Kind, OpSpec, node_location
from .recurrent import RecurrentRule, run_aten_cell, run_recurrent
from .rules import BoundLayer, Epsilon, Flat, Rule, Tally, WSquare, ZBox
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


def needs_sink(rule: Rule) -> bool:
    """Rules that hand out relevance not proportional to the input value."""
    return isinstance(rule, ZBox | Flat | WSquare) or rule.bias == "distribute"


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
                 gamma=None, beta=None, *, target: Tensor | None = None,
                 route: str | None = None, tally: Tally | None = None,
                 relu_after: bool = False) -> Tensor:
        weights = self.weights((w, b, mean, var, gamma, beta))
        bound = BoundLayer(self.op.kernel, weights, **self.flags, recording=tally is not None,
                           relu_after=relu_after)
        return LayerRuleFunction.apply(x, target, route, bound, self.rule, tally)

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
    # direct relevance goes to a sink beside the model input, through these move steps
    # (reshape, flatten, ...: [placeholder, move, move, ...]), so zero inputs get theirs
    sink_chain: list[int] | None = None
    bypass: int | None = None  # ...or enters at this step's output (a ReLU's input)
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


@dataclass
class RunResult:
    output: Any
    inputs: list[Tensor]
    sinks: dict[int, Tensor]  # step index of the consuming layer -> sink leaf
    sink_sources: dict[int, int]  # step index of the consuming layer -> placeholder step
    recording: Recording | None
    placeholder_steps: list[int] = field(default_factory=list)


class Program:
    """Steps in forward order, built from a traced model and a composite."""

    def __init__(self, steps: list[Step], traced: TracedModel, composite: Composite) -> None:
        self.steps = steps
        self.traced = traced
        self.composite = composite
        self.placeholders = [i for i, s in enumerate(steps) if s.op == "placeholder"]

    @classmethod
    def build(cls, traced: TracedModel, composite: Composite) -> Program:
        graph = traced.graph
        dynamic = canonize(graph, traced.root, functional=traced.method == "fx",
                           leaves=traced.leaves)
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
                x = node.args[0]
                step.sink_chain = _move_chain(x, index)
            elif s is not None and s.kind is Kind.LAYER:
                info = LayerInfo(node.name, s.path, s.layer_type, s.kernel.kind,
                                 rank.get(node, -1), len(ranked))
                rule = composite.rule_for(info)
                x = node.args[0]
                flags = {"nonneg_input": x in nonneg, "positive_only": positive_only(node),
                         "top_k": composite.top_k}
                step.rule = rule
                step.call = LayerCall(s, rule, flags)
                if needs_sink(rule) and isinstance(x, fx.Node):
                    step.sink_chain = _move_chain(x, index)
                    if step.sink_chain is None and _identity_activation(x) and \
                            isinstance(x.args[0], fx.Node):
                        step.bypass = index[x.args[0]]
            elif s is not None:
                step.call = _step_call(s, composite)
            elif node.op in ("call_function",):
                step.call = node.target  # type: ignore[assignment]
            elif node.op == "call_method":
                name = str(node.target)
                step.call = lambda obj, *a, _n=name, **k: getattr(obj, _n)(*a, **k)
            steps.append(step)
        _plan_fast_paths(steps, nodes, index, nonneg, composite)
        _plan_frees(steps, nodes, index)
        return cls(steps, traced, composite)

    def layer_steps(self) -> list[Step]:
        return [s for s in self.steps if s.kind is Kind.LAYER]

    def run(self, inputs: list[Tensor], record: bool = False) -> RunResult:
        """Forward pass; with record=True every value and gradient is kept for the ledger."""
        env: list[Any] = [None] * len(self.steps)
        rec = Recording(values=env) if record else None
        sinks: dict[int, Tensor] = {}
        sink_sources: dict[int, int] = {}
        feed = iter(inputs)
        output = None
        for i, step in enumerate(self.steps):
            if step.op == "placeholder":
                try:
                    env[i] = next(feed)
                except StopIteration:
                    raise InputError(f"the model takes more inputs than the {len(inputs)} "
                                     "given") from None
                if rec is not None:
                    env[i] = Tap.apply(env[i], rec.out_grads, i)
                continue
            if step.op == "get_attr":
                env[i] = attribute(self.traced.root, str(step.node.target)).detach()
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
                if step.kind in (Kind.LAYER, Kind.RECURRENT):
                    if step.sink_chain is not None:
                        src = step.sink_chain[0]
                        sink = torch.zeros_like(env[src], requires_grad=True)
                        sinks[i], sink_sources[i] = sink, src
                        target = sink
                        for j in step.sink_chain[1:]:  # the same moves, applied to the sink
                            move = self.steps[j]
                            rest = _resolve(move.args[1:], env, None)
                            target = move.call(target, *rest, **_resolve(move.kwargs, env, None))
                        kwargs = {**kwargs, "target": target, "route": "sink"}
                    elif step.bypass is not None:
                        pre = env[step.bypass]
                        pre = tap(step.bypass, pre) if tap is not None else pre
                        kwargs = {**kwargs, "target": pre, "route": "bypass"}

                if rec is not None and step.kind in (Kind.LAYER, Kind.NORM, Kind.RECURRENT):
                    rec.tallies[i] = Tally()
                    kwargs = {**kwargs, "tally": rec.tallies[i]}
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
            env[i] = value
            if rec is None:
                for j in step.frees:
                    env[j] = None
        return RunResult(output, list(inputs), sinks, sink_sources, rec, self.placeholders)


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
    filter, or when a later rule must route relevance to an activation's input.
    """
    if composite.top_k is not None:
        return
    bypassed = {s.bypass for s in steps if s.bypass is not None}
    for i, step in enumerate(steps):
        if i in bypassed or step.fast is not None:
            continue
        if step.op == "call_function" and step.node.target in _MAX_POOLS:
            step.fast = _lean_max_pool(step.node)
            continue
        if step.kind is Kind.PROPORTIONAL and composite.stabilizer > 0:
            relu = _sole_activation(nodes[i])
            if relu is not None and relu[1] == RELU:
                step.fast = functools.partial(_sum_then_relu, spec(nodes[i]).fn,
                                              composite.stabilizer)
                steps[index[relu[0]]].fast = _passthrough
            continue
        if step.kind is not Kind.LAYER:
            continue
        if step.sink_chain is not None:  # z-box at the input: its ReLU can still join it
            follower = _sole_activation(nodes[i])
            if isinstance(step.rule, ZBox) and follower is not None and follower[1] == RELU \
                    and index[follower[0]] not in bypassed:
                step.fast = functools.partial(step.call, relu_after=True)
                steps[index[follower[0]]].fast = _passthrough
            continue
        rule = step.rule
        node = nodes[i]
        if isinstance(rule, Epsilon) and rule.epsilon == 0 and rule.bias == "absorb":
            step.fast = step.call.plain  # LRP-0: the plain gradient, exactly
            continue
        if not fusable(rule, node.args[0] in nonneg) or spec(node).kernel.kind == "affine":
            continue
        follower = _sole_activation(node)
        if follower is None or index[follower[0]] in bypassed:
            step.fast = functools.partial(step.call.fused, None)
        else:
            step.fast = functools.partial(step.call.fused, follower[1])
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


# max pooling -> (its with-indices form, spatial dims, position of return_indices)
_MAX_POOLS: dict[Any, tuple[Callable[..., Any], int, int]] = {
    F.max_pool1d: (F.max_pool1d_with_indices, 1, 6),
    F.max_pool2d: (F.max_pool2d_with_indices, 2, 6),
    F.max_pool3d: (F.max_pool3d_with_indices, 3, 6),
    F.adaptive_max_pool1d: (F.adaptive_max_pool1d_with_indices, 1, 2),
    F.adaptive_max_pool2d: (F.adaptive_max_pool2d_with_indices, 2, 2),
    F.adaptive_max_pool3d: (F.adaptive_max_pool3d_with_indices, 3, 2),
}


def _lean_max_pool(node: fx.Node) -> Callable[..., Any] | None:
    """Max pooling that saves int32 argmax positions only (relprop.fused.LeanMaxPool)."""
    with_indices, ndim, flag = _MAX_POOLS[node.target]
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


def _move_chain(x: Any, index: dict[fx.Node, int]) -> list[int] | None:
    """[placeholder, move, ...] if x is a model input seen through pure moves, else None.

    Moves (reshape, view, flatten, permute, transpose, squeeze, ...) carry values
    one to one, so their gradient carries relevance back to the input exactly.
    """
    chain: list[int] = []
    while isinstance(x, fx.Node):
        if x.op == "placeholder":
            return [index[x], *reversed(chain)]
        s = spec(x)
        if s is None or not s.pure_move or not x.args or not isinstance(x.args[0], fx.Node):
            return None
        others = [a for a in _args_of(x) if a is not x.args[0]]
        if any(spec(a) is not None and spec(a).kind is not Kind.META for a in others):
            return None  # a second data input: not a pure rearrangement of one tensor
        chain.append(index[x])
        x = x.args[0]
    return None


def _identity_activation(node: fx.Node) -> bool:
    """ReLU or another element-wise activation whose rule passes relevance unchanged."""
    s = spec(node)
    return s is not None and (s.zero_below or s.kind is Kind.ELEMENTWISE)


def _plan_frees(steps: list[Step], nodes: list[fx.Node], index: dict[fx.Node, int]) -> None:
    """Drop each value from the environment after its last use (autograd keeps what it needs)."""
    last: dict[int, int] = {}
    for i, node in enumerate(nodes):
        for a in _args_of(node):
            last[index[a]] = i
        if steps[i].bypass is not None:
            last[steps[i].bypass] = max(last.get(steps[i].bypass, i), i)
        for j in steps[i].sink_chain or []:  # the moves are replayed on the sink here
            for a in _args_of(nodes[j]):
                last[index[a]] = max(last.get(index[a], i), i)
    for src, i in last.items():
        if steps[src].op != "placeholder":
            steps[i].frees.append(src)


def _args_of(node: fx.Node) -> list[fx.Node]:
    found: list[fx.Node] = []
    fx.node.map_arg((node.args, node.kwargs), lambda n: found.append(n) or n)
    return found

