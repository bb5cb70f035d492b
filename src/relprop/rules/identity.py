"""The identity rule for element-wise non-linearities (GELU, SiLU, tanh, sigmoid, ...):
relevance passes on unchanged, R_x = R_y (registry family "identity")."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .base import safe_divide


class IdentityRule(torch.autograd.Function):
    """Element-wise non-linearity y = f(x) that passes relevance on unchanged: R_x = R_y.

    In gradient form c_x = c_y * f(x) / x, exact wherever x != 0 (where x = 0
    the input carries no relevance in gradient form, whatever c_x is; the shadow
    channel's ShadowIdentity carries it there).
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, fn: Callable[[Tensor], Tensor]) -> Tensor:  # type: ignore[override]
        y = fn(x)
        ctx.save_for_backward(x, y)
        return y

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None]:
        x, y = ctx.saved_tensors
        return grad * safe_divide(y, x), None
