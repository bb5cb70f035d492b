"""Custom autograd Functions: the same forward value, the rule's backward.

Autograd carries c = R / a (relevance divided by the activation), so that
relevance at any tensor a is a * grad(a), and operations whose rule is the
gradient itself (ReLU, max pooling, reshapes, concatenation, scaling by a
constant) need nothing special. The Functions below are the places where the
rule differs from the gradient.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .rules import BoundLayer, Incoming, Rule, Tally, safe_divide, stabilize


class LayerRuleFunction(torch.autograd.Function):
    """A linear-like layer whose backward is an LRP rule.

    Gradient form (R = x * c) cannot carry relevance to an input whose value
    is 0, and some rules hand relevance out regardless of the input's value
    (z-box, flat, w-square, bias distribution). That relevance travels on the
    *shadow* channel (relprop.shadow): `shadow` is the input's shadow tensor,
    whose gradient receives it as relevance, not divided by anything. Without
    a shadow it is converted to R / x, losing what lands on zeros (the ledger
    shows it). With `port=True` the layer returns (z, shadow of z) and
    relevance arriving on that shadow joins c_z * z before the rule applies.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: Tensor, shadow: Tensor | None, layer: BoundLayer, rule: Rule,
        tally: Tally | None, port: bool,
    ) -> Tensor | tuple[Tensor, Tensor]:
        z, state = rule.forward(layer, x)
        # z-box keeps z / stab(d) instead of z: z itself only for the ledger, a filter or a port
        keep_z = rule.uses_output or tally is not None or layer.top_k is not None or port
        ctx.save_for_backward(x, z if keep_z else None, *state)
        ctx.layer, ctx.rule, ctx.tally, ctx.has_shadow = layer, rule, tally, shadow is not None
        ctx.set_materialize_grads(False)
        if port:
            return z, z.new_zeros(z.shape)
        return z  # a rule that honours layer.relu_after returns relu(z)

    @staticmethod
    def backward(ctx: Any, grad: Tensor | None,
                 direct: Tensor | None = None) -> tuple[Tensor | None, ...]:
        x, z, *state = ctx.saved_tensors
        layer: BoundLayer = ctx.layer
        if grad is None:
            grad = torch.zeros_like(z if z is not None else state[0])
        incoming = Incoming(grad=grad, z=z, top_k=layer.top_k, direct=direct)
        out = ctx.rule.backward(layer, x, z, tuple(state), incoming, ctx.tally)
        grad_x, grad_shadow = out.grad, None
        if out.relevance is not None:
            if ctx.has_shadow:
                grad_shadow = out.relevance
            else:
                lossy = safe_divide(out.relevance, x)
                grad_x = lossy if grad_x is None else grad_x + lossy
        return grad_x, grad_shadow, None, None, None, None


class StabilisedRatio(torch.autograd.Function):
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


class IdentityRule(torch.autograd.Function):
    """Element-wise non-linearity y = f(x) that passes relevance on unchanged: R_x = R_y.

    In gradient form c_x = c_y * f(x) / x, exact wherever x != 0 (where x = 0
    the input carries no relevance in gradient form, whatever c_x is).
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


class Tap(torch.autograd.Function):
    """Identity that stores the gradient passing through it (for recording relevance)."""

    @staticmethod
    def forward(ctx: Any, t: Tensor, store: dict, key: Any) -> Tensor:  # type: ignore[override]
        ctx.store, ctx.key = store, key
        return t.view_as(t)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        prev = ctx.store.get(ctx.key)
        ctx.store[ctx.key] = grad if prev is None else prev + grad
        return grad, None, None
