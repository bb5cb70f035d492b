"""Explaining generation (relprop.explain_generation) and contrastive targets (relprop.contrast).

Tiny random LLaMA and GPT-2 built offline in float64 (tests/reference_attnlrp.py): the
generated tokens are Hugging Face's greedy `generate`; every row of the relevance is the
separate single-target explanation of that token; all rows come from one forward pass;
a contrast is the difference of its two explanations; the views parse.
"""

from __future__ import annotations

import io
import json
from html.parser import HTMLParser

import pytest
import torch
from torch import nn

import relprop
from relprop.program import Program

ref = pytest.importorskip("reference_attnlrp")

IDS = torch.tensor([[3, 7, 11, 2, 9], [1, 2, 3, 4, 5]])
N = 4
P = IDS.shape[1]
MODELS = {"llama": ref.tiny_llama, "gpt2": ref.tiny_gpt2}


@pytest.fixture(scope="module", params=sorted(MODELS))
def generated(request: pytest.FixtureRequest) -> tuple[nn.Module, relprop.Generation]:
    model = MODELS[request.param](0)
    return model, relprop.explain_generation(model, IDS, max_new_tokens=N)


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6 * float(want.abs().max()))


def test_tokens_are_greedy_decoding(generated) -> None:
    model, gen = generated
    want = model.generate(IDS, attention_mask=torch.ones_like(IDS), max_new_tokens=N,
                          do_sample=False, eos_token_id=None, pad_token_id=0)
    assert torch.equal(gen.ids, want)
    assert torch.equal(gen.tokens, want[:, P:])
    # teacher forcing agrees: each token is the argmax at the position before it
    with torch.no_grad():
        assert torch.equal(model(gen.ids).logits[:, P - 1:-1].argmax(-1), gen.tokens)
    assert gen.relevance.shape == (2, N, P + N) and gen.explained.shape == (2, N)


def test_rows_are_the_single_explanations(generated) -> None:
    model, gen = generated
    explainer = relprop.Explainer(model, "attnlrp")
    with torch.no_grad():
        logits = model(gen.ids).logits
    for n in range(N):
        p = P - 1 + n
        one = explainer(gen.ids, target=[(p, int(t)) for t in gen.tokens[:, n]])
        _close(gen.relevance[:, n], one.relevance)
        _close(gen.explained[:, n], logits[:, p].gather(1, gen.tokens[:, n:n + 1])[:, 0])
        assert (gen.relevance[:, n, P + n:] == 0).all()  # the token itself and later ones
        assert one.relevance[:, P + n:].abs().max() < 1e-9 * one.relevance.abs().max()


def test_one_forward_and_one_backward_per_token(monkeypatch: pytest.MonkeyPatch) -> None:
    model = ref.tiny_gpt2(1)
    explainer = relprop.Explainer(model, "attnlrp")
    explainer(IDS, target=1)  # traced beforehand: only the explanation's run is counted
    runs, grads = [], []
    run, grad = Program.run, torch.autograd.grad
    monkeypatch.setattr(Program, "run", lambda self, *a, **k: runs.append(1) or run(self, *a,
                                                                                    **k))
    monkeypatch.setattr(torch.autograd, "grad", lambda *a, **k: grads.append(1) or grad(*a, **k))
    gen = explainer.explain_generation(IDS, max_new_tokens=N)
    assert (len(runs), len(grads)) == (1, N)
    assert gen.relevance.shape == (2, N, P + N)


