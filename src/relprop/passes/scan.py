"""`hold_selection`: a selective state-space scan (Mamba) as MambaLRP (Jafari et al.,
NeurIPS 2024) explains it, the one architectural reading here.

Mamba computes its input-dependent scan parameters from one projection of the input,
split into the step size Delta (through a softplus), B and C: x_proj(u) -> (dt, B, C),
Delta = softplus(dt_proj(dt)). MambaLRP holds Delta, A = exp(Delta A), B and C
constant, so the scan is linear in its input u (the state a held-decay weighted sum of
held-scaled inputs, read out by a held C) and relevance flows through u alone. Here:
the split a softplus's input comes from is held whole; what only it computes (the
softplus, exp, the discretised A and B) needs no rule.

Only a split of parameters alone is held: where a piece goes on into a layer (Mamba2
splits its input projection into the gate, the scan input and dt; the scan input
enters the conv1d), nothing is held and the scan is refused at its first op without
a rule rather than explained wrong.
"""

from __future__ import annotations

from torch import fx

from ..ops import Kind, is_op, meaning, node_args


def hold_selection(graph: fx.Graph) -> set[fx.Node]:
    """The split projections feeding a softplus (Mamba's x_proj -> dt, B, C), held."""
    dependent: set[fx.Node] = set()
    for node in graph.nodes:  # what depends on a model input
        if node.op == "placeholder" or any(a in dependent for a in node_args(node)):
            dependent.add(node)
    held: set[fx.Node] = set()
    for node in graph.nodes:
        if not is_op(node, "softplus"):
            continue
        at = node
        while at is not None and not (is_op(at, "getitem") and is_op(at.args[0], "split")):
            inputs = [a for a in node_args(at) if a in dependent]
            at = inputs[0] if len(inputs) == 1 else None
        if at is not None and not any(_feeds_layer(piece) for piece in at.args[0].users):
            split = at.args[0]
            split.meta["relprop_constant"] = "statistic"  # (what classify stops at)
            split.meta["relprop_held"] = "selective scan parameters (Delta, B, C)"
            held.add(split)
    return held


def _feeds_layer(node: fx.Node) -> bool:
    """`node` reaches a linear or convolution layer through moves (views, casts)."""
    todo, seen = [node], set()
    while todo:
        n = todo.pop()
        for user in n.users:
            if user in seen:
                continue
            seen.add(user)
            what = meaning(user)
            if what is not None and what.kind is Kind.LAYER:
                return True
            if what is not None and (what.pure_move or what.view or what.name == "cast"):
                todo.append(user)
    return False
