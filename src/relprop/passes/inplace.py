"""In-place operations run as their out-of-place twins, reads of the mutated tensor
redirected to the result: the program keeps the values its rules read in their
backward and must never write into the user's tensors.

Writes into a tensor the graph itself made that depend on no input (a mask filled
slice by slice, `mask[h, w] = k`, torchvision's Swin) are constant computation: they
stay in place and run in order, as in eager.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx
from torch.fx.node import has_side_effect

from ..errors import UnsupportedOperationError
from ..ops import node_args, node_location, original_label
from ..ops.aliasing import aliases_of, inplace_twin, is_view, reads_shape_only


def _input_dependent(graph: fx.Graph) -> set[fx.Node]:
    """Nodes whose values may depend on a model input (every placeholder counts; sizes,
    dtypes and tensors made from an input's shape alone do not)."""
    found: set[fx.Node] = set()
    for node in graph.nodes:
        if node.op == "placeholder":
            found.add(node)
            continue
        args = node_args(node)
        if reads_shape_only(node):
            args = [a for a in args if a is not node.args[0]]  # the shape's template
        if any(a in found for a in args):
            found.add(node)
    return found


@has_side_effect
def _inplace_method(obj: Any, name: str, *args: Any, **kwargs: Any) -> Any:
    """`obj.name_(*args)` as a function fx keeps (an unused method call would be dropped
    as dead code)."""
    return getattr(obj, name)(*args, **kwargs)


def _constant_write(node: fx.Node, dependent: set[fx.Node], order: dict[fx.Node, int]) -> bool:
    """An in-place write, depending on no input, into a tensor made in the graph (not a
    parameter, buffer or input) whose storage nothing but views and other such writes
    reads before it."""
    if node.op == "call_function" and not isinstance(node.target, torch._ops.OpOverload):
        return False  # operator.iadd, F.relu(x, inplace=True): run out of place as before
    mutated = node.args[0] if node.args else None
    if not isinstance(mutated, fx.Node) or any(a in dependent for a in node_args(node)):
        return False
    base = mutated
    while is_view(base) and base.args and isinstance(base.args[0], fx.Node):
        base = base.args[0]
    if base.op not in ("call_function", "call_method"):
        return False
    aliases = aliases_of(mutated)
    return all(u in aliases or order[u] > order[node] or inplace_twin(u) is not None
               for a in aliases for u in a.users)


def out_of_place(graph: fx.Graph) -> None:
    """Run every in-place op as its out-of-place twin (x += y, x.add_(y), F.relu(x,
    inplace=True), nn.ReLU(inplace=True), torch.dropout_, aten.add_.Tensor, ...).

    The program keeps every value a rule may read in its backward (inputs of layers,
    of sums), so no op may overwrite one; and it must never write into the user's
    tensors. In eager PyTorch the mutated tensor holds the result afterwards: reads
    of it later in the graph are redirected to the new node, so the values are the
    model's. A mutation seen through another view of the same storage (`v = x.view(-1);
    x.relu_(); ... v ...`) cannot be redirected that way and is refused.
    """
    order = {n: i for i, n in enumerate(graph.nodes)}
    dependent = _input_dependent(graph)
    for node in list(graph.nodes):
        twin = inplace_twin(node) if node.op in ("call_function", "call_method") else None
        if twin is None:
            continue
        if _constant_write(node, dependent, order):
            node.meta.setdefault("relprop_label", original_label(node))
            if node.op == "call_method":  # kept by dead-code elimination as a function
                node.op, node.target = "call_function", _inplace_method
                node.args = (node.args[0], node.meta["relprop_label"][len("Tensor."):],
                             *node.args[1:])
            continue
        where = node_location(node)
        node.meta.setdefault("relprop_label", original_label(node))
        node.target, node.args, node.kwargs = twin
        if node.op == "call_method" and not isinstance(node.target, str):
            node.op = "call_function"  # x.zero_() -> zeros_like(x)
        node.meta.pop("relprop_inplace", None)
        mutated = node.args[0] if node.args else None
        if not isinstance(mutated, fx.Node):
            continue
        later = [u for u in mutated.users if u is not node and order[u] > order[node]]
        for u in later:
            u.replace_input_with(mutated, node)
        for other in aliases_of(mutated) - {mutated, node}:
            if any(order[u] > order[node] for u in other.users if u is not node):
                raise UnsupportedOperationError(
                    f"in-place {where} changes a tensor that '{other.name}' views and reads "
                    "later: relprop runs it out of place; write it out of place "
                    "(y = f(x)) or clone before the in-place op")

