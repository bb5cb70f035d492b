"""The first pass on an fx graph: every module call becomes the functional call it
stands for (nn.ReLU -> F.relu, nn.Conv2d -> F.conv2d with get_attr parameters), so
that the catalogue (relprop.ops) classifies one form of each op and the rewritten
graph never calls the user's modules or fires their hooks.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..errors import UnsupportedOperationError
from ..ops import node_location
from ..ops.vocabulary import identity as _identity
from ..registry import module_family
from .arguments import conv_padding
from .multihead import expand_multihead_attention

_CONV_MODULES = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}
_CONV_FUNCTIONS_BY_NDIM = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_T_MODULES = {nn.ConvTranspose1d: 1, nn.ConvTranspose2d: 2, nn.ConvTranspose3d: 3}
_CONV_T_BY_NDIM = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


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
        if isinstance(module, nn.MultiheadAttention):  # several nodes: passes.multihead
            expand_multihead_attention(graph, node, module, path)
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
            node.meta["relprop_inplace"] = True  # passes.inplace.out_of_place redirects later reads
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
                pad = m.padding if not isinstance(m.padding, str) else conv_padding(
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

