"""T5 against the explicit layer-by-layer reference (issue 19, tests/reference_families.py)
in float64: the decoder's next-token logit explained over the encoder's tokens, with
padding. The decoder's tokens are constants, so the first cross-attention's queries are
constant and its scores a product with a constant factor (all their relevance to the
keys); the relative position bias is a constant summand of the scores.
"""

from __future__ import annotations

import pytest
import torch
from test_families import IDS

import relprop

fam = pytest.importorskip("reference_families")

DEC = torch.tensor([[0, 4, 5], [0, 6, 7]])
MASK = torch.tensor([[1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0, 0]])


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_t5_matches_reference(impl: str) -> None:
    """attnlrp's defaults (epsilon -> 0, sums unstabilised): within 1e-6 of max|R|
    (measured: eager 3e-16, SDPA 2e-16; SDPA's constant queries leave the keys all of the
    scores' relevance, as the written-out product does)."""
    model = fam.tiny_t5(0, impl)
    kw = {"attention_mask": MASK, "decoder_input_ids": DEC}
    want = fam.t5_relevance(model, IDS, DEC, MASK, token=4)
    got = relprop.Explainer(model, "attnlrp")(IDS, target=4, forward_kwargs=kw)
    assert float((got.embeddings - want).abs().max() / want.abs().max()) < 1e-6
    assert torch.all(got.relevance[1, 5:] == 0)
    with torch.no_grad():
        hf = model(IDS, **kw).logits
    torch.testing.assert_close(fam.t5_forward(model, IDS, DEC, MASK).logits, hf, rtol=0,
                               atol=1e-10)
