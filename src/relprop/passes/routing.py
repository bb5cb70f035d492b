"""Held choices (issue 19): what only decides *where* relevance goes carries none itself.

- `hold_choices`: a discrete result (argmax, comparisons, one_hot, histc, ...; the
  positions a topk or sort returns) is constant: its gradient is 0, so relevance could
  never pass it; held, what computes it needs no rule.
- `hold_routers`: a mixture-of-experts router, the one architectural reading here: a
  top-k choice over a softmax (or sigmoid) of scores. The composite's `routing` says
  how relevance crosses it:

  - "held" (the default): the routing weights, and their renormalisation (Mixtral's
    `router_top_value /= router_top_value.sum()`), are held constant with the choice,
    so each chosen expert's output takes its share of the weighted sum in proportion
    to it and relevance flows through the chosen experts only.
  - "uniform": the choice stays held, the weights do not: each product weight *
    expert output is a bilinear product of two activations, split half and half (the
    uniform rule, as for attention and gates); the weight's half goes back through the
    renormalisation (its sum held, as RMSNorm's norm is), the top-k values (a move) and
    the router's softmax (AttnLRP's Taylor rule, the softmax's gradient, as at an
    attention softmax) to the router's layer and the hidden state.

Held nodes are marked as held statistics are (`relprop_constant`), with the reason in
`relprop_held`.

- `grouped_experts`: the experts' grouped matmul of transformers' grouped_mm path, traced
  as transformers' fallback op, runs as relprop's twin (relprop.rules.experts): the same
  values, a backward that computes the input's gradient only.
"""

from __future__ import annotations

import torch
from torch import fx

from ..ops import is_op, meaning, node_args
from ..rules.experts import grouped_mm

# ops a router's scores may pass between the softmax and the choice, and its weights
# between the choice and their renormalisation
_PASSING = ("cast", "view", "reshape", "flatten", "contiguous", "identity")


def _hold(node: fx.Node, why: str) -> None:
    node.meta["relprop_constant"] = "statistic"  # (what relprop.passes.classify stops at)
    node.meta["relprop_held"] = why


def hold_choices(graph: fx.Graph) -> set[fx.Node]:
    """Discrete results, and the positions of a topk / sort, marked held."""
    held: set[fx.Node] = set()
    for node in graph.nodes:
        what = meaning(node)
        if what is not None and what.choice:
            _hold(node, "choice")
            held.add(node)
        elif _element(node, 1):
            source = meaning(node.args[0])
            if source is not None and source.selects:  # (values, indices)[1]
                _hold(node, "choice")
                held.add(node)
    return held


def hold_routers(graph: fx.Graph, routing: str = "held") -> set[fx.Node]:
    """A top-k over a softmax / sigmoid (through casts and views): a router, held whole
    ("held"), or only its choice and renormalisation ("uniform")."""
    held: set[fx.Node] = set()
    for node in graph.nodes:
        if not is_op(node, "topk") or not node.args:
            continue
        scores = node.args[0]
        while is_op(scores, *_PASSING) and len(node_args(scores)) >= 1:
            scores = scores.args[0]
        if not is_op(scores, "softmax", "sigmoid"):
            continue
        if routing == "held":
            _hold(node, "routing weights")
            held.add(node)
            continue
        if is_op(scores, "softmax"):
            _taylor(scores)
        for divisor in _renormalisers(node):
            _hold(divisor, "routing renormalisation")
            held.add(divisor)
    return held


def _taylor(softmax: fx.Node) -> None:
    """AttnLRP's softmax rule, the Taylor rule at its input: in gradient form the softmax's
    own gradient (the rule family "gradient"), as at an attention softmax."""
    if softmax.op == "call_method":  # x.softmax(dim): a function, as the family needs
        softmax.op, softmax.target = "call_function", torch.Tensor.softmax
    softmax.meta["relprop_family"] = "gradient"
    softmax.meta["relprop_label"] = "softmax (router weights: Taylor rule)"


def _element(node: fx.Node, i: int) -> bool:
    """node is `source[i]` of a node's result tuple."""
    return is_op(node, "getitem") and node.args[1:] == (i,) and \
        isinstance(node.args[0], fx.Node)


def _renormalisers(topk: fx.Node) -> list[fx.Node]:
    """The divisors of the top-k values (through casts and views): w / w.sum(), held."""
    values = [u for u in topk.users if _element(u, 0)]
    found: list[fx.Node] = []
    while values:
        node = values.pop()
        for user in node.users:
            if is_op(user, *_PASSING) and user.args and user.args[0] is node:
                values.append(user)
            elif is_op(user, "div") and len(user.args) > 1 and user.args[0] is node and \
                    isinstance(user.args[1], fx.Node) and user.args[1] is not node:
                found.append(user.args[1])
    return found


def grouped_experts(graph: fx.Graph) -> None:
    """transformers::grouped_mm_fallback -> relprop::grouped_mm_fallback (same schema)."""
    for node in graph.nodes:
        target = node.target
        if node.op == "call_function" and isinstance(target, torch._ops.OpOverload) and \
                target.namespace == "transformers" and target._opname == "grouped_mm_fallback":
            node.target = grouped_mm._opoverload
