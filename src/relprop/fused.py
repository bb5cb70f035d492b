"""The fast path: a dense/conv layer, optionally with the activation after it, as one
autograd Function that saves per-output factors instead of activations.

Relevance at the layer's output is R = c * y, where y = act(z) is what the
network passes on (y = z without an activation) and c what autograd carries;
an identity-rule activation hands R on unchanged, so the layer's rule sees R
at z. Every fusable rule then reads

    c_x = sum_k W_k^T (c * f_k)        (one or two modified weights W_k)

with factors f_k = y / D_k computed in the forward pass; on inputs of either
sign, alpha-beta and z-plus make both sides' sums and pick the one on x's side.
Rules that hand relevance out directly (flat, w-square) return R_x itself,
which `ToShadow` routes to the input's shadow (relprop.shadow). Each rule owns
its fused form (`Rule.fusable`, `fused_forward`, `fused_backward` in
relprop.rules; what each saves and how many convolutions it makes is in each
rule's docstring); `FusedLayer` only runs it.

The eps of the positive denominators rides in a cached bias, so it costs no
pass. Element-wise work avoids torch.where and multiplies by boolean tensors
(several times slower than float arithmetic on CPU) and buffers twice an
output's size where it can: those cross glibc's mmap threshold (32 MB) on large
layers, and a fresh mapping's page faults on every call cost more than a second
transposed call.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .layers import Modifier
from .rules import RELU, Activation, BoundLayer, Rule

__all__ = ["RELU", "Activation", "FusedLayer", "LeanMaxPool", "ProportionalRelu", "ToShadow",
           "fused_direct"]


class FusedLayer(torch.autograd.Function):
    """y = act(W x + b) whose backward is the layer's LRP rule in its fused form."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, layer: BoundLayer, rule: Rule,  # type: ignore[override]
                act: Activation) -> Tensor:
        z = layer.apply(x, Modifier.PLAIN, Modifier.PLAIN)
        ctx.shape, ctx.layer, ctx.rule = x.shape, layer, rule
        return rule.fused_forward(ctx, layer, x, z, act)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None, None, None]:
        return ctx.rule.fused_backward(ctx, grad), None, None, None


class ToShadow(torch.autograd.Function):
    """x unchanged. What arrives in its backward is relevance, not c_x (the fused form of
    a rule that hands relevance out directly returns R_x): it goes to x's shadow, whose
    gradient is relevance itself (relprop.shadow), and none goes to x."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, shadow: Tensor) -> Tensor:  # type: ignore[override]
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, relevance: Tensor) -> tuple[None, Tensor]:
        return None, relevance


def fused_direct(general: Callable[..., Any], fused: Callable[..., Tensor], x: Tensor,
                 *args: Any, shadow: Tensor | None = None, port: bool = False,
                 **kwargs: Any) -> Any:
    """The fast path of a rule that hands relevance out directly (flat, w-square): its
    fused form, the relevance routed through `ToShadow` to the input's shadow. Without a
    shadow (relevance would be divided by x), or as a port (relevance may arrive on the
    output's shadow), the general form `general` runs."""
    if shadow is None or port:
        return general(x, *args, shadow=shadow, port=port, **kwargs)
    return fused(ToShadow.apply(x, shadow), *args, **kwargs)


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
