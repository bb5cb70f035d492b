"""Held choices (issue 19): what only decides *where* relevance goes carries none itself.

- `hold_choices`: a discrete result (argmax, comparisons, one_hot, histc, ...; the
  positions a topk or sort returns) is constant: its gradient is 0, so relevance could
  never pass it; held, what computes it needs no rule.
- `hold_routers`: a mixture-of-experts router, the one architectural reading here: a
  top-k choice over a softmax (or sigmoid) of scores. Its routing weights, and their
  renormalisation (Mixtral's `router_top_value /= router_top_value.sum()`), are held
  constant with the choice, so each chosen expert's output takes its share of the
  weighted sum in proportion to it and relevance flows through the chosen experts.

Held nodes are marked as held statistics are (`relprop_constant`), with the reason in
`relprop_held`.
"""

from __future__ import annotations

from torch import fx

from ..ops import is_op, meaning, node_args

# ops a router's scores may pass between the softmax and the choice
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
        elif is_op(node, "getitem") and node.args[1:] == (1,) and \
                isinstance(node.args[0], fx.Node):
            source = meaning(node.args[0])
            if source is not None and source.selects:  # (values, indices)[1]
                _hold(node, "choice")
                held.add(node)
    return held


def hold_routers(graph: fx.Graph) -> set[fx.Node]:
    """A top-k over a softmax / sigmoid (through casts and views): a router, held whole."""
    held: set[fx.Node] = set()
    for node in graph.nodes:
        if not is_op(node, "topk") or not node.args:
            continue
        scores = node.args[0]
        while is_op(scores, *_PASSING) and len(node_args(scores)) >= 1:
            scores = scores.args[0]
        if is_op(scores, "softmax", "sigmoid"):
            _hold(node, "routing weights")
            held.add(node)
    return held
