"""The data model of the op catalogue: the rule families (`Kind`) and what relprop
knows of one graph node (`OpSpec`), attached to the node under `SPEC` and read back
with `spec`. Kept apart from the tables so that every pass, the planner and the
ledger can read a node's family without importing the classification itself.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any

from torch import fx

from ..layers import Kernel

SPEC = "relprop"  # node.meta key of a node's OpSpec


class Kind(Enum):
    LAYER = "layer"
    BATCHNORM = "batchnorm"
    GRADIENT = "gradient"
    PROPORTIONAL = "proportional"
    ELEMENTWISE = "elementwise"
    NORM = "norm"
    RECURRENT = "recurrent"
    META = "meta"
    SOURCE = "source"  # embedding lookup of token ids: relevance is explained at its output
    BILINEAR = "bilinear"  # product of two activations (Q K^T, A V, gated MLP): uniform split
    ATTENTION = "attention"  # scaled_dot_product_attention: AttnLRP / CP-LRP
    SIMILARITY = "similarity"  # cosine similarity: norms held, products split uniformly
    SOFTMAX = "softmax"  # a softmax whose output weighs another activation (attention weights)


@dataclass
class OpSpec:
    """What relprop knows of one graph node."""

    kind: Kind
    label: str  # human-readable op name, e.g. "Conv2d" or "torch.relu"
    path: str  # module path the op belongs to ("" = the model itself)
    fn: Callable[..., Any] | None = None  # forward callable (GRADIENT/PROPORTIONAL/...)
    kernel: Kernel | None = None  # LAYER
    layer_type: type | None = None  # LAYER: module class for composite matching
    zero_below: bool = False  # output and gradient are 0 where the input <= 0 (ReLU)
    nonneg: str = "never"  # output >= 0: "always", "preserve" (if its inputs are), "never"
    product: bool = False  # multiplication/division: rule only while one factor is constant
    gate: bool = False  # output in [0, 1] (sigmoid, hardsigmoid): a gate when it multiplies
    pure_move: bool = False  # one-to-one rearrangement (reshape, permute, ...): invertible
    bn_eps: float = 1e-5  # BATCHNORM, or a LAYER with a BatchNorm folded in
    folded: str | None = None  # path of the BatchNorm folded into this LAYER
    constant_summand: bool = False  # a sum or cat with a constant term (absorbs like a bias)
    module: Any = None  # RECURRENT: the nn.LSTM / nn.GRU it runs
    signal: int | None = None  # signal * gate: the position of the signal (the gate is detached)
    weights: int | None = None  # BILINEAR: the operand holding attention weights (softmax)
    op: Any = None  # the vocabulary entry (relprop.ops.vocabulary.Op); None for user families


def spec(node: fx.Node) -> OpSpec | None:
    return node.meta.get(SPEC)


def node_args(node: fx.Node) -> list[fx.Node]:
    found: list[fx.Node] = []
    fx.node.map_arg((node.args, node.kwargs), lambda n: found.append(n) or n)
    return found
