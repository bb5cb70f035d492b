"""The LRP rules for linear-like layers, in gradient form.

A rule sees one layer z = W x + b. In the forward pass it may compute what its
backward needs (e.g. the positive contributions for z-plus and gamma). In the
backward pass it receives c_z, the quantity autograd carries (relevance at the
layer's output is R_z = c_z * z), and returns either the gradient-form answer
c_x (input relevance R_x = x * c_x) or the relevance R_x itself for rules
whose result is not proportional to the input (flat, w-square, z-box, bias
distribution). Formulas are those of ../shared/RULES.md (Zennit's and
iNNvestigate's definitions); notation: x+ = max(x, 0), w- = min(w, 0).

Bias handling (`bias=`): "absorb" keeps b in the denominator (relevance the
bias explains is lost and reported in the ledger), "ignore" leaves it out
(relevance is conserved), "distribute" keeps it in the denominator and hands
each output's bias share b_j / n_j to its n_j connected inputs (conserved).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .errors import CompositeError, InputError
from .layers import ConvKernel, Kernel, LayerWeights, LinearKernel

BIAS_MODES = ("absorb", "ignore", "distribute")
# Stabilizer used where a rule asks for none (LRP-0 with a filter, ignored bias):
# small enough to be invisible next to any real pre-activation, large enough
# that 0/0 never happens.
TINY = 1e-30


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

    def apply(self, x: Tensor, wmod: str, bmod: str | None = None, gamma: float = 0.0) -> Tensor:
        b = None if bmod is None else self.weights.bias(bmod, gamma)
        return self.kernel.forward(x, self.weights.weight(wmod, gamma), b)

    def t(self, s: Tensor, wmod: str, x: Tensor, gamma: float = 0.0) -> Tensor:
        """W'^T s for the modified weight W'."""
        return self.kernel.transpose(s, self.weights.weight(wmod, gamma), x)

    def bias_term(self, bmod: str, z: Tensor, gamma: float = 0.0) -> Tensor | None:
        b = self.weights.bias(bmod, gamma)
        return None if b is None else self.kernel.bias_like(b, z)

    def fan_in(self, x: Tensor) -> Tensor:
        """How many inputs each output is connected to (padding excluded)."""
        return self.apply(torch.ones_like(x), "ones")


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
    def filtered(self) -> bool:
        return self.top_k is not None

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


def _distribute(layer: BoundLayer, x: Tensor, shares: Tensor) -> Tensor:
    """Hand each output's bias relevance `shares` equally to its connected inputs."""
    return layer.t(shares / layer.fan_in(x), "ones", x)


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
    """Base of all layer rules; `bias` selects the bias handling."""

    bias: str = field(default="absorb", kw_only=True)

    name = "rule"
    uses_output = True  # the backward reads z (z-box does not, unless recording/filtering)

    def __post_init__(self) -> None:
        if self.bias not in BIAS_MODES:
            raise CompositeError(f"bias={self.bias!r}: choose one of {', '.join(BIAS_MODES)}")
        if hasattr(self, "epsilon"):  # every rule's stabilizer (the epsilon rule's epsilon)
            check_nonnegative(type(self).__name__, "epsilon", self.epsilon, EPSILON_WHY)

    def forward(self, layer: BoundLayer, x: Tensor) -> tuple[Tensor, tuple[Tensor, ...]]:
        return layer.apply(x, "plain", "plain"), ()

    def backward(
        self, layer: BoundLayer, x: Tensor, z: Tensor, state: tuple[Tensor, ...],
        incoming: Incoming, tally: Tally | None,
    ) -> Propagated:
        raise NotImplementedError

    def describe(self) -> str:
        return self.name


