"""SigLIP's pixels (issue 19): the vision tower's attention-pooling head,
nn.MultiheadAttention as cross-attention from a learned probe, traced into (the probe
repeated to the batch size is a constant: nothing leaks at its scores' product). A
single image (batch 1, as record=True runs): tests/models/test_families_batch1.py.
"""

from __future__ import annotations

import pytest
import torch
from test_families import check_contract
from test_families_siglip import IDS

fam = pytest.importorskip("reference_families")

PIXELS = torch.randn(2, 3, 16, 16, dtype=torch.float64,
                     generator=torch.Generator().manual_seed(3))


class _Pixels(torch.nn.Module):
    """The model with its texts fixed: each image's similarity to the texts (the model's
    first argument is its input_ids, so pixels are explained through a caller)."""

    def __init__(self, model: torch.nn.Module, ids: torch.Tensor) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("ids", ids)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=self.ids, pixel_values=pixels).logits_per_image


def test_siglip_pixels_run_unchanged() -> None:
    """Each image's similarity to text 2, through the attention-pooling head: its
    softmax is attention (it leaks, as the encoder's do), the rest balances."""
    model = _Pixels(fam.tiny_siglip(0), IDS)
    expl = check_contract(model, PIXELS, 2, logit=lambda out: out[:, 2])
    assert expl.relevance.shape == PIXELS.shape
