"""Linear-like layers as rules see them: a forward map, its transpose, its weights.

Every layer a rule can act on is z = W x + b for some linear map W: a dense
layer, a convolution, a transposed convolution, or a per-channel affine map
(BatchNorm that could not be folded). A `Kernel` knows how to apply W (with any
modified weight) and its transpose; `LayerWeights` holds the detached weight and
bias together with the modified copies rules ask for, computed once and reused
while the parameters do not change.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor


class Kernel(Protocol):
    """The linear map of a layer, parameterised by a (possibly modified) weight."""

    kind: str

    def forward(self, x: Tensor, w: Tensor, b: Tensor | None) -> Tensor: ...

    def transpose(self, s: Tensor, w: Tensor, x: Tensor) -> Tensor: ...

    def bias_like(self, b: Tensor, z: Tensor) -> Tensor: ...

    def scale_outputs(self, w: Tensor, scale: Tensor) -> Tensor: ...

    def out_channels(self, w: Tensor) -> int: ...


@dataclass(frozen=True)
class LinearKernel:
    """Dense layer acting on the last dimension: z = x W^T + b."""

    kind: str = "linear"

    def forward(self, x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
        return F.linear(x, w, b)

    def transpose(self, s: Tensor, w: Tensor, x: Tensor | torch.Size) -> Tensor:
        return s.matmul(w)

    def bias_like(self, b: Tensor, z: Tensor) -> Tensor:
        return b

    def scale_outputs(self, w: Tensor, scale: Tensor) -> Tensor:
        return w * scale[:, None]

    def out_channels(self, w: Tensor) -> int:
        """Length of the bias (a bias-free layer's stand-in zeros need it)."""
        return w.shape[0]


_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


@dataclass(frozen=True)
class ConvKernel:
    """N-d convolution with zero padding (grouped and depthwise included)."""

    ndim: int
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    groups: int
    kind: str = "conv"

    def _pointwise(self, w: Tensor, t: Tensor) -> bool:
        """A 1x1 convolution with stride 1, no padding, groups 1, on a contiguous
        (N, C, ...) tensor: a batched matrix product over the flattened positions. On
        CPU, torch's own path for it (_slow_conv2d, slow_conv_transpose2d) unfolds and
        folds around the GEMM and runs 1.3-3x slower than the product itself."""
        return (self.groups == 1 and t.dim() == self.ndim + 2 and t.is_contiguous()
                and all(k == 1 for k in w.shape[2:]) and all(v == 1 for v in self.stride)
                and not any(self.padding) and t.device.type == "cpu")

    def forward(self, x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
        if self._pointwise(w, x):
            n, co = x.shape[0], w.shape[0]
            z = torch.matmul(w.view(co, -1), x.view(n, x.shape[1], -1))
            if b is not None:
                z.add_(b.view(co, 1))
            return z.view(n, co, *x.shape[2:])
        return _CONV[self.ndim](x, w, b, self.stride, self.padding, self.dilation, self.groups)

    def transpose(self, s: Tensor, w: Tensor, x: Tensor | torch.Size) -> Tensor:
        # W^T s is a transposed convolution; output_padding recovers the input size the
        # strided forward rounded away. (aten.convolution_backward computes the same but
        # wants the input tensor itself; a stand-in costs it a full copy on CPU.)
        size = x.shape if isinstance(x, Tensor) else x
        if self._pointwise(w, s):
            n, co = s.shape[0], w.shape[0]
            return torch.matmul(w.view(co, -1).t(), s.view(n, co, -1)).view(
                n, w.shape[1], *s.shape[2:])
        extra = [
            size[2 + d] - ((s.shape[2 + d] - 1) * self.stride[d] - 2 * self.padding[d]
                           + self.dilation[d] * (w.shape[2 + d] - 1) + 1)
            for d in range(self.ndim)
        ]
        return _CONV_T[self.ndim](s, w, None, self.stride, self.padding, extra, self.groups,
                                  self.dilation)

    def bias_like(self, b: Tensor, z: Tensor) -> Tensor:
        return b.view(-1, *([1] * self.ndim))

    def scale_outputs(self, w: Tensor, scale: Tensor) -> Tensor:
        return w * scale.view(-1, *([1] * (w.dim() - 1)))

    def out_channels(self, w: Tensor) -> int:
        return w.shape[0]


@dataclass(frozen=True)
class ConvTransposeKernel:
    """N-d transposed convolution (stride, padding, output_padding, groups, dilation).

    The weight keeps PyTorch's layout (in, out/groups, k...), so W^T is the ordinary
    convolution with that very weight (same stride, padding, dilation, groups): for
    a (in, out/g, k...) tensor, conv reads it as (out_conv, in_conv/g, k...).
    """

    ndim: int
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    output_padding: tuple[int, ...]
    dilation: tuple[int, ...]
    groups: int
    kind: str = "conv"  # composites treat it as a convolution

    def forward(self, x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
        return _CONV_T[self.ndim](x, w, b, self.stride, self.padding, self.output_padding,
                                  self.groups, self.dilation)

    def transpose(self, s: Tensor, w: Tensor, x: Tensor | torch.Size) -> Tensor:
        # The convolution's output may be longer than x where output_padding >= stride
        # (allowed when dilation > output_padding): those extra positions correspond to
        # no input, so W^T is their crop.
        size = x.shape if isinstance(x, Tensor) else x
        out = _CONV[self.ndim](s, w, None, self.stride, self.padding, self.dilation,
                               self.groups)
        for d in range(self.ndim):
            if out.shape[2 + d] != size[2 + d]:
                out = out.narrow(2 + d, 0, size[2 + d])
        return out

    def bias_like(self, b: Tensor, z: Tensor) -> Tensor:
        return b.view(-1, *([1] * self.ndim))

    def scale_outputs(self, w: Tensor, scale: Tensor) -> Tensor:
        # Output channel of w[i, j] is (group of i) * out/groups + j.
        g = self.groups
        grouped = w.reshape(g, w.shape[0] // g, *w.shape[1:])
        return (grouped * scale.view(g, 1, -1, *([1] * self.ndim))).reshape(w.shape)

    def out_channels(self, w: Tensor) -> int:
        return w.shape[1] * self.groups  # not w.shape[0]: that is the input channels


@dataclass(frozen=True)
class AffineKernel:
    """Per-channel scale and shift (BatchNorm in eval mode that had no layer to fold into)."""

    channel_dim: int = 1
    kind: str = "affine"

    def _view(self, v: Tensor, like: Tensor) -> Tensor:
        shape = [1] * like.dim()
        shape[self.channel_dim] = -1
        return v.view(shape)

    def forward(self, x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
        z = x * self._view(w, x)
        return z if b is None else z + self._view(b, x)

    def transpose(self, s: Tensor, w: Tensor, x: Tensor) -> Tensor:
        return s * self._view(w, s)

    def bias_like(self, b: Tensor, z: Tensor) -> Tensor:
        return self._view(b, z)

    def scale_outputs(self, w: Tensor, scale: Tensor) -> Tensor:
        return w * scale

    def out_channels(self, w: Tensor) -> int:
        return w.shape[0]


def fold_batchnorm_weights(
    kernel: Kernel,
    w: Tensor,
    b: Tensor | None,
    mean: Tensor,
    var: Tensor,
    gamma: Tensor | None,
    beta: Tensor | None,
    eps: float,
) -> tuple[Tensor, Tensor]:
    """Merge an eval-mode BatchNorm that follows a layer into that layer's weight and bias."""
    scale = torch.rsqrt(var + eps)
    if gamma is not None:
        scale = scale * gamma
    bias = -mean if b is None else b - mean
    bias = bias * scale
    if beta is not None:
        bias = bias + beta
    return kernel.scale_outputs(w, scale), bias


class Modifier(Enum):
    """How a rule modifies a layer's weight and bias before applying it.

    `modify(t, gamma)` gives the modified tensor; `gamma` matters only to the
    GAMMA_* modifiers (the gamma rule's gamma).
    """

    PLAIN = "plain"  # w
    POS = "pos"  # w+ = max(w, 0)
    NEG = "neg"  # w- = min(w, 0)
    SQUARE = "square"  # w^2 (w-square)
    ONES = "ones"  # 1 (flat, fan-in counts, bias distribution)
    GAMMA_POS = "gamma_pos"  # w + gamma w+
    GAMMA_NEG = "gamma_neg"  # w + gamma w-
    GAMMA_ABS = "gamma_abs"  # gamma / (2 + gamma) |w| (gamma's fused form on signed inputs)

    def modify(self, t: Tensor, gamma: float = 0.0) -> Tensor:
        return _MODIFY[self](t, gamma)


_MODIFY: dict[Modifier, Callable[[Tensor, float], Tensor]] = {
    Modifier.PLAIN: lambda t, g: t,
    Modifier.POS: lambda t, g: t.clamp(min=0),
    Modifier.NEG: lambda t, g: t.clamp(max=0),
    Modifier.SQUARE: lambda t, g: t * t,
    Modifier.ONES: lambda t, g: torch.ones_like(t),
    Modifier.GAMMA_POS: lambda t, g: t + g * t.clamp(min=0),
    Modifier.GAMMA_NEG: lambda t, g: t + g * t.clamp(max=0),
    Modifier.GAMMA_ABS: lambda t, g: t.abs() * (g / (2 + g)),
}


class LayerWeights:
    """A layer's detached weight and bias, with modified copies made on first use.

    Rules ask for `w+`, `w-`, `w^2`, `1` (flat), `w+gamma*w+`, and the matching
    bias parts by `Modifier`; each is computed once per parameter version.
    """

    def __init__(self, w: Tensor, b: Tensor | None) -> None:
        self.w = w
        self.b = b
        self._cache: dict[tuple, Tensor | None] = {}
        # rules' own per-weights caches: stacked weights, z-box maps, per-shape maps
        self.extra: dict[object, Any] = {}

    def weight(self, mod: Modifier, gamma: float = 0.0) -> Tensor:
        key = ("w", mod, gamma)
        if key not in self._cache:
            self._cache[key] = mod.modify(self.w, gamma)
        return self._cache[key]  # type: ignore[return-value]

    def bias(self, mod: Modifier, gamma: float = 0.0) -> Tensor | None:
        if self.b is None:
            return None
        key = ("b", mod, gamma)
        if key not in self._cache:
            self._cache[key] = mod.modify(self.b, gamma)
        return self._cache[key]
