"""The fast path for a dense/conv layer followed by a ReLU (most layers of most CNNs).

With the ReLU folded into the layer, the relevance rule needs one element-wise
factor per output, computed in the forward pass and saved instead of the
activations a plain gradient would keep:

    a = relu(z)                       (what the network computes)
    f = a / stab(D)                   (D: the rule's denominator, > 0 wherever a > 0)
    backward:  c_x = W_rule^T (c_a * f)

which is exact because relevance at the layer's output is R = c_a * a and is
zero wherever z <= 0. Per rule (input x >= 0 for the sign-splitting rules):
epsilon D = z + eps; z-plus D = W+ x + b+ + eps; gamma D = (W + g W+) x + b +
g b+ + eps, W_rule = W + g W+; alpha-beta two factors for W+ and W-. Cost: the
plain gradient's convolutions plus one forward convolution for z-plus and
gamma (two transposed convolutions for alpha-beta), two element-wise passes,
and no extra saved tensors.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .layers import ConvKernel
from .rules import AlphaBeta, BoundLayer, Epsilon, Gamma, Rule


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


class FusedReluLayer(torch.autograd.Function):
    """relu(W x + b) whose backward is the layer's LRP rule (see module docstring)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, layer: BoundLayer, rule: Rule) -> Tensor:  # type: ignore[override]
        z = layer.apply(x, "plain", "plain")
        a = z.relu_()
        ctx.shape, ctx.layer, ctx.rule = x.shape, layer, rule
        if isinstance(rule, Epsilon):
            f = a / (a + rule.epsilon)
            ctx.save_for_backward(f)
        elif isinstance(rule, Gamma):  # D = (W + g W+) x + b + g b+ + eps: eps rides the bias
            d = _shifted(layer, x, "gamma_pos", rule.epsilon, rule.gamma)
            ctx.save_for_backward(torch.div(a, d, out=d))
        elif rule.beta == 0:  # z-plus: D = W+ x + b+ + eps
            d = _shifted(layer, x, "pos", rule.epsilon)
            f = torch.div(a, d, out=d)
            ctx.save_for_backward(f.mul_(rule.alpha) if rule.alpha != 1 else f)
        else:  # alpha-beta: P = W+ x + b+ > 0, N = z - P <= 0 where a > 0
            p = _shifted(layer, x, "pos", rule.epsilon)  # P + eps
            # a - (P + eps) = N - eps = stab(N) for N < 0; at N == 0 every negative
            # contribution x_i w_ij- is zero, so that output's share is zero either way
            n = torch.sub(a, p)
            f_neg = torch.div(a, n, out=n)
            f_pos = torch.div(a, p, out=p)
            if rule.beta != 1:
                f_neg.mul_(rule.beta)
            if rule.alpha != 1:
                f_pos.mul_(rule.alpha)
            ctx.save_for_backward(f_pos, f_neg)
        return a

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None, None]:
        layer: BoundLayer = ctx.layer
        rule = ctx.rule
        if isinstance(rule, Epsilon):
            (f,) = ctx.saved_tensors
            return layer.t(grad * f, "plain", ctx.shape), None, None
        if isinstance(rule, Gamma):
            (f,) = ctx.saved_tensors
            return layer.t(grad * f, "gamma_pos", ctx.shape, rule.gamma), None, None
        if rule.beta == 0:
            (f,) = ctx.saved_tensors
            return layer.t(grad * f, "pos", ctx.shape), None, None
        f_pos, f_neg = ctx.saved_tensors
        kernel = layer.kernel
        if isinstance(kernel, ConvKernel) and kernel.groups == 1:
            # W+^T g+ - W-^T g- as one transposed convolution over stacked channels
            cache = layer.weights.extra
            if "pos_neg" not in cache:
                w = layer.weights
                cache["pos_neg"] = torch.cat([w.weight("pos"), -w.weight("neg")], 0)
            g = torch.cat([grad * f_pos, grad * f_neg], 1)
            return kernel.transpose(g, cache["pos_neg"], ctx.shape), None, None
        return (layer.t(grad * f_pos, "pos", ctx.shape)
                - layer.t(grad * f_neg, "neg", ctx.shape)), None, None
