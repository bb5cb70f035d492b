"""Which keyword inputs go with the explained rows when a batch is explained in parts
(`record=True` runs one row at a time, `batch_size=` a few).

An attention mask has a row per sample and is split with the batch; CLIP's images,
passed beside the texts being explained, are shared by every text and must not be, even
when there happen to be as many images as texts. A keyword tensor whose leading sizes
are those of an explained input (a mask (B, T) beside ids (B, T), lengths (B,)) goes
with the rows. One that only has B rows is tried: the model's output for the first row,
computed with the keyword split and whole, is compared with that row of the whole
batch's output, and the keyword goes the way that reproduces it. Where neither does,
explaining in parts would change what is explained: that is an error.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from . import targets
from .errors import InputError
from .trace import preserved


def per_row(model: nn.Module, inputs: tuple[Tensor, ...], keywords: dict[str, Any]) -> set[str]:
    """The names of the keyword tensors to split with the batch."""
    total = inputs[0].shape[0]
    rowed = {k for k, v in keywords.items()
             if isinstance(v, Tensor) and v.dim() and v.shape[0] == total}
    aligned = {k for k in rowed if any(_aligned(keywords[k], x) for x in inputs)}
    unsure = sorted(rowed - aligned)
    if not unsure or total < 2:
        return aligned
    first = slice(0, 1)
    whole = _output(model, inputs, keywords, set(), None)
    want = whole[first] if whole is not None else None
    decided = set(aligned)
    shared = _output(model, inputs, keywords, aligned, first)  # every unsure one whole
    for name in unsure:
        if _same(_output(model, inputs, keywords, aligned | {name}, first), want):
            decided.add(name)
        elif not _same(shared, want):
            raise InputError(
                f"keyword {name!r} has {total} rows, as the batch has, but the model's output "
                "for the first sample is not the batch's with it split by rows nor whole; "
                "explain this batch at once (record=False, no batch_size=)")
    return decided


def split(keywords: dict[str, Any], rows: set[str], sl: slice) -> dict[str, Any]:
    """The keywords of the samples `sl`: those in `rows` sliced, the others whole."""
    return {k: v[sl] if k in rows else v for k, v in keywords.items()}


def _aligned(keyword: Tensor, x: Tensor) -> bool:
    """The keyword's sizes are the input's leading ones (a mask beside its ids)."""
    return keyword.dim() <= x.dim() and tuple(keyword.shape) == tuple(x.shape[:keyword.dim()])


@torch.no_grad()
def _output(model: nn.Module, inputs: tuple[Tensor, ...], keywords: dict[str, Any],
            rows: set[str], sl: slice | None) -> Tensor | None:
    """The tensor relprop would explain, for the samples `sl` (all if None), or None
    where the model refuses those inputs."""
    xs = inputs if sl is None else tuple(x[sl] for x in inputs)
    kw = keywords if sl is None else split(keywords, rows, sl)
    try:
        with preserved(model, eval_mode=True):
            return targets.logits(model(*xs, **kw), xs[0]).detach()
    except Exception:  # noqa: BLE001 (a split the model cannot take is simply not this one)
        return None


def _same(got: Tensor | None, want: Tensor | None) -> bool:
    if got is None or want is None or got.shape != want.shape:
        return False
    scale = float(want.abs().max()) if want.numel() else 0.0
    return bool(torch.allclose(got.double(), want.double(), rtol=1e-4, atol=1e-6 * scale))
