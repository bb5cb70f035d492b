"""SigLIP explained unchanged (issue 19): its text (last-token pooling, the logit bias a
constant summand) against two images; the family contract (test_families).
"""

from __future__ import annotations

import pytest
import torch
from test_families import check_contract

fam = pytest.importorskip("reference_families")

IDS = torch.tensor([[3, 7, 11, 2, 9, 14, 5], [1, 2, 3, 4, 5, 6, 7], [1, 2, 3, 4, 5, 6, 8]])
PIXELS = torch.randn(2, 3, 16, 16, dtype=torch.float64,
                     generator=torch.Generator().manual_seed(3))


def test_siglip_text_runs_unchanged() -> None:
    """Each text's similarity to image 1 (its logit bias a constant summand)."""
    check_contract(fam.tiny_siglip(0), IDS, 1, {"pixel_values": PIXELS},
                   logit=lambda out: out.logits_per_text[:, 1])
