"""Sign analysis read by the planner: which values are provably >= 0 (the rules
skip their x- terms) and which layers feed only ReLUs (their negative outputs
carry no relevance).
"""

from __future__ import annotations

from torch import fx

from ..ops import Kind, node_args, spec


def mark_nonneg(graph: fx.Graph, dynamic: set[fx.Node]) -> set[fx.Node]:
    """Nodes whose output is provably >= 0 (lets rules skip the x- terms)."""
    nonneg: set[fx.Node] = set()
    for node in graph.nodes:
        s = spec(node)
        if s is None:
            continue
        if s.nonneg == "always":
            nonneg.add(node)
        elif s.nonneg == "preserve":
            args = node_args(node)
            # sizes (x.view(x.size(0), -1)) are dynamic but no data: they cannot be negative
            dyn = [a for a in args if a in dynamic and (spec(a) is None or
                                                        spec(a).kind is not Kind.META)]
            numbers = [a for a in node.args if isinstance(a, int | float) and not
                       isinstance(a, bool)]
            binary = s.kind is Kind.PROPORTIONAL and len(node.args) >= 2 and (
                numbers or any(a not in dynamic for a in args))
            if dyn and all(a in nonneg for a in dyn) and not binary:
                nonneg.add(node)
    return nonneg


def positive_only(node: fx.Node) -> bool:
    """True if every consumer zeroes its gradient where this node's output is <= 0."""
    users = list(node.users)
    return bool(users) and all(
        spec(u) is not None and spec(u).zero_below and u.args[0] is node for u in users)
