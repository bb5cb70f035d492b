"""The fast path: a dense/conv layer, optionally with the activation after it, as one
autograd Function that saves per-output factors instead of activations.

Relevance at the layer's output is R = c * y, where y = act(z) is what the
network passes on (y = z without an activation) and c what autograd carries;
an identity-rule activation hands R on unchanged, so the layer's rule sees R
at z. Every fusable rule then reads

    c_x = sum_k W_k^T (c * f_k)        (one or two modified weights W_k)

with factors f_k = y * [sign gate] / stab(D_k) computed in the forward pass.
Per rule (sign-splitting rules need inputs x >= 0, e.g. after a ReLU):

- epsilon: f = y / stab(z), W = W.
- z-plus / alpha-beta: P = W+ x + b+ (> 0 after +eps), N = z - P (<= 0);
  f+ = alpha y / (P + eps) with W+, f- = beta y / (N - eps) with W-.
- gamma: P = (W + g W+) x + b + g b+ and N = (W + g W-) x + b + g b- =
  (2 + g) z - P, so one extra forward convolution gives both; f+ = y / (P + eps)
  where z > 0 with W + g W+, f- = y / (N - eps) where z < 0 with W + g W-.
  After a ReLU the z < 0 half carries no relevance and is skipped.

The eps of the positive denominators rides in a cached bias, so it costs no
pass. Cost: the plain gradient's convolutions, one extra forward convolution for
z-plus/alpha-beta/gamma, a second transposed convolution where two weights are
needed, a few element-wise passes, and one saved factor per output (gamma on
signed outputs adds a boolean sign mask; alpha-beta keeps two factors).

Two transposed calls rather than one over outputs stacked with the weights:
the stacked buffer, twice an output's size, crosses glibc's mmap threshold
(32 MB) on large layers, and a fresh mapping's page faults on every call cost
more than the second call.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .rules import AlphaBeta, BoundLayer, Epsilon, Gamma, Rule, stabilize

# What follows the layer: nothing, a ReLU (z <= 0 carries no relevance), or an
# element-wise activation with act(0) = 0 whose rule passes relevance unchanged.
Activation = Callable[[Tensor], Tensor] | str | None
RELU = "relu"


def fusable(rule: Rule, nonneg_input: bool) -> bool:
    """Rules the fast path computes exactly (bias absorbed, no filter)."""
    if rule.bias != "absorb":
        return False
    if isinstance(rule, Epsilon):
        return rule.epsilon > 0
    if isinstance(rule, Gamma | AlphaBeta):
        return nonneg_input
    return False


def _shifted(layer: BoundLayer, x: Tensor, mod: str, eps: float, gamma: float = 0.0) -> Tensor:
    """The modified layer's output plus eps, with eps folded into the (cached) bias."""
    key = ("shifted", mod, gamma, eps)
    cache = layer.weights.extra
    if key not in cache:
        b = layer.weights.bias(mod, gamma)
        w = layer.weights.weight(mod, gamma)
        out_features = w.shape[0]
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
        if relu:
            y = z = z.relu_()  # the sign tests below read z > 0 from y > 0
        else:
            y = z if act is None else act(z)  # type: ignore[operator]
        ctx.shape, ctx.layer, ctx.rule, ctx.signed = x.shape, layer, rule, not relu
        if isinstance(rule, Epsilon):
            d = z + rule.epsilon if relu else stabilize(z, rule.epsilon)
            ctx.save_for_backward(torch.div(y, d, out=d))
        elif isinstance(rule, Gamma):
            p = _shifted(layer, x, "gamma_pos", rule.epsilon, rule.gamma)  # P + eps
            if relu:
                ctx.save_for_backward(torch.div(y, p, out=p))
            else:
                # one factor: y / (P + eps) where z > 0, y / (eps - N) elsewhere, with
                # eps - N = (P + eps) - (2 + g) z > 0 wherever z < 0 (at z = 0, y = 0);
                # the negative side's sign is restored in the backward pass
                positive = z > 0
                d = torch.where(positive, p, torch.sub(p, z, alpha=2 + rule.gamma))
                ctx.save_for_backward(torch.div(y, d, out=d), positive)
        else:  # alpha-beta (z-plus: beta = 0)
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
            ctx.save_for_backward(f_pos, *([] if f_neg is None else [f_neg]))
        return y

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None, None, None]:
        layer: BoundLayer = ctx.layer
        rule = ctx.rule
        shape = ctx.shape
        saved = ctx.saved_tensors
        if isinstance(rule, Epsilon):
            return layer.t(grad * saved[0], "plain", shape), None, None, None
        if isinstance(rule, Gamma):
            g = rule.gamma
            if not ctx.signed:
                return layer.t(grad * saved[0], "gamma_pos", shape, g), None, None, None
            f, positive = saved
            c = grad * f
            c_pos = c * positive
            c_neg = c.sub_(c_pos)  # exact: c_pos is c or 0
            out = layer.t(c_pos, "gamma_pos", shape, g)
            return out.sub_(layer.t(c_neg, "gamma_neg", shape, g)), None, None, None
        if len(saved) == 1:  # z-plus
            return layer.t(grad * saved[0], "pos", shape), None, None, None
        f_pos, f_neg = saved
        out = layer.t(grad * f_pos, "pos", shape)
        return out.sub_(layer.t(grad * f_neg, "neg", shape)), None, None, None


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
