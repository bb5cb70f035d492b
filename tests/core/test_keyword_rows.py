"""Explaining a batch in parts (record=True, batch_size=) splits the keywords that go
with the rows and keeps the others whole (relprop.keyword_rows)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import relprop
from relprop import keyword_rows


class TextImage(nn.Module):
    """CLIP's shape: texts (B_t, D) explained, images (B_i, E) a keyword; the output
    (B_t, B_i) is every text against every image."""

    def __init__(self) -> None:
        super().__init__()
        self.text, self.image = nn.Linear(5, 4), nn.Linear(3, 4)

    def forward(self, x: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        return self.text(x) @ self.image(images).T


class WithContext(nn.Module):
    """A per-sample context (B, C) whose sizes are not the input's (B, D)."""

    def __init__(self) -> None:
        super().__init__()
        self.x, self.c = nn.Linear(5, 3), nn.Linear(2, 3)

    def forward(self, x: torch.Tensor, context: torch.Tensor,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        out = self.x(x) + self.c(context)
        return out if mask is None else out * mask[:, :1]


def _same_recorded_and_whole(model: nn.Module, x: torch.Tensor, kw: dict) -> None:
    explainer = relprop.Explainer(model, "epsilon")
    whole = explainer(x, target=1, forward_kwargs=kw)
    for parts in (dict(record=True), dict(batch_size=1)):
        got = explainer(x, target=1, forward_kwargs=kw, **parts)
        torch.testing.assert_close(got.relevance, whole.relevance, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(got.explained, whole.explained, rtol=1e-10, atol=1e-12)


def test_images_beside_explained_texts_stay_whole() -> None:
    torch.manual_seed(0)
    model = TextImage().double()
    x, images = torch.randn(2, 5, dtype=torch.float64), torch.randn(2, 3, dtype=torch.float64)
    assert keyword_rows.per_row(model, (x,), {"images": images}) == set()
    _same_recorded_and_whole(model, x, {"images": images})  # as many images as texts


def test_a_per_sample_keyword_goes_with_the_rows() -> None:
    torch.manual_seed(0)
    model = WithContext().double()
    x = torch.randn(3, 5, dtype=torch.float64)
    kw = {"context": torch.randn(3, 2, dtype=torch.float64),
          "mask": torch.tensor([[1.0, 1.0, 1.0, 1.0, 1.0], [1.0] * 5, [0.0] * 5]).double()}
    assert keyword_rows.per_row(model, (x,), kw) == {"context", "mask"}  # mask: aligned
    _same_recorded_and_whole(model, x, kw)


def test_a_keyword_that_is_neither_is_refused() -> None:
    class BatchSized(nn.Module):
        def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
            return x * context + x.shape[0]  # the batch's size enters the output

    x, context = torch.randn(2, 4), torch.randn(2, 1)  # not sized as x: tried both ways
    with pytest.raises(relprop.InputError, match="keyword 'context' has 2 rows"):
        relprop.Explainer(BatchSized(), "epsilon")(x, target=0, record=True,
                                                  forward_kwargs={"context": context})
