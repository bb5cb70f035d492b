"""Graph passes: from a traced graph to one every node of which has a rule family.

Each pass takes the fx graph (with OpSpecs in `node.meta["relprop"]`) and
changes it in place; they run in the order of `canonize`.
"""

from __future__ import annotations

import operator

import torch
from torch import fx, nn

from .errors import UnsupportedOperationError
from .layers import AffineKernel
from .optable import Kind, OpSpec, classify, functionalize, node_location

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
                operands = node.args[:2]
                s.constant_summand = any(not (isinstance(a, fx.Node) and a in dynamic)
                                         for a in operands)
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
            dyn = [a for a in args if a in dynamic]
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


def canonize(graph: fx.Graph, root: nn.Module, functional: bool = True,
             leaves: dict[str, str] | None = None,
             constants: frozenset[str] = frozenset()) -> set[fx.Node]:
    """Run all passes; returns the set of input-dependent nodes."""
    if functional:
        functionalize(graph, root, leaves)
    dynamic = mark_dynamic(graph, constants)
    classify_nodes(graph, root, dynamic)
    fold_batchnorm(graph)
    batchnorm_as_affine(graph)
    graph.eliminate_dead_code()
    return mark_dynamic(graph, constants)
