"""The w-square rule."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..layers import Modifier
from .base import Propagated, Rule, distribute, stabilize


@dataclass(frozen=True)
class WSquare(Rule):
    """w-square: R_i = sum_j w_ij^2 R_j / sum_i' w_i'j^2 (input values ignored)."""

    epsilon: float = 1e-6
    name = "wsquare"

    @property
    def hands_out_directly(self) -> bool:
        return True

    def backward(self, layer, x, z, state, incoming, tally):
        ones = torch.ones_like(x)
        d = layer.apply(ones, Modifier.SQUARE)
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
