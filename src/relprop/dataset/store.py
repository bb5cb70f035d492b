"""What of each relevance map goes to disk: whole, summed over channels, pooled to a grid.

50,000 full 3x224x224 float32 maps are 30 GB; a heatmap summed over channels is a third
of that and a grid of 8x8-pixel blocks 1/64 of it. Pooling sums (never averages), so the
stored relevance still adds up to what the explanation put at the input.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import RelpropError

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass(frozen=True)
class Store:
    """channels: sum over the channel axis; pool: sum over pool x pool blocks (0 = off)."""

    channels: bool = False
    pool: int = 0

    @property
    def spec(self) -> str:
        parts = (["channels"] if self.channels else []) + ([f"pool:{self.pool}"] if self.pool
                                                            else [])
        return ",".join(parts) or "whole"

    @classmethod
    def parse(cls, spec: str | Store) -> Store:
        """'whole', 'channels', 'pool:8' or 'channels,pool:8'."""
        if isinstance(spec, Store):
            return spec
        channels, pool = False, 0
        for part in (p.strip() for p in str(spec).split(",")):
            if part == "whole":
                continue
            if part == "channels":
                channels = True
            elif part.startswith("pool:") and part[5:].isdigit() and int(part[5:]) >= 1:
                pool = int(part[5:])
            else:
                raise RelpropError(f"store={spec!r}: use 'whole', 'channels', 'pool:K' "
                                   "(sum over KxK blocks) or 'channels,pool:K'")
        return cls(channels=channels, pool=pool if pool > 1 else 0)

    def reduce(self, relevance: Tensor) -> Tensor:
        """(B, C, *spatial) -> what is kept, in float32 (sums before any rounding)."""
        r = relevance.float()
        spatial = r.dim() - 2
        if (self.channels or self.pool) and spatial < 1:
            raise RelpropError(f"store={self.spec!r} needs inputs shaped (B, C, ...), got "
                               f"{tuple(relevance.shape)}; use store='whole'")
        if self.pool:
            r = _sum_pool(r, self.pool, spatial)
        if self.channels:
            r = r.sum(1)
        return r


def _sum_pool(r: Tensor, k: int, spatial: int) -> Tensor:
    """Sums over k-sized blocks of the last `spatial` axes; ragged edges padded with 0."""
    pad: list[int] = []
    for size in reversed(r.shape[-spatial:]):
        pad += [0, -size % k]
    r = F.pad(r, pad)
    shape = list(r.shape[:-spatial])
    for size in r.shape[-spatial:]:
        shape += [size // k, k]
    r = r.reshape(shape)
    block_axes = tuple(range(r.dim() - 2 * spatial + 1, r.dim(), 2))
    return r.sum(block_axes)


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise RelpropError(f"dtype={dtype!r}: choose {', '.join(DTYPES)}")


def dtype_name(dtype: torch.dtype) -> str:
    return next(k for k, v in DTYPES.items() if v == dtype)
