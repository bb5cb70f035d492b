"""Eval-mode BatchNorm as a linear map: merged into the dense/conv layer that feeds
only it, or else run as a per-channel affine layer, so that the composite's layer
rules apply to it.
"""

from __future__ import annotations

from torch import fx

from ..layers import AffineKernel
from ..ops import Kind, spec


def fold_batchnorm(graph: fx.Graph) -> None:
    """Merge eval-mode BatchNorm into the dense/conv layer that feeds only it."""
    for node in list(graph.nodes):
        s = spec(node)
        if s is None or s.kind is not Kind.BATCHNORM:
            continue
        producer = node.args[0]
        ps = spec(producer) if isinstance(producer, fx.Node) else None
        if ps is None or ps.kind is not Kind.LAYER or len(producer.users) != 1:
            continue
        if ps.kernel.kind == "affine" or len(producer.args) != 3:
            continue
        params = [a for a in node.args[1:] if isinstance(a, fx.Node)]
        if any(a.op != "get_attr" for a in params):
            continue  # statistics computed in the graph: keep the BatchNorm on its own
        for a in params:  # parameters must be defined before the merged layer
            producer.prepend(a)
        producer.args = (*producer.args, *node.args[1:])
        ps.bn_eps = s.bn_eps
        ps.label = f"{ps.label}+{s.label}"
        ps.folded = s.path or node.name
        node.replace_all_uses_with(producer)
        graph.erase_node(node)


def batchnorm_as_affine(graph: fx.Graph) -> None:
    """BatchNorm with no layer to fold into becomes a per-channel affine layer."""
    for node in graph.nodes:
        s = spec(node)
        if s is not None and s.kind is Kind.BATCHNORM:
            x, mean, var, gamma, beta = node.args
            node.args = (x, None, None, mean, var, gamma, beta)
            s.kind = Kind.LAYER
            s.kernel = AffineKernel(channel_dim=1)
