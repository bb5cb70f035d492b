"""Normalisation layers: LayerNorm with its standard deviation held constant.

RMSNorm (x * rsqrt(mean(x^2) + eps) * w) needs no class of its own: its normaliser
is held constant where the graph is built (relprop.passes.transformer marks it),
which leaves a product of x with constants, explained by the plain gradient.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .base import Tally, stabilize


class LayerNormRule(torch.autograd.Function):
    """LayerNorm with the standard deviation held constant (Ali et al. 2022's LN rule).

    y = gamma * (x - mean(x)) / std + beta. Per feature, the affine part takes
    the epsilon rule (beta absorbs its share); the centering x - mean(x) is a
    linear map without bias and takes LRP-0, which conserves relevance. In
    gradient form: c_x = (u - mean(u)) / std with u = gamma * c_y * y / stab(y).
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, shape: Any, weight: Tensor | None,  # type: ignore[override]
                bias: Tensor | None, eps: float, epsilon: float, tally: Tally | None) -> Tensor:
        y = torch.nn.functional.layer_norm(x, shape, weight, bias, eps)
        ctx.save_for_backward(x, y, weight, bias)
        ctx.tally = tally
        ctx.eps, ctx.epsilon, ctx.ndim = eps, epsilon, len(shape) if not isinstance(
            shape, int) else 1
        return y

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, y, weight, bias = ctx.saved_tensors
        dims = tuple(range(-ctx.ndim, 0))
        var = x.var(dim=dims, unbiased=False, keepdim=True)
        rstd = torch.rsqrt(var + ctx.eps)
        den = stabilize(y, ctx.epsilon)
        s = grad * y / den  # R_y / stab(y)
        if ctx.tally is not None:
            ctx.tally.add(bias=s * bias if bias is not None else None, stabilizer=s * (den - y))
        u = s * weight if weight is not None else s
        return (u - u.mean(dim=dims, keepdim=True)) * rstd, None, None, None, None, None, None
