"""`hold_selection`: a selective state-space scan (Mamba) as MambaLRP (Jafari et al.,
NeurIPS 2024) explains it, the one architectural reading here.

Mamba computes its input-dependent scan parameters from one projection of the input,
split into the step size Delta (through a softplus), B and C: x_proj(u) -> (dt, B, C),
Delta = softplus(dt_proj(dt)). MambaLRP holds Delta, A = exp(Delta A), B and C
constant, so the scan is linear in its input u (the state a held-decay weighted sum of
held-scaled inputs, read out by a held C) and relevance flows through u alone. Here:
the split a softplus's input comes from is held whole; what only it computes (the
softplus, exp, the discretised A and B) needs no rule.
"""

from __future__ import annotations

from torch import fx

from ..ops import is_op, node_args


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
        if at is not None:
            split = at.args[0]
            split.meta["relprop_constant"] = "statistic"  # (what classify stops at)
            split.meta["relprop_held"] = "selective scan parameters (Delta, B, C)"
            held.add(split)
    return held
