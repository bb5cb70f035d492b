"""In-place operations run as their out-of-place twins, reads of the mutated tensor
redirected to the result: the program keeps the values its rules read in their
backward and must never write into the user's tensors.

Writes into a tensor the graph itself made that depend on no input (a mask filled
slice by slice, `mask[h, w] = k`, torchvision's Swin) are constant computation: they
stay in place and run in order, as in eager.
"""

from __future__ import annotations

import inspect
import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx
from torch.fx.node import has_side_effect

from ..errors import UnsupportedOperationError
from ..ops import node_args, node_location, original_label

_FUNCTION_TWINS: dict[Any, Any] = {
    operator.iadd: operator.add, operator.isub: operator.sub, operator.imul: operator.mul,
    operator.itruediv: operator.truediv, operator.ifloordiv: operator.floordiv,
    operator.imod: operator.mod, operator.ipow: operator.pow, operator.imatmul: operator.matmul,
    operator.iand: operator.and_, operator.ior: operator.or_, operator.ixor: operator.xor,
    operator.ilshift: operator.lshift, operator.irshift: operator.rshift,
}
for _ns in (torch, F):  # torch.relu_ -> torch.relu, F.elu_ -> F.elu, torch.dropout_ -> ...
    for _name in dir(_ns):
        if _name.endswith("_") and not _name.startswith("_"):
            _f, _twin = getattr(_ns, _name), getattr(_ns, _name[:-1], None)
            if callable(_f) and callable(_twin):
                _FUNCTION_TWINS[_f] = _twin
_FUNCTION_TWINS[torch.zero_] = torch.zeros_like
_METHOD_TWINS: dict[str, Any] = {"zero_": torch.zeros_like, "fill_": torch.full_like}
_NOT_INPLACE_METHODS = {"requires_grad_", "share_memory_", "retain_grad_"}
# ops whose output shares storage with their first argument (fx graphs; ATen ops say so
# in their schema)
_VIEW_FUNCTIONS = {
    operator.getitem, torch.flatten, torch.reshape, torch.permute, torch.transpose,
    torch.squeeze, torch.unsqueeze, torch.t, torch.split, torch.chunk, torch.unbind,
    torch.narrow, torch.movedim, torch.unflatten, torch.swapaxes, torch.select, torch.detach,
    torch.as_strided, torch.diagonal, torch.tensor_split,
}
_VIEW_METHODS = {
    "view", "view_as", "reshape", "reshape_as", "flatten", "unflatten", "permute",
    "transpose", "t", "squeeze", "unsqueeze", "expand", "expand_as", "narrow", "detach",
    "contiguous", "select", "split", "chunk", "unbind", "movedim", "swapaxes", "diagonal",
    "unfold", "as_strided", "__getitem__", "to", "type_as", "float", "double", "half",
    "tensor_split",
}
_SHAPE_METHODS = {"size", "dim", "numel", "__len__", "ndimension", "nelement", "stride"}
# new tensors whose values depend on their first argument's shape only (dtype, device)
_TEMPLATE_METHODS = {"new_zeros", "new_ones", "new_full", "new_empty"}
_TEMPLATE_FUNCTIONS = {torch.zeros_like, torch.ones_like, torch.full_like, torch.empty_like}
_TEMPLATE_ATEN = {"zeros_like", "ones_like", "full_like", "empty_like", "new_zeros",
                  "new_ones", "new_full", "new_empty", "sym_size", "sym_numel", "sym_stride",
                  "sym_storage_offset", "_assert_tensor_metadata"}
_SHAPE_ATTRIBUTES = {"shape", "dtype", "device", "ndim", "layout", "is_cuda", "requires_grad"}


