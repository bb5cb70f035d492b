"""Which role each op plays on the shadow channel (`role`) and which values get a
shadow (`plan_shadows`), decided once per program."""

from __future__ import annotations

from enum import Enum
from typing import Any

import torch
from torch import fx

from ..ops import Kind, max_pool_with_indices, node_args, spec


class Role(Enum):
    """How an op carries a shadow (None: it cannot)."""

    INPUT = "input"  # a model input: the shadow is a leaf
    LAYER = "layer"  # dense/conv/affine: direct relevance joins the rule's input
    RECURRENT = "recurrent"  # LSTM/GRU: hands relevance to its input's shadow, none out
    IDENTITY = "identity"  # element-wise map with the identity rule
    MOVE = "move"  # the same op applied to the shadow
    POOL = "pool"  # max pooling: gather at the argmax
    SUM = "sum"  # proportional split
    SCALE = "scale"  # times / divided by a constant


def role(node: fx.Node, dynamic: set[fx.Node]) -> Role | None:
    """How `node` carries a shadow, from its OpSpec."""
    if node.op == "placeholder":
        return Role.INPUT
    s = spec(node)
    if s is None or node not in dynamic:
        return None
    if s.kind is Kind.LAYER:
        return Role.LAYER
    if s.kind is Kind.RECURRENT:
        return Role.RECURRENT
    op = s.op
    if s.kind is Kind.ELEMENTWISE or s.zero_below or (op is not None and op.signed_identity):
        return Role.IDENTITY
    if s.kind is Kind.PROPORTIONAL:
        return Role.SUM
    if s.kind is not Kind.GRADIENT:
        return None
    if op is not None and op.pool_dims:
        return Role.POOL if op.returns_indices or not _returns_indices(node) else None
    if s.signal is not None:
        return Role.SCALE
    if s.product:
        dyn = [a for a in data_inputs(node, dynamic)]
        if len(dyn) != 1 or (op is not None and op.divides and node.args[0] is not dyn[0]):
            return None  # c / x is not linear in x
        return Role.SCALE
    if s.pure_move or _is_move(node):
        return Role.MOVE
    return None


def _is_move(node: fx.Node) -> bool:
    """GRADIENT ops that are linear with 0/1 coefficients (cat, getitem, pad, expand, ...)."""
    s = spec(node)
    return s is not None and s.kind is Kind.GRADIENT and not s.product and \
        s.signal is None and not s.zero_below and s.fn is not None and (
            s.op is None or not (s.op.signed_identity or s.op.pool_dims))


def _returns_indices(node: fx.Node) -> bool:
    """A max pooling called with return_indices=True (fx spelling)."""
    flag = max_pool_with_indices(spec(node).op)[1]
    value = node.args[flag] if len(node.args) > flag else node.kwargs.get(
        "return_indices", False)
    return value is not False


def data_inputs(node: fx.Node, dynamic: set[fx.Node]) -> list[fx.Node]:
    """The input-dependent tensor arguments whose relevance this node hands back."""
    out = []
    for a in node_args(node):
        s = spec(a)
        if a in dynamic and (s is None or s.kind is not Kind.META) and a not in out:
            out.append(a)
    return out


def scaled_input(node: fx.Node, dynamic: set[fx.Node]) -> fx.Node:
    """The input whose relevance a SCALE node passes on: the signal of signal * gate, or
    the one input-dependent factor of x * c."""
    s = spec(node)
    if s is not None and s.signal is not None:
        return node.args[s.signal]
    return data_inputs(node, dynamic)[0]


def plan_shadows(nodes: list[fx.Node], dynamic: set[fx.Node],
                 producers: set[fx.Node]) -> tuple[dict[fx.Node, Role], set[fx.Node]]:
    """Each node's role, and the nodes whose shadow some consumer wants."""
    roles = {n: r for n in nodes if (r := role(n, dynamic)) is not None}
    wanted: set[fx.Node] = set()
    for node in reversed(nodes):
        r = roles.get(node)
        if node in producers:
            first = node.args[0] if node.args else None
            if isinstance(first, fx.Node) and first in dynamic:
                wanted.add(first)
        elif node in wanted and r in (Role.IDENTITY, Role.POOL):
            wanted.add(node.args[0])
        elif node in wanted and r is Role.SCALE:
            wanted.add(scaled_input(node, dynamic))
        elif node in wanted and r in (Role.MOVE, Role.SUM):
            wanted.update(data_inputs(node, dynamic))
    can_carry = {Role.INPUT, Role.LAYER, Role.IDENTITY, Role.MOVE, Role.POOL, Role.SUM,
                 Role.SCALE}
    return roles, {n for n in wanted if roles.get(n) in can_carry}


def zero_preserving(fn: Any) -> bool:
    """f(0) == 0 for an element-wise map (else relevance at exactly-0 inputs needs a shadow)."""
    try:
        out = fn(torch.zeros(1, dtype=torch.float64))
    except Exception:
        return False
    return bool(torch.as_tensor(out).eq(0).all())
