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

A rule's formulas are in its module of relprop.rules (rules/epsilon.py for Epsilon);
rules/base.py states what a rule is given and answers, and runs it in autograd.
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from .errors import CompositeError
from .rules import (
    CPLRP,
    LRP0,
    TINY,
    AlphaBeta,
    AttentionRule,
    AttnLRP,
    Epsilon,
    Flat,
    Gamma,
    RecurrentRule,
    Rule,
    RuleBase,
    WSquare,
    ZBox,
    ZPlus,
    check_bounds,
    check_nonnegative,
    is_number,
)


@dataclass
class LayerInfo:
    """What a composite may look at to choose a rule."""

    name: str  # graph node name
    path: str  # module path ("features.0"), the enclosing module for functional ops
    layer_type: type | None  # nn.Conv2d, nn.Linear, nn.BatchNorm2d, ...
    kind: str  # "linear", "conv", "affine" or "recurrent" (LSTM/GRU)
    position: int  # index among linear/conv layers in forward order (-1 for the others)
    count: int  # number of linear/conv layers


@dataclass
class Composite:
    """Rule assignment by name pattern > position > type > default.

    `by_type` keys are module classes (matched with issubclass) or the kinds
    "linear", "conv", "affine", "recurrent". LSTM/GRU layers take a RecurrentRule
    (`recurrent` unless a by_name or by_type entry gives one). `stabilizer` is the
    epsilon of the proportional rule at sums, means and average pooling (0 = plain
    gradient). `attention`: how relevance crosses attention and products of two
    activations (AttnLRP's rules by default; CPLRP() holds the attention weights
    constant). `routing`: how relevance crosses a mixture-of-experts router (ROUTING;
    relprop.passes.routing): "held" holds the routing weights constant, so relevance
    flows through the chosen experts; "uniform" splits each product weight * expert
    output half and half, the weight's half going back through the router's softmax.
    The top-k choice is held either way.
    """

    by_type: dict[type | str, RuleBase] = field(default_factory=dict)
    first: Rule | None = None
    last: Rule | None = None
    by_name: dict[str, RuleBase] = field(default_factory=dict)
    default: Rule = field(default_factory=Epsilon)
    stabilizer: float = 1e-6
    top_k: float | None = None
    name: str = "custom"
    recurrent: RecurrentRule = field(default_factory=RecurrentRule)
    attention: AttentionRule = field(default_factory=AttnLRP)
    routing: str = "held"

    def __post_init__(self) -> None:
        check_nonnegative("Composite", "stabilizer", self.stabilizer,
                          "the epsilon of the proportional split at sums and average pooling")
        check_top_k(self.top_k)
        check_routing(self.routing)

    def describe(self) -> dict[str, Any]:
        """Every rule of the composite with all its parameters, plus stabilizer and top_k.

        So that an explanation can say which values were used (defaults included),
        not only which were asked for. Rules are dicts ({"rule": class name, field:
        value, ...}); tensors (z-box bounds) are summarised by shape and range.
        """
        out: dict[str, Any] = {"name": self.name}
        for f in dataclasses.fields(self):
            out[f.name] = _describe_value(getattr(self, f.name))
        return out

    def summary(self) -> str:
        """describe() as text, one entry per line (for the ledger and reports)."""
        lines = []
        for key, value in self.describe().items():
            if value is None or value == {}:
                continue  # no such entry (no rule for `last`, no filter)
            if isinstance(value, dict) and "rule" not in value:
                lines.extend(f"{key}[{k}]: {_format_rule(v)}" for k, v in value.items())
            else:
                lines.append(f"{key}: {_format_rule(value)}")
        return "\n".join(lines)

    def rule_for(self, layer: LayerInfo) -> RuleBase:
        """The rule of one layer: by name pattern, position, module type, kind, default.

        An LSTM/GRU (kind "recurrent") gets a RecurrentRule, any other layer a rule
        that is not one: entries of the other sort are passed over, and the default
        is `recurrent` or `default` accordingly.
        """
        recurrent = layer.kind == "recurrent"

        def fits(rule: RuleBase) -> bool:
            return isinstance(rule, RecurrentRule) == recurrent

        for pattern, rule in self.by_name.items():
            if fits(rule) and (fnmatch.fnmatchcase(layer.path, pattern) or layer.name == pattern):
                return rule
        if layer.position == 0 and self.first is not None and fits(self.first):
            return self.first
        last = layer.position >= 0 and layer.position == layer.count - 1
        if last and self.last is not None and fits(self.last):
            return self.last
        for key, rule in self.by_type.items():
            if fits(rule) and isinstance(key, type) and layer.layer_type is not None and \
                    issubclass(layer.layer_type, key):
                return rule
        for key, rule in self.by_type.items():
            if fits(rule) and key == layer.kind:
                return rule
        return self.recurrent if recurrent else self.default


