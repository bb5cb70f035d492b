"""The proportional rule at sums (x + y, sum, mean, average pooling): relevance split in
proportion to the parts, R_i = x_i * R_z / stab(z), with the composite's stabilizer.

The sum's own gradient already hands each part c_z, so in gradient form the rule is
one factor z / stab(z) after the sum (`StabilizedRatio`); `ProportionalRelu` is that
factor and the ReLU after the sum in one. With stabilizer 0 the rule is the plain
gradient and the program adds neither.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .base import stabilize


class StabilizedRatio(torch.autograd.Function):
    """Identity forward; backward multiplies by z / stab(z).

    Placed after a sum-like operation (x + y, sum, mean, average pooling) it
    turns the plain gradient into the proportional rule with stabilizer:
    R_i = x_i * R_z / stab(z).
    """

    @staticmethod
    def forward(ctx: Any, z: Tensor, epsilon: float) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(z)
        ctx.epsilon = epsilon
        return z.view_as(z)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None]:
        (z,) = ctx.saved_tensors
        return grad * z / stabilize(z, ctx.epsilon), None


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