@dataclass(frozen=True)
class Epsilon(Rule):
    """LRP-epsilon: R_i = x_i sum_j w_ij R_j / stab(z_j)."""

    epsilon: float = 1e-6
    name = "epsilon"

    def backward(self, layer, x, z, state, incoming, tally):
        b = layer.bias_term("plain", z)
        if self.epsilon == 0 and incoming.plain and (b is None or self.bias != "ignore"):
            # LRP-0 without stabilizer: R_z / z = c_z exactly, the plain gradient.
            s = incoming.grad
            if tally is not None and b is not None and self.bias == "absorb":
                tally.add(bias=s * b)
            out = Propagated(grad=layer.t(s, "plain", x))
            if self.bias == "distribute" and b is not None:
                out.relevance = _distribute(layer, x, s * b)
            return out
        eps = self.epsilon
        d = z - b if (b is not None and self.bias == "ignore") else z
        den = stabilize(d, eps)
        s = incoming.relevance() / den
        out = Propagated(grad=layer.t(s, "plain", x))
        if b is not None and self.bias == "distribute":
            out.relevance = _distribute(layer, x, s * b)
        if tally is not None:
            tally.add(bias=s * b if (b is not None and self.bias == "absorb") else None,
                      stabilizer=s * (den - d))
        return out

    def describe(self) -> str:
        return "lrp0" if self.epsilon == 0 else f"epsilon({self.epsilon:g})"


@dataclass(frozen=True)
class LRP0(Epsilon):
    """LRP-0: epsilon with no stabilizer (on ReLU networks: gradient x input)."""

    epsilon: float = field(default=0.0, init=False)


def _positive_contributions(layer: BoundLayer, x: Tensor) -> Tensor:
    """sum_i x+_i w+_ij + x-_i w-_ij (no bias): the positive part of z - b."""
    if layer.nonneg_input:
        return layer.apply(x, "pos")
    return layer.apply(x.clamp(min=0), "pos") + layer.apply(x.clamp(max=0), "neg")


def _sign_split_transpose(layer: BoundLayer, x: Tensor, a: Tensor, b: Tensor | None) -> Tensor:
    """c_x for c_x+ = W+^T a + W-^T b and c_x- = W+^T b + W-^T a."""
    c_pos = layer.t(a, "pos", x)
    if b is not None:
        c_pos = c_pos + layer.t(b, "neg", x)
    if layer.nonneg_input:
        return c_pos
    c_neg = layer.t(a, "neg", x)
    if b is not None:
        c_neg = c_neg + layer.t(b, "pos", x)
    return torch.where(x > 0, c_pos, c_neg)


@dataclass(frozen=True)
class AlphaBeta(Rule):
    """LRP-alpha-beta (alpha - beta = 1): positive and negative contributions apart."""

    alpha: float = 2.0
    beta: float = 1.0
    epsilon: float = 1e-6
    name = "alpha_beta"

    def __post_init__(self) -> None:
        super().__post_init__()
        finite = all(is_number(v) and math.isfinite(v) for v in (self.alpha, self.beta))
        given = f"AlphaBeta: alpha={self.alpha!r}, beta={self.beta!r}"
        if not finite or self.alpha < 0 or self.beta < 0:
            raise CompositeError(
                f"{given}: alpha and beta must be finite numbers >= 0 (with alpha - beta = 1): "
                "they weight the shares of the positive and the negative contributions, and a "
                "negative weight hands relevance out with the wrong sign")
        if abs(self.alpha - self.beta - 1) > 1e-9:
            raise CompositeError(
                f"{given}: need alpha - beta = 1, otherwise the rule does not conserve "
                f"relevance: each layer would hand on alpha - beta = "
                f"{self.alpha - self.beta:g} times what it receives")

    def forward(self, layer, x):
        return layer.apply(x, "plain", "plain"), (_positive_contributions(layer, x),)

    def backward(self, layer, x, z, state, incoming, tally):
        (zp,) = state
        r = incoming.relevance()
        b = layer.bias_term("plain", z)
        bp = layer.bias_term("pos", z)
        bn = layer.bias_term("neg", z)
        absorb = self.bias != "ignore"
        zw = z if b is None else z - b
        p = zp + bp if (absorb and bp is not None) else zp
        p_den = stabilize(p, self.epsilon)
        s_pos = r / p_den
        a = s_pos * self.alpha if self.alpha != 1 else s_pos
        neg = None
        if self.beta != 0:
            n = zw - zp
            if absorb and bn is not None:
                n = n + bn
            n_den = stabilize(n, self.epsilon)
            s_neg = r / n_den
            neg = s_neg * (-self.beta)
        out = Propagated(grad=_sign_split_transpose(layer, x, a, neg))
        if bp is not None and self.bias == "distribute":
            shares = a * bp if neg is None else a * bp + neg * bn
            out.relevance = _distribute(layer, x, shares)
        if tally is not None:
            stab = a * (p_den - p)
            bias = a * bp if (bp is not None and self.bias == "absorb") else None
            if neg is not None:
                stab = stab + neg * (n_den - n)
                if bias is not None:
                    bias = bias + neg * bn
            tally.add(bias=bias, stabilizer=stab)
        return out

    def describe(self) -> str:
        if self.alpha == 1 and self.beta == 0:
            return "zplus"
        return f"alpha{self.alpha:g}_beta{self.beta:g}"


