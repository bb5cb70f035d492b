"""What a condition asks for: which concepts, at which layers, as one map each.

`{"features.28": [3, 7, 11]}` asks for three maps, one per channel; a dict with several
layers asks for every combination (`{"features.28": [3], "features.21": [40, 41]}`: two
maps). A list of dicts asks for one map per dict, each layer's entry a single concept
(several channel ids are one concept: their union), as zennit-crp's conditions.

A concept is a set of features along a layer's feature axis (a mask: channels, neurons, an
attention head's slice) or a direction (relevance projected onto a unit vector: a CAV, a
sparse-autoencoder feature). Sets are resolved once the layer's width is known.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .sites import ConceptError


@dataclass(frozen=True)
class Row:
    """One concept at one layer: a 0/1 mask or a unit direction over the features."""

    kind: str  # "mask" or "direction"
    vector: Tensor  # (C,)
    label: str


class ConceptSet:
    """Concepts at one layer; `rows(C)` lists them once the width C is known."""

    def rows(self, width: int, dtype: torch.dtype, device: torch.device) -> list[Row]:
        raise NotImplementedError

    def count(self) -> int | None:
        """How many concepts, where known before the layer's width is."""
        return None


class Channels(ConceptSet):
    """Channels of a convolution, neurons of a dense layer: ids, or every one ("all")."""

    def __init__(self, ids: Sequence[int] | str) -> None:
        if isinstance(ids, str):
            if ids != "all":
                raise ConceptError(f"concepts {ids!r}: give channel ids, 'all', a (K, C) "
                                   "tensor of directions or relprop.concepts.heads(...)")
            self.ids: tuple[int, ...] | None = None
        else:
            self.ids = tuple(_as_int(i) for i in ids)
            if not self.ids:
                raise ConceptError("an empty list of concepts")

    def count(self) -> int | None:
        return None if self.ids is None else len(self.ids)

    def rows(self, width: int, dtype: torch.dtype, device: torch.device) -> list[Row]:
        ids = range(width) if self.ids is None else self.ids
        out = []
        for i in ids:
            if not -width <= i < width:
                raise ConceptError(f"channel {i} does not exist: the layer has {width}")
            v = torch.zeros(width, dtype=dtype, device=device)
            v[i] = 1
            out.append(Row("mask", v, str(i % width)))
        return out


class Heads(ConceptSet):
    """Attention heads: the features split into `n` equal consecutive slices (the heads
    of an attention output before its output projection)."""

    def __init__(self, n: int, which: Sequence[int] | None = None) -> None:
        self.n = _as_int(n)
        if self.n < 1:
            raise ConceptError(f"heads({n}): the number of heads must be positive")
        self.which = None if which is None else tuple(_as_int(h) for h in which)

    def count(self) -> int | None:
        return self.n if self.which is None else len(self.which)

    def rows(self, width: int, dtype: torch.dtype, device: torch.device) -> list[Row]:
        if width % self.n:
            raise ConceptError(f"{width} features do not split into {self.n} heads")
        size = width // self.n
        out = []
        for h in range(self.n) if self.which is None else self.which:
            if not 0 <= h < self.n:
                raise ConceptError(f"head {h} does not exist: there are {self.n}")
            v = torch.zeros(width, dtype=dtype, device=device)
            v[h * size:(h + 1) * size] = 1
            out.append(Row("mask", v, f"head {h}"))
        return out


class Directions(ConceptSet):
    """Directions in a layer's feature space, (K, C) or (C,): each row is normalised, and
    the concept's relevance is the part of the gradient along it (c -> u u^T c), so that
    an orthonormal basis splits relevance exactly."""

    def __init__(self, matrix: Tensor, labels: Sequence[str] | None = None) -> None:
        m = torch.as_tensor(matrix)
        if m.dim() == 1:
            m = m[None]
        if m.dim() != 2 or not m.is_floating_point():
            raise ConceptError(f"directions must be a float (K, C) matrix, got "
                               f"{tuple(m.shape)} {m.dtype}")
        norms = m.norm(dim=1)
        if (norms == 0).any():
            raise ConceptError(f"direction {int((norms == 0).nonzero()[0])} is zero")
        self.matrix = m / norms[:, None]
        self.labels = list(labels) if labels is not None else [f"direction {k}" for k in
                                                                 range(len(m))]

    def count(self) -> int | None:
        return len(self.matrix)

    def rows(self, width: int, dtype: torch.dtype, device: torch.device) -> list[Row]:
        if self.matrix.shape[1] != width:
            raise ConceptError(f"directions have {self.matrix.shape[1]} features, the layer "
                               f"{width}")
        m = self.matrix.to(dtype=dtype, device=device)
        return [Row("direction", m[k], self.labels[k]) for k in range(len(m))]


