"""Which rule family each traced operation belongs to: the tables (data) and
`classify`, the one function that reads them.

Every node that depends on the model input must be known here; anything else
is an error that names the op and where it sits. Module calls are first
rewritten into their functional form (relprop.passes.functionalize), so that `nn.ReLU()`
and `torch.relu`, `nn.Conv2d` and `F.conv2d` are one and the same node and get
the same relevance.

Families:
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
- META: shapes, sizes and other non-tensor values.

Padding (every nn.*Pad*d module, F.pad in every mode, a conv's padding_mode) is
F.pad, a GRADIENT move; in-place ops run as their out-of-place twins. Both are
graph passes: relprop.passes.padding (normalize_padding) and
relprop.passes.inplace (out_of_place).

To support a new op, add it to the table of its family below (or give `classify`
one more branch if it needs its own OpSpec fields); ATen spellings of the same op
(graphs from torch.export) go in relprop.ops.aten.
"""

from __future__ import annotations

import inspect
import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..errors import UnsupportedOperationError
from ..layers import ConvKernel, ConvTransposeKernel, Kernel, LinearKernel
from ..registry import function_family
from ..rules.attention import cosine_similarity
from .aten import _ALIASES, _aten_as_function
from .locations import _target_name, node_location, node_path
from .spec import Kind, OpSpec


def _identity(x: Any, *args: Any, **kwargs: Any) -> Any:
    return x


def conv_padding(padding: Any, ndim: int, weight_shape: torch.Size | None,
                 dilation: tuple[int, ...], where: str) -> tuple[int, ...]:
    if padding == "valid":
        return (0,) * ndim
    if padding == "same":
        if weight_shape is None:
            raise UnsupportedOperationError(f"padding='same' with a computed weight at {where}")
        pads = []
        for k, d in zip(weight_shape[2:], dilation, strict=True):
            total = d * (k - 1)
            if total % 2:
                raise UnsupportedOperationError(
                    f"padding='same' with an even kernel (asymmetric padding) at {where}")
            pads.append(total // 2)
        return tuple(pads)
    return ntuple(padding, ndim)


def ntuple(v: Any, n: int) -> tuple[int, ...]:
    if isinstance(v, int):
        return (v,) * n
    v = tuple(v)
    return v * n if len(v) == 1 else v


_CONV_FUNCTIONS = {F.conv1d: 1, F.conv2d: 2, F.conv3d: 3}
_CONV_TYPES = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_CONV_T_FUNCTIONS = {F.conv_transpose1d: 1, F.conv_transpose2d: 2, F.conv_transpose3d: 3}
_CONV_T_TYPES = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}


# ---------------------------------------------------------------- classification

_RELU = {F.relu, torch.relu, torch.relu_, F.relu_}
_GRADIENT_FUNCTIONS = {F.prelu}  # positively homogeneous: the gradient is the identity rule
_MOVE_FUNCTIONS = {
    torch.flatten, torch.reshape, torch.cat, torch.concat, torch.concatenate, torch.stack,
    operator.getitem, torch.permute, torch.transpose, torch.squeeze, torch.unsqueeze,
    torch.clone, torch.t, torch.split, torch.chunk, torch.unbind, torch.narrow, torch.movedim,
    torch.unflatten, torch.swapaxes, torch.flip, torch.roll,
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.adaptive_max_pool1d, F.adaptive_max_pool2d,
    F.adaptive_max_pool3d, F.pad, F.leaky_relu, _identity,
}
_PURE_MOVES = {torch.flatten, torch.reshape, torch.permute, torch.transpose, torch.squeeze,
               torch.unsqueeze, torch.unflatten, torch.movedim, torch.swapaxes, torch.t,
               torch.clone, _identity}
_PURE_MOVE_METHODS = {"view", "reshape", "flatten", "permute", "transpose", "contiguous",
                      "squeeze", "unsqueeze", "unflatten", "view_as", "reshape_as", "movedim",
                      "swapaxes", "t", "clone"}
_DROPOUT = {F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout,
            F.feature_alpha_dropout, torch.dropout, torch.alpha_dropout, torch.feature_dropout,
            torch.feature_alpha_dropout}
