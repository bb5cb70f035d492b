"""Every transformer family, unchanged (issue 19): the same contract as the families that
ran before (tests/test_transformers.py), on tiny random models built offline.

The contract, for eager and SDPA where the model has both: the model is left as it was
and its output is the traced program's; the explained logit is exactly the seed's
relevance; the ledger balances (what did not reach the tokens is what the ledger books,
and on bias-free models only the attention softmax rule leaks); padded tokens get
exactly 0.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from checks import snapshot

import relprop

fam = pytest.importorskip("reference_families")

IDS = torch.tensor([[3, 7, 11, 2, 9, 14, 5], [1, 2, 3, 4, 5, 6, 7]])
LEFT_PADDED = torch.tensor([[1, 1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1, 1]])


def _logits(output: Any, ids: torch.Tensor | None = None) -> torch.Tensor:
    """What relprop explains of the model's output (CLIP's similarities per text)."""
    return relprop.targets.logits(output, ids)


def check_contract(model: torch.nn.Module, ids: torch.Tensor, target: Any,
                   forward_kwargs: dict[str, Any] | None = None,
                   padded: torch.Tensor | None = None, bias_free: bool = False,
                   logit: Any = None, softmax: bool = True) -> relprop.Explanation:
    """Explain `target` with record=True and check the contract; returns the explanation.

    `padded`: a bool (B, T) of padded tokens; `logit`: a function of the model's output
    giving the explained value per sample (default: the target at the last position);
    `bias_free`: nothing is booked as bias either; `softmax`: the model has attention
    softmaxes, which must leak (without: nothing may leak)."""
    kw = dict(forward_kwargs or {})
    before = snapshot(model)
    with torch.no_grad():
        want = model(ids, **kw)
    expl = relprop.Explainer(model, "attnlrp", record=True)(ids, target=target,
                                                          forward_kwargs=kw)
    assert snapshot(model) == before  # the model runs unchanged and stays so
    exact = 1e-10 if _logits(want).dtype == torch.float64 else 1e-5
    torch.testing.assert_close(expl.output, _logits(want, ids), rtol=0, atol=exact)
    value = logit(want) if logit is not None else _logits(want)[:, -1, target]
    # the explained logit is exactly the relevance the seed put at the output
    torch.testing.assert_close(expl.explained, value, rtol=0, atol=exact)
    R = expl.relevance  # (B, T) per token, or the input's shape (pixels, features)
    per_sample = R.flatten(1).sum(-1)
    assert torch.isfinite(R).all() and (R.flatten(1).abs().sum(-1) > 0).all()
    totals = expl.ledger.totals()
    scale = float(expl.explained.abs().max())
    double = R.dtype == torch.float64
    torch.testing.assert_close(totals["leaked"], expl.explained - per_sample, rtol=0,
                               atol=(1e-9 if double else 1e-5) * scale)
    # casts to float32 inside a float64 model round (about 1e-8 of the relevance), and so
    # does float32 itself; anything above that is a leak: only the attention softmax rule
    # may leak beyond what biases and constant summands take
    tol = (1e-6 if double else 1e-4) * scale
    leaks = {e.node: e.op for e in expl.ledger if float(e.other.abs().max()) > tol}
    assert bool(leaks) == softmax and all("attention" in op or "attention" in n
                                          for n, op in leaks.items()), leaks
    if bias_free:
        assert float(totals["bias"].abs().max()) == 0.0
    if padded is not None:
        assert torch.all(R[padded] == 0) and torch.all(R[~padded] != 0)
    return expl


# --------------------------------------------------------------------------- Gemma


def test_gemma3_runs_unchanged() -> None:
    """Gemma 3's RMSNorm casts back with `type_as`: a cast, relevance passes."""
    check_contract(fam.tiny_gemma3(0, "sdpa"), IDS, 4, {"attention_mask": LEFT_PADDED},
                   padded=LEFT_PADDED == 0, bias_free=True)


@pytest.mark.slow
def test_gemma3_eager_runs_unchanged_and_agrees_with_sdpa() -> None:
    """The eager trace's `scores + mask` passes relevance to the scores, as SDPA does.

    In float32: Hugging Face's eager Gemma 3 itself returns NaN for a left-padded row
    in float64 (its sliding-window and padding masks add up to -inf)."""
    kw = {"attention_mask": LEFT_PADDED}
    a = check_contract(fam.tiny_gemma3(0, "eager").float(), IDS, 4, kw,
                       padded=LEFT_PADDED == 0, bias_free=True)
    b = relprop.Explainer(fam.tiny_gemma3(0, "sdpa").float(), "attnlrp")(
        IDS, target=4, forward_kwargs=kw)
    torch.testing.assert_close(a.relevance, b.relevance, rtol=0,
                               atol=1e-5 * float(b.relevance.abs().max()))


@pytest.mark.slow
def test_gemma2_runs_unchanged() -> None:
    """Gemma 2 has eager attention only (soft-capped scores: tanh, identity rule); float32
    as Gemma 3's eager test."""
    check_contract(fam.tiny_gemma2(0, "eager").float(), IDS, 4, {"attention_mask": LEFT_PADDED},
                   padded=LEFT_PADDED == 0, bias_free=True)


