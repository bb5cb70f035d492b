"""DeBERTa-v2 explained unchanged (issue 19): its disentangled attention gathers the
relative-position scores (`torch.gather`: a move) and masks the scores with
`masked_fill` (the filled entries hold no relevance); the relative position embeddings
are constants, so the content-position products are linear in the content. The family
contract (test_families), right-padded.
"""

from __future__ import annotations

import pytest
import torch
from test_families import IDS, check_contract

import relprop

fam = pytest.importorskip("reference_families")

MASK = torch.tensor([[1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0, 0]])


def test_deberta_v2_runs_unchanged() -> None:
    check_contract(fam.tiny_deberta_v2(0), IDS, 1, {"attention_mask": MASK},
                   padded=MASK == 0, logit=lambda out: out.logits[:, 1])


def test_deberta_v2_padding_is_the_shorter_sequence() -> None:
    """A right-padded row is explained as the sequence without its padding."""
    model = fam.tiny_deberta_v2(0)
    explain = relprop.Explainer(model, "attnlrp")
    padded = explain(IDS[1:], target=1, forward_kwargs={"attention_mask": MASK[1:]})
    short = explain(IDS[1:, :5], target=1)
    torch.testing.assert_close(padded.relevance[:, :5], short.relevance, rtol=0,
                               atol=1e-9 * float(short.relevance.abs().max()))
