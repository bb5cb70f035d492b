"""Building a program: from a traced model and a composite to the list of steps the
interpreter (run.py) executes. Runs the graph passes, gives each layer its rule
(`LayerCall`), plans the shadow channel, the fused fast paths and when each value
may be freed. Everything here happens once per model and composite.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, fx

from ..composites import Composite, LayerInfo
from ..functions import IdentityRule, LayerNormRule, LayerRuleFunction, StabilisedRatio
from ..fused import RELU, Activation, FusedLayer, LeanMaxPool, ProportionalRelu, fused_direct
from ..layers import LayerWeights, fold_batchnorm_weights
from ..ops import Kind, OpSpec, is_op, max_pool_with_indices, node_args, spec
from ..passes import canonize, mark_nonneg, positive_only
from ..recurrent import RecurrentRule, run_aten_cell, run_recurrent
from ..refs import Ref
from ..rules import BoundLayer, Rule, Tally
from ..rules.attention import cosine_similarity
from ..shadow import Role, plan_shadows, zero_preserving
from ..trace import TracedModel


def _template(value: Any, index: dict[fx.Node, int]) -> Any:
    return fx.node.map_arg(value, lambda n: Ref(index[n]))  # type: ignore[arg-type]


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
                w, b = fold_batchnorm_weights(self.op.kernel, w, b, mean, var, gamma, beta,
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
    # names a half-precision dtype (a traced cast): computed in float32, it casts to that
    half_literal: bool = False

    @property
    def name(self) -> str:
        return self.node.name


def plan(traced: TracedModel, composite: Composite) -> list[Step]:
    """The steps of `traced` under `composite`, in forward order (canonizes its graph)."""
    graph = traced.graph
    dynamic = canonize(graph, traced.root, functional=traced.method == "fx",
                       leaves=traced.leaves, constants=frozenset(traced.constants),
                       index_inputs=traced.index_inputs, model=traced.model)
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
        elif node.op == "call_module":  # torch.export's guard on constant inputs
            step.call = traced.root.get_submodule(str(node.target))
        step.half_literal = _names_half((node.args, node.kwargs))
        if _is_metadata_assert(node):  # torch.export's dtype/device checks of the trace
            step.call = _no_check
        if node.meta.get("relprop_constant") and step.call is not None:
            step.call = _as_constant(step.call)  # a held normaliser and what only it uses
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
    return steps


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
    if s.kind is Kind.ATTENTION:
        return composite.attention.attention
    if s.kind is Kind.SIMILARITY:
        return cosine_similarity
    if s.kind is Kind.BILINEAR:
        return functools.partial(composite.attention.product, fn, weights=s.weights)
    if s.kind is Kind.ELEMENTWISE:

        def identity_rule(x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
            return IdentityRule.apply(x, lambda t: fn(t, *args, **kwargs))

        return identity_rule
    return fn


HALF = (torch.float16, torch.bfloat16)


def _names_half(value: Any) -> bool:
    found = []
    fx.node.map_aggregate(value, lambda v: found.append(v in HALF) if isinstance(
        v, torch.dtype) else None)
    return any(found)


def _is_metadata_assert(node: fx.Node) -> bool:
    return is_op(node, "assert_metadata")


def _no_check(*args: Any, **kwargs: Any) -> None:
    """The trace's dtype assertions: a half model is explained in float32."""
    return None


def _as_constant(fn: Callable[..., Any]) -> Callable[..., Any]:
    """fn computed without autograd: a value that carries no relevance."""

    def constant(*args: Any, **kwargs: Any) -> Any:
        with torch.no_grad():
            return fn(*args, **kwargs)

    return constant


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
        op = spec(step.node).op if spec(step.node) is not None else None
        if op is not None and op.pool_dims and not op.returns_indices:
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
            any(isinstance(a, fx.Node) for a in node_args(act) if a is not node):
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
    op = spec(node).op
    with_indices, flag = max_pool_with_indices(op)
    ndim = op.pool_dims
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
        for a in node_args(node):
            last[index[a]] = i
    for src, i in last.items():
        if steps[src].op != "placeholder":
            steps[i].frees.append(src)


def _revives_zeros(node: fx.Node) -> bool:
    """An identity-rule activation with f(0) != 0 whose output carries relevance (not only
    a gate): relevance reaching an input that is exactly 0 needs the shadow channel."""
    s = spec(node)
    if s is None or s.fn is None or any(isinstance(a, fx.Node) for a in node_args(node)
                                        if a is not node.args[0]):
        return False
    if zero_preserving(lambda t: s.fn(t, *node.args[1:], **node.kwargs)):
        return False
    return not all(spec(u) is not None and spec(u).signal is not None and
                   u.args[spec(u).signal] is not node for u in node.users)
