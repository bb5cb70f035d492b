"""Which rule family each traced operation belongs to.

Every node that depends on the model input must be known here; anything else
is an error that names the op and where it sits. Module calls are first
rewritten into their functional form (`functionalize`), so that `nn.ReLU()`
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
graph passes in relprop.canonize (normalize_padding, out_of_place).
"""

from __future__ import annotations

import inspect
import operator
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from .errors import UnsupportedOperationError
from .layers import ConvKernel, ConvTransposeKernel, Kernel, LinearKernel
from .registry import function_family, module_family


class Kind(Enum):
    LAYER = "layer"
    BATCHNORM = "batchnorm"
    GRADIENT = "gradient"
    PROPORTIONAL = "proportional"
    ELEMENTWISE = "elementwise"
    NORM = "norm"
    RECURRENT = "recurrent"
    META = "meta"


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
    constant_summand: bool = False  # PROPORTIONAL with a constant term (absorbs like a bias)
    module: Any = None  # RECURRENT: the nn.LSTM / nn.GRU it runs
    signal: int | None = None  # signal * gate: the position of the signal (the gate is detached)


def _identity(x: Any, *args: Any, **kwargs: Any) -> Any:
    return x


def node_path(node: fx.Node) -> str:
    """The module path a node belongs to, from the tracer's module stack."""
    if "relprop_path" in node.meta:
        return node.meta["relprop_path"]
    stack = node.meta.get("nn_module_stack")
    if stack:
        return list(stack.values())[-1][0] if isinstance(list(stack.values())[-1], tuple) \
            else list(stack.keys())[-1]
    return ""


def node_location(node: fx.Node) -> str:
    """'op X (graph node N) in module Y (file:line: code)' for error messages."""
    label = node.meta.get("relprop_label") or _target_name(node)
    path = node_path(node)
    where = f" in module '{path}'" if path else " in the model's forward"
    frame = user_frame(node.stack_trace or "")
    return f"'{label}' (graph node '{node.name}'){where}" + (f" ({frame})" if frame else "")


_PACKAGE = str(Path(__file__).resolve().parent)


def user_frame(stack_trace: str) -> str:
    """The innermost frame of a traced stack that is the user's code, not torch's."""
    lines = stack_trace.strip().splitlines()
    frames = []
    for i, line in enumerate(lines):
        line = line.strip()
        if line.startswith("File "):
            code = lines[i + 1].strip() if i + 1 < len(lines) else ""
            frames.append((line, code))
    for line, code in reversed(frames):
        if "/torch/" not in line and "\\torch\\" not in line and _PACKAGE not in line:
            parts = line.split('"')
            file = parts[1] if len(parts) > 2 else line
            lineno = line.split("line ")[-1].split(",")[0]
            return f"{file}:{lineno}: {code}"
    return ""


def _target_name(node: fx.Node) -> str:
    t = node.target
    if isinstance(t, str):
        return f"Tensor.{t}" if node.op == "call_method" else t
    mod = getattr(t, "__module__", "") or ""
    name = getattr(t, "__name__", repr(t))
    if mod.startswith("torch.nn.functional"):
        return f"F.{name}"
    if mod == "_operator":
        return f"operator.{name}"
    if mod.startswith("torch"):
        return f"torch.{name}"
    return f"{mod}.{name}" if mod else name


# ---------------------------------------------------------------- functionalize

def _conv_padding(padding: Any, ndim: int, weight_shape: torch.Size | None,
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
    return _ntuple(padding, ndim)


def _ntuple(v: Any, n: int) -> tuple[int, ...]:
    if isinstance(v, int):
        return (v,) * n
    v = tuple(v)
    return v * n if len(v) == 1 else v


_CONV_MODULES = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}
_CONV_FUNCTIONS = {F.conv1d: 1, F.conv2d: 2, F.conv3d: 3}
_CONV_TYPES = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_CONV_T_MODULES = {nn.ConvTranspose1d: 1, nn.ConvTranspose2d: 2, nn.ConvTranspose3d: 3}
_CONV_T_FUNCTIONS = {F.conv_transpose1d: 1, F.conv_transpose2d: 2, F.conv_transpose3d: 3}
_CONV_T_TYPES = {nd: cls for cls, nd in _CONV_T_MODULES.items()}
_CONV_T_BY_NDIM = {nd: fn for fn, nd in _CONV_T_FUNCTIONS.items()}


def _params(graph: fx.Graph, node: fx.Node, path: str, *names: str) -> list[fx.Node | None]:
    out: list[fx.Node | None] = []
    with graph.inserting_before(node):
        for name in names:
            out.append(graph.get_attr(f"{path}.{name}" if path else name))
    return out