_SUM_FUNCTIONS = {operator.add, torch.add, operator.sub, torch.sub, operator.iadd,
                  operator.isub, torch.sum, torch.mean, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
                  F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d}
_ELEMENTWISE = {torch.sigmoid, F.sigmoid, torch.tanh, F.tanh, F.softmax, torch.softmax, F.elu,
                F.relu6, F.silu, F.hardswish, F.hardsigmoid, F.gelu, F.mish, F.selu, F.celu,
                F.softplus, F.hardtanh}
_NONNEG_ELEMENTWISE = {torch.sigmoid, F.sigmoid, F.softmax, torch.softmax, F.relu6,
                       F.hardsigmoid, F.softplus}
# Element-wise maps that are 0 (and pass no relevance) wherever their input is <= 0.
_ZERO_BELOW = {F.relu6}
# Outputs in [0, 1] that scale another tensor: in a product they are gates.
GATES = {torch.sigmoid, F.sigmoid, F.hardsigmoid}
_SCALE = {operator.mul, torch.mul, operator.truediv, torch.div, operator.neg, torch.neg,
          operator.imul, operator.itruediv}
_META = {getattr, len}
# Products of two tensors that are bilinear maps (the uniform rule when both are
# activations; a linear map of the one activation otherwise).
_MATMUL = {torch.matmul, operator.matmul, torch.bmm, torch.mm}
_MATMUL_METHODS = {"matmul", "bmm", "mm", "__matmul__"}
# Token-id lookups: with integer inputs, relevance is explained at their output.
_EMBEDDING = {F.embedding, torch.embedding}
# Normalisers: held constant where they scale an activation (RMSNorm's 1/rms, x / |x|).
STATISTICS = {torch.rsqrt, torch.sqrt, torch.norm, torch.linalg.vector_norm, torch.std,
              torch.reciprocal}
STATISTIC_METHODS = {"rsqrt", "sqrt", "norm", "std", "reciprocal"}
# New tensors whose values do not depend on the input's values (only on its shape).
_CONSTANT_FUNCTIONS = {torch.zeros_like, torch.ones_like, torch.full_like, torch.empty_like,
                       torch.zeros, torch.ones, torch.full, torch.arange, torch.empty}
_CONSTANT_METHODS = {"new_zeros", "new_ones", "new_full", "new_empty", "new_tensor"}
_INPLACE = {operator.iadd: operator.add, operator.isub: operator.sub,
            operator.imul: operator.mul, operator.itruediv: operator.truediv,
            torch.relu_: torch.relu, F.relu_: F.relu}

_MOVE_METHODS = {
    "view", "reshape", "flatten", "permute", "transpose", "contiguous", "squeeze", "unsqueeze",
    "expand", "expand_as", "repeat", "t", "clone", "chunk", "split", "unflatten", "view_as",
    "reshape_as", "narrow", "float", "double", "half", "to", "type_as", "unbind", "flip",
    "movedim", "swapaxes", "detach_",
}
_META_METHODS = {"size", "dim", "numel", "__len__", "ndimension", "nelement"}
_SUM_METHODS = {"add", "add_", "sub", "sub_", "sum", "mean", "__add__", "__sub__"}
_ELEMENTWISE_METHODS = {"sigmoid", "sigmoid_", "tanh", "tanh_", "softmax", "relu6"}
_SCALE_METHODS = {"mul", "mul_", "div", "div_", "neg", "__mul__", "__truediv__"}
_INPLACE_METHODS = {"relu_": "relu", "add_": "add", "sub_": "sub", "mul_": "mul",
                    "div_": "div", "sigmoid_": "sigmoid", "tanh_": "tanh"}


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


def _bind(fn: Callable, args: tuple, kwargs: dict) -> dict[str, Any]:
    sig = _REFERENCE_SIGNATURES[fn]
    bound = sig.bind(*args, **kwargs)
    bound.apply_defaults()
    return dict(bound.arguments)


def _sig(src: Callable) -> inspect.Signature:
    return inspect.signature(src)


def _linear_sig(input, weight, bias=None): ...  # noqa: ANN001, E704
def _conv_sig(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1): ...  # noqa
def _conv_t_sig(input, weight, bias=None, stride=1, padding=0, output_padding=0,  # noqa
                groups=1, dilation=1): ...
