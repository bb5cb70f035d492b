"""What every rule shares: the layer it acts on, what arrives in the backward pass,
its answer, the ledger's tally, the stabilizer, validation, and the `Rule` base class.

A rule sees one layer z = W x + b. In the forward pass it may compute what its
backward needs (e.g. the positive contributions for z-plus and gamma). In the
backward pass it receives c_z, the quantity autograd carries (relevance at the
layer's output is R_z = c_z * z), and returns either the gradient-form answer
c_x (input relevance R_x = x * c_x) or the relevance R_x itself for rules
whose result is not proportional to the input (flat, w-square, z-box, bias
distribution). A rule may also have a fused form (relprop.fused): the layer and
the activation after it in one autograd Function that saves per-output factors.
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
from ..layers import ConvKernel, Kernel, LayerWeights, LinearKernel, Modifier

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
class Rule:
    """Base of all layer rules; `bias` selects the bias handling.

    Bias handling (`bias=`): "absorb" keeps b in the denominator (relevance the
    bias explains is lost and reported in the ledger), "ignore" leaves it out
    (relevance is conserved), "distribute" keeps it in the denominator and hands
    each output's bias share b_j / n_j to its n_j connected inputs (conserved).

    A rule owns all of its forms: `forward`/`backward` (the general form, run by
    relprop.functions.LayerRuleFunction), optionally `fusable`/`fused_forward`/
    `fused_backward` (the fast form with the activation after the layer, run by
    relprop.fused.FusedLayer), and what the program needs to know of it
    (`hands_out_directly`, `is_plain_gradient`, `takes_relu_inside`).
    """

    bias: str = field(default="absorb", kw_only=True)

    name = "rule"
    uses_output = True  # the backward reads z (z-box does not, unless recording/filtering)
    takes_relu_inside = False  # honours BoundLayer.relu_after: the ReLU after it can join it

    def __post_init__(self) -> None:
        if self.bias not in BIAS_MODES:
            raise CompositeError(f"bias={self.bias!r}: choose one of {', '.join(BIAS_MODES)}")
        if hasattr(self, "epsilon"):  # every rule's stabilizer (the epsilon rule's epsilon)
            check_nonnegative(type(self).__name__, "epsilon", self.epsilon, EPSILON_WHY)

    # -- what the program asks --------------------------------------------------------

    @property
    def hands_out_directly(self) -> bool:
        """Hands out relevance not proportional to the input value (relprop.shadow)."""
        return self.bias == "distribute"

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

    # -- the fused form (relprop.fused) -----------------------------------------------

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
        relevance out directly returns R_x instead (relprop.fused.ToShadow routes it)."""
        raise NotImplementedError(f"{type(self).__name__} has no fused form")

    def describe(self) -> str:
        return self.name


# -- helpers several rules share ------------------------------------------------------

def distribute(layer: BoundLayer, x: Tensor, shares: Tensor) -> Tensor:
    """Hand each output's bias relevance `shares` equally to its connected inputs."""
    return layer.t(shares / layer.fan_in(x), Modifier.ONES, x)


@dataclass
class Side:
    """One side of a two-sided rule: s = R / den (times its weight), its bias part b,
    and its denominator d before and den after the stabilizer."""

    s: Tensor
    b: Tensor | None
    d: Tensor
    den: Tensor


def bias_and_tally(layer: BoundLayer, x: Tensor, out: Propagated, tally: Tally | None,
                   mode: str, pos: Side, neg: Side | None) -> None:
    """Bias distribution and the ledger's shares for a rule with a positive and a
    negative side (alpha-beta, gamma): `out.relevance` gets the distributed bias
    (mode "distribute"), `tally` what the bias (mode "absorb") and the stabilizer took."""
    if pos.b is not None and mode == "distribute":
        shares = pos.s * pos.b if neg is None else pos.s * pos.b + neg.s * neg.b
        out.relevance = distribute(layer, x, shares)
    if tally is not None:
        stab = pos.s * (pos.den - pos.d)
        bias = pos.s * pos.b if (pos.b is not None and mode == "absorb") else None
        if neg is not None:
            stab = stab + neg.s * (neg.den - neg.d)
            if bias is not None:
                bias = bias + neg.s * neg.b
        tally.add(bias=bias, stabilizer=stab)


def positive_contributions(layer: BoundLayer, x: Tensor) -> Tensor:
    """sum_i x+_i w+_ij + x-_i w-_ij (no bias): the positive part of z - b."""
    if layer.nonneg_input:
        return layer.apply(x, Modifier.POS)
    return layer.apply(x.clamp(min=0), Modifier.POS) + layer.apply(x.clamp(max=0), Modifier.NEG)


def stacks(kernel: Kernel) -> bool:
    """Whether modified weights run stacked in one call: dense layers and convolutions with
    groups == 1. (A grouped call with two parts per group runs slower than two calls.)"""
    return isinstance(kernel, LinearKernel) or (
        isinstance(kernel, ConvKernel) and kernel.groups == 1)