@dataclass(frozen=True)
class ZPlus(AlphaBeta):
    """z-plus: alpha-beta with alpha=1, beta=0 (positive contributions only)."""

    alpha: float = field(default=1.0, init=False)
    beta: float = field(default=0.0, init=False)


@dataclass(frozen=True)
class Gamma(Rule):
    """Generalised LRP-gamma: favour contributions with the sign of the output."""

    gamma: float = 0.25
    epsilon: float = 1e-6
    name = "gamma"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_nonnegative("Gamma", "gamma", self.gamma,
                          "a negative gamma favours contributions against the output's sign, "
                          "the denominator can cross zero and relevance explodes")

    def forward(self, layer, x):
        return layer.apply(x, "plain", "plain"), (_positive_contributions(layer, x),)

    def backward(self, layer, x, z, state, incoming, tally):
        (zp,) = state
        g = self.gamma
        r = incoming.relevance()
        b = layer.bias_term("plain", z)
        absorb = self.bias != "ignore"
        zw = z if b is None else z - b
        # P = z + g * (positive contributions), N = z + g * (negative contributions).
        base = z if absorb else zw
        bp = layer.bias_term("pos", z) if absorb else None
        p = base + g * (zp if bp is None else zp + bp)
        p_den = stabilize(p, self.epsilon)
        s_pos = r / p_den
        if not layer.positive_only:
            s_pos = torch.where(z > 0, s_pos, 0.0)
        if layer.positive_only and layer.nonneg_input:
            # Relevance is zero where z <= 0, inputs are >= 0: one modified transpose.
            grad = layer.t(s_pos, "gamma_pos", x, g)
            s_neg = None
        elif layer.positive_only:
            s_neg = None
            grad = _sign_split_transpose(layer, x, s_pos * (1 + g), s_pos)
        else:
            bn = layer.bias_term("neg", z) if absorb else None
            n = base + g * ((zw - zp) if bn is None else (zw - zp) + bn)
            n_den = stabilize(n, self.epsilon)
            s_neg = torch.where(z < 0, r / n_den, 0.0)
            grad = _sign_split_transpose(layer, x, s_pos * (1 + g) + s_neg,
                                         s_pos + s_neg * (1 + g))
        out = Propagated(grad=grad)
        b_p = layer.bias_term("gamma_pos", z, g)  # b + g b+
        b_n = layer.bias_term("gamma_neg", z, g)  # b + g b-
        if b_p is not None and self.bias == "distribute":
            shares = s_pos * b_p if s_neg is None else s_pos * b_p + s_neg * b_n
            out.relevance = _distribute(layer, x, shares)
        if tally is not None:
            stab = s_pos * (p_den - p)
            bias = s_pos * b_p if (b_p is not None and self.bias == "absorb") else None
            if s_neg is not None:
                stab = stab + s_neg * (n_den - n)
                if bias is not None:
                    bias = bias + s_neg * b_n
            tally.add(bias=bias, stabilizer=stab)
        return out

    def describe(self) -> str:
        return f"gamma({self.gamma:g})"


