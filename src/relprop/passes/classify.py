"""Which nodes depend on the explained input (`mark_dynamic`) and the OpSpec of each
of them (`classify_nodes`, through relprop.ops.classify), with what only the
graph around a node can tell: sums with a constant summand, arithmetic on sizes,
and products whose gate factor is detached (`_make_gated`).
"""

from __future__ import annotations

import torch
from torch import fx, nn

from ..errors import UnsupportedOperationError
from ..ops import SPEC, Kind, OpSpec, classify, is_op, meaning, node_args, node_location, spec


def is_binary_sum(node: fx.Node) -> bool:
    """x + y or x - y (any spelling: operator, torch function, method, ATen op)."""
    op = meaning(node)
    return op is not None and op.binary_sum


def mark_dynamic(graph: fx.Graph, constants: frozenset[str] = frozenset(),
                 index_inputs: frozenset[str] = frozenset()) -> set[fx.Node]:
    """Nodes whose value depends on an explained model input and reaches the output
    (only these need rules).

    Placeholders named in `constants` (keyword inputs such as an attention mask) are
    fed as constants: what depends on them alone needs no rule. Placeholders in
    `index_inputs` hold token ids: relevance is explained at the output of their
    embedding lookups, which are the roots instead. Nodes marked
    `relprop_constant` (a held normaliser, relprop.passes.transformer) stop the
    dependence. What depends on the input but reaches the output only through
    such a node carries no relevance: it is marked `relprop_constant` too and runs
    as a constant.
    """
    dynamic: set[fx.Node] = set()
    indexed: set[fx.Node] = set()
    for node in graph.nodes:
        if node.op == "placeholder":
            if node.name in index_inputs:
                indexed.add(node)
            elif node.name not in constants:
                dynamic.add(node)
            continue
        if node.meta.get("relprop_constant") == "statistic":
            continue
        args = node_args(node)
        if is_lookup(node, indexed) or any(a in dynamic for a in args):
            dynamic.add(node)
        elif any(a in indexed for a in args) and not _reads_shape_only(node):
            indexed.add(node)  # (positions made from the ids' length are no token ids)
    return _reaching_output(graph, dynamic)


def _reads_shape_only(node: fx.Node) -> bool:
    """A node that reads a tensor's size, not its values."""
    op = meaning(node)
    return op is not None and op.shape_only


def is_lookup(node: fx.Node, indexed: set[fx.Node]) -> bool:
    """An embedding lookup of token ids (F.embedding(ids, W); aten.embedding(W, ids))."""
    if not is_op(node, "embedding"):
        return False
    ids = node.args[1] if isinstance(node.target, torch._ops.OpOverload) else (
        node.args[0] if node.args else node.kwargs.get("input"))
    return ids in indexed


def _reaching_output(graph: fx.Graph, dynamic: set[fx.Node]) -> set[fx.Node]:
    """The dynamic nodes on a path to the output; the others are marked constant. Nodes
    without users stay (a side effect such as an in-place write must meet its rule)."""
    reach: set[fx.Node] = set()
    for node in reversed(graph.nodes):
        if node.op == "output" or (node in dynamic and (node in reach or not node.users)):
            reach.add(node)
            reach.update(a for a in node_args(node) if a in dynamic)
    for node in dynamic - reach:
        node.meta["relprop_constant"] = "unused"
    return dynamic & reach


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
            if is_op(node, "cat", "stack") and node.args and \
                    isinstance(node.args[0], list | tuple):
                # a constant piece joined to the input's (ViT's class token) keeps the
                # relevance that reaches it, as a bias does
                s.constant_summand = any(not (isinstance(a, fx.Node) and a in dynamic) or
                                         a in shapes for a in node.args[0])
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
    """A product of two activations.

    signal * gate (a sigmoid/hardsigmoid factor): the gate is detached, so all
    relevance goes to the signal. In gradient form this is exact: c_signal = c_z *
    gate, hence R_signal = z * c_z = R_z, and the gate (whose sub-network only
    decides how much passes) receives nothing. Any other product (matmul, or mul
    without a gate: Q K^T, A V, a gated MLP's silu(g) * u) is bilinear: the uniform
    rule of relprop.rules.attention (the composite's `attention`).
    """
    is_mul, is_matmul = is_op(node, "mul"), is_op(node, "matmul")
    factors = node.args[:2]
    gates = [i for i, a in enumerate(factors) if isinstance(a, fx.Node) and _gate_source(a)]
    if is_matmul or (is_mul and len(factors) == 2 and len(gates) != 1):
        s.kind = Kind.BILINEAR
        s.product = False
        s.label = f"{s.label} (bilinear: uniform split)"
        return
    if is_op(node, "einsum"):
        raise UnsupportedOperationError(
            f"einsum of two or more input-dependent operands at {node_location(node)}: "
            "relprop explains an einsum linear in one input-dependent operand (the others "
            "constant or held, as Mamba2's scan parameters are); write a product of two "
            "activations as matmul or mul (the uniform bilinear rule)")
    if not is_mul or len(factors) != 2:
        raise UnsupportedOperationError(
            f"division of two input-dependent tensors at {node_location(node)}: relprop "
            "has a rule for a quotient only when the divisor is constant or a normaliser "
            "(sqrt, rsqrt, norm, std) held constant")
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