def functionalize(graph: fx.Graph, root: nn.Module, leaves: dict[str, str] | None = None) -> None:
    """Rewrite every call_module node into the equivalent call_function node.

    The rewritten graph never calls the user's modules (so their hooks never
    fire) and reads parameters through get_attr nodes. Raises for modules
    relprop has no rule for.
    """
    for node in list(graph.nodes):
        if node.op != "call_module":
            continue
        module = root.get_submodule(node.target)
        path = str(node.target)
        node.meta["relprop_path"] = path
        node.meta["relprop_label"] = type(module).__name__
        node.meta["relprop_module_type"] = type(module)
        x = node.args[0] if node.args else node.kwargs.get("input")
        family = module_family(module, path, leaves or {})
        if family is not None:  # a leaf chosen by the user: runs its own forward, no hooks
            node.meta["relprop_family"] = family
            node.op, node.target = "call_function", _leaf_forward(module)
            continue
        if isinstance(module, _RECURRENT):
            node.meta["relprop_recurrent"] = module
            node.op, node.target = "call_function", _recurrent_marker(module)
            continue
        new = _module_as_function(graph, node, module, path, x)
        if new is None:
            raise UnsupportedOperationError(
                f"no relevance rule for module {node_location(node)} of type "
                f"{type(module).__module__}.{type(module).__name__}"
            )
        fn, args, kwargs = new
        if getattr(module, "inplace", False) is True:  # nn.ReLU(inplace=True), nn.Dropout(...)
            node.meta["relprop_inplace"] = True  # canonize.out_of_place redirects later reads
        node.op = "call_function"
        node.target = fn
        node.args = tuple(args)
        node.kwargs = kwargs


_RECURRENT = (nn.LSTM, nn.GRU, nn.LSTMCell, nn.GRUCell)


