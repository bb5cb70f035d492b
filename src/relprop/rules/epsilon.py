"""LRP-epsilon and LRP-0.

A composite (relprop.composites) gives a layer its Epsilon; rules/base.py runs it:
`LayerRuleFunction` calls `forward` and `backward` (the general form, with a ledger or
a filter), `FusedLayer` calls `fused_forward` and `fused_backward` (the fast form).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..layers import Modifier
from .base import RELU, Propagated, Rule, activate, distribute, stabilize


@dataclass(frozen=True)
class Epsilon(Rule):
    """LRP-epsilon: R_i = x_i sum_j w_ij R_j / stab(z_j).

    Fused form (any activation after it, inputs of any sign): f = y / stab(z),
    c_x = W^T (c f); after a ReLU, stab(z) = z + eps where y != 0.
    """

    epsilon: float = 1e-6
    name = "epsilon"

    @property
    def is_plain_gradient(self) -> bool:
        """LRP-0 with the bias absorbed is the layer's own gradient, exactly."""
        return self.epsilon == 0 and self.bias == "absorb"

    def forward(self, layer, x):
        if self.bias != "ignore" or layer.weights.b is None:
            return super().forward(layer, x)
        # the denominator W x computed, not z - b: where |b| >> |W x| the subtraction
        # would lose the digits the rule divides by
        zw = layer.apply(x, Modifier.PLAIN)
        return zw + layer.bias_term(Modifier.PLAIN, zw), (zw,)

    def backward(self, layer, x, z, state, incoming, tally):
        b = layer.bias_term(Modifier.PLAIN, z)
        if self.epsilon == 0 and incoming.plain and (b is None or self.bias != "ignore"):
            # LRP-0 without stabilizer: R_z / z = c_z exactly, the plain gradient.
            s = incoming.grad
            if tally is not None and b is not None and self.bias == "absorb":
                tally.add(bias=s * b)
            out = Propagated(grad=layer.t(s, Modifier.PLAIN, x))
            if self.bias == "distribute" and b is not None:
                out.relevance = distribute(layer, x, s * b)
            return out
        eps = self.epsilon
        d = state[0] if state else (z - b if (b is not None and self.bias == "ignore") else z)
        den = stabilize(d, eps)
        s = incoming.relevance() / den
        out = Propagated(grad=layer.t(s, Modifier.PLAIN, x))
        if b is not None and self.bias == "distribute":
            out.relevance = distribute(layer, x, s * b)
        if tally is not None:
            tally.add(bias=s * b if (b is not None and self.bias == "absorb") else None,
                      stabilizer=s * (den - d))
        return out

    def fusable(self, nonneg_input):
        return self.bias == "absorb" and self.epsilon > 0

    def fused_forward(self, ctx, layer, x, z, act):
        y = activate(z, act)  # after a ReLU, z is relu(z) as well
        d = z + self.epsilon if act == RELU else stabilize(z, self.epsilon)
        ctx.save_for_backward(torch.div(y, d, out=d))
        return y

    def fused_backward(self, ctx, grad):
        return ctx.layer.t(grad * ctx.saved_tensors[0], Modifier.PLAIN, ctx.shape)

    def describe(self) -> str:
        return "lrp0" if self.epsilon == 0 else f"epsilon({self.epsilon:g})"


@dataclass(frozen=True)
class LRP0(Epsilon):
    """LRP-0: epsilon with no stabilizer (on ReLU networks: gradient x input)."""

    epsilon: float = field(default=0.0, init=False)