def stacked_weight(layer: BoundLayer, mods: tuple[Modifier, ...]) -> Tensor:
    """The modified weights side by side along the input dimension, cached (the parts
    are not cached apart, so this costs no more memory than the parts would)."""
    key = ("stacked", mods)
    cache = layer.weights.extra
    if key not in cache:
        cache[key] = torch.cat([m.modify(layer.weights.w) for m in mods], 1)
    return cache[key]


def _stacked_dim(layer: BoundLayer, ndim: int) -> int:
    return ndim - 1 if isinstance(layer.kernel, LinearKernel) else 1


def transposes(layer: BoundLayer, s: Tensor, shape: torch.Size,
               mods: tuple[Modifier, ...]) -> tuple[Tensor, ...]:
    """W_m^T s for each modifier m (`shape`: the layer's input shape): one call over the
    stacked weights where `stacks`, whose output holds the parts side by side (views)."""
    if not stacks(layer.kernel):
        return tuple(layer.t(s, m, shape) for m in mods)
    dim = _stacked_dim(layer, len(shape))
    size = list(shape)
    size[dim] *= len(mods)
    out = layer.kernel.transpose(s, stacked_weight(layer, mods), torch.Size(size))
    return out.chunk(len(mods), dim=dim)


def split_positive(layer: BoundLayer, x: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """P + eps = W+ x+ + W- x- + b+ + eps for inputs of either sign, and [x > 0] as 0/1.

    Every term of P is >= 0, so P keeps its digits also where it is near 0 (the
    identity (x w)+ = (x w + |x| |w|) / 2 would take P as a difference there). Where
    `stacks`: one call, [x+, x-] against [W+, W-]; else two calls sharing one buffer.
    The 0/1 mask is float: selecting with it (torch.lerp) is exact and several times
    faster than torch.where or a multiply by a boolean tensor on CPU.
    """
    bias = shifted_bias(layer, Modifier.POS, eps)
    kernel = layer.kernel
    if stacks(kernel):
        dim = _stacked_dim(layer, x.dim())
        size = list(x.shape)
        size[dim] *= 2
        both = x.new_empty(size)
        pos, neg = both.chunk(2, dim=dim)
        torch.clamp(x, min=0, out=pos)
        torch.clamp(x, max=0, out=neg)
        p = kernel.forward(both, stacked_weight(layer, (Modifier.POS, Modifier.NEG)), bias)
        del both, pos, neg
        return p, torch.gt(x, 0, out=x.new_empty(x.shape))
    part = x.clamp(min=0)
    p = kernel.forward(part, layer.weights.weight(Modifier.POS), bias)
    torch.clamp(x, max=0, out=part)
    p.add_(kernel.forward(part, layer.weights.weight(Modifier.NEG), None))
    return p, torch.gt(x, 0, out=part)


def select(mask: Tensor, where_pos: Tensor, where_neg: Tensor) -> Tensor:
    """where(mask, where_pos, where_neg) for a 0/1 float mask, exactly (lerp with a weight
    of 0 or 1 returns one end unchanged), into `where_neg` when it is its own tensor."""
    own = where_neg.is_contiguous() and where_neg._base is None
    return torch.lerp(where_neg, where_pos, mask, out=where_neg if own else None)


def sign_split_transpose(layer: BoundLayer, x: Tensor, a: Tensor, b: Tensor | None) -> Tensor:
    """c_x for c_x+ = W+^T a + W-^T b and c_x- = W+^T b + W-^T a."""
    c_pos = layer.t(a, Modifier.POS, x)
    if b is not None:
        c_pos = c_pos + layer.t(b, Modifier.NEG, x)
    if layer.nonneg_input:
        return c_pos
    c_neg = layer.t(a, Modifier.NEG, x)
    if b is not None:
        c_neg = c_neg + layer.t(b, Modifier.POS, x)
    return torch.where(x > 0, c_pos, c_neg)


def activate(z: Tensor, act: Activation) -> Tensor:
    """y = act(z) in a fused form; a ReLU runs in place, so z becomes relu(z) too."""
    if act == RELU:
        return z.relu_()
    return z if act is None else act(z)  # type: ignore[operator]


def shifted_bias(layer: BoundLayer, mod: Modifier, eps: float, gamma: float = 0.0) -> Tensor:
    """The modified bias plus eps (zeros plus eps without a bias), cached."""
    key = ("shifted", mod, gamma, eps)
    cache = layer.weights.extra
    if key not in cache:
        b = layer.weights.bias(mod, gamma)
        w = layer.weights.w
        out_features = layer.kernel.out_channels(w)
        base = torch.zeros(out_features, dtype=w.dtype, device=w.device) if b is None else b
        cache[key] = base + eps
    return cache[key]


def shifted(layer: BoundLayer, x: Tensor, mod: Modifier, eps: float,
            gamma: float = 0.0) -> Tensor:
    """The modified layer's output plus eps, with eps folded into the (cached) bias."""
    return layer.kernel.forward(x, layer.weights.weight(mod, gamma),
                                shifted_bias(layer, mod, eps, gamma))
