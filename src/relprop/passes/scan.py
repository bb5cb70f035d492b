"""`hold_selection`: a selective state-space scan (Mamba, Mamba2) as MambaLRP (Jafari et
al., NeurIPS 2024) explains it, the one architectural reading here.

Mamba computes its input-dependent scan parameters from one projection of the input,
split into the step size Delta (through a softplus), B and C: x_proj(u) -> (dt, B, C),
Delta = softplus(dt_proj(dt)). MambaLRP holds Delta, A = exp(Delta A), B and C
constant, so the scan is linear in its input u (the state a held-decay weighted sum of
held-scaled inputs, read out by a held C) and relevance flows through u alone. Here:
the split a softplus's input comes from is held whole; what only it computes (the
softplus, exp, the discretised A and B) needs no rule.

Mamba2 splits its input projection into the gate z, xBC and dt, and xBC, after the
causal conv1d, into the scan input x, B and C: the scan input and its parameters come
from one split. The piece Delta scales (the discretised input x Delta) is the scan
input; its sibling pieces (B and C) are held, and so is Delta's own piece, dt. What
only they compute (the clamp of Delta, A Delta and its cumsum, the segment sums and
their masks, exp, C B^T, B and C repeated over the heads) needs no rule, and each
einsum of the chunked scan is linear in x.

A split is held only where that reading fits: a split of parameters alone (no piece
goes on into a layer), or, for Mamba2, where everything dt, B and C compute reaches the
output only as a factor of a product with what x computes (a coefficient of the scan).
Anything else holds nothing, and the scan is refused at its first op without a rule
rather than explained wrong.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import fx

from ..ops import Kind, is_op, meaning, node_args

# ops that pass Delta on unchanged in value (up to its layout, copies, dtype and limits)
_DELTA_PASSES = ("cast", "view", "reshape", "unsqueeze", "expand", "repeat",
                 "repeat_interleave", "clamp", "identity", "contiguous")


def hold_selection(graph: fx.Graph) -> set[fx.Node]:
    """The split projections feeding a softplus (Mamba's x_proj -> dt, B, C), held; for
    Mamba2, the step-size piece and the scan input's sibling pieces (B, C)."""
    dependent: set[fx.Node] = set()
    for node in graph.nodes:  # what depends on a model input
        if node.op == "placeholder" or any(a in dependent for a in node_args(node)):
            dependent.add(node)
    held: set[fx.Node] = set()
    for node in graph.nodes:
        if not is_op(node, "softplus"):
            continue
        piece = _piece(node, dependent)
        if piece is None:
            continue
        split = piece.args[0]
        if not any(_feeds_layer(p) for p in split.users):
            _hold(split, "selective scan parameters (Delta, B, C)")
            held.add(split)
            continue
        scan_input = _scaled_by_delta(node, dependent)
        if scan_input is None:
            continue
        parameters = [p for p in scan_input.args[0].users if p not in (scan_input, piece)]
        if parameters and _only_coefficients([piece, *parameters], scan_input):
            held.add(_hold_piece(graph, piece, "selective scan step size (Delta)"))
            held.update(_hold_piece(graph, p, "selective scan parameters (B, C)")
                        for p in parameters)
    return held


def _hold(node: fx.Node, why: str) -> None:
    node.meta["relprop_constant"] = "statistic"  # (what classify stops at)
    node.meta["relprop_held"] = why


def _hold_piece(graph: fx.Graph, piece: fx.Node, why: str) -> fx.Node:
    """A detached copy of one piece of a split, held in its place: the piece itself is
    the split's own output (a getitem of its list), so computing it without autograd
    would still hand back a tensor that carries the split's gradient."""
    with graph.inserting_after(piece):
        held = graph.call_function(torch.ops.aten.detach.default, (piece,))
    piece.replace_all_uses_with(held, delete_user_cb=lambda user: user is not held)
    held.meta.update({k: v for k, v in piece.meta.items()
                      if k in ("nn_module_stack", "stack_trace", "val")})
    _hold(held, why)
    return held


def _piece(node: fx.Node, dependent: set[fx.Node]) -> fx.Node | None:
    """The piece of a split `node` computes from (through ops of one dependent input)."""
    at: fx.Node | None = node
    while at is not None and not _is_piece(at):
        inputs = [a for a in node_args(at) if a in dependent]
        at = inputs[0] if len(inputs) == 1 else None
    return at


def _is_piece(node: fx.Node) -> bool:
    return is_op(node, "getitem") and is_op(node.args[0], "split")


def _scaled_by_delta(delta: fx.Node, dependent: set[fx.Node]) -> fx.Node | None:
    """The split piece Delta multiplies (through moves, casts and its clamp): the scan
    input x of Mamba2's x * Delta; None unless there is exactly one."""
    found: set[fx.Node] = set()

    def passes(n: fx.Node, user: fx.Node) -> bool:
        return is_op(user, *_DELTA_PASSES) and bool(user.args) and user.args[0] is n

    for n, user in _reached([delta], passes):
        if not passes(n, user) and is_op(user, "mul") and len(user.args) == 2:
            other = user.args[1] if user.args[0] is n else user.args[0]
            if isinstance(other, fx.Node) and other in dependent:
                found.add(_moved_from(other))
    pieces = [f for f in found if f is not None and _is_piece(f)]
    return pieces[0] if len(found) == 1 and len(pieces) == 1 else None


def _only_coefficients(pieces: list[fx.Node], x: fx.Node) -> bool:
    """What the pieces compute reaches the output only as a factor of a product with what
    x computes: coefficients of the scan, linear in x once they are held, never a term of
    their own (which holding them would silently drop)."""
    carries = {x} | {user for _, user in _reached([x], lambda n, u: True)}

    def term(n: fx.Node, user: fx.Node) -> bool:  # not a factor of a product with x
        return not (is_op(user, "mul", "einsum", "matmul") and
                    any(a in carries for a in node_args(user) if a is not n))

    return not any(user.op == "output" for _, user in _reached(pieces, term))


def _moved_from(node: fx.Node) -> fx.Node:
    """What `node` is a view, cast or reshape of (through moves of one input)."""
    while is_op(node, *_DELTA_PASSES) and not is_op(node, "clamp") and \
            isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return node


def _feeds_layer(node: fx.Node) -> bool:
    """`node` reaches a linear or convolution layer through moves (views, casts)."""
    def moves(n: fx.Node, user: fx.Node) -> bool:
        what = meaning(user)
        return what is not None and (what.pure_move or what.view or what.name == "cast")

    return any((what := meaning(user)) is not None and what.kind is Kind.LAYER
               for _, user in _reached([node], moves))


def _reached(starts: list[fx.Node],
             follow: Callable[[fx.Node, fx.Node], bool]) -> Iterator[tuple[fx.Node, fx.Node]]:
    """(node, user) for each user reached from `starts`, once, walking on through the
    users `follow(node, user)` accepts."""
    todo, seen = list(starts), set(starts)
    while todo:
        n = todo.pop()
        for user in n.users:
            if user in seen:
                continue
            seen.add(user)
            yield n, user
            if follow(n, user):
                todo.append(user)
