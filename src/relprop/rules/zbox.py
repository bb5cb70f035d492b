"""The z-box rule (z^B) for the input layer, with bounded inputs."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import CompositeError, InputError
from ..layers import Modifier
from .base import TINY, Propagated, Rule, is_number, stabilize
from .signsplit import transposes


def check_bounds(low: float | Tensor, high: float | Tensor) -> None:
    """Refuse z-box bounds with low > high anywhere (floats or tensors, elementwise)."""
    for name, v in (("low", low), ("high", high)):
        if not (isinstance(v, Tensor) or is_number(v)):
            raise CompositeError(f"ZBox: {name}={v!r}: the bound must be a number or a tensor")
    lo = torch.as_tensor(low).detach()
    hi = torch.as_tensor(high).detach().to(lo.device)
    try:
        bad = ~(lo <= hi)  # NaN bounds count as bad too
    except RuntimeError as exc:
        raise CompositeError(f"ZBox: low= of shape {tuple(lo.shape)} and high= of shape "
                             f"{tuple(hi.shape)} do not broadcast together") from exc
    if bad.any():
        where = tuple(int(i) for i in bad.nonzero()[0]) if bad.dim() else ()
        lo_b, hi_b = torch.broadcast_tensors(lo, hi)
        at = f" at index {where}" if where else ""
        raise CompositeError(
            f"ZBox: low > high{at} (low={lo_b[where].item():g}, high={hi_b[where].item():g}, "
            f"{int(bad.sum())} of {bad.numel()} positions): low= and high= are the smallest and "
            "largest value each input can take, so low <= high everywhere")


@dataclass(frozen=True, eq=False)
class ZBox(Rule):
    """z-box (z^B) for bounded inputs low <= x <= high, meant for the input layer.

    Its relevance is x g_x - low g_low - high g_high, not proportional to x: it hands
    relevance out directly. Its ReLU after it can run inside it (`BoundLayer.relu_after`).
    """

    low: float | Tensor = 0.0
    high: float | Tensor = 1.0
    epsilon: float = 1e-6
    name = "zbox"
    uses_output = False
    takes_relu_inside = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_bounds(self.low, self.high)

    @property
    def hands_out_directly(self) -> bool:
        return True

    def _bounds(self, x: Tensor) -> tuple[Tensor, Tensor]:
        for name, v in (("low", self.low), ("high", self.high)):
            if isinstance(v, Tensor) and v.dim() == x.dim() and v.shape[0] not in (1, x.shape[0]):
                raise InputError(
                    f"z-box bound {name}= holds {v.shape[0]} samples but the batch has "
                    f"{x.shape[0]} (with batch_size=, per-sample bounds do not split): give "
                    f"bounds of shape {(1, *v.shape[1:])} or explain the batch in one call")
        low = torch.as_tensor(self.low, dtype=x.dtype, device=x.device)
        high = torch.as_tensor(self.high, dtype=x.dtype, device=x.device)
        return (torch.broadcast_to(low, x.shape).contiguous(),
                torch.broadcast_to(high, x.shape).contiguous())

    def forward(self, layer, x):
        z = layer.apply(x, Modifier.PLAIN, Modifier.PLAIN)
        # b + W+ low + W- high depends only on the shape and the weights: computed once,
        # for one sample unless the bounds differ between samples
        per_sample = any(isinstance(v, Tensor) and v.dim() == x.dim() and v.shape[0] > 1
                         for v in (self.low, self.high))
        shape = tuple(x.shape) if per_sample else (1, *x.shape[1:])
        key = ("zbox", shape, x.dtype, id(self))
        cache = layer.weights.extra
        if key not in cache:
            low, high = self._bounds(x.new_empty(shape))
            shift = layer.apply(low, Modifier.POS) + layer.apply(high, Modifier.NEG)
            b = layer.bias_term(Modifier.PLAIN, z)
            cache[key] = shift if b is None else shift + b
        d = z - cache[key]  # the bias cancels in z-box
        # backward needs only z / stab(d) (d itself only for the ledger's stabilizer share);
        # with the ReLU after the layer fused in, relevance arrives as c * relu(z)
        if layer.recording:
            return z, (z / stabilize(d, self.epsilon), d)
        # stab(d) = (|d| + eps) * sign(d), in one buffer (these are the largest maps)
        den = d.abs().add_(self.epsilon or TINY).copysign_(d)
        del d
        if layer.relu_after:
            z = z.relu_()
        return z, (torch.div(z, den, out=den),)

    def backward(self, layer, x, z, state, incoming, tally):
        ratio = state[0]
        if not incoming.plain and layer.recording:  # d kept: exact also where z = 0
            s = incoming.relevance() / stabilize(state[1], self.epsilon)
        elif not incoming.plain:
            s = incoming.relevance() * (ratio / z.where(z != 0, 1.0))
        else:
            s = incoming.grad * ratio  # R / stab(d) = c * z / stab(d)
        low, high = self._bounds(x)
        t_plain, t_pos, t_neg = transposes(layer, s, x.shape,
                                           (Modifier.PLAIN, Modifier.POS, Modifier.NEG))
        r = x * t_plain - low * t_pos - high * t_neg
        if tally is not None:
            d = state[1]
            tally.add(stabilizer=s * (stabilize(d, self.epsilon) - d))
        return Propagated(relevance=r)

    def describe(self) -> str:
        low = self.low if isinstance(self.low, float | int) else "tensor"
        high = self.high if isinstance(self.high, float | int) else "tensor"
        return f"zbox({low}, {high})"
