"""What relprop knows of in-place ops and views, whatever their spelling: the
out-of-place twin of an in-place op, which ops return views of their input, which
values are sizes rather than tensors. relprop.passes.inplace rewrites the graph with
this; nothing here changes a graph.
"""

from __future__ import annotations

import inspect
import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx

from .vocabulary import meaning

_OPERATOR_TWINS: dict[Any, Any] = {
    operator.iadd: operator.add, operator.isub: operator.sub, operator.imul: operator.mul,
    operator.itruediv: operator.truediv, operator.ifloordiv: operator.floordiv,
    operator.imod: operator.mod, operator.ipow: operator.pow, operator.imatmul: operator.matmul,
    operator.iand: operator.and_, operator.ior: operator.or_, operator.ixor: operator.xor,
    operator.ilshift: operator.lshift, operator.irshift: operator.rshift,
}
_FUNCTION_TWINS: dict[Any, Any] = dict(_OPERATOR_TWINS)
for _ns in (torch, F):  # torch.relu_ -> torch.relu, F.elu_ -> F.elu, torch.dropout_ -> ...
    for _name in dir(_ns):
        if _name.endswith("_") and not _name.startswith("_"):
            _f, _twin = getattr(_ns, _name), getattr(_ns, _name[:-1], None)
            if callable(_f) and callable(_twin):
                _FUNCTION_TWINS[_f] = _twin
_FUNCTION_TWINS[torch.zero_] = torch.zeros_like
_METHOD_TWINS: dict[str, Any] = {"zero_": torch.zeros_like, "fill_": torch.full_like}
_NOT_INPLACE_METHODS = {"requires_grad_", "share_memory_", "retain_grad_"}
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


def maybe_tensor(node: Any) -> bool:
    """False for values known not to be tensors (sizes and arithmetic on them)."""
    if not isinstance(node, fx.Node):
        return False
    val = node.meta.get("val")
    if val is not None:
        return isinstance(val, torch.Tensor)
    op = meaning(node)
    if op is not None and op.shape_only:
        return False
    if node.op == "call_function" and getattr(node.target, "__module__", "") == "_operator" \
            and (op is None or op.name != "getitem"):
        return any(maybe_tensor(a) for a in node.args)
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
        if t in _OPERATOR_TWINS and not maybe_tensor(node.args[0]):
            return None  # `n += 1` on a size: immutable, nothing is mutated
        return twin, node.args, node.kwargs
    flagless = _without_inplace_flag(node)
    return (t, *flagless) if flagless is not None else None


def reads_shape_only(node: fx.Node) -> bool:
    """A size read or a new tensor made from a template's shape (`x.size()`,
    `zeros_like(x)`, `x.shape`): its value does not depend on the first argument's
    values."""
    op = meaning(node)
    if op is not None and (op.shape_only or op.template):
        return op.name != "size" or node.op != "call_function" or node.target is len or (
            len(node.args) > 1 and node.args[1] in _SHAPE_ATTRIBUTES)
    return False


def is_view(node: fx.Node) -> bool:
    """The node's output may share storage with its first argument (ATen ops say so in
    their schema; fx spellings, the vocabulary)."""
    if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload):
        return any(r.alias_info is not None and not r.alias_info.is_write
                   for r in node.target._schema.returns)
    op = meaning(node)
    if op is not None and op.name == "getitem" and node.args and \
            isinstance(node.args[0], fx.Node):
        source = meaning(node.args[0])
        if source is not None and source.selects:
            return False  # an element of topk's / sort's result tuple: a new tensor
    return op is not None and op.view


def aliases_of(node: fx.Node) -> set[fx.Node]:
    """Nodes that may share storage with `node`: its view chain down from the base."""
    base = node
    while is_view(base) and base.args and isinstance(base.args[0], fx.Node):
        base = base.args[0]
    found, todo = {base}, [base]
    while todo:
        n = todo.pop()
        for u in n.users:
            if u not in found and is_view(u) and u.args and u.args[0] is n:
                found.add(u)
                todo.append(u)
    return found