def _recurrent_marker(module: nn.Module) -> Callable[..., Any]:
    """Placeholder target; the program runs the module with relprop's recurrent rule."""

    def recurrent(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("recurrent nodes are run by the program")

    recurrent.__name__ = type(module).__name__
    return recurrent


def _leaf_forward(module: nn.Module) -> Callable[..., Any]:
    """Call a leaf module's forward directly (its hooks stay silent)."""

    def forward(*args: Any, **kwargs: Any) -> Any:
        return type(module).forward(module, *args, **kwargs)

    forward.__name__ = type(module).__name__
    return forward


def _module_as_function(graph: fx.Graph, node: fx.Node, m: nn.Module, path: str, x: Any):
    p = lambda *names: _params(graph, node, path, *names)  # noqa: E731
    if isinstance(m, nn.Linear):
        w, = p("weight")
        b = p("bias")[0] if m.bias is not None else None
        return F.linear, (x, w, b), {}
    for cls, nd in _CONV_MODULES.items():
        if isinstance(m, cls):
            w, = p("weight")
            b = p("bias")[0] if m.bias is not None else None
            if m.padding_mode != "zeros":  # torch's own Conv: F.pad, then an unpadded conv
                x = _padding_node(graph, node, x, m, path)
                pad: Any = (0,) * nd
            else:
                pad = m.padding if not isinstance(m.padding, str) else _conv_padding(
                    m.padding, nd, m.weight.shape, m.dilation, node_location(node))
            return _CONV_FUNCTIONS_BY_NDIM[nd], (x, w, b, m.stride, pad, m.dilation, m.groups), {}
    for cls, nd in _CONV_T_MODULES.items():
        if isinstance(m, cls):
            return _conv_transpose_call(graph, node, m, path, x, nd)
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        if not m.track_running_stats or m.running_mean is None:
            raise UnsupportedOperationError(
                f"BatchNorm without running statistics at {node_location(node)}: it normalises "
                "with batch statistics, which has no LRP rule")
        rm, rv = p("running_mean", "running_var")
        w = p("weight")[0] if m.weight is not None else None
        b = p("bias")[0] if m.bias is not None else None
        return F.batch_norm, (x, rm, rv, w, b, False, 0.0, m.eps), {}
    if isinstance(m, tuple(_PAD_MODULES)):
        mode = _PAD_MODULES[next(c for c in _PAD_MODULES if isinstance(m, c))]
        value = float(m.value) if mode == "constant" else None
        return F.pad, (x, tuple(m.padding), mode, value), {}
    simple = _SIMPLE_MODULES.get(type(m))
    if simple is not None:
        fn, attrs = simple
        return fn, (x, *(getattr(m, a) for a in attrs)), {}
    if isinstance(m, nn.Flatten):
        return torch.flatten, (x, m.start_dim, m.end_dim), {}
    if isinstance(m, nn.GELU):
        return F.gelu, (x,), {"approximate": m.approximate}
    if type(m) is nn.LayerNorm:
        w = p("weight")[0] if m.weight is not None else None
        b = p("bias")[0] if m.bias is not None else None
        return F.layer_norm, (x, m.normalized_shape, w, b, m.eps), {}
    if isinstance(m, nn.PReLU):
        return F.prelu, (x, p("weight")[0]), {}
    if isinstance(m, nn.Unflatten):
        return torch.unflatten, (x, m.dim, m.unflattened_size), {}
    if isinstance(m, nn.Softmax):
        return F.softmax, (x, m.dim), {}
    if isinstance(m, nn.MaxPool1d | nn.MaxPool2d | nn.MaxPool3d):
        nd = {nn.MaxPool1d: 1, nn.MaxPool2d: 2, nn.MaxPool3d: 3}[type(m)]
        fn = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[nd]
        return fn, (x, m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode,
                    m.return_indices), {}
    if isinstance(m, nn.AvgPool1d):
        return F.avg_pool1d, (x, m.kernel_size, m.stride, m.padding, m.ceil_mode,
                              m.count_include_pad), {}
    if isinstance(m, nn.AvgPool2d | nn.AvgPool3d):
        fn = F.avg_pool2d if isinstance(m, nn.AvgPool2d) else F.avg_pool3d
        return fn, (x, m.kernel_size, m.stride, m.padding, m.ceil_mode, m.count_include_pad,
                    m.divisor_override), {}
    adaptive = {nn.AdaptiveAvgPool1d: F.adaptive_avg_pool1d, nn.AdaptiveAvgPool2d:
                F.adaptive_avg_pool2d, nn.AdaptiveAvgPool3d: F.adaptive_avg_pool3d,
                nn.AdaptiveMaxPool1d: F.adaptive_max_pool1d, nn.AdaptiveMaxPool2d:
                F.adaptive_max_pool2d, nn.AdaptiveMaxPool3d: F.adaptive_max_pool3d}
    if type(m) in adaptive:
        extra = (m.return_indices,) if "Max" in type(m).__name__ else ()
        return adaptive[type(m)], (x, m.output_size, *extra), {}
    return None


_CONV_FUNCTIONS_BY_NDIM = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
# padding modules (ZeroPad*d are ConstantPad*d) -> F.pad's mode
_PAD_MODULES: dict[type, str] = {
    nn.modules.padding._ConstantPadNd: "constant",
    nn.modules.padding._ReflectionPadNd: "reflect",
    nn.modules.padding._ReplicationPadNd: "replicate",
    nn.modules.padding._CircularPadNd: "circular",
}


def _padding_node(graph: fx.Graph, node: fx.Node, x: Any, m: nn.Module, path: str) -> fx.Node:
    """The F.pad node that a conv with padding_mode reflect/replicate/circular runs first.

    Exactly what torch's Conv does (`_reversed_padding_repeated_twice`, also for
    padding="same"); the conv then runs unpadded, and the pad moves relevance
    back to the inputs it copied.
    """
    pads = tuple(m._reversed_padding_repeated_twice)
    with graph.inserting_before(node):
        padded = graph.call_function(F.pad, (x, pads, m.padding_mode, None))
    padded.meta.update({k: v for k, v in node.meta.items() if k in (
        "nn_module_stack", "stack_trace")})
    padded.meta["relprop_path"] = path
    padded.meta["relprop_label"] = f"{type(m).__name__} padding_mode={m.padding_mode!r}"
    return padded


def _conv_transpose_call(graph: fx.Graph, node: fx.Node, m: nn.Module, path: str, x: Any,
                         nd: int) -> tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]:
    """nn.ConvTranspose{nd}d as F.conv_transpose{nd}d with the module's settings.

    `output_size=` picks output_padding from the input's shape at run time; the
    functional form has no such argument, so it is refused rather than guessed.
    """
    output_size = node.args[1] if len(node.args) > 1 else node.kwargs.get("output_size")
    if output_size is not None:
        raise UnsupportedOperationError(
            f"output_size= at {node_location(node)}: relprop needs a fixed output_padding; "
            "set output_padding on the module instead")
    if m.padding_mode != "zeros":
        raise UnsupportedOperationError(
            f"padding_mode={m.padding_mode!r} at {node_location(node)}: only zero padding "
            "has a rule")
    w, = _params(graph, node, path, "weight")
    b = _params(graph, node, path, "bias")[0] if m.bias is not None else None
    return _CONV_T_BY_NDIM[nd], (x, w, b, m.stride, m.padding, m.output_padding, m.groups,
                                 m.dilation), {}


