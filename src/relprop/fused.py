"""The fast path: a dense/conv layer, optionally with the activation after it, as one
autograd Function that saves per-output factors instead of activations.

Relevance at the layer's output is R = c * y, where y = act(z) is what the
network passes on (y = z without an activation) and c what autograd carries;
an identity-rule activation hands R on unchanged, so the layer's rule sees R
at z. Every fusable rule then reads

    c_x = sum_k W_k^T (c * f_k)        (one or two modified weights W_k)

with factors f_k = y / D_k computed in the forward pass. Each rule owns its
fused form (`Rule.fusable`, `fused_forward`, `fused_backward` in relprop.rules;
the factors per rule are in each rule's docstring); `FusedLayer` only runs it.

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

from .layers import Modifier
from .rules import RELU, Activation, BoundLayer, Rule

__all__ = ["RELU", "Activation", "FusedLayer", "LeanMaxPool", "ProportionalRelu"]


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
