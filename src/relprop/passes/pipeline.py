"""The order the graph passes run in: one entry point from a traced graph to one
whose every input-dependent node carries its OpSpec.
"""

from __future__ import annotations

from torch import fx, nn

from .arguments import normalize_layer_arguments
from .batchnorm import batchnorm_as_affine, fold_batchnorm
from .classify import classify_nodes, mark_dynamic
from .functionalize import functionalize
from .inplace import out_of_place
from .masks import wrapped_attention_masks
from .outputs import structured_output
from .padding import normalize_padding
from .routing import grouped_experts, hold_choices, hold_routers
from .scan import hold_selection
from .transformer import (
    attention_weights,
    collapse_leaf_modules,
    grouped_query,
    hold_statistics,
    linear_products,
    scaled_products,
)


def canonize(graph: fx.Graph, root: nn.Module, functional: bool = True,
             leaves: dict[str, str] | None = None,
             constants: frozenset[str] = frozenset(),
             index_inputs: frozenset[str] = frozenset(),
             model: nn.Module | None = None, routing: str = "held") -> set[fx.Node]:
    """Run all passes; returns the set of input-dependent nodes. `model`: the user's
    model where `root` is torch.export's module (which has none of its classes);
    `routing`: the composite's, for mixture-of-experts routers."""
    if functional:
        functionalize(graph, root, leaves)
    else:
        collapse_leaf_modules(graph, model if model is not None else root, leaves or {})
        structured_output(graph)
    wrapped_attention_masks(graph)
    out_of_place(graph)
    normalize_padding(graph)
    linear_products(graph, root)
    scaled_products(graph)
    grouped_query(graph)
    hold_choices(graph)  # discrete results; then MoE routers and Mamba's scan parameters
    hold_routers(graph, routing)
    grouped_experts(graph)
    hold_selection(graph)
    hold_statistics(graph)
    dynamic = mark_dynamic(graph, constants, index_inputs)
    normalize_layer_arguments(graph, root, dynamic)
    classify_nodes(graph, root, dynamic)
    attention_weights(graph)
    fold_batchnorm(graph)
    batchnorm_as_affine(graph)
    graph.eliminate_dead_code()
    return mark_dynamic(graph, constants, index_inputs)
