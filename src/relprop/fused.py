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
        elif isinstance(rule, Gamma):
            d = layer.apply(x, "gamma_pos", "gamma_pos", rule.gamma).add_(rule.epsilon)
            ctx.save_for_backward(torch.div(a, d, out=d))
        elif rule.beta == 0:  # z-plus
            d = layer.apply(x, "pos", "pos").add_(rule.epsilon)
            f = torch.div(a, d, out=d)
            ctx.save_for_backward(f.mul_(rule.alpha) if rule.alpha != 1 else f)
        else:  # alpha-beta: N = z - P <= 0 with x >= 0
            p = layer.apply(x, "pos", "pos")
            n = (a - p).where(a > 0, torch.zeros((), dtype=a.dtype))  # z - P where a > 0
            n = torch.where(n >= 0, n + rule.epsilon, n - rule.epsilon)
            f_neg = a / n * rule.beta
            f_pos = a / p.add_(rule.epsilon) * rule.alpha
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
        return (layer.t(grad * f_pos, "pos", ctx.shape)
                - layer.t(grad * f_neg, "neg", ctx.shape)), None, None
