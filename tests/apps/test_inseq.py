"""relprop as an Inseq attribution method (relprop.integrations.inseq).

A tiny random LLaMA (float64, SDPA attention, built offline from its config) and a
word-level tokenizer built in memory. `inseq.load_model(model, "relprop")` generates and
attributes; every generated token's scores are relprop's explain_generation row for it,
the columns sum to what relprop's ledger says reached the input, and Inseq's HTML viewer
shows those numbers. Inseq stores scores in float32: the comparisons allow its rounding
and no more. Inseq 0.7.1 is installed with `pip install --no-deps` (see the Makefile).
"""

from __future__ import annotations

import sys
from html.parser import HTMLParser

import pytest
import torch

inseq = pytest.importorskip(
    "inseq", reason="pip install --no-deps inseq==0.7.1 jaxtyping treescope wadler-lindig")
transformers = pytest.importorskip("transformers")
ref = pytest.importorskip("reference_attnlrp")

import relprop  # noqa: E402
import relprop.integrations.inseq as relprop_inseq  # noqa: E402

PROMPT = "w3 w7 w11 w20 w9"
N = 4
# LLaMA's config: <s> = 1, </s> = 2; the rest are words, one token each
WORDS = ["<unk>", "<s>", "</s>", *(f"w{i}" for i in range(3, 50))]


def _tokenizer() -> transformers.PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>",
                                                bos_token="<s>", eos_token="</s>",
                                                pad_token="</s>")


@pytest.fixture(scope="module")
def attributed():
    """The Inseq model (record=True reaches relprop's Explainer: every explanation keeps its
    ledger, from the one traced program), its output for PROMPT and relprop's own
    explain_generation of the same prompt."""
    model = ref.tiny_llama(0, "sdpa")
    wrapped = inseq.load_model(model, "relprop", tokenizer=_tokenizer(), record=True)
    out = wrapped.attribute(PROMPT, generation_args={"max_new_tokens": N},
                            step_scores=["logit"], show_progress=False)
    ids = torch.tensor([[WORDS.index(w) for w in PROMPT.split()]])
    gen = wrapped.attribution_method.explainer.explain_generation(ids, max_new_tokens=N)
    return wrapped, out, gen


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    """Equal up to Inseq's float32 storage."""
    torch.testing.assert_close(got.double(), want.double(), rtol=0,
                               atol=1e-6 * float(want.abs().max()))


def test_relprop_is_an_inseq_method(attributed) -> None:
    wrapped, out, _ = attributed
    assert "relprop" in inseq.list_feature_attribution_methods()
    assert isinstance(wrapped.attribution_method, relprop_inseq.RelpropAttribution)
    assert wrapped.attribution_method.explainer.composite.name == "attnlrp"
    assert out.info["attribution_method"] == "relprop"
    assert out.info["attributed_fn"] == "logit_fn"  # relprop's default, not Inseq's


def test_scores_are_explain_generations_rows(attributed) -> None:
    _, out, gen = attributed
    P = gen.prompt_length
    seq = out.sequence_attributions[0]
    assert [t.id for t in seq.target] == gen.ids[0].tolist()  # the same greedy tokens
    assert [t.token for t in seq.source] == PROMPT.split()
    scores = seq.target_attributions  # (P + N, N): prefix tokens by generated tokens
    assert seq.source_attributions is None and scores.shape == (P + N, N)
    for n in range(N):
        known = P + n  # the prompt and the n tokens generated before this one
        _close(scores[:known, n], gen.relevance[0, n, :known])
        assert scores[known:, n].isnan().all()


def test_sums_are_what_the_ledger_books(attributed) -> None:
    """Each column sums to the relevance that reached the input, which is the logit
    Inseq computed for that step less what the ledger says leaked on the way."""
    wrapped, out, gen = attributed
    explainer = wrapped.attribution_method.explainer
    P = gen.prompt_length
    seq = out.sequence_attributions[0]
    logits = seq.step_scores["logit"]
    _close(logits, gen.explained[0])
    for n in range(N):
        ledger = explainer(gen.ids[:, :P + n], target=[(P + n - 1, int(gen.tokens[0, n]))]
                           ).ledger
        _close(logits[n:n + 1], ledger.explained)
        _close(seq.target_attributions[:P + n, n].double().sum()[None], ledger.at_input)
        _close(ledger.at_input, ledger.explained - ledger.totals()["leaked"])


