"""Layer arguments in one form: every input-dependent dense, convolution, transposed
convolution and BatchNorm call (any spelling: F.conv2d with keywords, aten.conv2d,
aten.batch_norm with its own argument order) becomes `(x, weight, bias)` or
`(x, running_mean, running_var, weight, bias)`, its settings (stride, padding, ...)
kept as a Kernel in node.meta for relprop.ops.classify to read.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import fx, nn

from ..errors import UnsupportedOperationError
from ..layers import ConvKernel, ConvTransposeKernel, Kernel, LinearKernel
from ..ops import Kind, meaning, node_location
from ..ops.catalogue import BN_EPS_META, LAYER_META

_CONV_TYPES = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_CONV_T_TYPES = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}


def _linear_sig(input, weight, bias=None): ...  # noqa: ANN001, E704
def _conv_sig(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1): ...  # noqa
def _conv_t_sig(input, weight, bias=None, stride=1, padding=0, output_padding=0,  # noqa
                groups=1, dilation=1): ...
def _bn_sig(input, running_mean, running_var, weight=None, bias=None, training=False,  # noqa
            momentum=0.1, eps=1e-5): ...
def _aten_bn_sig(input, weight, bias, running_mean, running_var, training=False,  # noqa
                 momentum=0.1, eps=1e-5, cudnn_enabled=False): ...


_SIGNATURES = {name: inspect.signature(sig) for name, sig in (
    ("linear", _linear_sig), ("conv", _conv_sig), ("conv_transpose", _conv_t_sig),
    ("batch_norm", _bn_sig), ("aten.batch_norm", _aten_bn_sig))}


def normalize_layer_arguments(graph: fx.Graph, root: nn.Module, dynamic: set[fx.Node]) -> None:
    """Rewrite the arguments of every input-dependent layer node (see module docstring)."""
    for node in graph.nodes:
        if node not in dynamic or "relprop_recurrent" in node.meta:
            continue
        op = meaning(node)
        if op is None or op.kind not in (Kind.LAYER, Kind.BATCHNORM) or \
                node.meta.get("relprop_family"):
            continue
        if op.kind is Kind.BATCHNORM:
            aten = isinstance(node.target, torch._ops.OpOverload)
            a = _bind("aten.batch_norm" if aten else "batch_norm", node)
            node.args = (a["input"], a["running_mean"], a["running_var"], a["weight"],
                         a["bias"])
            node.kwargs = {}
            node.meta[BN_EPS_META] = float(a["eps"]) if a["eps"] is not None else 1e-5
            continue
        family = op.name.rstrip("123d") if op.name != "linear" else "linear"
        a = _bind(family, node)
        node.meta[LAYER_META] = _kernel(op.name, a, node, root)
        node.args, node.kwargs = (a["input"], a["weight"], a["bias"]), {}


def _bind(signature: str, node: fx.Node) -> dict[str, Any]:
    bound = _SIGNATURES[signature].bind(*node.args, **node.kwargs)
    bound.apply_defaults()
    return dict(bound.arguments)


def _kernel(name: str, a: dict[str, Any], node: fx.Node, root: nn.Module
            ) -> tuple[Kernel, type]:
    if name == "linear":
        return LinearKernel(), node.meta.get("relprop_module_type", nn.Linear)
    nd = int(name[-2])
    if name.startswith("conv_transpose"):
        kernel: Kernel = ConvTransposeKernel(
            nd, ntuple(a["stride"], nd), ntuple(a["padding"], nd),
            ntuple(a["output_padding"], nd), ntuple(a["dilation"], nd), int(a["groups"]))
        return kernel, node.meta.get("relprop_module_type", _CONV_T_TYPES[nd])
    dilation = ntuple(a["dilation"], nd)
    padding = conv_padding(a["padding"], nd, _static_shape(a["weight"], root), dilation,
                           node_location(node))
    kernel = ConvKernel(nd, ntuple(a["stride"], nd), padding, dilation, int(a["groups"]))
    return kernel, node.meta.get("relprop_module_type", _CONV_TYPES[nd])


def conv_padding(padding: Any, ndim: int, weight_shape: torch.Size | None,
                 dilation: tuple[int, ...], where: str) -> tuple[int, ...]:
    """A convolution's padding as numbers ('valid', 'same' resolved)."""
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


def _static_shape(arg: Any, root: nn.Module) -> torch.Size | None:
    if isinstance(arg, fx.Node) and arg.op == "get_attr":
        from ..trace import attribute

        return attribute(root, str(arg.target)).shape
    return None