def _inplace_param(fn: Any) -> int | None:
    """Position of a torch function's `inplace=` parameter (F.relu, F.dropout, ...)."""
    if not (getattr(fn, "__module__", None) or "").startswith("torch"):
        return None
    try:
        names = list(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return None
    return names.index("inplace") if "inplace" in names else None


def _without_inplace_flag(node: fx.Node) -> tuple[tuple, dict] | None:
    """(args, kwargs) without `inplace=True`, or None if the call is not in place."""
    at = _inplace_param(node.target)
    if at is None:
        return None
    flag = node.args[at] if len(node.args) > at else node.kwargs.get("inplace", False)
    if flag is not True:
        return None
    names = list(inspect.signature(node.target).parameters)
    kwargs = {k: v for k, v in node.kwargs.items() if k != "inplace"}
    kwargs.update({names[i]: v for i, v in enumerate(node.args) if i > at})
    return tuple(node.args[:at]), kwargs


def _maybe_tensor(node: Any) -> bool:
    """False for values known not to be tensors (sizes and arithmetic on them)."""
    if not isinstance(node, fx.Node):
        return False
    val = node.meta.get("val")
    if val is not None:
        return isinstance(val, torch.Tensor)
    if node.op == "call_method":
        return node.target not in _SHAPE_METHODS
    if node.op == "call_function" and node.target in (getattr, len):
        return False
    if node.op == "call_function" and getattr(node.target, "__module__", "") == "_operator" \
            and node.target is not operator.getitem:
        return any(_maybe_tensor(a) for a in node.args)
    return True


def inplace_twin(node: fx.Node) -> tuple[Any, tuple, dict] | None:
    """The out-of-place form (target, args, kwargs) of an in-place node; None if not in place."""
    if node.meta.get("relprop_inplace"):  # a module with inplace=True, already functional
        return node.target, node.args, node.kwargs
    t = node.target
    if node.op == "call_method":
        name = str(t)
        if name in _METHOD_TWINS:
            return _METHOD_TWINS[name], node.args, node.kwargs
        if not name.endswith("_") or name.endswith("__") or name in _NOT_INPLACE_METHODS:
            return None
        if callable(getattr(torch.Tensor, name[:-1], None)):
            return name[:-1], node.args, node.kwargs
        return None
    if node.op != "call_function":
        return None
    if isinstance(t, torch._ops.OpOverload):
        if t.namespace != "aten" or not t._schema.is_mutable or not t._opname.endswith("_"):
            return None
        packet = getattr(torch.ops.aten, t._opname[:-1], None)
        twin = getattr(packet, t._overloadname, None) if packet is not None else None
        if twin is None or twin._schema.is_mutable:
            return None
        return twin, node.args, node.kwargs
    try:
        twin = _FUNCTION_TWINS.get(t)
    except TypeError:  # unhashable target
        return None
    if twin is not None:
        if t in (operator.iadd, operator.isub, operator.imul, operator.itruediv,
                 operator.ifloordiv, operator.imod, operator.ipow, operator.imatmul,
                 operator.iand, operator.ior, operator.ixor, operator.ilshift,
                 operator.irshift) and not _maybe_tensor(node.args[0]):
            return None  # `n += 1` on a size: immutable, nothing is mutated
        return twin, node.args, node.kwargs
    flagless = _without_inplace_flag(node)
    return (t, *flagless) if flagless is not None else None


def _input_dependent(graph: fx.Graph) -> set[fx.Node]:
    """Nodes whose values may depend on a model input (every placeholder counts; sizes,
    dtypes and tensors made from an input's shape alone do not)."""
    found: set[fx.Node] = set()
    for node in graph.nodes:
        if node.op == "placeholder":
            found.add(node)
            continue
        args = node_args(node)
        t = node.target
        if node.op == "call_method" and t in _SHAPE_METHODS | _TEMPLATE_METHODS or (
                node.op == "call_function" and (
                    t in _TEMPLATE_FUNCTIONS or (t is getattr and len(node.args) > 1 and
                                                 node.args[1] in _SHAPE_ATTRIBUTES) or
                    getattr(t, "_opname", None) in _TEMPLATE_ATEN)):
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
    while _is_view(base) and base.args and isinstance(base.args[0], fx.Node):
        base = base.args[0]
    if base.op not in ("call_function", "call_method"):
        return False
    aliases = _aliases(mutated)
    return all(u in aliases or order[u] > order[node] or inplace_twin(u) is not None
               for a in aliases for u in a.users)


def _is_view(node: fx.Node) -> bool:
    if node.op == "call_method":
        return node.target in _VIEW_METHODS
    if node.op != "call_function":
        return False
    t = node.target
    if isinstance(t, torch._ops.OpOverload):
        return any(r.alias_info is not None and not r.alias_info.is_write
                   for r in t._schema.returns)
    return t in _VIEW_FUNCTIONS or getattr(t, "__name__", "") == "_identity"


def _aliases(node: fx.Node) -> set[fx.Node]:
    """Nodes that may share storage with `node`: its view chain down from the base."""
    base = node
    while _is_view(base) and base.args and isinstance(base.args[0], fx.Node):
        base = base.args[0]
    found, todo = {base}, [base]
    while todo:
        n = todo.pop()
        for u in n.users:
            if u not in found and _is_view(u) and u.args and u.args[0] is n:
                found.add(u)
                todo.append(u)
    return found


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
        if node.target in (torch.zeros_like, torch.full_like):
            node.op = "call_function"
        node.meta.pop("relprop_inplace", None)
        mutated = node.args[0] if node.args else None
        if not isinstance(mutated, fx.Node):
            continue
        later = [u for u in mutated.users if u is not node and order[u] > order[node]]
        for u in later:
            u.replace_input_with(mutated, node)
        for other in _aliases(mutated) - {mutated, node}:
            if any(order[u] > order[node] for u in other.users if u is not node):
                raise UnsupportedOperationError(
                    f"in-place {where} changes a tensor that '{other.name}' views and reads "
                    "later: relprop runs it out of place; write it out of place "
                    "(y = f(x)) or clone before the in-place op")

