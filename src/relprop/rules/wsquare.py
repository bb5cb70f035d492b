"""The w-square rule."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..layers import Modifier
from .base import BoundLayer, Propagated, Rule, activate, distribute, stabilize


@dataclass(frozen=True)
class WSquare(Rule):
    """w-square: R_i = sum_j w_ij^2 R_j / sum_i' w_i'j^2 (input values ignored).

    Relevance not proportional to x, handed to the input's shadow (relprop.shadow).
    The denominator d = sum_i' w_i'j^2 (+ b_j^2 unless the bias is ignored) depends
    on the input's shape alone: computed once per shape, for one sample.

    Fused form (bias absorbed or ignored, any activation after it): one factor
    f = y / stab(d), saved; R_x = (W^2)^T (c f), returned to `relprop.shadow.functions.ToShadow`,
    which hands it to the input's shadow. Convolutions: 1 forward (W), 1 transposed
    (W^2): the gradient's count. Where the layer's output carries a shadow itself
    (relevance may arrive there directly), the general form runs.
    """

    epsilon: float = 1e-6
    name = "wsquare"

    @property
    def hands_out_directly(self) -> bool:
        return True

    def _squares(self, layer: BoundLayer, x: Tensor) -> Tensor:
        """sum_i w_ij^2 for one sample, bias not included."""
        return layer.per_shape(("wsquare",), x, lambda ones: layer.apply(ones, Modifier.SQUARE))

    def backward(self, layer, x, z, state, incoming, tally):
        d = self._squares(layer, x)
        b2 = layer.bias_term(Modifier.SQUARE, z)
        if b2 is not None and self.bias != "ignore":
            d = d + b2
        den = stabilize(d, self.epsilon)
        s = incoming.relevance() / den
        out = Propagated(relevance=layer.t(s, Modifier.SQUARE, x))
        if b2 is not None and self.bias == "distribute":
            out.relevance = out.relevance + distribute(layer, x, s * b2)
        if tally is not None:
            bias = s * b2 if (b2 is not None and self.bias == "absorb") else None
            tally.add(bias=bias, stabilizer=s * (den - d))
        return out

    def fusable(self, nonneg_input):
        return self.bias != "distribute"

    def fused_forward(self, ctx, layer, x, z, act):
        d = self._squares(layer, x)
        b2 = layer.bias_term(Modifier.SQUARE, d)
        if b2 is not None and self.bias == "absorb":
            d = d + b2
        y = activate(z, act)
        ctx.save_for_backward(torch.div(y, stabilize(d, self.epsilon)))
        return y

    def fused_backward(self, ctx, grad):
        return ctx.layer.t(grad * ctx.saved_tensors[0], Modifier.SQUARE, ctx.shape)
