"""One step of a program: a node of the rewritten graph with everything the
interpreter needs to run it, fixed when the program is built (immutable)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import fx

from ..ops import Kind
from ..rules import RecurrentRule, Rule
from ..shadow import Role


@dataclass(frozen=True)
class Step:
    """One node of the rewritten graph."""

    node: fx.Node
    op: str  # fx op: placeholder, get_attr, call_function, call_method, output
    kind: Kind | None  # rule family for input-dependent nodes, None otherwise
    call: Callable[..., Any] | None
    args: Any  # with relprop.refs.Ref for the values of earlier steps
    kwargs: Any
    dynamic: bool
    rule: Rule | RecurrentRule | None = None
    role: Role | None = None  # how the step carries the shadow channel (relprop.shadow)
    producer: bool = False  # hands relevance to its input's shadow
    shadow_out: bool = False  # a consumer wants this step's shadow
    fast: Callable[..., Any] | None = None  # its fused form (relprop.program.fusion)
    frees: tuple[int, ...] = ()  # values no later step reads (dropped when not recording)
    # names a half-precision dtype (a traced cast): computed in float32, it casts to that
    half_literal: bool = False

    @property
    def name(self) -> str:
        return self.node.name
