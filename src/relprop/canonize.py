"""Graph passes: from a traced graph to one every node of which has a rule family.

Each pass takes the fx graph (with OpSpecs in `node.meta["relprop"]`) and
changes it in place; they run in the order of `canonize`.
"""

from __future__ import annotations

import inspect
import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from .errors import UnsupportedOperationError
from .layers import AffineKernel
from .optable import Kind, OpSpec, classify, functionalize, node_location, pad_arguments

SPEC = "relprop"
_BINARY = {operator.add, operator.sub, operator.iadd, operator.isub, torch.add, torch.sub,
           "add", "sub", "__add__", "__sub__", "add_", "sub_"}


def spec(node: fx.Node) -> OpSpec | None:
    return node.meta.get(SPEC)


def _node_args(node: fx.Node) -> list[fx.Node]:
    found: list[fx.Node] = []
    fx.node.map_arg((node.args, node.kwargs), lambda n: found.append(n) or n)
    return found


def mark_dynamic(graph: fx.Graph, constants: frozenset[str] = frozenset()) -> set[fx.Node]:
    """Nodes whose value depends on an explained model input (only these need rules).

    Placeholders named in `constants` (keyword inputs such as an attention mask) are
    fed as constants: what depends on them alone needs no rule."""
    dynamic: set[fx.Node] = set()
    for node in graph.nodes:
        if (node.op == "placeholder" and node.name not in constants) or \
                any(a in dynamic for a in _node_args(node)):
            dynamic.add(node)
    return dynamic


def classify_nodes(graph: fx.Graph, root: nn.Module, dynamic: set[fx.Node]) -> None:
    """Attach an OpSpec to every computing node that depends on the input."""
    shapes: set[fx.Node] = set()  # nodes holding sizes and other non-tensor values
    for node in graph.nodes:
        dyn_args = [a for a in _node_args(node) if a in dynamic]
        if node in dynamic and dyn_args and all(a in shapes for a in dyn_args) and \
                node.op in ("call_function", "call_method"):
            # arithmetic on sizes (num_channels // groups): plain Python, no relevance
            fn = node.target if node.op == "call_function" else (
                lambda obj, *a, _n=node.target, **k: getattr(obj, _n)(*a, **k))
            node.meta[SPEC] = OpSpec(Kind.META, str(node.target), "", fn=fn)
            shapes.add(node)
            continue
        if node in dynamic and node.op in ("call_function", "call_method"):
            node.meta[SPEC] = classify(node, root)
            if node.meta[SPEC].kind is Kind.META:
                shapes.add(node)
            s = node.meta[SPEC]
            binary = node.target in _BINARY or getattr(node.target, "_opname", "") in (
                "add", "sub")
            if s.kind is Kind.PROPORTIONAL and binary:
                # a summand that is not input-dependent, or built from shapes alone
                # (zeros_like(x), a constant pad border), absorbs relevance like a bias
                operands = node.args[:2]
                s.constant_summand = any(not (isinstance(a, fx.Node) and a in dynamic) or
                                         a in shapes for a in operands)
            if s.product and sum(a in dynamic for a in _node_args(node)) > 1:
                _make_gated(node, s, dynamic)
        elif node in dynamic and node.op == "call_module":
            if str(node.target) == "_guards_fn":  # torch.export's input-shape guard
                node.meta[SPEC] = OpSpec(Kind.META, "guards", "",
                                         fn=root.get_submodule(str(node.target)))
                continue
            raise UnsupportedOperationError(f"module call left at {node_location(node)}")


def _gate_source(node: fx.Node) -> bool:
    """True if `node` is a gate (sigmoid/hardsigmoid), possibly reshaped or expanded."""
    while True:
        s = spec(node)
        if s is None:
            return False
        if s.gate:
            return True
        if s.kind is Kind.GRADIENT and s.nonneg == "preserve" and node.args and \
                isinstance(node.args[0], fx.Node) and len(_node_args(node)) == 1:
            node = node.args[0]  # view / reshape / flatten / expand / unsqueeze ...
            continue
        return False


