"""LRP-alpha-beta and z-plus (alpha = 1, beta = 0)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..errors import CompositeError
from ..layers import Modifier
from .base import (
    Propagated,
    Rule,
    Side,
    activate,
    bias_and_tally,
    is_number,
    positive_contributions,
    shifted,
    sign_split_transpose,
    stabilize,
)


@dataclass(frozen=True)
class AlphaBeta(Rule):
    """LRP-alpha-beta (alpha - beta = 1): positive and negative contributions apart.

    Fused form (inputs x >= 0 only: on signed inputs only the sign-split form keeps
    every digit): P = W+ x + b+, N = z - P <= 0; f+ = alpha y / (P + eps) with W+,
    f- = beta y / (N - eps) with W-; c_x = W+^T (c f+) - W-^T (c f-).
    """

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
        return layer.apply(x, Modifier.PLAIN, Modifier.PLAIN), (positive_contributions(layer, x),)

    def backward(self, layer, x, z, state, incoming, tally):
        (zp,) = state
        r = incoming.relevance()
        b = layer.bias_term(Modifier.PLAIN, z)
        bp = layer.bias_term(Modifier.POS, z)
        bn = layer.bias_term(Modifier.NEG, z)
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
        out = Propagated(grad=sign_split_transpose(layer, x, a, neg))
        bias_and_tally(layer, x, out, tally, self.bias, Side(a, bp, p, p_den),
                       None if neg is None else Side(neg, bn, n, n_den))
        return out

    def fusable(self, nonneg_input):
        return self.bias == "absorb" and nonneg_input

    def fused_forward(self, ctx, layer, x, z, act):
        y = activate(z, act)
        p = shifted(layer, x, Modifier.POS, self.epsilon)  # P + eps
        f_neg = None
        if self.beta != 0:
            # z - (P + eps) = N - eps = stab(N) for N < 0; at N == 0 every negative
            # contribution x_i w_ij- is zero, so that output's share is zero either way
            n = torch.sub(z, p)
            f_neg = torch.div(y, n, out=n)
            if self.beta != 1:
                f_neg.mul_(self.beta)
        f_pos = torch.div(y, p, out=p)
        if self.alpha != 1:
            f_pos.mul_(self.alpha)
        ctx.save_for_backward(*((f_pos,) if f_neg is None else (f_pos, f_neg)))
        return y

    def fused_backward(self, ctx, grad):
        layer, shape, saved = ctx.layer, ctx.shape, ctx.saved_tensors
        if len(saved) == 1:  # z-plus
            return layer.t(grad * saved[0], Modifier.POS, shape)
        f_pos, f_neg = saved
        out = layer.t(grad * f_pos, Modifier.POS, shape)
        return out.sub_(layer.t(grad * f_neg, Modifier.NEG, shape))

    def describe(self) -> str:
        if self.alpha == 1 and self.beta == 0:
            return "zplus"
        return f"alpha{self.alpha:g}_beta{self.beta:g}"


@dataclass(frozen=True)
class ZPlus(AlphaBeta):
    """z-plus: alpha-beta with alpha=1, beta=0 (positive contributions only)."""

    alpha: float = field(default=1.0, init=False)
    beta: float = field(default=0.0, init=False)