@dataclass(frozen=True)
class Flat(Rule):
    """Flat: all weights taken as 1, no bias; relevance spread evenly over connected inputs."""

    epsilon: float = 1e-6
    name = "flat"

    def backward(self, layer, x, z, state, incoming, tally):
        d = layer.fan_in(x)
        den = stabilize(d, self.epsilon)
        s = incoming.relevance() / den
        if tally is not None:
            tally.add(stabilizer=s * (den - d))
        return Propagated(relevance=layer.t(s, "ones", x))


@dataclass(frozen=True)
class WSquare(Rule):
    """w-square: R_i = sum_j w_ij^2 R_j / sum_i' w_i'j^2 (input values ignored)."""

    epsilon: float = 1e-6
    name = "wsquare"

    def backward(self, layer, x, z, state, incoming, tally):
        ones = torch.ones_like(x)
        d = layer.apply(ones, "square")
        b2 = layer.bias_term("square", z)
        if b2 is not None and self.bias != "ignore":
            d = d + b2
        den = stabilize(d, self.epsilon)
        s = incoming.relevance() / den
        out = Propagated(relevance=layer.t(s, "square", x))
        if b2 is not None and self.bias == "distribute":
            out.relevance = out.relevance + _distribute(layer, x, s * b2)
        if tally is not None:
            bias = s * b2 if (b2 is not None and self.bias == "absorb") else None
            tally.add(bias=bias, stabilizer=s * (den - d))
        return out


