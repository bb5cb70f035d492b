"""Fusion: a rewrite of the planned steps that gives layers (with the activation after
them), sum -> ReLU pairs and max pooling a fused form, run when not
recording. Same relevance as the unfused steps, fewer passes over activation maps.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, fx

from ..composites import Composite
from ..ops import Kind, max_pool_with_indices, node_args, spec
from ..rules.base import RELU, Activation
from ..rules.proportional import ProportionalRelu
from ..shadow.functions import fused_direct
from .steps import Step


def fuse(steps: list[Step], nonneg: frozenset[fx.Node], composite: Composite) -> list[Step]:
    """The steps with their fused form (`Step.fast`): layers with the activation after
    them, and sum -> ReLU pairs, as one Function each; max pooling that keeps int32
    argmax positions only.

    A rewrite that a recorded run skips (the ledger wants every node apart); none with
    a relevance filter, or on steps that carry the shadow channel (relprop.shadow).
    """
    if composite.top_k is not None:
        return steps
    nodes = [s.node for s in steps]
    index = {n: i for i, n in enumerate(nodes)}
    fast: dict[int, Callable[..., Any]] = {}
    shadowed = {i for i, s in enumerate(steps) if s.producer or s.shadow_out}
    for i, step in enumerate(steps):
        if i in fast or (i in shadowed and step.rule is None):
            continue
        op = spec(step.node).op if spec(step.node) is not None else None
        if op is not None and op.pool_dims and not op.returns_indices:
            fast[i] = _lean_max_pool(step.node)
            continue
        if step.kind is Kind.PROPORTIONAL and composite.stabilizer > 0:
            relu = _sole_activation(nodes[i])
            if relu is not None and relu[1] == RELU and index[relu[0]] not in shadowed:
                fast[i] = functools.partial(_sum_then_relu, spec(nodes[i]).fn,
                                            composite.stabilizer)
                fast[index[relu[0]]] = passthrough
            continue
        if step.kind is not Kind.LAYER:
            continue
        if step.shadow_out:
            continue
        rule = step.rule
        node = nodes[i]
        follower = _sole_activation(node)
        if follower is not None and index[follower[0]] in shadowed:
            follower = None
        if step.producer and rule.takes_relu_inside:  # z-box at the input: its ReLU joins it
            if follower is not None and follower[1] == RELU:
                fast[i] = functools.partial(step.call, relu_after=True)
                fast[index[follower[0]]] = passthrough
            continue
        if rule.is_plain_gradient:
            fast[i] = step.call.plain  # LRP-0: the plain gradient, exactly
            continue
        if not rule.fusable(node.args[0] in nonneg) or spec(node).kernel.kind == "affine":
            continue
        fused = functools.partial(step.call.fused, None if follower is None else follower[1])
        # flat, w-square: relevance to the input's shadow (relprop.shadow.functions.fused_direct)
        fast[i] = functools.partial(fused_direct, step.call, fused) if step.producer else fused
        if follower is not None:
            fast[index[follower[0]]] = passthrough
    return [dataclasses.replace(s, fast=fast[i]) if fast.get(i) is not None else s
            for i, s in enumerate(steps)]


def _sole_activation(node: fx.Node) -> tuple[fx.Node, Activation] | None:
    """The node's only user, if it is a ReLU or a sign-preserving identity-rule activation."""
    users = list(node.users)
    if len(users) != 1:
        return None
    act = users[0]
    s = spec(act)
    if s is None or not act.args or act.args[0] is not node or \
            any(isinstance(a, fx.Node) for a in node_args(act) if a is not node):
        return None
    if s.kind is Kind.GRADIENT and s.zero_below and len(act.args) == 1:
        return act, RELU
    if s.kind is not Kind.ELEMENTWISE or s.fn is None:
        return None
    fn, rest, kwargs = s.fn, act.args[1:], dict(act.kwargs)

    def apply(z: Tensor) -> Tensor:
        return fn(z, *rest, **kwargs)

    if not _zero_and_sign_preserving(apply):
        return None
    return act, apply


def _zero_and_sign_preserving(act: Callable[[Tensor], Tensor]) -> bool:
    """f(0) = 0 (relevance at z = 0 is lost in gradient form; fusing must not revive it)
    and sign(f(z)) = sign(z) or f(z) = 0 (the fused rules read the side of z from the
    sign of their factor), checked on a grid from -1e6 to 1e6."""
    magnitudes = 10 ** torch.linspace(-6, 6, 601, dtype=torch.float64)
    probe = torch.cat([-magnitudes, magnitudes, torch.zeros(1, dtype=torch.float64)])
    try:
        out = act(probe)
    except Exception:
        return False
    return bool(out[-1] == 0) and bool((out * probe >= 0).all())


def _lean_max_pool(node: fx.Node) -> Callable[..., Any] | None:
    """Max pooling that saves int32 argmax positions only (LeanMaxPool, below)."""
    op = spec(node).op
    with_indices, flag = max_pool_with_indices(op)
    ndim = op.pool_dims
    wants_indices = node.args[flag] if len(node.args) > flag else node.kwargs.get(
        "return_indices", False)
    if wants_indices is not False:
        return None

    def pool(x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        kwargs.pop("return_indices", None)
        args = args[:flag - 1]
        return LeanMaxPool.apply(x, lambda t: with_indices(t, *args, **kwargs), ndim)

    return pool


def _sum_then_relu(fn: Callable[..., Tensor], eps: float, *args: Any, **kwargs: Any) -> Tensor:
    return ProportionalRelu.apply(fn(*args, **kwargs), eps)


def passthrough(x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
    return x


class LeanMaxPool(torch.autograd.Function):
    """Max pooling whose backward keeps only the argmax positions, as int32.

    Autograd's own max pooling keeps its input and int64 indices: three times
    the input's size in float32. Relevance follows the gradient through max
    pooling, which needs only where each maximum came from.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, pool: Callable[[Tensor], tuple[Tensor, Tensor]],  # type: ignore[override]
                ndim: int) -> Tensor:
        y, index = pool(x)
        ctx.shape, ctx.ndim = x.shape, ndim
        small = math.prod(x.shape[-ndim:]) < 2**31  # indices count within one channel
        ctx.save_for_backward(index.to(torch.int32) if small else index)
        return y

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        (index,) = ctx.saved_tensors
        shape = ctx.shape
        lead = math.prod(shape[:-ctx.ndim])
        out = grad.new_zeros(lead, math.prod(shape[-ctx.ndim:]))
        # scatter_add, not max_unpool: overlapping windows can pick the same input twice
        out.scatter_add_(1, index.reshape(lead, -1).long(), grad.reshape(lead, -1))
        return out.view(shape), None, None
