"""The gate at a conditioned layer: an identity in the forward pass whose backward hands
on the gradient as the concept of each row asks (masked to its features, or projected
onto its direction), set anew before every backward pass over the kept graph.

Autograd carries c = R / a, so masking c along the feature axis masks the relevance
there: this is CRP's condition. Program.run(conditions=...) puts a gate on each
conditioned step's value (and on its shadow, where it has one).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .sites import ConceptError, Site, feature_axis


class _Gate(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, t: Tensor, gate: SiteGate) -> Tensor:  # type: ignore[override]
        ctx.gate = gate
        return t.view_as(t)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return ctx.gate.transform(grad), None


class SiteGate:
    """One conditioned step: what it computed (`value`, `shadow`), what its consumers read
    (`wrapped`, `wrapped_shadow`) and the transform its backward applies (none: identity;
    `rows` (R, C): one concept per batch row; `zero`: nothing passes)."""

    def __init__(self, site: Site) -> None:
        self.site = site
        self.value: Tensor | None = None
        self.wrapped: Tensor | None = None
        self.shadow: Tensor | None = None
        self.wrapped_shadow: Tensor | None = None
        self.axis = 1
        self.rows: Tensor | None = None
        self.directions: Tensor | None = None  # (R,) bool: rows that are directions
        self.zero = False

    def __call__(self, value: Any, shadow: Any) -> tuple[Any, Any]:
        if not isinstance(value, Tensor) or not value.requires_grad:
            raise ConceptError(f"{self.site.key!r} ({self.site.name}) computes "
                               f"{type(value).__name__} that carries no relevance; name a "
                               "layer whose output is a tensor the prediction depends on")
        self.axis = feature_axis(self.site, value)
        self.value = value
        self.wrapped = _Gate.apply(value, self)
        if isinstance(shadow, Tensor):
            self.shadow = shadow
            self.wrapped_shadow = _Gate.apply(shadow, self)
            return self.wrapped, self.wrapped_shadow
        return self.wrapped, shadow

    @property
    def width(self) -> int:
        assert self.value is not None
        return self.value.shape[self.axis]

    @property
    def outputs(self) -> list[Tensor]:
        """What the consumers read: the value, and the shadow where there is one."""
        return [t for t in (self.wrapped, self.wrapped_shadow) if t is not None]

    def set(self, rows: Tensor | None, directions: Tensor | None = None,
            zero: bool = False) -> None:
        self.rows, self.directions, self.zero = rows, directions, zero

    def clear(self) -> None:
        self.set(None)

    def transform(self, g: Tensor) -> Tensor:
        """The gradient a row's concept lets through."""
        if self.zero:
            return torch.zeros_like(g)
        if self.rows is None:
            return g
        if g.shape[0] != self.rows.shape[0]:
            raise ConceptError(f"{self.site.key!r}: its value has {g.shape[0]} rows, expected "
                               f"the batch ({self.rows.shape[0]}) first")
        shape = [1] * g.dim()
        shape[0], shape[self.axis] = g.shape[0], g.shape[self.axis]
        v = self.rows.to(g.dtype).view(shape)
        masked = g * v
        if self.directions is None or not bool(self.directions.any()):
            return masked
        projected = masked.sum(self.axis, keepdim=True) * v
        if bool(self.directions.all()):
            return projected
        which = self.directions.view([-1] + [1] * (g.dim() - 1))
        return torch.where(which, projected, masked)

    def relevance(self, c: list[Tensor | None]) -> Tensor:
        """Per row, the relevance the rows' concepts take at this step, from the gradients
        `c` that arrive at the value (and shadow): value * transform(c) (+ shadow's)."""
        assert self.value is not None
        rows = self.value.shape[0]
        r = (self.value.detach() * self.transform(c[0])).reshape(rows, -1).sum(1) \
            if c[0] is not None else torch.zeros(rows, dtype=self.value.dtype,
                                                  device=self.value.device)
        if len(c) > 1 and c[1] is not None:
            r = r + self.transform(c[1]).reshape(rows, -1).sum(1)
        return r

    def per_feature(self, c: list[Tensor | None]) -> Tensor:
        """(rows, C): the relevance at this step summed over all but the feature axis."""
        assert self.value is not None
        r = self.value.detach() * c[0] if c[0] is not None else torch.zeros_like(self.value)
        if len(c) > 1 and c[1] is not None:
            r = r + c[1]
        r = r.movedim(self.axis, 1)
        return r.reshape(r.shape[0], r.shape[1], -1).sum(-1)
