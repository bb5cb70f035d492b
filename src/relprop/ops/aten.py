"""ATen ops (graphs from torch.export) mapped onto the torch functions of the same
meaning, so that the catalogue's tables, written for fx graphs, classify them too.
An ATen op keeps running as itself: it is wrapped once in an alias that the
tables know (`_ALIASES`: alias -> the function it is classified like).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx

# ATen ops (graphs from torch.export) that mean the same as a torch function handled above.
_ATEN_SAME = {
    "linear": F.linear, "conv1d": F.conv1d, "conv2d": F.conv2d, "conv3d": F.conv3d,
    "conv_transpose1d": F.conv_transpose1d, "conv_transpose2d": F.conv_transpose2d,
    "conv_transpose3d": F.conv_transpose3d,
    "relu": torch.relu, "relu_": torch.relu, "leaky_relu": F.leaky_relu, "elu": F.elu,
    "sigmoid": torch.sigmoid, "tanh": torch.tanh, "softmax": torch.softmax,
    "_softmax": torch.softmax, "add": torch.add, "sub": torch.sub, "mul": torch.mul,
    "div": torch.div, "neg": torch.neg, "mean": torch.mean, "sum": torch.sum,
    "avg_pool1d": F.avg_pool1d, "avg_pool2d": F.avg_pool2d, "avg_pool3d": F.avg_pool3d,
    "adaptive_avg_pool1d": F.adaptive_avg_pool1d, "adaptive_avg_pool2d": F.adaptive_avg_pool2d,
    "adaptive_avg_pool3d": F.adaptive_avg_pool3d, "dropout": F.dropout,
    "max_pool1d": F.max_pool1d, "max_pool2d": F.max_pool2d, "max_pool3d": F.max_pool3d,
    "flatten": torch.flatten, "cat": torch.cat, "stack": torch.stack,
    "permute": torch.permute, "transpose": torch.transpose, "squeeze": torch.squeeze,
    "unsqueeze": torch.unsqueeze, "clone": torch.clone, "t": torch.t, "split": torch.split,
    "chunk": torch.chunk, "unbind": torch.unbind, "narrow": torch.narrow,
    "roll": torch.roll, "flip": torch.flip,
    "relu6": F.relu6, "silu": F.silu, "hardswish": F.hardswish, "hardsigmoid": F.hardsigmoid,
    "gelu": F.gelu, "layer_norm": F.layer_norm, "hardtanh": F.hardtanh, "mish": F.mish,
    "matmul": torch.matmul, "bmm": torch.bmm, "mm": torch.mm,
    "scaled_dot_product_attention": F.scaled_dot_product_attention,
    "embedding": F.embedding, "cosine_similarity": F.cosine_similarity,
    "rsqrt": torch.rsqrt, "sqrt": torch.sqrt, "reciprocal": torch.reciprocal,
    "linalg_vector_norm": torch.linalg.vector_norm, "norm": torch.norm, "std": torch.std,
}
_ATEN_MOVES = {"view", "reshape", "_unsafe_view", "select", "slice", "expand", "alias",
               "contiguous", "_to_copy", "to", "split_with_sizes", "max_pool2d_with_indices",
               "adaptive_max_pool2d", "detach", "lift_fresh_copy", "pad", "constant_pad_nd"}
_ATEN_META = {"sym_size", "sym_numel", "sym_stride", "_assert_tensor_metadata"}
_ATEN_CONSTANT = {"zeros_like", "ones_like", "full_like", "empty_like", "zeros", "ones", "full",
                  "arange", "empty", "new_zeros", "new_ones", "new_full", "new_empty",
                  "scalar_tensor"}
# returned as the torch function itself: layers (classify binds their arguments) and dropout
_ATEN_DIRECT = {F.linear, F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d,
                F.conv_transpose3d, F.dropout}


def _aten_as_function(node: fx.Node) -> Callable[..., Any]:
    """Map an ATen op onto the torch function with the same meaning (args normalised)."""
    op = node.target
    name = op._opname
    if name == "batch_norm":  # (x, weight, bias, mean, var, training, momentum, eps, cudnn)
        a = list(node.args) + [None] * (8 - len(node.args))
        node.args = (a[0], a[3], a[4], a[1], a[2], False, 0.0, a[7] if a[7] is not None else
                     1e-5)
        return F.batch_norm
    if name in _ATEN_SAME:
        same = _ATEN_SAME[name]
        if same in _ATEN_DIRECT:
            return same
        node.meta.setdefault("relprop_label", f"aten.{name}")
        return _aten_alias(op, same)
    if name in _ATEN_MOVES:
        return _aten_alias(op, torch.flatten)
    if name in _ATEN_META or name in _ATEN_CONSTANT:
        return _aten_alias(op, getattr)
    return op


_ATEN_KINDS: dict[Any, Callable[..., Any]] = {}


def _aten_alias(op: Any, like: Callable[..., Any]) -> Callable[..., Any]:
    """A callable running `op` that the tables above classify like `like`; made once per
    op (every export trace asks again: the registries must not grow per call)."""
    known = _ATEN_KINDS.get(op)
    if known is not None:
        return known

    def run(*args: Any, **kwargs: Any) -> Any:
        return op(*args, **kwargs)

    run.__name__ = str(op)
    _ALIASES[run] = like
    _ATEN_KINDS[op] = run
    return run


_ALIASES: dict[Callable[..., Any], Callable[..., Any]] = {}



def meaning(node: fx.Node) -> Any:
    """What a node computes, without changing it: the torch function (an ATen op's
    counterpart), or the method name of a call_method node."""
    if node.op == "call_method":
        return str(node.target)
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        name = target._opname
        if name == "addmm":
            return torch.addmm
        if name in _ATEN_MOVES:
            return name  # like the method of that name
        return _ATEN_SAME.get(name, target)
    return _ALIASES.get(target, target)
