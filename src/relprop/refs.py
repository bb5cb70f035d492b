"""References from a step's arguments to earlier steps' values, and the one walker that
replaces them (by their values, by their shadows, by anything)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Ref:
    """The value of step `index` (stands for an fx.Node in a step's arguments)."""

    index: int


def map_refs(value: Any, fn: Callable[[Ref], Any]) -> Any:
    """`value` (nested tuples, lists, dicts, slices) with every Ref replaced by fn(ref)."""
    if isinstance(value, Ref):
        return fn(value)
    if isinstance(value, tuple | list):
        return type(value)(map_refs(v, fn) for v in value)
    if isinstance(value, dict):
        return {k: map_refs(v, fn) for k, v in value.items()}
    if isinstance(value, slice):
        return slice(map_refs(value.start, fn), map_refs(value.stop, fn),
                     map_refs(value.step, fn))
    return value


def refs_in(value: Any) -> list[Ref]:
    """Every Ref in `value`, in order."""
    found: list[Ref] = []
    map_refs(value, lambda r: found.append(r) or r)
    return found