# --------------------------------------------------------------------------- outputs


class _Seq2Seq(torch.nn.Module):
    """Returns an output object (Hugging Face's Seq2SeqLMOutput)."""

    def __init__(self) -> None:
        super().__init__()
        self.enc, self.dec = torch.nn.Linear(4, 3), torch.nn.Linear(3, 5)

    def forward(self, x: torch.Tensor) -> Any:
        from transformers.modeling_outputs import Seq2SeqLMOutput

        h = self.enc(x)
        return Seq2SeqLMOutput(logits=self.dec(h), encoder_last_hidden_state=h)


def test_an_output_object_is_explained_alike_by_fx_and_export() -> None:
    """torch.export flattens a Seq2SeqLMOutput into (logits, encoder_last_hidden_state);
    the traced program hands back the object's fields, as fx's does."""
    from relprop.program import Program
    from relprop.trace import trace_export, trace_fx

    torch.manual_seed(0)
    model = _Seq2Seq().double()
    x = torch.randn(3, 4, dtype=torch.float64)
    composite = relprop.Explainer(model, "attnlrp").composite
    runs = [Program.build(t, composite).run([x.clone().requires_grad_()]).output
            for t in (trace_fx(model), trace_export(model, (x,)))]
    for out in runs:
        assert set(out.keys()) == {"logits", "encoder_last_hidden_state"}
        torch.testing.assert_close(out["logits"], model(x).logits, rtol=0, atol=1e-12)


@pytest.mark.parametrize("impl", ["sdpa", pytest.param("eager", marks=pytest.mark.slow)])
def test_t5_runs_unchanged(impl: str) -> None:
    """The decoder's next-token logit explained over the encoder's tokens (the decoder's
    tokens are constants: their embeddings are constant summands, booked as bias)."""
    model = fam.tiny_t5(0, impl)
    dec = torch.tensor([[0, 4, 5], [0, 6, 7]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0, 0]])
    check_contract(model, IDS, 4, {"attention_mask": mask, "decoder_input_ids": dec},
                   padded=mask == 0)


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_whisper_runs_unchanged(impl: str) -> None:
    """Audio features in, relevance per feature out."""
    model = fam.tiny_whisper(0, impl)
    x = torch.randn(2, 8, 16, dtype=torch.float64)
    dec = torch.tensor([[1, 4, 5], [1, 6, 7]])
    before = snapshot(model)
    expl = relprop.Explainer(model, "attnlrp", record=True)(
        x, target=4, forward_kwargs={"decoder_input_ids": dec})
    assert snapshot(model) == before
    with torch.no_grad():
        want = model(x, decoder_input_ids=dec).logits[:, -1, 4]
    torch.testing.assert_close(expl.explained, want, rtol=0, atol=1e-10)
    assert expl.relevance.shape == x.shape
    torch.testing.assert_close(expl.ledger.totals()["leaked"],
                               expl.explained - expl.relevance.sum((1, 2)), rtol=0,
                               atol=1e-9 * float(want.abs().max()))


# --------------------------------------------------------------------------- BLOOM (ALiBi)


class _Baddbmm(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("bias", torch.randn(3, 5, dtype=torch.float64))

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.bias.baddbmm(a, b, beta=2.0, alpha=0.5)


def test_baddbmm_splits_the_product_uniformly_and_the_bias_takes_its_share() -> None:
    """beta * C + alpha * (A @ B): C a constant summand, A @ B the bilinear (uniform) rule:
    with relevance = the output, R_A = alpha/2 * A * (1 @ B^T) entry by entry, and the
    same for B; C keeps beta * C."""
    torch.manual_seed(0)
    model = _Baddbmm()
    a = torch.randn(2, 3, 4, dtype=torch.float64)
    b = torch.randn(2, 4, 5, dtype=torch.float64)
    out = model(a, b)
    expl = relprop.Explainer(model, "lrp0", stabilizer=0.0, record=True)(
        (a, b), output_relevance=out.detach())
    ra, rb = expl.relevance
    torch.testing.assert_close(ra, 0.25 * a * b.sum(-1)[:, None, :], rtol=0, atol=1e-12)
    torch.testing.assert_close(rb, 0.25 * b * a.sum(-2)[:, :, None], rtol=0, atol=1e-12)
    torch.testing.assert_close(expl.ledger.totals()["bias"], 2.0 * model.bias.sum().expand(2),
                               rtol=0, atol=1e-12)


@pytest.mark.slow
def test_bloom_runs_unchanged() -> None:
    """BLOOM builds its scores with alibi.baddbmm(q, k^T): ALiBi is a constant summand the
    scores pass relevance through, as an attention mask (eager attention only; float32
    as for Gemma: Hugging Face's eager masks add up to -inf for left padding in float64)."""
    check_contract(fam.tiny_bloom(0).float(), IDS, 4, {"attention_mask": LEFT_PADDED},
                   padded=LEFT_PADDED == 0)
