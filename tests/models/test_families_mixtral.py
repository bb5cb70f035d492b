"""Mixtral and Qwen3-MoE explained unchanged (issue 19): the router's top-k choice and
its renormalised routing weights (Mixtral's in-place `/=`) held constant, the experts
through transformers' default grouped_mm path (on CPU its `grouped_mm_fallback` op,
x @ W_e per group of rows) and its batched_mm path.

Hugging Face's own grouped_mm forward refuses float64 on CPU (torch._grouped_mm takes
float32 / bfloat16 / float16), so the float64 comparisons take the model's output from
its batched_mm path; the contract runs in float32.
"""

from __future__ import annotations

import pytest
import torch
from test_families import IDS, LEFT_PADDED, check_contract

import relprop

fam = pytest.importorskip("reference_families")


def _deviation(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize(("impl", "experts"), [
    ("sdpa", "grouped_mm"), ("eager", "batched_mm"),
    pytest.param("sdpa", "batched_mm", marks=pytest.mark.slow),
    pytest.param("eager", "grouped_mm", marks=pytest.mark.slow)])
def test_mixtral_matches_reference(impl: str, experts: str) -> None:
    """attnlrp's defaults (epsilon -> 0, sums unstabilised) against the explicit reference:
    within 1e-6 of max|R| in float64 (the router's softmax and RMSNorm run in float32 in
    the model, on both sides)."""
    model = fam.tiny_mixtral(0, impl)
    model.config._experts_implementation = experts
    got = relprop.Explainer(model, "attnlrp")(IDS, target=4)
    want = fam.mixtral_relevance(model, IDS, token=4)
    assert _deviation(got.embeddings, want) < 1e-6
    reference = fam.mixtral_forward(model, IDS).logits
    torch.testing.assert_close(got.output, reference, rtol=0, atol=1e-10)
    model.config._experts_implementation = "batched_mm"
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, reference, rtol=0, atol=1e-10)


def test_mixtral_runs_unchanged() -> None:
    """The contract (float32), left-padded: only the attention softmax leaks, the router
    takes nothing, padded tokens 0."""
    check_contract(fam.tiny_mixtral(0, "sdpa").float(), IDS, 4,
                   {"attention_mask": LEFT_PADDED}, padded=LEFT_PADDED == 0, bias_free=True)


def test_qwen3_moe_runs_unchanged() -> None:
    """Qwen3-MoE: the same router (renormalised top-k), q/k RMSNorm."""
    check_contract(fam.tiny_qwen3_moe(0, "sdpa").float(), IDS, 4,
                   {"attention_mask": LEFT_PADDED}, padded=LEFT_PADDED == 0, bias_free=True)
