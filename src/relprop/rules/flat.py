"""The flat rule."""

from __future__ import annotations

from dataclasses import dataclass

from ..layers import Modifier
from .base import Propagated, Rule, stabilize


@dataclass(frozen=True)
class Flat(Rule):
    """Flat: all weights taken as 1, no bias; relevance spread evenly over connected inputs."""

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
