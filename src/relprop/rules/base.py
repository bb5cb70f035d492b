"""The rule contract: what a rule is given, what it answers, and the two autograd
Functions that run it.

A rule sees one layer z = W x + b (`BoundLayer`). In the forward pass it may
compute what its backward needs (e.g. the positive contributions for z-plus and
gamma). In the backward pass it receives c_z, the quantity autograd carries
(relevance at the layer's output is R_z = c_z * z; `Incoming`), and returns
(`Propagated`) either the gradient-form answer c_x (input relevance R_x = x * c_x)
or the relevance R_x itself for rules whose result is not proportional to the
input (flat, w-square, z-box, bias distribution); what its bias and stabilizer
absorbed goes to the ledger's `Tally`. `LayerRuleFunction` runs that general form.
A rule may also have a fused form, run by `FusedLayer`: the layer and the
activation after it in one autograd Function that saves per-output factors.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..errors import CompositeError
from ..layers import Kernel, LayerWeights, Modifier

BIAS_MODES = ("absorb", "ignore", "distribute")
# Stabilizer used where a rule asks for none (LRP-0 with a filter, ignored bias):
# small enough to be invisible next to any real pre-activation, large enough
# that 0/0 never happens.
TINY = 1e-30

# What follows a fused layer: nothing, a ReLU (z <= 0 carries no relevance), or an
# identity-rule activation with act(0) = 0 that keeps the sign of its input
# (SiLU, GELU, ...: checked when the program is built).
Activation = Callable[[Tensor], Tensor] | str | None
RELU = "relu"


def stabilize(d: Tensor, eps: float) -> Tensor:
    """d + eps * sign(d), with sign(+0) = +1, so the result is never 0 (eps=0: TINY).

    copysign makes this two passes over d instead of four; it reads -0.0 as
    negative, which only matters where the denominator is exactly zero, and
    there the relevance to divide is zero as well in every rule here.
    """
    eps = eps or TINY
    return d + torch.copysign(torch.tensor(eps, dtype=d.dtype, device=d.device), d)


def safe_divide(num: Tensor, den: Tensor) -> Tensor:
    """num / den where den != 0, else 0 (relevance at a zero input cannot be carried)."""
    nonzero = den != 0
    return torch.where(nonzero, num / torch.where(nonzero, den, torch.ones_like(den)), 0.0)


@dataclass
class BoundLayer:
    """One call of a layer: its kernel, current weights, and what is known of its data."""

    kernel: Kernel
    weights: LayerWeights
    nonneg_input: bool = False  # input known >= 0 (after a ReLU): x- terms vanish
    positive_only: bool = False  # every consumer is ReLU-like: relevance is 0 where z <= 0
    top_k: float | None = None  # relevance filter: fraction of output relevance kept
    recording: bool = False  # a ledger is kept or relevance may arrive directly: keep more
    relu_after: bool = False  # the ReLU after the layer runs inside it (z-box fast path)

    def apply(self, x: Tensor, wmod: Modifier, bmod: Modifier | None = None,
              gamma: float = 0.0) -> Tensor:
        b = None if bmod is None else self.weights.bias(bmod, gamma)
        return self.kernel.forward(x, self.weights.weight(wmod, gamma), b)

    def t(self, s: Tensor, wmod: Modifier, x: Tensor | torch.Size,
          gamma: float = 0.0) -> Tensor:
        """W'^T s for the modified weight W'."""
        return self.kernel.transpose(s, self.weights.weight(wmod, gamma), x)

    def bias_term(self, bmod: Modifier, z: Tensor, gamma: float = 0.0) -> Tensor | None:
        b = self.weights.bias(bmod, gamma)
        return None if b is None else self.kernel.bias_like(b, z)

    def fan_in(self, x: Tensor) -> Tensor:
        """How many inputs each output is connected to (padding excluded), for one sample."""
        return self.per_shape("fan_in", x, lambda ones: self.apply(ones, Modifier.ONES))

    def per_shape(self, key: object, x: Tensor, make: Callable[[Tensor], Tensor]) -> Tensor:
        """make(ones of one sample's shape): a map that depends on the input's shape alone
        (fan-in, w-square's sum of squared weights), broadcast over the batch. Cached for
        the latest input shape only, so explaining many sizes does not pile maps up."""
        sample = (1, *x.shape[1:]) if x.dim() > 1 else tuple(x.shape)
        tag = (sample, x.dtype, x.device)
        hit = self.weights.extra.get(key)
        if hit is None or hit[0] != tag:
            hit = self.weights.extra[key] = (tag, make(x.new_ones(sample)))
        return hit[1]


@dataclass
class Propagated:
    """A rule's answer: gradient form (R_x = x * grad) plus any relevance given directly."""

    grad: Tensor | None = None
    relevance: Tensor | None = None


@dataclass
class Incoming:
    """What arrives at the layer's output during the backward pass."""

    grad: Tensor  # c_z
    z: Tensor
    top_k: float | None = None
    # relevance that arrived directly (not as c_z * z): shares handed to z where z may be 0
    direct: Tensor | None = None
    _relevance: Tensor | None = field(default=None, repr=False)

    @property
    def plain(self) -> bool:
        """All relevance is c_z * z, unfiltered: rules may work on c_z directly."""
        return self.top_k is None and self.direct is None

    def relevance(self) -> Tensor:
        if self._relevance is None:
            r = self.grad * self.z
            if self.direct is not None:
                r = r + self.direct
            if self.top_k is not None:
                r = keep_top_k(r, self.top_k)
            self._relevance = r
        return self._relevance


def keep_top_k(r: Tensor, fraction: float) -> Tensor:
    """Zero all but the `fraction` of each sample's relevance values largest in magnitude.

    Magnitude, not value: a filter by value would drop the whole relevance of a
    negative explained output (its only non-zero entry is the smallest).
    """
    flat = r.reshape(r.shape[0], -1)
    k = max(1, math.ceil(fraction * flat.shape[1]))
    threshold = flat.abs().topk(k, dim=1).values[:, -1:]
    return torch.where(flat.abs() >= threshold, flat, 0.0).reshape(r.shape)


class Tally:
    """Per-sample sums of the relevance a layer's bias and stabilizer absorbed."""

    def __init__(self) -> None:
        self.bias: Tensor | None = None
        self.stabilizer: Tensor | None = None

    @staticmethod
    def _per_sample(t: Tensor) -> Tensor:
        return t.reshape(t.shape[0], -1).sum(1)

    def add(self, bias: Tensor | None = None, stabilizer: Tensor | None = None) -> None:
        if bias is not None:
            v = self._per_sample(bias)
            self.bias = v if self.bias is None else self.bias + v
        if stabilizer is not None:
            v = self._per_sample(stabilizer)
            self.stabilizer = v if self.stabilizer is None else self.stabilizer + v


def is_number(value: object) -> bool:
    """A real number (numpy scalars included), not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_nonnegative(owner: str, name: str, value: object, why: str) -> None:
    """Refuse a parameter that must be a finite number >= 0, naming it and saying why.

    Checked when a rule or composite is built, so a typo fails before any model work
    instead of surfacing as exploding or vanishing relevance.
    """
    ok = is_number(value) and math.isfinite(value) and value >= 0  # type: ignore[arg-type]
    if not ok:
        raise CompositeError(f"{owner}: {name}={value!r} is not allowed; {name} must be a "
                             f"finite number >= 0 ({why})")


EPSILON_WHY = "it is added to each denominator's magnitude; a negative one can cancel it"


@dataclass(frozen=True)
class RuleBase:
    """What every rule shares, the layer rules' `Rule` and the recurrent rule: the bias
    mode (`bias=`), the stabilizer's validation, a name and a description.

    Bias handling: "absorb" keeps b in the denominator (relevance the bias explains
    is lost and reported in the ledger), "ignore" leaves it out (relevance is
    conserved), "distribute" keeps it in the denominator and hands each output's
    bias share to the inputs (conserved).
    """

    bias: str = field(default="absorb", kw_only=True)

    name = "rule"

    def __post_init__(self) -> None:
        if self.bias not in BIAS_MODES:
            raise CompositeError(f"bias={self.bias!r}: choose one of {', '.join(BIAS_MODES)}")
        if hasattr(self, "epsilon"):  # every rule's stabilizer (the epsilon rule's epsilon)
            check_nonnegative(type(self).__name__, "epsilon", self.epsilon, EPSILON_WHY)

    @property
    def hands_out_directly(self) -> bool:
        """Hands out relevance not proportional to the input value (relprop.shadow)."""
        return self.bias == "distribute"

    def describe(self) -> str:
        return self.name


@dataclass(frozen=True)
class Rule(RuleBase):
    """Base of the rules for linear-like layers (z = W x + b).

    Mode "distribute" hands each output's bias share b_j / n_j to its n_j connected
    inputs. A rule owns all of its forms: `forward`/`backward` (the general form, run
    by `LayerRuleFunction`), optionally `fusable`/`fused_forward`/`fused_backward` (the
    fast form with the activation after the layer, run by `FusedLayer`), and what the
    program needs to know of it (`hands_out_directly`, `is_plain_gradient`,
    `takes_relu_inside`). The recurrent rule (relprop.rules.recurrent) is a `RuleBase`
    too; relprop.recurrent runs it on LSTM/GRU layers.
    """

    uses_output = True  # the backward reads z (z-box does not, unless recording/filtering)
    takes_relu_inside = False  # honours BoundLayer.relu_after: the ReLU after it can join it

    # -- what the program asks --------------------------------------------------------

    @property
    def is_plain_gradient(self) -> bool:
        """The rule is the layer's own gradient exactly: no custom Function needed."""
        return False

    # -- the general form -------------------------------------------------------------

    def forward(self, layer: BoundLayer, x: Tensor) -> tuple[Tensor, tuple[Tensor, ...]]:
        return layer.apply(x, Modifier.PLAIN, Modifier.PLAIN), ()

    def backward(
        self, layer: BoundLayer, x: Tensor, z: Tensor, state: tuple[Tensor, ...],
        incoming: Incoming, tally: Tally | None,
    ) -> Propagated:
        raise NotImplementedError

    # -- the fused form (FusedLayer) -----------------------------------------------------

    def fusable(self, nonneg_input: bool) -> bool:
        """Whether the fused form computes this rule exactly on this layer, given
        whether its inputs are known >= 0 (no filter: the program checks that).
        Default: no fused form."""
        return False

    def fused_forward(self, ctx: Any, layer: BoundLayer, x: Tensor, z: Tensor,
                      act: Activation) -> Tensor:
        """y = act(z) for z the layer's output; saves on `ctx` what `fused_backward`
        needs (ctx.layer and ctx.shape, the input's shape, are set already)."""
        raise NotImplementedError(f"{type(self).__name__} has no fused form")

    def fused_backward(self, ctx: Any, grad: Tensor) -> Tensor:
        """c_x from c_y, the gradient at the fused layer's output; a rule that hands
        relevance out directly returns R_x instead (relprop.shadow.functions.ToShadow routes it)."""
        raise NotImplementedError(f"{type(self).__name__} has no fused form")


# -- helpers several rules share ------------------------------------------------------

def distribute(layer: BoundLayer, x: Tensor, shares: Tensor) -> Tensor:
    """Hand each output's bias relevance `shares` equally to its connected inputs."""
    return layer.t(shares / layer.fan_in(x), Modifier.ONES, x)


def activate(z: Tensor, act: Activation) -> Tensor:
    """y = act(z) in a fused form; a ReLU runs in place, so z becomes relu(z) too."""
    if act == RELU:
        return z.relu_()
    return z if act is None else act(z)  # type: ignore[operator]


# -- running a rule: the general form and the fused form ------------------------------

class LayerRuleFunction(torch.autograd.Function):
    """A linear-like layer whose backward is an LRP rule (its general form).

    Gradient form (R = x * c) cannot carry relevance to an input whose value
    is 0, and some rules hand relevance out regardless of the input's value
    (z-box, flat, w-square, bias distribution). That relevance travels on the
    *shadow* channel (relprop.shadow): `shadow` is the input's shadow tensor,
    whose gradient receives it as relevance, not divided by anything. Without
    a shadow it is converted to R / x, losing what lands on zeros (the ledger
    shows it). With `port=True` the layer returns (z, shadow of z) and
    relevance arriving on that shadow joins c_z * z before the rule applies.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: Tensor, shadow: Tensor | None, layer: BoundLayer, rule: Rule,
        tally: Tally | None, port: bool,
    ) -> Tensor | tuple[Tensor, Tensor]:
        z, state = rule.forward(layer, x)
        # z-box keeps z / stab(d) instead of z: z itself only for the ledger, a filter or a port
        keep_z = rule.uses_output or tally is not None or layer.top_k is not None or port
        ctx.save_for_backward(x, z if keep_z else None, *state)
        ctx.layer, ctx.rule, ctx.tally, ctx.has_shadow = layer, rule, tally, shadow is not None
        ctx.set_materialize_grads(False)
        if port:
            return z, z.new_zeros(z.shape)
        return z  # a rule that honours layer.relu_after returns relu(z)

    @staticmethod
    def backward(ctx: Any, grad: Tensor | None,
                 direct: Tensor | None = None) -> tuple[Tensor | None, ...]:
        x, z, *state = ctx.saved_tensors
        layer: BoundLayer = ctx.layer
        if grad is None:
            grad = torch.zeros_like(z if z is not None else state[0])
        incoming = Incoming(grad=grad, z=z, top_k=layer.top_k, direct=direct)
        out = ctx.rule.backward(layer, x, z, tuple(state), incoming, ctx.tally)
        grad_x, grad_shadow = out.grad, None
        if out.relevance is not None:
            if ctx.has_shadow:
                grad_shadow = out.relevance
            else:
                lossy = safe_divide(out.relevance, x)
                grad_x = lossy if grad_x is None else grad_x + lossy
        return grad_x, grad_shadow, None, None, None, None


class FusedLayer(torch.autograd.Function):
    """y = act(W x + b) whose backward is the layer's LRP rule in its fused form.

    Relevance at the layer's output is R = c * y, where y = act(z) is what the
    network passes on (y = z without an activation) and c what autograd carries;
    an identity-rule activation hands R on unchanged, so the layer's rule sees R
    at z. Every fusable rule then reads c_x = sum_k W_k^T (c * f_k) (one or two
    modified weights W_k) with factors f_k = y / D_k computed in the forward pass
    (what each rule saves and how many convolutions it makes is in its docstring).
    Rules that hand relevance out directly (flat, w-square) return R_x itself,
    which relprop.shadow.functions.ToShadow routes to the input's shadow.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, layer: BoundLayer, rule: Rule,  # type: ignore[override]
                act: Activation) -> Tensor:
        z = layer.apply(x, Modifier.PLAIN, Modifier.PLAIN)
        ctx.shape, ctx.layer, ctx.rule = x.shape, layer, rule
        return rule.fused_forward(ctx, layer, x, z, act)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None, None, None]:
        return ctx.rule.fused_backward(ctx, grad), None, None, None