_SIMPLE_MODULES: dict[type, tuple[Callable, tuple[str, ...]]] = {
    nn.ReLU: (F.relu, ()),
    nn.LeakyReLU: (F.leaky_relu, ("negative_slope",)),
    nn.ELU: (F.elu, ("alpha",)),
    nn.Sigmoid: (torch.sigmoid, ()),
    nn.Tanh: (torch.tanh, ()),
    nn.ReLU6: (F.relu6, ()),
    nn.SiLU: (F.silu, ()),
    nn.Hardswish: (F.hardswish, ()),
    nn.Hardsigmoid: (F.hardsigmoid, ()),
    nn.Mish: (F.mish, ()),
    nn.SELU: (F.selu, ()),
    nn.CELU: (F.celu, ("alpha",)),
    nn.Softplus: (F.softplus, ("beta", "threshold")),
    nn.Hardtanh: (F.hardtanh, ("min_val", "max_val")),
    nn.Identity: (_identity, ()),
    nn.Dropout: (_identity, ()),
    nn.Dropout1d: (_identity, ()),
    nn.Dropout2d: (_identity, ()),
    nn.Dropout3d: (_identity, ()),
    nn.AlphaDropout: (_identity, ()),
    nn.FeatureAlphaDropout: (_identity, ()),
}


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
# New tensors whose values do not depend on the input's values (only on its shape).
_CONSTANT_FUNCTIONS = {torch.zeros_like, torch.ones_like, torch.full_like, torch.empty_like,
                       torch.zeros, torch.ones, torch.full, torch.arange, torch.empty}
_CONSTANT_METHODS = {"new_zeros", "new_ones", "new_full", "new_empty", "new_tensor"}
_ATEN_CONSTANT = {"zeros_like", "ones_like", "full_like", "empty_like", "zeros", "ones", "full",
                  "arange", "empty", "new_zeros", "new_ones", "new_full", "new_empty",
                  "scalar_tensor"}
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
                nd, _ntuple(a["stride"], nd), _ntuple(a["padding"], nd),
                _ntuple(a["output_padding"], nd), _ntuple(a["dilation"], nd), int(a["groups"]))
            layer_type = node.meta.get("relprop_module_type", _CONV_T_TYPES[nd])
        elif fn is F.linear:
            kernel = LinearKernel()
            layer_type = node.meta.get("relprop_module_type", nn.Linear)
        else:
            nd = _CONV_FUNCTIONS[fn]
            dilation = _ntuple(a["dilation"], nd)
            wshape = _static_shape(a["weight"], root)
            kernel = ConvKernel(nd, _ntuple(a["stride"], nd),
                                _conv_padding(a["padding"], nd, wshape, dilation,
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
    if meaning in _GRADIENT_FUNCTIONS:
        return OpSpec(Kind.GRADIENT, label, path, fn=run(meaning))
    if meaning in _SCALE:
        return OpSpec(Kind.GRADIENT, label, path, fn=run(meaning), product=True)
    if meaning in _META:
        return OpSpec(Kind.META, label, path, fn=run(meaning))
    if meaning in _CONSTANT_FUNCTIONS:
        return OpSpec(Kind.META, label, path, fn=run(meaning))
    raise UnsupportedOperationError(f"no relevance rule for {node_location(node)}")


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
    "relu6": F.relu6, "silu": F.silu, "hardswish": F.hardswish, "hardsigmoid": F.hardsigmoid,
    "gelu": F.gelu, "layer_norm": F.layer_norm, "hardtanh": F.hardtanh, "mish": F.mish,
}
_ATEN_MOVES = {"view", "reshape", "_unsafe_view", "select", "slice", "expand", "alias",
               "contiguous", "_to_copy", "to", "split_with_sizes", "max_pool2d_with_indices",
               "adaptive_max_pool2d", "detach", "lift_fresh_copy", "pad", "constant_pad_nd"}
_ATEN_META = {"sym_size", "sym_numel", "sym_stride", "_assert_tensor_metadata"}


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
        if same in _CONV_FUNCTIONS or same in _CONV_T_FUNCTIONS or same is F.linear or \
                same is F.dropout:
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
    if name in _SCALE_METHODS:
        return OpSpec(Kind.GRADIENT, label, path, fn=fn, product=True)
    raise UnsupportedOperationError(
        f"no relevance rule for {node_location(node)}")


def _static_shape(arg: Any, root: nn.Module) -> torch.Size | None:
    if isinstance(arg, fx.Node) and arg.op == "get_attr":
        from .trace import attribute

        return attribute(root, str(arg.target)).shape
    return None
