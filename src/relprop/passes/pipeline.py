"""The order the graph passes run in: one entry point from a traced graph to one
whose every input-dependent node carries its OpSpec.
"""

from __future__ import annotations

from torch import fx, nn

from .batchnorm import batchnorm_as_affine, fold_batchnorm
from .classify import classify_nodes, mark_dynamic
from .functionalize import functionalize
from .inplace import out_of_place
from .padding import normalize_padding


def canonize(graph: fx.Graph, root: nn.Module, functional: bool = True,
             leaves: dict[str, str] | None = None,
             constants: frozenset[str] = frozenset()) -> set[fx.Node]:
    """Run all passes; returns the set of input-dependent nodes."""
    if functional:
        functionalize(graph, root, leaves)
    out_of_place(graph)
    normalize_padding(graph)
    dynamic = mark_dynamic(graph, constants)
    classify_nodes(graph, root, dynamic)
    fold_batchnorm(graph)
    batchnorm_as_affine(graph)
    graph.eliminate_dead_code()
    return mark_dynamic(graph, constants)
