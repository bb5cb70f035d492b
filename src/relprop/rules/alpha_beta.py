"""LRP-alpha-beta and z-plus (alpha = 1, beta = 0)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..errors import CompositeError
from ..layers import Modifier
from .base import TINY, activate, is_number, stabilize
from .signsplit import (
    Side,
    SignSplitRule,
    select,
    shifted,
    sign_split_transpose,
    split_positive,
    transposes,
)


def _scaled_ratio(y: Tensor, d: Tensor, scale: float) -> Tensor:
    """scale * y / d into d, in one pass (addcdiv onto a zero scalar)."""
    if scale == 1:
        return torch.div(y, d, out=d)
    return torch.addcdiv(d.new_zeros(()), y, d, value=scale, out=d)


@dataclass(frozen=True)
class AlphaBeta(SignSplitRule):
    """LRP-alpha-beta (alpha - beta = 1): positive and negative contributions apart.

    Fused form (bias absorbed; any activation after it), in gradient form with
    P = W+ x+ + W- x- + b+ and N = z - P <= 0 (the bias's negative part included):
    factors f+ = alpha y / (P + eps) and f- = beta y / (eps - N), eps riding in a
    cached bias, eps - N kept >= eps. Per layer, beside the plain forward W x:

    - inputs x >= 0 (after a ReLU): P = W+ x + b+. Convolutions: forward 1 (W+),
      transposed 2 (z-plus: 1): c_x = W+^T (c f+) + W-^T (c f-). Saved: f+ and f-
      (z-plus: f+). Element-wise: forward 1 division per factor (alpha-beta also
      P - z and its clamp); backward 1 multiply per factor (alpha-beta: 1 add).
    - inputs of either sign (SiLU, hardswish, gates, residual sums, the image): the
      sign split is kept. The identity (x w)+ = (x w + |x| |w|) / 2 would meet
      s = R / (P + eps) or R / (eps - N), as large as R / eps where P or N is 0,
      with weights whose terms cancel only after rounding (iNNvestigate's oracle
      caught it); the split meets it only with weights that are exactly 0.
      P from [x+, x-] against [W+, W-] (`split_positive`); both sides' sums
      c_x+ = W+^T (c f+) + W-^T (c f-), c_x- = W-^T (c f+) + W+^T (c f-), and the
      one on x's side picked exactly (`select`: lerp with the 0/1 mask [x > 0]).
      Where groups == 1 (dense, 1x1 and full convolutions) W+ and W- run stacked,
      one call over twice the channels: forward 1 call, transposed 1 call per
      factor (z-plus 1, alpha-beta 2). Grouped and depthwise convolutions run
      them apart (forward 2, transposed 2 per factor): a call with two parts per
      group is slower on CPU. Saved: f+, f- (z-plus: f+) and the mask. Element-
      wise: forward 2 clamps and the mask, then as above; backward as above
      plus 1 lerp (alpha-beta: 2 adds).
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
        return self.answer(layer, x, sign_split_transpose(layer, x, a, neg), tally,
                           Side(a, bp, p, p_den), None if neg is None else Side(neg, bn, n, n_den))

    def fused_forward(self, ctx, layer, x, z, act):
        ctx.signed = not layer.nonneg_input
        eps = self.epsilon or TINY  # as `stabilize`: epsilon=0 still never divides by 0
        if ctx.signed:
            p, mask = split_positive(layer, x, eps)  # P + eps
        else:
            p = shifted(layer, x, Modifier.POS, eps)  # P + eps
        y = activate(z, act)
        factors = []
        if self.beta != 0:
            # (P + eps) - z = eps - N = -stab(N) for N < 0, kept >= eps: where N == 0 the
            # computed difference can be 0 (eps below P's last digit), and there every
            # negative contribution x_i w_ij- is zero, so that output's share is zero anyway
            d = torch.sub(p, z).clamp_(min=eps)
            factors.append(_scaled_ratio(y, d, self.beta))
        f_pos = _scaled_ratio(y, p, self.alpha)
        ctx.save_for_backward(f_pos, *factors, *([mask] if ctx.signed else []))
        return y

    def fused_backward(self, ctx, grad):
        layer, shape, saved = ctx.layer, ctx.shape, ctx.saved_tensors
        f_pos = saved[0]
        f_neg = saved[1] if self.beta != 0 else None
        if not ctx.signed:
            out = layer.t(grad * f_pos, Modifier.POS, shape)
            if f_neg is None:  # z-plus
                return out
            return out.add_(layer.t(grad * f_neg, Modifier.NEG, shape))
        sides = (Modifier.POS, Modifier.NEG)
        c_pos, c_neg = transposes(layer, grad * f_pos, shape, sides)  # W+^T u, W-^T u
        if f_neg is not None:
            v_pos, v_neg = transposes(layer, grad * f_neg, shape, sides)
            c_pos = c_pos.add_(v_neg)
            c_neg = c_neg.add_(v_pos)
        return select(saved[-1], c_pos, c_neg)

    def describe(self) -> str:
        if self.alpha == 1 and self.beta == 0:
            return "zplus"
        return f"alpha{self.alpha:g}_beta{self.beta:g}"


@dataclass(frozen=True)
class ZPlus(AlphaBeta):
    """z-plus: alpha-beta with alpha=1, beta=0 (positive contributions only); its fused
    form is AlphaBeta's with the factor f+ alone."""

    alpha: float = field(default=1.0, init=False)
    beta: float = field(default=0.0, init=False)
