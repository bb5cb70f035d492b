"""What each step runs: a table from rule family (Kind) to the handler that builds the
step's callable under a composite, and `LayerCall`, a linear-like layer with its rule.
Built once per model and composite; relprop.program.plan assembles the steps.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, fx

from ..composites import Composite, LayerInfo
from ..layers import LayerWeights, fold_batchnorm_weights
from ..ops import Kind, OpSpec, node_args, spec
from ..passes import positive_only
from ..recurrent import run_aten_cell, run_recurrent
from ..rules import BoundLayer, RecurrentRule, Rule, Tally
from ..rules.base import Activation, FusedLayer, LayerRuleFunction
from ..rules.identity import IdentityRule
from ..rules.norm import LayerNormRule
from ..rules.proportional import StabilizedRatio
from ..shadow import zero_preserving


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
        """act(layer(x)) in one Function (relprop.rules.base.FusedLayer): the fast path."""
        weights = self.weights((w, b, mean, var, gamma, beta))
        bound = BoundLayer(self.op.kernel, weights, **self.flags)
        return FusedLayer.apply(x, bound, self.rule, act)


@dataclass(frozen=True)
class Planning:
    """What the handlers may read: the composite and facts about the whole graph."""

    composite: Composite
    nonneg: frozenset[fx.Node]  # values known to be >= 0
    rank: dict[fx.Node, int]  # position of each dense/conv layer in forward order
    layers: int  # how many there are
    # nodes whose output relevance may also arrive on the shadow channel
    shadowed_users: frozenset[fx.Node] = frozenset()


def rule_for(node: fx.Node, s: OpSpec, p: Planning) -> Rule | RecurrentRule | None:
    """The composite's rule of a layer or recurrent node (None for other families)."""
    if s.kind is Kind.RECURRENT:
        info = LayerInfo(node.name, s.path, s.layer_type, "recurrent", -1, p.layers)
        return p.composite.rule_for(info)
    if s.kind is Kind.LAYER:
        info = LayerInfo(node.name, s.path, s.layer_type, s.kernel.kind,
                         p.rank.get(node, -1), p.layers)
        return p.composite.rule_for(info)
    return None


def hands_out_directly(node: fx.Node, s: OpSpec, rule: Any) -> bool:
    """A producer of the shadow channel: its rule hands relevance to its input
    regardless of the input's value (relprop.shadow)."""
    if s.kind is Kind.RECURRENT:
        return True
    if s.kind is Kind.LAYER:
        return rule.hands_out_directly
    return s.kind is Kind.ELEMENTWISE and _revives_zeros(node)


Handler = Callable[[fx.Node, OpSpec, Any, Planning], Callable[..., Any]]


def _layer(node: fx.Node, s: OpSpec, rule: Rule, p: Planning) -> Callable[..., Any]:
    # a ReLU on the shadow channel hands relevance also to z <= 0 (R_z = R_a)
    flags = {"nonneg_input": node.args[0] in p.nonneg,
             "positive_only": positive_only(node) and not any(
                 u in p.shadowed_users for u in node.users),
             "top_k": p.composite.top_k}
    return LayerCall(s, rule, flags)


def _recurrent(node: fx.Node, s: OpSpec, rule: RecurrentRule, p: Planning
               ) -> Callable[..., Any]:
    if isinstance(s.module, str):  # aten.lstm_cell / aten.gru_cell (export)
        return functools.partial(run_aten_cell, s.module, rule)
    return functools.partial(run_recurrent, s.module, rule)


def _proportional(node: fx.Node, s: OpSpec, rule: Any, p: Planning) -> Callable[..., Any]:
    fn, eps = s.fn, p.composite.stabilizer
    if eps <= 0:
        return fn

    def proportional(*args: Any, **kwargs: Any) -> Any:
        return StabilizedRatio.apply(fn(*args, **kwargs), eps)

    return proportional


def _norm(node: fx.Node, s: OpSpec, rule: Any, p: Planning) -> Callable[..., Any]:
    eps_rule = p.composite.stabilizer

    def layer_norm(x: Tensor, shape: Any, weight: Tensor | None = None,
                   bias: Tensor | None = None, eps: float = 1e-5, *rest: Any,
                   tally: Tally | None = None) -> Tensor:
        return LayerNormRule.apply(x, shape, weight, bias, eps, eps_rule, tally)

    return layer_norm


def _elementwise(node: fx.Node, s: OpSpec, rule: Any, p: Planning) -> Callable[..., Any]:
    fn = s.fn

    def identity_rule(x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        return IdentityRule.apply(x, lambda t: fn(t, *args, **kwargs))

    return identity_rule


HANDLERS: dict[Kind, Handler] = {
    Kind.LAYER: _layer,
    Kind.RECURRENT: _recurrent,
    Kind.PROPORTIONAL: _proportional,
    Kind.NORM: _norm,
    Kind.ELEMENTWISE: _elementwise,
    Kind.ATTENTION: lambda node, s, rule, p: p.composite.attention.attention,
    Kind.SIMILARITY: lambda node, s, rule, p: p.composite.attention.similarity,
    Kind.SOFTMAX: lambda node, s, rule, p: p.composite.attention.softmax(s.fn),
    Kind.BILINEAR: lambda node, s, rule, p: functools.partial(
        p.composite.attention.product, s.fn, weights=s.weights),
}
# every other family (GRADIENT, SOURCE, META) runs the op itself: its gradient is the rule


def op_call(node: fx.Node, s: OpSpec, rule: Any, p: Planning) -> Callable[..., Any]:
    """The callable of an input-dependent node under the composite."""
    handler = HANDLERS.get(s.kind)
    if handler is not None:
        return handler(node, s, rule, p)
    assert s.fn is not None, node
    return s.fn


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
