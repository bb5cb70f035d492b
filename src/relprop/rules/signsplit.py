"""What the sign-split rules share (alpha-beta, z-plus, gamma): positive and negative
contributions apart, in the general form and in the fused forms' numerics.

`SignSplitRule` is their common base: the forward keeps the positive contributions,
the fused form needs the bias absorbed, and the backward ends in `answer` (bias
distribution and the ledger's tally for both sides). The functions below compute
P = W+ x+ + W- x- (+ b+) and the transposes W+^T, W-^T: one call over stacked
weights where the kernel allows it (`stacks`), the side picked exactly by a 0/1
mask (`select`), eps folded into a cached bias (`shifted`), so it costs no pass
(z-box runs its three weights through `transposes` too).

Element-wise work in the fused forms avoids torch.where and multiplies by boolean
tensors (several times slower than float arithmetic on CPU) and buffers twice an
output's size where it can: those cross glibc's mmap threshold (32 MB) on large
layers, and a fresh mapping's page faults on every call cost more than a second
transposed call.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..layers import ConvKernel, Kernel, LinearKernel, Modifier
from .base import BoundLayer, Propagated, Rule, Tally, distribute


@dataclass
class Side:
    """One side of a two-sided rule: s = R / den (times its weight), its bias part b,
    and its denominator d before and den after the stabilizer."""

    s: Tensor
    b: Tensor | None
    d: Tensor
    den: Tensor


@dataclass(frozen=True)
class SignSplitRule(Rule):
    """A rule that weighs a layer's positive and negative contributions apart."""

    def forward(self, layer, x):
        return layer.apply(x, Modifier.PLAIN, Modifier.PLAIN), (positive_contributions(layer, x),)

    def fusable(self, nonneg_input):
        return self.bias == "absorb"

    def answer(self, layer: BoundLayer, x: Tensor, grad: Tensor, tally: Tally | None,
               pos: Side, neg: Side | None) -> Propagated:
        """c_x = `grad`, with the bias distribution and the ledger's shares of both sides:
        the distributed bias as relevance (mode "distribute"), and in `tally` what the
        bias (mode "absorb") and the stabilizer took."""
        out = Propagated(grad=grad)
        if pos.b is not None and self.bias == "distribute":
            shares = pos.s * pos.b if neg is None else pos.s * pos.b + neg.s * neg.b
            out.relevance = distribute(layer, x, shares)
        if tally is not None:
            stab = pos.s * (pos.den - pos.d)
            bias = pos.s * pos.b if (pos.b is not None and self.bias == "absorb") else None
            if neg is not None:
                stab = stab + neg.s * (neg.den - neg.d)
                if bias is not None:
                    bias = bias + neg.s * neg.b
            tally.add(bias=bias, stabilizer=stab)
        return out


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
