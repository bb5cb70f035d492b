"""Mixture-of-experts routing (issue 19) on a small hand-written MoE layer: the router's
choice (topk) and its routing weights, renormalised, are held constant, so relevance
flows through the chosen experts only, in proportion to each one's weighted output; the
router takes none. With the composite's routing="uniform", each product weight * expert
output splits half and half and the weight's half crosses the router (renormalisation
held, softmax by its Taylor rule). And discrete results (comparisons) are constant
choices.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import relprop
from relprop.errors import CompositeError

D = torch.float64


class _MoE(nn.Module):
    """out = sum over the k chosen experts e of w_e * (x @ W_e), w the router's top-k
    softmax weights renormalised."""

    def __init__(self, experts: int = 4, dim: int = 6, k: int = 2,
                 renormalise: bool = True) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.k, self.renormalise = k, renormalise
        self.router = nn.Linear(dim, experts, bias=False, dtype=D)
        self.w = nn.Parameter(torch.randn(experts, dim, dim, generator=g, dtype=D))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        top, idx = self.router(x).softmax(-1).topk(self.k, dim=-1)
        if self.renormalise:
            top = top / top.sum(-1, keepdim=True)
        y = torch.matmul(x[:, None, None, :], self.w[idx]).squeeze(2)  # (N, k, dim)
        return (y * top[..., None]).sum(1)


def test_routing_weights_are_held_and_relevance_flows_through_the_chosen_experts() -> None:
    model = _MoE()
    x = torch.randn(5, 6, dtype=D, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model(x)
        top, idx = model.router(x).softmax(-1).topk(2, dim=-1)
        M = ((top / top.sum(-1, keepdim=True))[..., None, None] * model.w[idx]).sum(1)
    expl = relprop.Explainer(model, "lrp0", stabilizer=0.0, record=True)(
        x, output_relevance=out)
    # the weights held: out = x @ M, linear in x; relevance = the output: R_x = x * M 1
    torch.testing.assert_close(expl.relevance, x * M.sum(-1), rtol=0, atol=1e-12)
    torch.testing.assert_close(expl.relevance.sum(-1), out.sum(-1), rtol=0, atol=1e-12)
    assert float(expl.ledger.totals()["leaked"].abs().max()) < 1e-12  # the router takes none


@pytest.mark.parametrize("renormalise", [True, False])
def test_uniform_routing_splits_each_weighted_output_and_the_weights_half_crosses_the_router(
        renormalise: bool) -> None:
    """routing="uniform", explicit float64 reference: each product y_e * w_e takes its
    share of the sum (here R = output, so its own value) and splits it half and half. The
    experts' half is half of the held explanation; the weight's half passes the held
    renormalisation, the top-k values (to the chosen probabilities) and the softmax by its
    Taylor rule (R_z = z * p * (c - sum_j p_j c_j), c = R_p / p) to the router (LRP-0).
    The softmax is the only node that leaks, by exactly R_p - R_z."""
    model = _MoE(renormalise=renormalise)
    x = torch.randn(5, 6, dtype=D, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model(x)
        z = model.router(x)
        p = z.softmax(-1)
        top, idx = p.topk(2, dim=-1)
        w = top / top.sum(-1, keepdim=True) if renormalise else top
        y = torch.matmul(x[:, None, None, :], model.w[idx]).squeeze(2)  # (N, k, dim)
        R_p = torch.zeros_like(p).scatter(-1, idx, 0.5 * (y * w[..., None]).sum(-1))
        c = R_p / p
        c_z = p * (c - (p * c).sum(-1, keepdim=True))
        R_router = x * (c_z @ model.router.weight)
    explain = {routing: relprop.Explainer(model, "lrp0", stabilizer=0.0, record=True,
                                          routing=routing)(x, output_relevance=out)
               for routing in ("held", "uniform")}
    held, uniform = explain["held"], explain["uniform"]
    torch.testing.assert_close(uniform.relevance, 0.5 * held.relevance + R_router, rtol=0,
                               atol=1e-12)
    assert float((uniform.relevance - held.relevance).abs().max()) > 0.1
    # the ledger balances: what did not reach x is what the router's softmax leaked
    leaks = {e.op: e.other for e in uniform.ledger if float(e.other.abs().max()) > 1e-12}
    assert list(leaks) == ["softmax (router weights: Taylor rule)"]
    torch.testing.assert_close(leaks["softmax (router weights: Taylor rule)"],
                               R_p.sum(-1) - (z * c_z).sum(-1), rtol=0, atol=1e-12)
    torch.testing.assert_close(uniform.ledger.totals()["leaked"],
                               out.sum(-1) - uniform.relevance.sum(-1), rtol=0, atol=1e-12)


def test_routing_is_checked() -> None:
    assert relprop.make_composite("attnlrp").routing == "held"
    assert relprop.make_composite("epsilon", routing="uniform").routing == "uniform"
    with pytest.raises(CompositeError, match="routing='soft'"):
        relprop.make_composite("attnlrp", routing="soft")
    with pytest.raises(CompositeError, match="routing"):
        relprop.Composite(routing="soft")
    with pytest.raises(CompositeError, match="routing="):  # set it in the Composite itself
        relprop.make_composite(relprop.Composite(), routing="uniform")


def test_a_comparison_is_a_constant_choice() -> None:
    """x * (x > 0): the mask is held, the product passes the kept entries' relevance; a
    summand made from an argmax is constant (it takes its share, as a bias)."""

    class Mask(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * (x > 0) + 0.5 * x.argmax(-1, keepdim=True)

    x = torch.randn(3, 4, dtype=D, generator=torch.Generator().manual_seed(2))
    out = Mask()(x)
    expl = relprop.Explainer(Mask(), "lrp0", stabilizer=0.0)(x, output_relevance=out)
    torch.testing.assert_close(expl.relevance, x.clamp(min=0), rtol=0, atol=1e-12)
