"""Which nodes depend on the explained input (`mark_dynamic`) and the OpSpec of each
of them (`classify_nodes`, through relprop.ops.classify), with what only the
graph around a node can tell: sums with a constant summand, arithmetic on sizes,
and products whose gate factor is detached (`_make_gated`).
"""

from __future__ import annotations

import operator

import torch
from torch import fx, nn

from ..errors import UnsupportedOperationError
from ..ops import SPEC, Kind, OpSpec, classify, node_args, node_location, spec

_BINARY_SUMS = {operator.add, operator.sub, operator.iadd, operator.isub, torch.add, torch.sub,
                "add", "sub", "__add__", "__sub__", "add_", "sub_"}


def is_binary_sum(node: fx.Node) -> bool:
    """x + y or x - y (any spelling: operator, torch function, method, ATen op)."""
    return node.target in _BINARY_SUMS or getattr(node.target, "_opname", "") in ("add", "sub")


def mark_dynamic(graph: fx.Graph, constants: frozenset[str] = frozenset()) -> set[fx.Node]:
    """Nodes whose value depends on an explained model input (only these need rules).

    Placeholders named in `constants` (keyword inputs such as an attention mask) are
    fed as constants: what depends on them alone needs no rule."""
    dynamic: set[fx.Node] = set()
    for node in graph.nodes:
        if (node.op == "placeholder" and node.name not in constants) or \
                any(a in dynamic for a in node_args(node)):
            dynamic.add(node)
    return dynamic


def classify_nodes(graph: fx.Graph, root: nn.Module, dynamic: set[fx.Node]) -> None:
    """Attach an OpSpec to every computing node that depends on the input."""
    shapes: set[fx.Node] = set()  # nodes holding sizes and other non-tensor values
    for node in graph.nodes:
        dyn_args = [a for a in node_args(node) if a in dynamic]
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
            if s.kind is Kind.PROPORTIONAL and is_binary_sum(node):
                # a summand that is not input-dependent, or built from shapes alone
                # (zeros_like(x), a constant pad border), absorbs relevance like a bias
                operands = node.args[:2]
                s.constant_summand = any(not (isinstance(a, fx.Node) and a in dynamic) or
                                         a in shapes for a in operands)
            if s.product and sum(a in dynamic for a in node_args(node)) > 1:
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
                isinstance(node.args[0], fx.Node) and len(node_args(node)) == 1:
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