def _bn_sig(input, running_mean, running_var, weight=None, bias=None, training=False,  # noqa
            momentum=0.1, eps=1e-5): ...


_REFERENCE_SIGNATURES = {
    F.linear: _sig(_linear_sig),
    **{f: _sig(_conv_sig) for f in _CONV_FUNCTIONS},
    **{f: _sig(_conv_t_sig) for f in _CONV_T_FUNCTIONS},
    F.batch_norm: _sig(_bn_sig),
}


def classify(node: fx.Node, root: nn.Module) -> OpSpec:
    """The OpSpec of a call_function / call_method node that depends on the input.

    Layer and BatchNorm nodes are normalised in place to positional arguments
    (x, weight, bias) and (x, mean, var, weight, bias).
    """
    path = node_path(node)
    label = node.meta.get("relprop_label") or _target_name(node)
    if node.op == "call_method":
        return _classify_method(node, path, label)
    fn = node.target
    if "relprop_recurrent" in node.meta:
        module = node.meta["relprop_recurrent"]
        return OpSpec(Kind.RECURRENT, label, path, module=module, layer_type=type(module))
    family = node.meta.get("relprop_family") or function_family(fn)
    if family is not None:
        return _family_spec(family, fn, label, path)
    if isinstance(fn, torch._ops.OpOverload):
        if fn._opname in ("lstm_cell", "gru_cell"):
            return OpSpec(Kind.RECURRENT, label, path, module=fn._opname,
                          layer_type=nn.LSTMCell if fn._opname == "lstm_cell" else nn.GRUCell)
        fn = _aten_as_function(node)
    if fn in _CONV_FUNCTIONS or fn in _CONV_T_FUNCTIONS or fn is F.linear:
        a = _bind(fn, node.args, node.kwargs)
        if fn in _CONV_T_FUNCTIONS:
            nd = _CONV_T_FUNCTIONS[fn]
            kernel: Kernel = ConvTransposeKernel(
                nd, ntuple(a["stride"], nd), ntuple(a["padding"], nd),
                ntuple(a["output_padding"], nd), ntuple(a["dilation"], nd), int(a["groups"]))
            layer_type = node.meta.get("relprop_module_type", _CONV_T_TYPES[nd])
        elif fn is F.linear:
            kernel = LinearKernel()
            layer_type = node.meta.get("relprop_module_type", nn.Linear)
        else:
            nd = _CONV_FUNCTIONS[fn]
            dilation = ntuple(a["dilation"], nd)
            wshape = _static_shape(a["weight"], root)
            kernel = ConvKernel(nd, ntuple(a["stride"], nd),
                                conv_padding(a["padding"], nd, wshape, dilation,
                                              node_location(node)),
                                dilation, int(a["groups"]))
            layer_type = node.meta.get("relprop_module_type", _CONV_TYPES[nd])
        node.args, node.kwargs = (a["input"], a["weight"], a["bias"]), {}
        return OpSpec(Kind.LAYER, label, path, kernel=kernel, layer_type=layer_type)
    if fn is F.batch_norm:
        a = _bind(fn, node.args, node.kwargs)
        node.args = (a["input"], a["running_mean"], a["running_var"], a["weight"], a["bias"])
        node.kwargs = {}
        return OpSpec(Kind.BATCHNORM, label, path, bn_eps=float(a["eps"]),
                      layer_type=node.meta.get("relprop_module_type", nn.BatchNorm2d))
    aten = _ALIASES.get(fn)  # an ATen op runs as itself but is classified like `aten`
    meaning = _INPLACE.get(aten or fn, aten or fn)

    def run(default: Callable[..., Any]) -> Callable[..., Any]:
        return fn if aten is not None else default

    if meaning in _RELU:
        return OpSpec(Kind.GRADIENT, label, path, fn=run(_without_inplace(meaning)),
                      zero_below=True, nonneg="always")
    if meaning in _MOVE_FUNCTIONS:
        nonneg = "never" if meaning is F.leaky_relu or (
            meaning is F.pad and not _pad_keeps_sign(node)) else "preserve"
        return OpSpec(Kind.GRADIENT, label, path, fn=run(_without_inplace(meaning)),
                      nonneg=nonneg, pure_move=meaning in _PURE_MOVES)
    if meaning in _DROPOUT or _is_stochastic_depth(meaning):
        return OpSpec(Kind.GRADIENT, label, path, fn=_identity, nonneg="preserve",
                      pure_move=True)
    if meaning in _SUM_FUNCTIONS:
        sub = meaning in (operator.sub, torch.sub, operator.isub)
        return OpSpec(Kind.PROPORTIONAL, label, path, fn=run(meaning),
                      nonneg="never" if sub else "preserve")
    if meaning in _ELEMENTWISE:
        return OpSpec(Kind.ELEMENTWISE, label, path, fn=run(_without_inplace(meaning)),
                      nonneg="always" if meaning in _NONNEG_ELEMENTWISE else "never",
                      zero_below=meaning in _ZERO_BELOW, gate=meaning in GATES)
    if meaning is F.layer_norm:
        return OpSpec(Kind.NORM, label, path, fn=run(meaning))
    if meaning in _MATMUL:
        return OpSpec(Kind.GRADIENT, label, path, fn=run(meaning), product=True)
    if meaning is F.scaled_dot_product_attention:
        return OpSpec(Kind.ATTENTION, label, path, fn=run(meaning))
    if meaning in _EMBEDDING:
        return OpSpec(Kind.SOURCE, label, path, fn=run(meaning))
    if meaning is F.cosine_similarity:
        # the norms held constant, products split uniformly (relprop.rules.attention)
        return OpSpec(Kind.GRADIENT, label, path, fn=cosine_similarity)
    if meaning in _GRADIENT_FUNCTIONS:
        return OpSpec(Kind.GRADIENT, label, path, fn=run(meaning))
    if meaning in _SCALE:
        return OpSpec(Kind.GRADIENT, label, path, fn=run(meaning), product=True)
    if meaning in _META:
        return OpSpec(Kind.META, label, path, fn=run(meaning))
    if meaning in _CONSTANT_FUNCTIONS:
        return OpSpec(Kind.META, label, path, fn=run(meaning))
    raise UnsupportedOperationError(f"no relevance rule for {node_location(node)}")


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