def heads(n: int, which: Sequence[int] | None = None) -> Heads:
    """The attention heads of an attention output (before its output projection): all `n`,
    or those listed. Use with the `:input` of `o_proj` (LLaMA) or `out_proj`."""
    return Heads(n, which)


def directions(matrix: Tensor, labels: Sequence[str] | None = None) -> Directions:
    """User directions (K, C): CAVs, sparse-autoencoder decoder rows, a basis."""
    return Directions(matrix, labels)


def as_set(value: Any) -> ConceptSet:
    """A condition's entry for one layer as a ConceptSet."""
    if isinstance(value, ConceptSet):
        return value
    if isinstance(value, Tensor):
        if value.is_floating_point():
            return Directions(value)
        if value.dtype == torch.bool:
            raise ConceptError("boolean masks: give channel ids, or relprop.concepts.heads()")
        return Channels(value.reshape(-1).tolist())
    if isinstance(value, str):
        return Channels(value)
    if isinstance(value, int):
        return Channels([value])
    if isinstance(value, Sequence):
        return Channels(value)
    raise ConceptError(f"cannot read {value!r} as concepts: give channel ids, 'all', a "
                       "(K, C) tensor of directions or relprop.concepts.heads(...)")


@dataclass
class Condition:
    """A parsed condition: `parts` (layer -> concepts), `joint` (list form: one map per
    dict) or not (dict form: every combination)."""

    parts: list[dict[str, ConceptSet]]
    joint: bool

    @classmethod
    def parse(cls, condition: Any) -> Condition:
        if isinstance(condition, Condition):
            return condition
        if isinstance(condition, Mapping):
            if not condition:
                raise ConceptError("an empty condition")
            return cls([{str(k): as_set(v) for k, v in condition.items()}], joint=False)
        if isinstance(condition, Sequence) and not isinstance(condition, str) and condition \
                and all(isinstance(c, Mapping) and c for c in condition):
            return cls([{str(k): as_set(v) for k, v in c.items()} for c in condition],
                       joint=True)
        raise ConceptError(f"condition={condition!r}: give a dict {{layer: concepts}} or a "
                           "list of such dicts (one map each)")

    @property
    def keys(self) -> list[str]:
        return list(dict.fromkeys(k for part in self.parts for k in part))

    def maps(self, widths: Mapping[str, int], dtype: torch.dtype,
             device: torch.device) -> list[dict[str, Row]]:
        """One dict (layer -> Row) per map, in order."""
        if not self.joint:
            part = self.parts[0]
            rows = [part[k].rows(widths[k], dtype, device) for k in part]
            return [dict(zip(part, combo, strict=True)) for combo in itertools.product(*rows)]
        return [{k: _union(k, s.rows(widths[k], dtype, device)) for k, s in part.items()}
                for part in self.parts]


def _union(key: str, rows: list[Row]) -> Row:
    """Several concepts of one layer in a joint condition: one concept, their union."""
    if len(rows) == 1:
        return rows[0]
    if any(r.kind != "mask" for r in rows):
        raise ConceptError(f"{key!r}: a joint condition takes one direction per layer")
    v = torch.stack([r.vector for r in rows]).amax(0)
    return Row("mask", v, "+".join(r.label for r in rows))


def _as_int(i: Any) -> int:
    if isinstance(i, bool) or not isinstance(i, int | torch.Tensor):
        try:
            import numpy as np

            if isinstance(i, np.integer):
                return int(i)
        except ImportError:  # pragma: no cover
            pass
        raise ConceptError(f"concept id {i!r} is not an integer")
    return int(i)