def test_left_padding_gives_the_unpadded_generation() -> None:
    model = ref.tiny_gpt2(0)
    padded = torch.tensor([[0, 0, 3, 7, 11], [1, 2, 3, 4, 5]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    gen = relprop.explain_generation(model, padded, max_new_tokens=3, attention_mask=mask)
    alone = relprop.explain_generation(model, padded[:1, 2:], max_new_tokens=3)
    assert torch.equal(gen.tokens[:1], alone.tokens)
    assert (gen.relevance[0, :, :2] == 0).all()  # padding holds none
    _close(gen.relevance[0, :, 2:], alone.relevance[0])
    assert gen.attention_mask.shape == gen.ids.shape


def test_decoding_reads_one_new_token_per_step_from_the_cache() -> None:
    """Hugging Face's key-value cache is used: after the prompt, each step feeds the
    model one token; a model without a cache (recomputing) gives the same tokens."""
    model = ref.tiny_llama(0)
    fed: list[int] = []
    hook = model.get_input_embeddings().register_forward_hook(
        lambda m, args, out: fed.append(args[0].shape[1]))
    try:
        ids, _, lengths = relprop.generation.greedy(model, IDS, N)
    finally:
        hook.remove()
    assert fed == [P] + [1] * (N - 1) and lengths.tolist() == [N, N]

    class NoCache(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = model

        def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
            return self.inner(input_ids, use_cache=False).logits

    again, _, _ = relprop.generation.greedy(NoCache(), IDS, N)
    assert torch.equal(again, ids)


@pytest.mark.parametrize("generated", ["gpt2"], indirect=True)  # decoding is the models' own
def test_generation_stops_at_the_end_token(generated) -> None:
    """Sample 0's second token taken as the end token: each sample stops where it first
    writes it, padded as Hugging Face's generate pads; later rows hold 0, and every row
    before equals the row of the generation that did not stop."""
    model, full = generated
    eos = int(full.tokens[0, 1])
    rows = full.tokens.tolist()
    stops = [row.index(eos) + 1 if eos in row else N for row in rows]
    assert stops[0] <= 2 and stops[1] > stops[0], "choose another seed: both stop together"
    gen = relprop.explain_generation(model, IDS, max_new_tokens=N, eos_token_id=eos,
                                     pad_token_id=0)
    want = model.generate(IDS, attention_mask=torch.ones_like(IDS), max_new_tokens=N,
                          do_sample=False, eos_token_id=eos, pad_token_id=0)
    assert torch.equal(gen.ids, want)
    assert gen.lengths.tolist() == stops
    T = gen.ids.shape[1]
    for b, stop in enumerate(stops):
        assert (gen.tokens[b, stop:] == 0).all()
        assert (gen.relevance[b, stop:] == 0).all() and (gen.explained[b, stop:] == 0).all()
        _close(gen.relevance[b, :stop], full.relevance[b, :stop, :T])
        _close(gen.explained[b, :stop], full.explained[b, :stop])
    done = relprop.explain_generation(model, IDS[:1], max_new_tokens=N, eos_token_id=[eos, 99])
    assert done.tokens.shape == (1, stops[0]) and done.lengths.tolist() == stops[:1]


def test_non_finite_logits_stop_decoding_with_an_error() -> None:
    """Hugging Face's eager LLaMA in float64 computes NaN for a left-padded prompt (its
    additive mask overflows); decoding says so instead of writing argmax(NaN) = 0."""
    model = ref.tiny_llama(0, "eager")
    padded = torch.tensor([[2, 2, 2, 4, 5], [3, 7, 11, 20, 9]])
    mask = torch.tensor([[0, 0, 0, 1, 1], [1, 1, 1, 1, 1]])
    with torch.no_grad():
        assert model(padded, attention_mask=mask).logits[0].isnan().any()  # the model's own
    with pytest.raises(relprop.InputError, match="logits of sample 0 are not finite"):
        relprop.explain_generation(model, padded, 2, attention_mask=mask)


@pytest.mark.parametrize("generated", ["gpt2"], indirect=True)  # a target: any model
def test_contrast_is_the_difference_of_two_explanations(generated) -> None:
    model, gen = generated
    explainer = relprop.Explainer(model, "attnlrp")
    n, other = 2, 5
    p = P - 1 + n
    got = gen.contrast(n, other)
    mine = explainer(gen.ids, target=[(p, int(t)) for t in gen.tokens[:, n]])
    alt = explainer(gen.ids, target=(p, other))
    _close(got.relevance, mine.relevance - alt.relevance)
    _close(got.explained, mine.explained - alt.explained)
    assert torch.equal(got.target, mine.target)


def test_contrast_for_a_classifier() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 5)).double().eval()
    x = torch.randn(3, 6, dtype=torch.float64)
    explainer = relprop.Explainer(model, "epsilon")
    got = explainer(x, target=relprop.contrast([[1, 2]], [[4, 4]]))  # K = 2 contrasts
    with torch.no_grad():
        out = model(x)
    for k, (a, b) in enumerate(((1, 4), (2, 4))):
        want = explainer(x, target=a).relevance - explainer(x, target=b).relevance
        _close(got.relevance[:, k], want)
        _close(got.explained[:, k], out[:, a] - out[:, b])
    chunked = explainer(x, target=relprop.contrast(None, [0, 1, 2]), batch_size=2)
    _close(chunked.explained, out.max(1).values - out[torch.arange(3), torch.arange(3)])
    with pytest.raises(relprop.TargetError, match="as many"):
        explainer(x, target=relprop.contrast([[1, 2]], 3))


class _Spans(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.generated: list[list[int]] = []
        self.relevance: list[list[list[float]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "div" and a.get("class") == "relprop-generation":
            self.generated.append([])
            self.relevance.append(json.loads(a["data-relevance"]))
        if tag == "span" and "gen" in (a.get("class") or "").split():
            self.generated[-1].append(int(a["data-n"]))


@pytest.mark.parametrize("generated", ["gpt2"], indirect=True)  # views of the numbers
def test_views(generated, tmp_path) -> None:
    Image = pytest.importorskip("PIL.Image")
    _, gen = generated
    words = [[f"w{t}<&" for t in row] for row in gen.ids.tolist()]
    page = gen.to_html(words, path=tmp_path / "gen.html")
    assert (tmp_path / "gen.html").read_text(encoding="utf-8") == page
    spans = _Spans()
    spans.feed(page)
    assert spans.generated == [list(range(N))] * 2  # one hoverable entry per generated token
    assert "http" not in page and "<script>" in page and "w3&lt;&amp;" in page
    scaled = gen.relevance[1] / gen.relevance[1].abs().amax(-1, keepdim=True)
    torch.testing.assert_close(torch.tensor(spans.relevance[1], dtype=torch.float64), scaled,
                               rtol=0, atol=5.1e-5)  # shown to 4 decimals

    tex = gen.to_latex(words[0])
    assert tex.count("\\colorbox") == sum(P + n for n in range(N))
    assert tex.count("\\fbox{") == N and "w3\\textless{}\\&" in tex  # escaped

    path = gen.to_png(tmp_path / "gen.png", words, sample=1)
    with Image.open(io.BytesIO(path.read_bytes())) as im:
        im.load()
        assert im.size[0] > 100 and im.size[1] > 50