def check_top_k(top_k: float | None) -> None:
    """top_k is the fraction of relevance kept at each layer's output: (0, 1] or None."""
    ok = top_k is None or (is_number(top_k) and 0 < top_k <= 1)
    if not ok:
        raise CompositeError(f"top_k={top_k!r}: the fraction of relevance kept at each layer "
                             "must be in (0, 1] (or None to keep all of it)")


ROUTING = ("held", "uniform")  # Composite.routing


def check_routing(routing: str) -> None:
    """routing is one of ROUTING."""
    if routing not in ROUTING:
        raise CompositeError(f"routing={routing!r}: how relevance crosses a mixture-of-experts "
                             f"router is one of {', '.join(map(repr, ROUTING))}")


def _describe_value(value: Any) -> Any:
    if isinstance(value, RuleBase | AttentionRule):
        out: dict[str, Any] = {"rule": type(value).__name__}
        for f in dataclasses.fields(value):
            out[f.name] = _describe_value(getattr(value, f.name))
        return out
    if isinstance(value, dict):
        return {(k.__name__ if isinstance(k, type) else str(k)): _describe_value(v)
                for k, v in value.items()}
    if isinstance(value, Tensor):
        if value.numel() == 1:
            return float(value)
        return (f"tensor{tuple(value.shape)} in [{float(value.min()):g}, "
                f"{float(value.max()):g}]")
    return value


def _format_rule(value: Any) -> str:
    if isinstance(value, dict) and "rule" in value:
        params = ", ".join(f"{k}={v!r}" if isinstance(v, str) and not v.startswith("tensor")
                           else f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
                           for k, v in value.items() if k != "rule")
        return f"{value['rule']}({params})"
    return f"{value:g}" if isinstance(value, float) else str(value)


def _uniform(rule: Rule, name: str, stabilizer: float, top_k: float | None,
             recurrent: RecurrentRule) -> Composite:
    return Composite(default=rule, stabilizer=stabilizer, top_k=top_k, name=name,
                     recurrent=recurrent)


def _bounds(name: str, low: float | Tensor | None, high: float | Tensor | None,
            bias: str, guard: float = 1e-6) -> ZBox:
    if low is None or high is None:
        raise CompositeError(
            f"composite {name!r} uses the z-box rule and needs low= and high=, the smallest and "
            "largest value an input can take (e.g. the normalised pixel range)")
    return ZBox(low=low, high=high, bias=bias, epsilon=guard)


PRESETS = (
    "lrp0", "epsilon", "gamma", "zplus", "alpha_beta", "flat", "wsquare", "zbox",
    "epsilon_gamma_box", "epsilon_plus", "epsilon_plus_flat", "epsilon_alpha2_beta1",
    "epsilon_alpha2_beta1_flat", "layer_position", "attnlrp", "cp_lrp",
)
# The keywords every preset accepts (a preset ignores those it has no rule for, so
# one set of keywords can be passed to any preset, as the command line does).
PARAMETERS = ("epsilon", "gamma", "alpha", "beta", "low", "high", "bias", "top_k", "stabilizer",
              "routing")
DEFAULT_EPSILON = 1e-6  # the epsilon rule's (Zennit's default)
DEFAULT_STABILIZER = 1e-6  # sums and average pooling


def _refuse_unknown(unknown: dict[str, Any]) -> None:
    for key in unknown:
        close = difflib.get_close_matches(key, PARAMETERS, n=1)
        hint = f" (did you mean {close[0]}=?)" if close else ""
        raise CompositeError(
            f"unknown keyword {key}={hint}; the composite keywords are "
            f"{', '.join(p + '=' for p in PARAMETERS)}")


