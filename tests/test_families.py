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


def _logits(output: Any) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output.logits


def check_contract(model: torch.nn.Module, ids: torch.Tensor, target: Any,
                   forward_kwargs: dict[str, Any] | None = None,
                   padded: torch.Tensor | None = None, bias_free: bool = False,
                   logit: Any = None) -> relprop.Explanation:
    """Explain `target` with record=True and check the contract; returns the explanation.

    `padded`: a bool (B, T) of padded tokens; `logit`: a function of the model's output
    giving the explained value per sample (default: the target at the last position)."""
    kw = dict(forward_kwargs or {})
    before = snapshot(model)
    with torch.no_grad():
        want = model(ids, **kw)
    expl = relprop.Explainer(model, "attnlrp", record=True)(ids, target=target,
                                                          forward_kwargs=kw)
    assert snapshot(model) == before  # the model runs unchanged and stays so
    exact = 1e-10 if _logits(want).dtype == torch.float64 else 1e-5
    torch.testing.assert_close(expl.output, _logits(want), rtol=0, atol=exact)
    value = logit(want) if logit is not None else _logits(want)[:, -1, target]
    # the explained logit is exactly the relevance the seed put at the output
    torch.testing.assert_close(expl.explained, value, rtol=0, atol=exact)
    R = expl.relevance
    assert torch.isfinite(R).all() and (R.abs().sum(-1) > 0).all()
    totals = expl.ledger.totals()
    scale = float(expl.explained.abs().max())
    double = R.dtype == torch.float64
    torch.testing.assert_close(totals["leaked"], expl.explained - R.sum(-1), rtol=0,
                               atol=(1e-9 if double else 1e-5) * scale)
    if bias_free:
        # casts to float32 inside a float64 model round (about 1e-8 of the relevance),
        # and so does float32 itself; anything above that is a leak, and only the
        # attention softmax rule may leak
        tol = (1e-6 if double else 1e-4) * scale
        leaks = {e.node: e.op for e in expl.ledger if float(e.other.abs().max()) > tol}
        assert leaks and all("attention" in op or "attention" in n
                             for n, op in leaks.items()), leaks
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