def _family_spec(family: str, fn: Callable[..., Any], label: str, path: str) -> OpSpec:
    kind = {"identity": Kind.ELEMENTWISE, "gradient": Kind.GRADIENT,
            "proportional": Kind.PROPORTIONAL}[family]
    return OpSpec(kind, label, path, fn=fn)


def _is_stochastic_depth(fn: Any) -> bool:
    """torchvision.ops.stochastic_depth: the identity at inference."""
    return getattr(fn, "__name__", "") == "stochastic_depth" and \
        getattr(fn, "__module__", "").startswith("torchvision.ops")


def _classify_method(node: fx.Node, path: str, label: str) -> OpSpec:
    name = _INPLACE_METHODS.get(node.target, node.target)
    fn = _method(name)
    if name == "relu":
        return OpSpec(Kind.GRADIENT, label, path, fn=fn, zero_below=True, nonneg="always")
    if name in _MOVE_METHODS:
        return OpSpec(Kind.GRADIENT, label, path, fn=fn, nonneg="preserve",
                      pure_move=name in _PURE_MOVE_METHODS)
    if name in _META_METHODS or name in _CONSTANT_METHODS:
        return OpSpec(Kind.META, label, path, fn=fn)
    if name in _SUM_METHODS:
        return OpSpec(Kind.PROPORTIONAL, label, path, fn=fn,
                      nonneg="never" if name in ("sub", "__sub__") else "preserve")
    if name in _ELEMENTWISE_METHODS:
        return OpSpec(Kind.ELEMENTWISE, label, path, fn=fn,
                      nonneg="always" if name in ("sigmoid", "softmax") else "never",
                      gate=name == "sigmoid")
    if name in _SCALE_METHODS or name in _MATMUL_METHODS:
        return OpSpec(Kind.GRADIENT, label, path, fn=fn, product=True)
    raise UnsupportedOperationError(
        f"no relevance rule for {node_location(node)}")


def _static_shape(arg: Any, root: nn.Module) -> torch.Size | None:
    if isinstance(arg, fx.Node) and arg.op == "get_attr":
        from ..trace import attribute

        return attribute(root, str(arg.target)).shape
    return None