class _Table(HTMLParser):
    """The cells of each row of Inseq's heatmap table."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[list[str]] = []
        self.cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs) -> None:
        if tag == "tr":
            self.rows.append([])
        elif tag == "th":
            self.cell = []

    def handle_data(self, data: str) -> None:
        if self.cell is not None:
            self.cell.append(data)

    def handle_endtag(self, tag: str) -> None:
        if tag == "th" and self.cell is not None:
            self.rows[-1].append("".join(self.cell).strip())
            self.cell = None


def test_inseq_viewer_shows_relprops_scores(attributed) -> None:
    _, out, gen = attributed
    P = gen.prompt_length
    html = out.show(display=False, return_html=True)
    table = _Table()
    table.feed(html)
    tokens = [WORDS[i] for i in gen.ids[0].tolist()]
    header = next(r for r in table.rows if r[2:] == tokens[P:])  # the generated tokens
    body = table.rows[table.rows.index(header) + 1:]
    assert header and [r[1] for r in body[:P + N - 1]] == tokens[:P + N - 1]
    for row, cells in enumerate(body[:P + N - 1]):
        for n, cell in enumerate(cells[2:]):
            if row < P + n:  # shown, to 3 decimals
                assert abs(float(cell) - float(gen.relevance[0, n, row])) <= 5e-4 + 1e-6
            else:
                assert cell == ""
    assert body[-1][1] == "logit"  # the step score row


def test_a_left_padded_prompt_is_explained_as_without_its_padding(attributed) -> None:
    """Prompts of different lengths are left-padded by Inseq: the short one's scores are
    relprop's explanations of its tokens without the padding. (Inseq 0.7.1 generates
    without the attention mask, so its tokens need not be the unpadded greedy ones.)"""
    wrapped, _, _ = attributed
    explainer = wrapped.attribution_method.explainer
    out = wrapped.attribute([PROMPT, "w4 w5"], generation_args={"max_new_tokens": 2},
                            show_progress=False)
    seq = out.sequence_attributions[1]
    ids = torch.tensor([[t.id for t in seq.target]])
    assert ids[0, :2].tolist() == [4, 5] and seq.target_attributions.shape == (4, 2)
    for n in range(2):
        want = explainer(ids[:, :2 + n], target=[(1 + n, int(ids[0, 2 + n]))]).relevance[0]
        _close(seq.target_attributions[:2 + n, n], want)


def test_only_the_logit_is_explained(attributed) -> None:
    """Inseq's other attributed functions are not what LRP conserves: refused by name."""
    wrapped, _, _ = attributed
    for fn in ("probability", "entropy"):
        with pytest.raises(relprop.InputError, match=f"logit.*not {fn}_fn"):
            wrapped.attribute(PROMPT, generation_args={"max_new_tokens": 1},
                              attributed_fn=fn, show_progress=False)


def test_encoder_decoder_models_are_refused() -> None:
    model = transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=len(WORDS), d_model=8, d_kv=4, d_ff=8, num_layers=1, num_heads=2,
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=2))
    with pytest.raises(relprop.InputError, match="decoder-only"):
        inseq.load_model(model, "relprop", tokenizer=_tokenizer())


def test_without_inseq_the_import_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib

    for name in [m for m in sys.modules if m == "inseq" or m.startswith("inseq.")]:
        monkeypatch.setitem(sys.modules, name, None)  # as if not installed
    monkeypatch.delitem(sys.modules, "relprop.integrations.inseq")
    with pytest.raises(ImportError, match=r"pip install --no-deps inseq==0\.7\.1"):
        importlib.import_module("relprop.integrations.inseq")