def make_composite(
    name: str | Composite,
    *,
    epsilon: float | None = None,
    gamma: float | None = None,
    alpha: float | None = None,
    beta: float | None = None,
    low: float | Tensor | None = None,
    high: float | Tensor | None = None,
    bias: str | None = None,
    top_k: float | None = None,
    stabilizer: float | None = None,
    routing: str | None = None,
    **unknown: Any,
) -> Composite:
    """A preset by name (see PRESETS), or the given Composite unchanged.

    Every value is checked here, before any model work, and an explicit keyword
    reaches every rule it names, so nothing given is silently dropped:

    - `epsilon=` sets the epsilon rule's epsilon (default 1e-6) and the LSTM/GRU
      rule's (RecurrentRule; Arras' 1e-3 when epsilon is not given; epsilon=0
      gives it 1e-30, LRP-0's guard against 0/0). LRP-0 layers stay at 0 by
      definition. The stabilizers inside the gamma, alpha-beta, flat, w-square
      and z-box rules are numerical guards (Zennit's `stabilizer`, 1e-6), not
      a rule parameter (an epsilon of 0.25 there would change those rules):
      they follow a given epsilon only downwards, min(1e-6, epsilon), like
      the sums' stabilizer, so a tiny epsilon is tiny everywhere.
    - `bias=` goes to every rule, the recurrent one included.
    - `stabilizer=` is the epsilon of sums and average pooling: 1e-6 (0 for
      `lrp0`) unless given; when not given but a smaller `epsilon=` is, it
      follows the epsilon (min of the two), so a tiny epsilon is not masked by
      sums stabilized a million times more strongly.
    - `routing=` is how relevance crosses a mixture-of-experts router ("held" unless
      given; Composite.routing).

    Keywords a preset has no rule for (`gamma=` for "epsilon") are checked but
    unused, so one set of keywords works with every preset; `describe()` on the
    result shows what each layer type gets. A misspelt keyword is refused.
    """
    _refuse_unknown(unknown)
    values = {"epsilon": epsilon, "gamma": gamma, "alpha": alpha, "beta": beta, "low": low,
              "high": high, "bias": bias, "top_k": top_k, "stabilizer": stabilizer}
    given = [k for k, v in values.items() if v is not None]
    if isinstance(name, Composite):
        named = given + (["routing"] if routing is not None else [])
        if named:
            raise CompositeError(
                f"{', '.join(k + '=' for k in named)} configure presets and would be ignored "
                "here: a Composite carries its own rules, so set the values in them, e.g. "
                "Epsilon(epsilon=...), RecurrentRule(epsilon=...), Composite(stabilizer=...)")
        return name
    routing = "held" if routing is None else routing
    check_routing(routing)
    return dataclasses.replace(_preset(name, values, given), routing=routing)


