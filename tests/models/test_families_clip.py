"""CLIP explained unchanged (issue 19): text tokens in, relevance per token out, for the
image-text similarity; against the explicit layer-by-layer reference
(tests/reference_families.py) in float64, and the family contract (test_families).

What CLIP adds to the families before it: the text tower pools at the end-of-sequence
token by advanced indexing (a move: the pooled row's relevance goes back to that token),
and both towers L2-normalise with pow / sum / pow(0.5) and a division (the norm is held
constant, as RMSNorm's is). The image is a keyword: a constant of the explanation.
"""

from __future__ import annotations

import pytest
import torch
from test_families import check_contract

import relprop
from relprop import targets

fam = pytest.importorskip("reference_families")

IDS = torch.tensor([[0, 7, 11, 9, 3, 1, 1], [0, 4, 5, 6, 8, 12, 3]])  # 3: end of sequence
MASK = torch.tensor([[1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 1]])  # 1: padding
PIXELS = torch.randn(1, 3, 16, 16, dtype=torch.float64,
                     generator=torch.Generator().manual_seed(3))


def _deviation(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_clip_matches_reference(impl: str) -> None:
    """Each text's similarity to the image, relprop's traced path against the reference
    (epsilon 1e-6, sums unstabilised): within 1e-6 of max|R| (eager's softmax runs in
    float32 inside the float64 model, on both sides)."""
    model = fam.tiny_clip(0, impl)
    kw = {"pixel_values": PIXELS, "attention_mask": MASK}
    want = fam.clip_text_relevance(model, IDS, PIXELS, image=0, attention_mask=MASK,
                                   stabilizer=0.0)
    got = relprop.Explainer(model, "attnlrp", epsilon=1e-6, stabilizer=0.0, record=True)(
        IDS, target=0, forward_kwargs=kw)
    assert _deviation(got.embeddings, want) < 1e-6
    torch.testing.assert_close(got.relevance, want.sum(-1), rtol=0,
                               atol=1e-6 * float(want.abs().max()))
    # the reference's forward is the model's
    with torch.no_grad():
        hf = model(input_ids=IDS, **kw).logits_per_text
    ref = fam.clip_text_forward(model, IDS, PIXELS, MASK).logits
    torch.testing.assert_close(ref, hf, rtol=0, atol=1e-10)


def test_clip_runs_unchanged() -> None:
    """The contract: the explained similarity exactly, the ledger balanced, only the
    attention softmax leaks (the norm held constant leaks nothing), padding 0."""
    model = fam.tiny_clip(0, "sdpa")
    check_contract(model, IDS, 0, {"pixel_values": PIXELS, "attention_mask": MASK},
                   padded=MASK == 0, logit=lambda out: out.logits_per_text[:, 0])


def test_clip_texts_without_recording() -> None:
    """A batch of texts, not recorded, against two images: each text's similarity to
    image 1 (logits_per_text: one row per text), its relevance its own tokens'."""
    model = fam.tiny_clip(0, "sdpa")
    pixels = torch.cat([PIXELS, PIXELS.flip(-1)])
    kw = {"pixel_values": pixels, "attention_mask": MASK}
    got = relprop.Explainer(model, "attnlrp", epsilon=1e-6, stabilizer=0.0)(
        IDS, target=1, forward_kwargs=kw)
    want = fam.clip_text_relevance(model, IDS, pixels, image=1, attention_mask=MASK,
                                   stabilizer=0.0)
    assert _deviation(got.embeddings, want) < 1e-6
    with torch.no_grad():
        torch.testing.assert_close(got.explained, model(IDS, **kw).logits_per_text[:, 1],
                                   rtol=0, atol=1e-12)
    one = relprop.Explainer(model, "attnlrp", epsilon=1e-6, stabilizer=0.0)(
        IDS[1:], target=1, forward_kwargs={"pixel_values": pixels})
    torch.testing.assert_close(one.relevance[0], got.relevance[1], rtol=0, atol=1e-12)


def test_contrastive_outputs_have_one_row_per_explained_sample() -> None:
    """logits_per_text for token ids (and by default: a CLIPModel's first argument is
    its input_ids), logits_per_image for pixels."""
    from transformers.models.clip.modeling_clip import CLIPOutput

    per_text = torch.randn(3, 2)
    out = CLIPOutput(logits_per_text=per_text, logits_per_image=per_text.T)
    assert targets.logits(out, IDS[:1]) is per_text
    assert targets.logits(out) is per_text
    assert targets.logits(out, PIXELS) is out.logits_per_image
    assert targets.logits({"logits": per_text, "logits_per_image": per_text.T}) is per_text
