"""`classify`: the OpSpec of one input-dependent node, read from the op vocabulary
(relprop.ops.vocabulary) and, for layers, from what relprop.passes.arguments
recorded. A pure lookup: it changes nothing in the graph.

Families (relprop.ops.spec.Kind):
- LAYER: linear-like with weights (dense, convolution, transposed convolution); the
  composite picks its rule.
- BATCHNORM: eval-mode BatchNorm; folded into the preceding layer or kept as affine.
- GRADIENT: the plain gradient is the rule: relevance moves with values
  (reshape, cat, indexing, max pooling = winner takes all), ReLU (identity
  rule, which for ReLU is its gradient), scaling by a constant.
- PROPORTIONAL: sums (x + y, sum, mean, average pooling) split relevance in
  proportion to the summands, with a small stabilizer.
- ELEMENTWISE: other element-wise non-linearities (sigmoid, tanh, softmax,
  ELU, GELU, SiLU, Hardswish, ReLU6, ...): identity rule, relevance passes
  unchanged. In a product with another activation, a sigmoid/hardsigmoid
  output is a gate: all relevance goes to the other factor.
- NORM: LayerNorm: mean-centering is linear (LRP-0), the division by the
  standard deviation is held constant, the affine part takes epsilon.
- ATTENTION, SIMILARITY, BILINEAR, SOURCE, RECURRENT: the composite's attention,
  cosine-similarity and recurrent rules; token embeddings.
- META: shapes, sizes and other non-tensor values.

Module calls are first rewritten into their functional form
(relprop.passes.functionalize), padding into F.pad (relprop.passes.padding) and
in-place ops into their out-of-place twins (relprop.passes.inplace).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import fx, nn

from ..errors import UnsupportedOperationError
from ..registry import function_family
from .locations import _target_name, node_location, node_path
from .spec import Kind, OpSpec
from .vocabulary import Op, identity, meaning

LAYER_META = "relprop_layer"  # node.meta key: (kernel, layer type) from passes.arguments
BN_EPS_META = "relprop_bn_eps"  # node.meta key: a BatchNorm's eps, from passes.arguments


def _method(name: str) -> Callable[..., Any]:
    def call(obj: Any, *args: Any, **kwargs: Any) -> Any:
        return getattr(obj, name)(*args, **kwargs)

    call.__name__ = f"Tensor.{name}"
    return call


def _without_inplace(fn: Callable[..., Any]) -> Callable[..., Any]:
    def call(*args: Any, **kwargs: Any) -> Any:
        kwargs.pop("inplace", None)
        return fn(*args, **kwargs)

    return call


def classify(node: fx.Node, root: nn.Module) -> OpSpec:
    """The OpSpec of a call_function / call_method node that depends on the input."""
    path = node_path(node)
    label = node.meta.get("relprop_label") or _label(node)
    if "relprop_recurrent" in node.meta:
        module = node.meta["relprop_recurrent"]
        return OpSpec(Kind.RECURRENT, label, path, module=module, layer_type=type(module))
    family = node.meta.get("relprop_family") or (
        function_family(node.target) if node.op == "call_function" else None)
    if family is not None:
        kind = {"identity": Kind.ELEMENTWISE, "gradient": Kind.GRADIENT,
                "proportional": Kind.PROPORTIONAL}[family]
        return OpSpec(kind, label, path, fn=node.target)
    op = meaning(node)
    if op is None or op.kind is None:
        raise UnsupportedOperationError(f"no relevance rule for {node_location(node)}")
    if op.kind is Kind.LAYER:
        kernel, layer_type = node.meta[LAYER_META]
        return OpSpec(Kind.LAYER, label, path, kernel=kernel, layer_type=layer_type, op=op)
    if op.kind is Kind.BATCHNORM:
        return OpSpec(Kind.BATCHNORM, label, path, bn_eps=node.meta[BN_EPS_META],
                      layer_type=node.meta.get("relprop_module_type", nn.BatchNorm2d), op=op)
    if op.kind is Kind.RECURRENT:  # aten.lstm_cell / aten.gru_cell (export)
        return OpSpec(Kind.RECURRENT, label, path, module=op.name, op=op,
                      layer_type=nn.LSTMCell if op.name == "lstm_cell" else nn.GRUCell)
    return OpSpec(op.kind, label, path, fn=_runner(node, op), nonneg=_nonneg(node, op),
                  zero_below=op.zero_below, product=op.product, gate=op.gate,
                  pure_move=op.pure_move, op=op)


def _label(node: fx.Node) -> str:
    if isinstance(node.target, torch._ops.OpOverload) and meaning(node) is not None:
        return f"aten.{node.target._opname}"
    return _target_name(node)


def _runner(node: fx.Node, op: Op) -> Callable[..., Any]:
    """What the node runs: its own spelling (dropout: the identity at inference)."""
    if op.dropout:
        return identity
    if node.op == "call_method":
        return _method(str(node.target))
    if isinstance(node.target, torch._ops.OpOverload):
        return node.target
    return _without_inplace(node.target)


def _nonneg(node: fx.Node, op: Op) -> str:
    if op.name == "pad" and not _pad_keeps_sign(node):
        return "never"
    return op.nonneg


def pad_arguments(node: fx.Node) -> tuple[Any, Any, str, Any]:
    """(input, pad, mode, value) of an F.pad node, defaults filled in."""
    names = ("input", "pad", "mode", "value")
    a = dict(zip(names, node.args, strict=False))
    a.update({k: v for k, v in node.kwargs.items() if k in names})
    return a["input"], a["pad"], a.get("mode", "constant"), a.get("value")


def _pad_keeps_sign(node: fx.Node) -> bool:
    """Padding copies inputs (reflect/replicate/circular) or adds zeros: output >= 0 if the
    input is; a negative constant pad value breaks that."""
    _, _, mode, value = pad_arguments(node)
    return mode != "constant" or value is None or (
        isinstance(value, int | float) and value >= 0)
