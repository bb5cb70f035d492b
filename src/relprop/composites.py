"""Composites: which rule each layer gets.

A composite maps layers to rules by module path pattern, by position (first /
last linear-like layer in forward order), and by layer type, in that order of
precedence. Presets carry Zennit's names and defaults so results compare.

Example of a custom composite::

    from relprop import Composite, Epsilon, Gamma, ZBox, LRP0
    composite = Composite(
        by_type={"conv": Gamma(0.25), "linear": Epsilon(1e-6)},
        first=ZBox(low=-3.0, high=3.0),
        last=LRP0(),
        by_name={"classifier.3": Epsilon(0.1)},   # fnmatch patterns on module paths
    )
    relprop.Explainer(model, composite=composite)
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

from torch import Tensor, nn

from .errors import CompositeError
from .recurrent import RecurrentRule
from .rules import LRP0, AlphaBeta, Epsilon, Flat, Gamma, Rule, WSquare, ZBox, ZPlus


@dataclass
class LayerInfo:
    """What a composite may look at to choose a rule."""

    name: str  # graph node name
    path: str  # module path ("features.0"), the enclosing module for functional ops
    layer_type: type | None  # nn.Conv2d, nn.Linear, nn.BatchNorm2d, ...
    kind: str  # "linear", "conv" or "affine"
    position: int  # index among linear/conv layers in forward order (-1 for affine)
    count: int  # number of linear/conv layers


@dataclass
class Composite:
    """Rule assignment by name pattern > position > type > default.

    `by_type` keys are module classes (matched with issubclass) or the kinds
    "linear", "conv", "affine". `stabilizer` is the epsilon of the proportional
    rule at sums, means and average pooling (0 = plain gradient).
    """

    by_type: dict[type | str, Rule] = field(default_factory=dict)
    first: Rule | None = None
    last: Rule | None = None
    by_name: dict[str, Rule] = field(default_factory=dict)
    default: Rule = field(default_factory=Epsilon)
    stabilizer: float = 1e-6
    top_k: float | None = None
    name: str = "custom"
    recurrent: RecurrentRule = field(default_factory=RecurrentRule)

    def rule_for_recurrent(self, layer: LayerInfo) -> RecurrentRule:
        """LSTM/GRU: a RecurrentRule by name pattern or type, else the composite's."""
        for pattern, rule in self.by_name.items():
            if isinstance(rule, RecurrentRule) and (fnmatch.fnmatchcase(layer.path, pattern)
                                                    or layer.name == pattern):
                return rule
        for key, rule in self.by_type.items():
            if isinstance(rule, RecurrentRule) and isinstance(key, type) and \
                    layer.layer_type is not None and issubclass(layer.layer_type, key):
                return rule
        return self.recurrent

    def rule_for(self, layer: LayerInfo) -> Rule:
        for pattern, rule in self.by_name.items():
            if fnmatch.fnmatchcase(layer.path, pattern) or layer.name == pattern:
                return rule
        if layer.position == 0 and self.first is not None:
            return self.first
        if layer.position >= 0 and layer.position == layer.count - 1 and self.last is not None:
            return self.last
        for key, rule in self.by_type.items():
            if isinstance(key, type) and layer.layer_type is not None and issubclass(
                    layer.layer_type, key):
                return rule
        for key, rule in self.by_type.items():
            if key == layer.kind:
                return rule
        return self.default


def _uniform(rule: Rule, name: str, stabilizer: float, top_k: float | None,
             recurrent: RecurrentRule) -> Composite:
    return Composite(default=rule, stabilizer=stabilizer, top_k=top_k, name=name,
                     recurrent=recurrent)


def _bounds(name: str, low: float | Tensor | None, high: float | Tensor | None) -> ZBox:
    if low is None or high is None:
        raise CompositeError(
            f"composite {name!r} uses the z-box rule and needs low= and high=, the smallest and "
            "largest value an input can take (e.g. the normalised pixel range)")
    return ZBox(low=low, high=high)


PRESETS = (
    "lrp0", "epsilon", "gamma", "zplus", "alpha_beta", "flat", "wsquare", "zbox",
    "epsilon_gamma_box", "epsilon_plus", "epsilon_plus_flat", "epsilon_alpha2_beta1",
    "epsilon_alpha2_beta1_flat", "layer_position",
)


def make_composite(
    name: str | Composite,
    *,
    epsilon: float = 1e-6,
    gamma: float = 0.25,
    alpha: float = 2.0,
    beta: float = 1.0,
    low: float | Tensor | None = None,
    high: float | Tensor | None = None,
    bias: str = "absorb",
    top_k: float | None = None,
    stabilizer: float = 1e-6,
) -> Composite:
    """A preset by name (see PRESETS), or the given Composite unchanged."""
    if isinstance(name, Composite):
        return name
    recurrent = RecurrentRule(bias=bias) if bias != "absorb" else RecurrentRule()
    if top_k is not None and not 0 < top_k <= 1:
        raise CompositeError(f"top_k={top_k}: the fraction of relevance kept must be in (0, 1]")
    eps = Epsilon(epsilon=epsilon, bias=bias)
    gam = Gamma(gamma=gamma, bias=bias)
    zplus = ZPlus(bias=bias)
    ab = AlphaBeta(alpha=alpha, beta=beta, bias=bias)
    ab21 = AlphaBeta(alpha=2.0, beta=1.0, bias=bias)
    linear = {nn.Linear: eps, "linear": eps, "affine": eps}

    def mixed(conv: Rule, first: Rule | None = None) -> Composite:
        return Composite(by_type={**linear, "conv": conv}, first=first, default=eps,
                         stabilizer=stabilizer, top_k=top_k, name=name, recurrent=recurrent)

    if name == "lrp0":
        return _uniform(LRP0(bias=bias), name, 0.0, top_k, recurrent)
    simple = {"epsilon": eps, "gamma": gam, "zplus": zplus, "alpha_beta": ab,
              "flat": Flat(), "wsquare": WSquare(bias=bias)}
    if name in simple:
        return _uniform(simple[name], name, stabilizer, top_k, recurrent)
    if name == "zbox":
        return _uniform(_bounds(name, low, high), name, stabilizer, top_k, recurrent)
    if name == "epsilon_gamma_box":
        return mixed(gam, _bounds(name, low, high))
    if name == "epsilon_plus":
        return mixed(zplus)
    if name == "epsilon_plus_flat":
        return mixed(zplus, Flat())
    if name == "epsilon_alpha2_beta1":
        return mixed(ab21)
    if name == "epsilon_alpha2_beta1_flat":
        return mixed(ab21, Flat())
    if name == "layer_position":
        return LayerPosition(first=_bounds(name, low, high), gamma_rule=gam, epsilon_rule=eps,
                             last=LRP0(bias=bias), stabilizer=stabilizer, top_k=top_k,
                             name=name, recurrent=recurrent)
    raise CompositeError(f"unknown composite {name!r}; presets: {', '.join(PRESETS)}")


@dataclass
class LayerPosition(Composite):
    """The tutorials' recipe: input z-box, lower third gamma, middle epsilon, top LRP-0."""

    gamma_rule: Rule = field(default_factory=Gamma)
    epsilon_rule: Rule = field(default_factory=Epsilon)

    def rule_for(self, layer: LayerInfo) -> Rule:
        if layer.position < 0:
            return self.epsilon_rule
        if layer.position == 0:
            return self.first or self.gamma_rule
        if layer.position == layer.count - 1:
            return self.last or self.epsilon_rule
        if layer.position < layer.count / 3:
            return self.gamma_rule
        return self.epsilon_rule