def _make_gated(node: fx.Node, s: OpSpec, dynamic: set[fx.Node]) -> None:
    """A product signal * gate: the gate is detached, so all relevance goes to the signal.

    In gradient form this is exact: c_signal = c_z * gate, hence R_signal = z * c_z = R_z,
    and the gate (whose sub-network only decides how much passes) receives nothing.
    """
    is_mul = node.target in (operator.mul, torch.mul, operator.imul, "mul", "mul_",
                             "__mul__") or getattr(node.target, "_opname", "") == "mul"
    factors = node.args[:2]
    gates = [i for i, a in enumerate(factors) if isinstance(a, fx.Node) and _gate_source(a)]
    if not is_mul or len(factors) != 2 or len(gates) == 0 or len(gates) == 2:
        raise UnsupportedOperationError(
            f"product of two input-dependent tensors at {node_location(node)}: relprop has a "
            "rule for a product only when exactly one factor is a gate (sigmoid or "
            "hardsigmoid output)")
    g = gates[0]
    fn = s.fn

    def gated(a, b, *rest, **kwargs):
        if g == 0:
            a = a.detach()
        else:
            b = b.detach()
        return fn(a, b, *rest, **kwargs)

    s.fn = gated
    s.product = False
    s.signal = 1 - g
    s.label = f"{s.label} (gate x{'first' if g == 0 else 'second'})"


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
            args = _node_args(node)
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


# ---------------------------------------------------------------- in-place operations

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
    for node in list(graph.nodes):
        twin = inplace_twin(node) if node.op in ("call_function", "call_method") else None
        if twin is None:
            continue
        where = node_location(node)
        node.meta.setdefault("relprop_label", _original_label(node))
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


def _original_label(node: fx.Node) -> str:
    t = node.target
    if node.op == "call_method":
        return f"Tensor.{t}"
    if isinstance(t, torch._ops.OpOverload):
        return f"aten.{t._opname}"
    return f"{getattr(t, '__module__', '') or ''}.{getattr(t, '__name__', t)}".lstrip(".") \
        .replace("torch.nn.functional.", "F.").replace("_operator.", "operator.")


# ---------------------------------------------------------------- padding

_PAD_MODES = {"reflection": "reflect", "replication": "replicate"}


def _aten_pad(node: fx.Node) -> tuple[Any, Any, str, Any] | None:
    """(input, pad, mode, value) of an ATen padding op (graphs from torch.export)."""
    t = node.target
    if node.op != "call_function" or not isinstance(t, torch._ops.OpOverload):
        return None
    name = t._opname
    a = list(node.args)
    if name == "pad":
        x, pad, mode, value = (a + [node.kwargs.get("mode", "constant"),
                                    node.kwargs.get("value")])[:4]
        return x, pad, mode, value
    if name == "constant_pad_nd":
        return a[0], a[1], "constant", a[2] if len(a) > 2 else node.kwargs.get("value", 0)
    if name == "_pad_circular":
        return a[0], a[1], "circular", None
    for prefix, mode in _PAD_MODES.items():
        if name.startswith(prefix + "_pad") and not name.endswith("backward"):
            return a[0], a[1], mode, None
    return None


def normalize_padding(graph: fx.Graph) -> None:
    """Every pad as F.pad(x, pad, mode, value); a constant c != 0 split off as a summand.

    Zero/reflect/replicate/circular padding only moves (and copies) values: the
    gradient is the rule, and relevance at copies sums back to their source.
    pad(x, c) with c != 0 equals pad(x, 0) + C, C being c on the border and 0
    inside: a sum with a constant summand, so relevance reaching the border is
    absorbed by C like a bias (the ledger books it as bias).
    """
    for node in list(graph.nodes):
        aten = _aten_pad(node)
        if aten is not None:
            node.meta.setdefault("relprop_label", _original_label(node))
            x, pad, mode, value = aten
        elif node.op == "call_function" and node.target is F.pad:
            x, pad, mode, value = pad_arguments(node)
        else:
            continue
        if mode != "constant":
            value = None
        node.target, node.args, node.kwargs = F.pad, (x, pad, mode, value), {}
        if mode != "constant" or isinstance(value, fx.Node) or not value:
            continue
        node.args = (x, pad, mode, 0.0)
        meta = {k: v for k, v in node.meta.items() if k in (
            "nn_module_stack", "stack_trace", "relprop_path")}
        label = node.meta.get("relprop_label", "F.pad")
        with graph.inserting_after(node):
            zeros = graph.call_function(torch.zeros_like, (x,))
        with graph.inserting_after(zeros):
            border = graph.call_function(F.pad, (zeros, pad, "constant", value))
        with graph.inserting_after(border):
            total = graph.call_function(operator.add, (node, border))
        for new, what in ((zeros, "zeros"), (border, f"border = {value}"),
                          (total, f"+ border {value}")):
            new.meta.update(meta)
            new.meta["relprop_label"] = f"{label} ({what})"
        node.replace_all_uses_with(total, delete_user_cb=lambda u, t=total: u is not t)


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
