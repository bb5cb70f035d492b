"""Generalised LRP-gamma."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..layers import Modifier
from .base import RELU, TINY, activate, check_nonnegative, stabilize
from .signsplit import Side, SignSplitRule, shifted, sign_split_transpose


@dataclass(frozen=True)
class Gamma(SignSplitRule):
    """Generalised LRP-gamma: favour contributions with the sign of the output.

    Fused form (any activation after it, inputs of any sign): P = z + g (positive
    contributions + b+), N = z + g (negative ones + b-) and P + N = (2 + g) z, so
    one extra forward convolution gives both. One factor f = y / (P + eps) where
    z > 0, y / (eps - N) where z <= 0; fused activations preserve sign, so
    sign(f) = sign(z) says which side an output is on. After a ReLU on inputs
    x >= 0 the z <= 0 side carries no relevance: one weight, W + g W+. Otherwise
    (x w)+ = (x w + |x| |w|) / 2 turns the four sign combinations into W and |W|
    (see `_fused_abs_forward`).
    """

    gamma: float = 0.25
    epsilon: float = 1e-6
    name = "gamma"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_nonnegative("Gamma", "gamma", self.gamma,
                          "a negative gamma favours contributions against the output's sign, "
                          "the denominator can cross zero and relevance explodes")

    def backward(self, layer, x, z, state, incoming, tally):
        (zp,) = state
        g = self.gamma
        r = incoming.relevance()
        b = layer.bias_term(Modifier.PLAIN, z)
        absorb = self.bias != "ignore"
        zw = z if b is None else z - b
        # P = z + g * (positive contributions), N = z + g * (negative contributions).
        base = z if absorb else zw
        bp = layer.bias_term(Modifier.POS, z) if absorb else None
        p = base + g * (zp if bp is None else zp + bp)
        p_den = stabilize(p, self.epsilon)
        s_pos = r / p_den
        if not layer.positive_only:
            s_pos = torch.where(z > 0, s_pos, 0.0)
        if layer.positive_only and layer.nonneg_input:
            # Relevance is zero where z <= 0, inputs are >= 0: one modified transpose.
            grad = layer.t(s_pos, Modifier.GAMMA_POS, x, g)
            s_neg = None
        elif layer.positive_only:
            s_neg = None
            grad = sign_split_transpose(layer, x, s_pos * (1 + g), s_pos)
        else:
            bn = layer.bias_term(Modifier.NEG, z) if absorb else None
            n = base + g * ((zw - zp) if bn is None else (zw - zp) + bn)
            n_den = stabilize(n, self.epsilon)
            s_neg = torch.where(z < 0, r / n_den, 0.0)
            grad = sign_split_transpose(layer, x, s_pos * (1 + g) + s_neg,
                                        s_pos + s_neg * (1 + g))
        b_p = layer.bias_term(Modifier.GAMMA_POS, z, g)  # b + g b+
        b_n = layer.bias_term(Modifier.GAMMA_NEG, z, g)  # b + g b-
        return self.answer(layer, x, grad, tally, Side(s_pos, b_p, p, p_den),
                           None if s_neg is None else Side(s_neg, b_n, n, n_den))

    def fused_forward(self, ctx, layer, x, z, act):
        relu = act == RELU
        ctx.signed = not relu
        # after a ReLU on inputs >= 0: the one-weight form W + g W+
        ctx.gamma_abs = not (relu and layer.nonneg_input)
        if ctx.gamma_abs:
            return self._fused_abs_forward(ctx, layer, x, z, act)
        y = activate(z, act)  # relu(z), in place
        eps = self.epsilon or TINY  # as `stabilize`: epsilon=0 still never divides by 0
        p = shifted(layer, x, Modifier.GAMMA_POS, eps, self.gamma)  # P + eps >= z + eps
        # y = 0 where z <= 0; the clamp only keeps 0 / p from meeting p == 0 there
        ctx.save_for_backward(torch.div(y, p.clamp_(min=eps), out=p))
        return y

    def fused_backward(self, ctx, grad):
        if ctx.gamma_abs:
            return self._fused_abs_backward(ctx, grad)
        return ctx.layer.t(grad * ctx.saved_tensors[0], Modifier.GAMMA_POS, ctx.shape,
                           self.gamma)

    def _fused_abs_forward(self, ctx, layer, x, z, act):
        """Gamma where outputs or inputs take both signs, through W and |W| alone.

        With (x w)+ = (x w + |x| |w|) / 2 and b + g b+ = (1 + g/2) b + (g/2)|b|:
        P = (1 + g/2) (z + k (|W| |x| + |b|)) with k = g / (2 + g), and P + N = (2 + g) z.
        Everything below is divided by (1 + g/2): P' = z + k (|W| |x| + |b|), and the
        negative side's eps - N becomes P' + eps' - 2 z (eps' = eps / (1 + g/2)).
        One factor f = y / (P' + eps') where z > 0, y / (P' + eps' - 2 z) where z <= 0,
        whose sign is that of z (fused activations preserve sign; at z = 0, y = 0).
        Backward, from w+ = (w + |w|)/2 and w- = (w - |w|)/2:
        c_x = W^T (c |f|) + sign(x) k |W|^T (c f): two transposed convolutions, where
        the sign-split form needs four, and one cached weight, k |W|.
        """
        g = self.gamma
        eps = (self.epsilon or TINY) / (1 + g / 2)
        magnitude = x if layer.nonneg_input else x.abs()
        p = shifted(layer, magnitude, Modifier.GAMMA_ABS, eps, g).add_(z)  # P' + eps'
        if act == RELU:
            y = z.relu_()
            f = torch.div(y, p.clamp_(min=eps), out=p)  # y = 0 where z <= 0
        else:
            y = activate(z, act)
            f = torch.div(y, p.sub_(z.clamp(max=0), alpha=2), out=p)
        ctx.save_for_backward(f, *([] if layer.nonneg_input else [x > 0]))
        return y

    def _fused_abs_backward(self, ctx, grad):
        layer = ctx.layer
        saved = ctx.saved_tensors
        f = saved[0]
        u = grad * f  # sign(z) s, with s the relevance over its side's denominator
        s = grad * f.abs() if ctx.signed else u  # after a ReLU, z > 0 wherever s != 0
        out = layer.t(s, Modifier.PLAIN, ctx.shape)
        t = layer.t(u, Modifier.GAMMA_ABS, ctx.shape, self.gamma)
        if layer.nonneg_input:
            return out.add_(t)
        out.sub_(t)  # out + sign(x) t = out - t + 2 [x > 0] t, without a select
        return out.add_(t.mul_(saved[1]), alpha=2)

    def describe(self) -> str:
        return f"gamma({self.gamma:g})"
