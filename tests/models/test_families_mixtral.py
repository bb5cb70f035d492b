"""Mixtral and Qwen3-MoE explained unchanged (issue 19): the router's top-k choice and
its renormalised routing weights (Mixtral's in-place `/=`) held constant, the experts
through transformers' default grouped_mm path (on CPU its `grouped_mm_fallback` op,
x @ W_e per group of rows) and its batched_mm path.

With the composite's routing="uniform", each product routing weight * expert output
splits half and half and the weight's half crosses the router; its reference is the held
one with the MoE block's rule swapped (`_uniform_moe`, below).

Hugging Face's own grouped_mm forward refuses float64 on CPU (torch._grouped_mm takes
float32 / bfloat16 / float16), so the float64 comparisons take the model's output from
its batched_mm path; the contract runs in float32.
"""

from __future__ import annotations

from typing import Any

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


def _uniform_moe(monkeypatch: pytest.MonkeyPatch) -> None:
    """The reference's MoE rule as routing="uniform": each chosen expert's weighted output
    takes its share of the sum (proportional rule) and splits it half and half. The expert
    output's half goes through the expert as before (the held rule is linear in R, so it is
    the held rule on R / 2); the weight's half passes the renormalisation (its sum held, a
    constant scale), the top-k values (to the chosen probabilities) and the float32 softmax
    by AttnLRP's Taylor rule, R_z = z * p * (c - sum_j p_j c_j) with c = R_p / p, to the
    router's linear layer (LRP-0: R_x = x * (R_z / z) W)."""
    ra, forward, held = fam._ra(), fam.moe_forward, fam.moe_relevance

    def moe_forward(sd: dict[str, torch.Tensor], p: str, x: torch.Tensor, top_k: int) -> Any:
        m = forward(sd, p, x, top_k)
        m.W_router = sd[p + "gate.weight"]
        m.probs = torch.softmax(ra.linear(m.x, m.W_router).float(), -1)
        return m

    def moe_relevance(m: Any, R: torch.Tensor, stabilizer: float) -> torch.Tensor:
        shares = ra.rel_sum([e.yw for e in m.experts], m.out, R.reshape(-1, R.shape[-1]),
                            stabilizer)
        R_w = torch.stack([0.5 * s.sum(-1) for s in shares], -1)  # (tokens, k)
        p = m.probs.double()
        R_p = torch.zeros_like(p).scatter(-1, m.idx, R_w)
        c = ra.safe_div(R_p, p)
        c_z = p * (c - (p * c).sum(-1, keepdim=True))  # = R_z / z
        return held(m, 0.5 * R, stabilizer) + (m.x * (c_z @ m.W_router)).reshape(R.shape)

    monkeypatch.setattr(fam, "moe_forward", moe_forward)
    monkeypatch.setattr(fam, "moe_relevance", moe_relevance)


@pytest.mark.parametrize(("impl", "experts"), [
    ("sdpa", "grouped_mm"), pytest.param("eager", "batched_mm", marks=pytest.mark.slow)])
def test_mixtral_uniform_routing_matches_reference(monkeypatch: pytest.MonkeyPatch, impl: str,
                                                   experts: str) -> None:
    """routing="uniform" against the explicit float64 reference, within 1e-6 of max|R|;
    it differs from the held explanation; the ledger balances and books leaks at the
    attention and router softmaxes only (their Taylor rules), each router's non-zero."""
    model = fam.tiny_mixtral(0, impl)
    model.config._experts_implementation = experts
    got = relprop.Explainer(model, "attnlrp", routing="uniform", record=True)(IDS, target=4)
    held = fam.mixtral_relevance(model, IDS, token=4)
    _uniform_moe(monkeypatch)
    want = fam.mixtral_relevance(model, IDS, token=4)
    assert _deviation(got.embeddings, want) < 1e-6
    assert _deviation(held, want) > 0.05  # the option changes the explanation
    # (the router's softmax runs in float32: its relevance rounds at about 1e-8)
    scale = float(got.explained.abs().max())
    torch.testing.assert_close(got.ledger.totals()["leaked"],
                               got.explained - got.relevance.sum(-1), rtol=0, atol=1e-7 * scale)
    leaks = [e.op for e in got.ledger if float(e.other.abs().max()) > 1e-6 * scale]
    routers = [op for op in leaks if op == "softmax (router weights: Taylor rule)"]
    assert len(routers) == model.config.num_hidden_layers
    assert all("attention" in op for op in leaks if op not in routers), leaks


def test_mixtral_uniform_routing_runs_unchanged_with_padding() -> None:
    """Float32, left-padded: the output is the model's and padded tokens get exactly 0 (a
    padded token's router decides only its own, unattended, position)."""
    model = fam.tiny_mixtral(0, "sdpa").float()
    with torch.no_grad():
        want = model(IDS, attention_mask=LEFT_PADDED).logits
    got = relprop.Explainer(model, "attnlrp", routing="uniform")(
        IDS, target=4, forward_kwargs={"attention_mask": LEFT_PADDED})
    torch.testing.assert_close(got.output, want, rtol=0, atol=1e-5)
    padded = LEFT_PADDED == 0
    assert torch.all(got.relevance[padded] == 0) and torch.all(got.relevance[~padded] != 0)


@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.float64,
                                                               marks=pytest.mark.slow)])
def test_the_experts_grouped_matmul_runs_as_relprops_twin(dtype: torch.dtype) -> None:
    """transformers' grouped_mm fallback op, traced, runs as relprop::grouped_mm_fallback:
    torch's grouped kernel in float32, the loop in float64; values and input gradients
    bit for bit those of transformers' op (an empty group included), the weights'
    gradient too where asked for."""
    pytest.importorskip("transformers.integrations.moe")  # (registers transformers' op)
    from relprop.rules.experts import grouped_mm

    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 16, dtype=dtype, generator=g)
    w = torch.randn(4, 24, 16, dtype=dtype, generator=g).transpose(-2, -1)
    offs = torch.tensor([10, 10, 25, 40], dtype=torch.int32)
    grad = torch.randn(40, 24, dtype=dtype, generator=g)
    got = []
    for op in (torch.ops.transformers.grouped_mm_fallback, grouped_mm):
        xr, wr = x.clone().requires_grad_(), w.detach().clone().requires_grad_()
        y = op(xr, wr, offs)
        y.backward(grad)
        got.append((y, xr.grad, wr.grad))
    for want, have in zip(*got, strict=True):
        assert torch.equal(want, have)
    model = fam.tiny_mixtral(0, "sdpa").to(dtype)
    explainer = relprop.Explainer(model, "attnlrp")
    explainer(IDS, target=4)
    ops = {str(s.node.target) for p in explainer._programs.values() for s in p.steps}
    assert "relprop.grouped_mm_fallback.default" in ops
    assert not any(op.startswith("transformers.") for op in ops)
