"""The fast path: a dense/conv layer, optionally with the activation after it, as one
autograd Function that saves per-output factors instead of activations.

Relevance at the layer's output is R = c * y, where y = act(z) is what the
network passes on (y = z without an activation) and c what autograd carries;
an identity-rule activation hands R on unchanged, so the layer's rule sees R
at z. Every fusable rule then reads

    c_x = sum_k W_k^T (c * f_k)        (one or two modified weights W_k)

with factors f_k = y / D_k computed in the forward pass. Per rule:

- epsilon: f = y / stab(z), W = W.
- z-plus / alpha-beta (inputs x >= 0): P = W+ x + b+, N = z - P <= 0;
  f+ = alpha y / (P + eps) with W+, f- = beta y / (N - eps) with W-.
- gamma: P = z + g (positive contributions + b+), N = z + g (negative ones + b-)
  and P + N = (2 + g) z, so one extra forward convolution gives both. One
  factor f = y / (P + eps) where z > 0, y / (eps - N) where z <= 0; fused
  activations preserve sign, so sign(f) = sign(z) says which side an output is
  on. Inputs x >= 0: W + g W+ for the positive side, W + g W- for the negative.
  Inputs of both signs: (x w)+ = (x w + |x| |w|) / 2 turns the four sign
  combinations into W and |W| (see `_gamma_signed_input`). After a ReLU the
  z <= 0 side carries no relevance and is skipped.

The eps of the positive denominators rides in a cached bias, so it costs no
pass. Cost: the plain gradient's convolutions, one extra forward convolution for
z-plus/alpha-beta/gamma, a second transposed convolution where two weights are
needed, a few element-wise passes, one saved factor per output (alpha-beta:
two) and, for gamma on inputs of both signs, a boolean sign mask of the input.

Element-wise work avoids torch.where (several times slower than arithmetic on
CPU) and buffers twice an output's size: those cross glibc's mmap threshold
(32 MB) on large layers, and a fresh mapping's page faults on every call cost
more than a second transposed call.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .rules import AlphaBeta, BoundLayer, Epsilon, Gamma, Rule, stabilize

# What follows the layer: nothing, a ReLU (z <= 0 carries no relevance), or an
# identity-rule activation with act(0) = 0 that keeps the sign of its input
# (SiLU, GELU, ...: checked when the program is built).
Activation = Callable[[Tensor], Tensor] | str | None
RELU = "relu"


def fusable(rule: Rule, nonneg_input: bool) -> bool:
    """Rules the fast path computes exactly (bias absorbed, no filter). Alpha-beta
    needs inputs >= 0: on signed inputs only its sign-split form keeps every digit."""
    if rule.bias != "absorb":
        return False
    if isinstance(rule, Epsilon):
        return rule.epsilon > 0
    if isinstance(rule, Gamma):
        return True
    if isinstance(rule, AlphaBeta):
        return nonneg_input
    return False


def _shifted(layer: BoundLayer, x: Tensor, mod: str, eps: float, gamma: float = 0.0) -> Tensor:
    """The modified layer's output plus eps, with eps folded into the (cached) bias."""
    key = ("shifted", mod, gamma, eps)
    cache = layer.weights.extra
    if key not in cache:
        b = layer.weights.bias(mod, gamma)
        w = layer.weights.weight(mod, gamma)
        out_features = layer.kernel.out_channels(w)
        base = torch.zeros(out_features, dtype=w.dtype, device=w.device) if b is None else b
        cache[key] = base + eps
    return layer.kernel.forward(x, layer.weights.weight(mod, gamma), cache[key])