def _three_transposes(layer: BoundLayer, s: Tensor, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """W^T s, W+^T s, W-^T s; one call with the weights stacked where the kernel allows."""
    kernel = layer.kernel
    stackable = isinstance(kernel, LinearKernel) or (
        isinstance(kernel, ConvKernel) and kernel.groups == 1)
    if not stackable:
        return layer.t(s, "plain", x), layer.t(s, "pos", x), layer.t(s, "neg", x)
    cache = layer.weights.extra
    if "stacked" not in cache:
        w = layer.weights
        cache["stacked"] = torch.cat([w.weight("plain"), w.weight("pos"), w.weight("neg")], 1)
    dim = x.dim() - 1 if isinstance(kernel, LinearKernel) else 1
    shape = list(x.shape)
    shape[dim] *= 3
    out = kernel.transpose(s, cache["stacked"], torch.Size(shape))
    return out.chunk(3, dim=dim)


def check_bounds(low: float | Tensor, high: float | Tensor) -> None:
    """Refuse z-box bounds with low > high anywhere (floats or tensors, elementwise)."""
    for name, v in (("low", low), ("high", high)):
        if not (isinstance(v, Tensor) or is_number(v)):
            raise CompositeError(f"ZBox: {name}={v!r}: the bound must be a number or a tensor")
    lo = torch.as_tensor(low).detach()
    hi = torch.as_tensor(high).detach().to(lo.device)
    try:
        bad = ~(lo <= hi)  # NaN bounds count as bad too
    except RuntimeError as exc:
        raise CompositeError(f"ZBox: low= of shape {tuple(lo.shape)} and high= of shape "
                             f"{tuple(hi.shape)} do not broadcast together") from exc
    if bad.any():
        where = tuple(int(i) for i in bad.nonzero()[0]) if bad.dim() else ()
        lo_b, hi_b = torch.broadcast_tensors(lo, hi)
        at = f" at index {where}" if where else ""
        raise CompositeError(
            f"ZBox: low > high{at} (low={lo_b[where].item():g}, high={hi_b[where].item():g}, "
            f"{int(bad.sum())} of {bad.numel()} positions): low= and high= are the smallest and "
            "largest value each input can take, so low <= high everywhere")


@dataclass(frozen=True, eq=False)
class ZBox(Rule):
    """z-box (z^B) for bounded inputs low <= x <= high, meant for the input layer."""

    low: float | Tensor = 0.0
    high: float | Tensor = 1.0
    epsilon: float = 1e-6
    name = "zbox"
    uses_output = False

    def __post_init__(self) -> None:
        super().__post_init__()
        check_bounds(self.low, self.high)

    def _bounds(self, x: Tensor) -> tuple[Tensor, Tensor]:
        for name, v in (("low", self.low), ("high", self.high)):
            if isinstance(v, Tensor) and v.dim() == x.dim() and v.shape[0] not in (1, x.shape[0]):
                raise InputError(
                    f"z-box bound {name}= holds {v.shape[0]} samples but the batch has "
                    f"{x.shape[0]} (with batch_size=, per-sample bounds do not split): give "
                    f"bounds of shape {(1, *v.shape[1:])} or explain the batch in one call")
        low = torch.as_tensor(self.low, dtype=x.dtype, device=x.device)
        high = torch.as_tensor(self.high, dtype=x.dtype, device=x.device)
        return (torch.broadcast_to(low, x.shape).contiguous(),
                torch.broadcast_to(high, x.shape).contiguous())

    def forward(self, layer, x):
        z = layer.apply(x, "plain", "plain")
        # b + W+ low + W- high depends only on the shape and the weights: computed once,
        # for one sample unless the bounds differ between samples
        per_sample = any(isinstance(v, Tensor) and v.dim() == x.dim() and v.shape[0] > 1
                         for v in (self.low, self.high))
        shape = tuple(x.shape) if per_sample else (1, *x.shape[1:])
        key = ("zbox", shape, x.dtype, id(self))
        cache = layer.weights.extra
        if key not in cache:
            low, high = self._bounds(x.new_empty(shape))
            shift = layer.apply(low, "pos") + layer.apply(high, "neg")
            b = layer.bias_term("plain", z)
            cache[key] = shift if b is None else shift + b
        d = z - cache[key]  # the bias cancels in z-box
        # backward needs only z / stab(d) (d itself only for the ledger's stabilizer share);
        # with the ReLU after the layer fused in, relevance arrives as c * relu(z)
        if layer.recording:
            return z, (z / stabilize(d, self.epsilon), d)
        # stab(d) = (|d| + eps) * sign(d), in one buffer (these are the largest maps)
        den = d.abs().add_(self.epsilon or TINY).copysign_(d)
        del d
        if layer.relu_after:
            z = z.relu_()
        return z, (torch.div(z, den, out=den),)

    def backward(self, layer, x, z, state, incoming, tally):
        ratio = state[0]
        if not incoming.plain and layer.recording:  # d kept: exact also where z = 0
            s = incoming.relevance() / stabilize(state[1], self.epsilon)
        elif not incoming.plain:
            s = incoming.relevance() * (ratio / z.where(z != 0, 1.0))
        else:
            s = incoming.grad * ratio  # R / stab(d) = c * z / stab(d)
        low, high = self._bounds(x)
        t_plain, t_pos, t_neg = _three_transposes(layer, s, x)
        r = x * t_plain - low * t_pos - high * t_neg
        if tally is not None:
            d = state[1]
            tally.add(stabilizer=s * (stabilize(d, self.epsilon) - d))
        return Propagated(relevance=r)

    def describe(self) -> str:
        low = self.low if isinstance(self.low, float | int) else "tensor"
        high = self.high if isinstance(self.high, float | int) else "tensor"
        return f"zbox({low}, {high})"
