"""The flat rule."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..layers import Modifier
from .base import BoundLayer, Propagated, Rule, activate, stabilize


@dataclass(frozen=True)
class Flat(Rule):
    """Flat: all weights taken as 1, no bias; relevance spread evenly over connected inputs.

    R_x = 1^T (R / stab(n)), n the fan-in: relevance not proportional to x, handed to
    the input's shadow (relprop.shadow). n depends on the input's shape alone and is
    computed once per shape, for one sample (`BoundLayer.fan_in`), not every call.

    Fused form (any bias mode, any activation after it, inputs of any sign): one
    factor f = y / stab(n), saved; R_x = 1^T (c f), returned to `relprop.shadow.functions.ToShadow`,
    which hands it to the input's shadow. Convolutions: 1 forward (W), 1 transposed
    (all-ones weight): the gradient's count. Where the layer's output carries a
    shadow itself (relevance may arrive there directly), the general form runs.
    """

    epsilon: float = 1e-6
    name = "flat"

    @property
    def hands_out_directly(self) -> bool:
        return True

    def backward(self, layer, x, z, state, incoming, tally):
        d = layer.fan_in(x)
        den = stabilize(d, self.epsilon)
        s = incoming.relevance() / den
        if tally is not None:
            tally.add(stabilizer=s * (den - d))
        return Propagated(relevance=layer.t(s, Modifier.ONES, x))

    def fusable(self, nonneg_input):
        return True

    def _denominator(self, layer: BoundLayer, x: torch.Tensor) -> torch.Tensor:
        return stabilize(layer.fan_in(x), self.epsilon)  # one sample's map: cheap

    def fused_forward(self, ctx, layer, x, z, act):
        y = activate(z, act)
        ctx.save_for_backward(torch.div(y, self._denominator(layer, x)))
        return y

    def fused_backward(self, ctx, grad):
        return ctx.layer.t(grad * ctx.saved_tensors[0], Modifier.ONES, ctx.shape)