class FusedLayer(torch.autograd.Function):
    """y = act(W x + b) whose backward is the layer's LRP rule (see module docstring)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, layer: BoundLayer, rule: Rule,  # type: ignore[override]
                act: Activation) -> Tensor:
        z = layer.apply(x, "plain", "plain")
        relu = act == RELU
        ctx.shape, ctx.layer, ctx.rule, ctx.signed = x.shape, layer, rule, not relu
        # gamma after a ReLU on inputs >= 0 takes the one-weight form W + g W+
        ctx.gamma_abs = isinstance(rule, Gamma) and not (relu and layer.nonneg_input)
        if ctx.gamma_abs:
            return _gamma_abs_forward(ctx, x, z, layer, rule, act)
        if relu:
            y = z = z.relu_()
        else:
            y = z if act is None else act(z)  # type: ignore[operator]
        if isinstance(rule, Epsilon):
            d = z + rule.epsilon if relu else stabilize(z, rule.epsilon)
            ctx.save_for_backward(torch.div(y, d, out=d))
        elif isinstance(rule, Gamma):
            p = _shifted(layer, x, "gamma_pos", rule.epsilon, rule.gamma)  # P + eps >= z + eps
            # y = 0 where z <= 0; the clamp only keeps 0 / p from meeting p == 0 there
            ctx.save_for_backward(torch.div(y, p.clamp_(min=rule.epsilon), out=p))
        else:
            ctx.save_for_backward(*_alpha_beta_factors(layer, x, z, y, rule))
        return y

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None, None, None]:
        layer: BoundLayer = ctx.layer
        rule = ctx.rule
        shape = ctx.shape
        saved = ctx.saved_tensors
        if isinstance(rule, Epsilon):
            return layer.t(grad * saved[0], "plain", shape), None, None, None
        if ctx.gamma_abs:
            return _gamma_abs_backward(ctx, grad, saved), None, None, None
        if isinstance(rule, Gamma):
            return layer.t(grad * saved[0], "gamma_pos", shape, rule.gamma), None, None, None
        if len(saved) == 1:  # z-plus
            return layer.t(grad * saved[0], "pos", shape), None, None, None
        f_pos, f_neg = saved
        out = layer.t(grad * f_pos, "pos", shape)
        return out.sub_(layer.t(grad * f_neg, "neg", shape)), None, None, None


def _gamma_abs_forward(ctx: Any, x: Tensor, z: Tensor, layer: BoundLayer, rule: Gamma,
                       act: Activation) -> Tensor:
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
    g = rule.gamma
    eps = rule.epsilon / (1 + g / 2)
    magnitude = x if layer.nonneg_input else x.abs()
    p = _shifted(layer, magnitude, "gamma_abs", eps, g).add_(z)  # P' + eps'
    relu = act == RELU
    if relu:
        y = z.relu_()
        f = torch.div(y, p.clamp_(min=eps), out=p)  # y = 0 where z <= 0
    else:
        y = z if act is None else act(z)  # type: ignore[operator]
        f = torch.div(y, p.sub_(z.clamp(max=0), alpha=2), out=p)
    ctx.save_for_backward(f, *([] if layer.nonneg_input else [x > 0]))
    return y


def _gamma_abs_backward(ctx: Any, grad: Tensor, saved: tuple[Tensor, ...]) -> Tensor:
    layer: BoundLayer = ctx.layer
    f = saved[0]
    u = grad * f  # sign(z) s, with s the relevance over its side's denominator
    s = grad * f.abs() if ctx.signed else u  # after a ReLU, z > 0 wherever s != 0
    out = layer.t(s, "plain", ctx.shape)
    t = layer.t(u, "gamma_abs", ctx.shape, ctx.rule.gamma)
    if layer.nonneg_input:
        return out.add_(t)
    out.sub_(t)  # out + sign(x) t = out - t + 2 [x > 0] t, without a select
    return out.add_(t.mul_(saved[1]), alpha=2)


def _alpha_beta_factors(layer: BoundLayer, x: Tensor, z: Tensor, y: Tensor,
                        rule: AlphaBeta) -> tuple[Tensor, ...]:
    p = _shifted(layer, x, "pos", rule.epsilon)  # P + eps
    f_neg = None
    if rule.beta != 0:
        # z - (P + eps) = N - eps = stab(N) for N < 0; at N == 0 every negative
        # contribution x_i w_ij- is zero, so that output's share is zero either way
        n = torch.sub(z, p)
        f_neg = torch.div(y, n, out=n)
        if rule.beta != 1:
            f_neg.mul_(rule.beta)
    f_pos = torch.div(y, p, out=p)
    if rule.alpha != 1:
        f_pos.mul_(rule.alpha)
    return (f_pos,) if f_neg is None else (f_pos, f_neg)


class ProportionalRelu(torch.autograd.Function):
    """relu(z) for z a sum (x + y): the ReLU's gradient and the sum's proportional rule
    in one factor, relu(z) / (relu(z) + eps), saved instead of z and the ReLU's mask."""

    @staticmethod
    def forward(ctx: Any, z: Tensor, epsilon: float) -> Tensor:  # type: ignore[override]
        y = z.relu()
        d = y + epsilon
        ctx.save_for_backward(torch.div(y, d, out=d))
        return y

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        (f,) = ctx.saved_tensors
        return grad * f, None


class LeanMaxPool(torch.autograd.Function):
    """Max pooling whose backward keeps only the argmax positions, as int32.

    Autograd's own max pooling keeps its input and int64 indices: three times
    the input's size in float32. Relevance follows the gradient through max
    pooling, which needs only where each maximum came from.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, pool: Callable[[Tensor], tuple[Tensor, Tensor]],  # type: ignore[override]
                ndim: int) -> Tensor:
        y, index = pool(x)
        ctx.shape, ctx.ndim = x.shape, ndim
        small = math.prod(x.shape[-ndim:]) < 2**31  # indices count within one channel
        ctx.save_for_backward(index.to(torch.int32) if small else index)
        return y

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        (index,) = ctx.saved_tensors
        shape = ctx.shape
        lead = math.prod(shape[:-ctx.ndim])
        out = grad.new_zeros(lead, math.prod(shape[-ctx.ndim:]))
        # scatter_add, not max_unpool: overlapping windows can pick the same input twice
        out.scatter_add_(1, index.reshape(lead, -1).long(), grad.reshape(lead, -1))
        return out.view(shape), None, None
