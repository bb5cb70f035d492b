"""Building a program: from a traced model and a composite to the immutable steps the
interpreter (run.py) executes. Runs the graph passes, asks the composite for each
layer's rule, plans the shadow channel (relprop.shadow), builds each step's call
(calls.py, one handler per rule family), when each value may be freed, and the fused
form (fusion.py). Everything here happens once per model and composite.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import fx

from ..composites import Composite
from ..ops import Kind, is_op, node_args, spec
from ..passes import canonize, mark_nonneg
from ..refs import Ref
from ..shadow import plan_shadows
from ..trace import TracedModel
from .calls import Planning, hands_out_directly, op_call, rule_for
from .fusion import fuse
from .steps import Step


def plan(traced: TracedModel, composite: Composite) -> list[Step]:
    """The steps of `traced` under `composite`, in forward order (canonizes its graph)."""
    graph = traced.graph
    dynamic = canonize(graph, traced.root, functional=traced.method == "fx",
                       leaves=traced.leaves, constants=frozenset(traced.constants),
                       index_inputs=traced.index_inputs, model=traced.model,
                       routing=composite.routing)
    nonneg = frozenset(mark_nonneg(graph, dynamic))
    nodes = list(graph.nodes)
    index = {n: i for i, n in enumerate(nodes)}
    ranked = [n for n in nodes if spec(n) is not None and spec(n).kind is Kind.LAYER
              and spec(n).kernel.kind != "affine"]
    p = Planning(composite, nonneg, {n: i for i, n in enumerate(ranked)}, len(ranked))
    rules = {n: rule_for(n, spec(n), p) for n in nodes if spec(n) is not None}
    producers = {n for n, rule in rules.items() if hands_out_directly(n, spec(n), rule)}
    roles, wanted = plan_shadows(nodes, dynamic, producers)
    p = Planning(composite, nonneg, p.rank, p.layers, frozenset(producers | wanted))
    frees = _frees(nodes, index)
    steps = []
    for i, node in enumerate(nodes):
        s = spec(node)
        steps.append(Step(
            node, node.op, s.kind if s else None,
            _call(node, rules.get(node), p, traced),
            _template(node.args, index), _template(node.kwargs, index), node in dynamic,
            rule=rules.get(node), role=roles.get(node), producer=node in producers,
            shadow_out=node in wanted, frees=frees.get(i, ()),
            half_literal=_names_half((node.args, node.kwargs))))
    return fuse(steps, nonneg, composite)


def _call(node: fx.Node, rule: Any, p: Planning, traced: TracedModel
          ) -> Callable[..., Any] | None:
    """What a node runs (None for placeholders, parameters and the output)."""
    s = spec(node)
    if s is not None:
        call = op_call(node, s, rule, p)
    elif node.op == "call_function":
        call = node.target  # type: ignore[assignment]
    elif node.op == "call_method":
        name = str(node.target)
        call = lambda obj, *a, _n=name, **k: getattr(obj, _n)(*a, **k)  # noqa: E731
    elif node.op == "call_module":  # torch.export's guard on constant inputs
        call = traced.root.get_submodule(str(node.target))
    else:
        return None
    if is_op(node, "assert_metadata"):  # torch.export's dtype/device checks of the trace
        call = _no_check
    if node.meta.get("relprop_constant"):
        call = _as_constant(call)  # a held normaliser and what only it uses
    return call


def _template(value: Any, index: dict[fx.Node, int]) -> Any:
    return fx.node.map_arg(value, lambda n: Ref(index[n]))  # type: ignore[arg-type]


def _frees(nodes: list[fx.Node], index: dict[fx.Node, int]) -> dict[int, tuple[int, ...]]:
    """Step -> the values it is the last to read (autograd keeps what it needs)."""
    last: dict[int, int] = {}
    for i, node in enumerate(nodes):
        for a in node_args(node):
            last[index[a]] = i
    frees: dict[int, list[int]] = {}
    for src, i in last.items():
        if nodes[src].op != "placeholder":
            frees.setdefault(i, []).append(src)
    return {i: tuple(f) for i, f in frees.items()}


HALF = (torch.float16, torch.bfloat16)


def _names_half(value: Any) -> bool:
    found = []
    fx.node.map_aggregate(value, lambda v: found.append(v in HALF) if isinstance(
        v, torch.dtype) else None)
    return any(found)


def _no_check(*args: Any, **kwargs: Any) -> None:
    """The trace's dtype assertions: a half model is explained in float32."""
    return None


def _as_constant(fn: Callable[..., Any]) -> Callable[..., Any]:
    """fn computed without autograd: a value that carries no relevance."""

    def constant(*args: Any, **kwargs: Any) -> Any:
        with torch.no_grad():
            return fn(*args, **kwargs)

    return constant