def _preset(name: str, values: dict[str, Any], given: list[str]) -> Composite:
    """make_composite's preset `name` with the checked keyword values."""
    epsilon, gamma, alpha, beta, low, high, bias, top_k, stabilizer = values.values()
    gamma = 0.25 if gamma is None else gamma
    alpha = 2.0 if alpha is None else alpha
    beta = 1.0 if beta is None else beta
    bias = "absorb" if bias is None else bias
    if not isinstance(name, str):
        raise CompositeError(f"composite must be a preset name or a Composite, got "
                             f"{type(name).__name__}")
    check_top_k(top_k)
    if stabilizer is not None:
        check_nonnegative(f"composite {name!r}", "stabilizer", stabilizer,
                          "the epsilon of the proportional split at sums and average pooling")
    if low is not None and high is not None:
        check_bounds(low, high)
    eps_value = DEFAULT_EPSILON if epsilon is None else epsilon
    eps = Epsilon(epsilon=eps_value, bias=bias)
    # epsilon=0 (LRP-0) gets LRP-0's guard against 0/0 here too: an LSTM's sums are
    # exactly 0 where inputs and state are (zero padding, no bias)
    recurrent = RecurrentRule(bias=bias) if epsilon is None else \
        RecurrentRule(epsilon=epsilon or TINY, bias=bias)
    if stabilizer is None:
        stabilizer = DEFAULT_STABILIZER if epsilon is None else min(DEFAULT_STABILIZER, epsilon)
    guard = DEFAULT_STABILIZER if epsilon is None else max(min(DEFAULT_STABILIZER, epsilon),
                                                            TINY)
    gam = Gamma(gamma=gamma, bias=bias, epsilon=guard)
    zplus = ZPlus(bias=bias, epsilon=guard)
    ab = AlphaBeta(alpha=alpha, beta=beta, bias=bias, epsilon=guard)
    ab21 = AlphaBeta(alpha=2.0, beta=1.0, bias=bias, epsilon=guard)
    flat = Flat(bias=bias, epsilon=guard)
    linear = {nn.Linear: eps, "linear": eps, "affine": eps}

    def mixed(conv: Rule, first: Rule | None = None) -> Composite:
        return Composite(by_type={**linear, "conv": conv}, first=first, default=eps,
                         stabilizer=stabilizer, top_k=top_k, name=name, recurrent=recurrent)

    if name == "lrp0":
        sums = 0.0 if "stabilizer" not in given else stabilizer  # LRP-0: plain gradient
        return _uniform(LRP0(bias=bias), name, sums, top_k, recurrent)
    simple = {"epsilon": eps, "gamma": gam, "zplus": zplus, "alpha_beta": ab,
              "flat": flat, "wsquare": WSquare(bias=bias, epsilon=guard)}
    if name in simple:
        return _uniform(simple[name], name, stabilizer, top_k, recurrent)
    if name == "zbox":
        return _uniform(_bounds(name, low, high, bias, guard), name, stabilizer, top_k, recurrent)
    if name == "epsilon_gamma_box":
        return mixed(gam, _bounds(name, low, high, bias, guard))
    if name == "epsilon_plus":
        return mixed(zplus)
    if name == "epsilon_plus_flat":
        return mixed(zplus, flat)
    if name == "epsilon_alpha2_beta1":
        return mixed(ab21)
    if name == "epsilon_alpha2_beta1_flat":
        return mixed(ab21, flat)
    if name in ("attnlrp", "cp_lrp"):
        # transformers, as the AttnLRP authors' implementation (LXT) computes them: the
        # epsilon rule with epsilon -> 0 on every linear layer, sums split without a
        # stabilizer (in gradient form both are the plain gradient: nothing is divided,
        # nothing kept, so the explanation costs one gradient); epsilon= / stabilizer= give
        # stabilized ones, gamma= puts Gamma on the linear layers (the AttnLRP paper's
        # choice for vision transformers); attention by AttnLRP or CP-LRP
        on_linear = gam if "gamma" in given else eps if "epsilon" in given else LRP0(bias=bias)
        sums = stabilizer if given and {"epsilon", "stabilizer"} & set(given) else 0.0
        return Composite(default=on_linear, stabilizer=sums, top_k=top_k, name=name,
                         recurrent=recurrent,
                         attention=AttnLRP() if name == "attnlrp" else CPLRP())
    if name == "layer_position":
        return LayerPosition(first=_bounds(name, low, high, bias, guard), gamma_rule=gam,
                             epsilon_rule=eps, last=LRP0(bias=bias), stabilizer=stabilizer,
                             top_k=top_k, name=name, recurrent=recurrent)
    raise CompositeError(f"unknown composite {name!r}; presets: {', '.join(PRESETS)}")


@dataclass
class LayerPosition(Composite):
    """The tutorials' recipe: input z-box, lower third gamma, middle epsilon, top LRP-0."""

    gamma_rule: Rule = field(default_factory=Gamma)
    epsilon_rule: Rule = field(default_factory=Epsilon)

    def rule_for(self, layer: LayerInfo) -> RuleBase:
        if layer.kind == "recurrent":
            return super().rule_for(layer)
        if layer.position < 0:
            return self.epsilon_rule
        if layer.position == 0:
            return self.first or self.gamma_rule
        if layer.position == layer.count - 1:
            return self.last or self.epsilon_rule
        if layer.position < layer.count / 3:
            return self.gamma_rule
        return self.epsilon_rule
