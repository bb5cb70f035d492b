"""The shadow channel's autograd Functions: where relevance moves between the
gradient-form channel (c = R / a) and the shadow (relevance itself)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ..rules import safe_divide, stabilize


class ShadowIdentity(torch.autograd.Function):
    """y = f(x) element-wise with the identity rule R_x = R_y, on both channels.

    Relevance at y is c_y * y plus what arrived on y's shadow. It moves to x
    in gradient form where x != 0 and on x's shadow where x == 0 (sigmoid(0),
    or a ReLU whose pre-activation is exactly 0), so none of it is lost.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, shadow: Tensor | None,  # type: ignore[override]
                fn: Callable[[Tensor], Tensor], port: bool) -> Any:
        y = fn(x)
        ctx.save_for_backward(x, y)
        ctx.has_shadow = shadow is not None
        ctx.set_materialize_grads(False)
        return (y, y.new_zeros(y.shape)) if port else y

    @staticmethod
    def backward(ctx: Any, grad: Tensor | None,
                 direct: Tensor | None = None) -> tuple[Tensor | None, ...]:
        x, y = ctx.saved_tensors
        r = grad * y if grad is not None else torch.zeros_like(y)
        if direct is not None:
            r = r + direct
        zero = x == 0
        grad_x = safe_divide(r, x)
        grad_shadow = torch.where(zero, r, 0.0) if ctx.has_shadow else None
        return grad_x, grad_shadow, None, None


class ShadowSum(torch.autograd.Function):
    """Marks z = sum of parts (x + y, sum, mean, average pooling) on both channels.

    Relevance at z (c_z * z plus the shadow's) is split in proportion to the
    parts: c = R / stab(z) flows back through the sum's own gradient. Where z
    is exactly 0 the proportions are undefined; there the shadow's relevance
    is split equally among the contributing parts: `parts` is the sum applied
    to the parts' shadows, `count` the sum applied to ones (the number of
    contributors), and the sum's gradient then hands each part R / count.
    """

    @staticmethod
    def forward(ctx: Any, z: Tensor, parts: Tensor, count: Tensor,  # type: ignore[override]
                epsilon: float, port: bool) -> Any:
        ctx.save_for_backward(z, count)
        ctx.epsilon = epsilon
        ctx.set_materialize_grads(False)
        out = z.view_as(z)
        return (out, z.new_zeros(z.shape)) if port else out

    @staticmethod
    def backward(ctx: Any, grad: Tensor | None,
                 direct: Tensor | None = None) -> tuple[Tensor | None, ...]:
        z, count = ctx.saved_tensors
        r = grad * z if grad is not None else torch.zeros_like(z)
        if direct is not None:
            r = r + direct
        zero = z == 0
        grad_z = torch.where(zero, 0.0, r / stabilize(z, ctx.epsilon))
        grad_parts = None
        if direct is not None:
            grad_parts = torch.where(zero & (count != 0), direct / count.where(count != 0, 1.0),
                                     0.0)
        return grad_z, grad_parts, None, None, None


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
