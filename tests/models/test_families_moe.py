"""Mixture-of-experts routing (issue 19) on a small hand-written MoE layer: the router's
choice (topk) and its routing weights, renormalised, are held constant, so relevance
flows through the chosen experts only, in proportion to each one's weighted output; the
router takes none. And discrete results (comparisons) are constant choices.
"""

from __future__ import annotations

import torch
from torch import nn

import relprop

D = torch.float64


class _MoE(nn.Module):
    """out = sum over the k chosen experts e of w_e * (x @ W_e), w the router's top-k
    softmax weights renormalised."""

    def __init__(self, experts: int = 4, dim: int = 6, k: int = 2) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.k = k
        self.router = nn.Linear(dim, experts, bias=False, dtype=D)
        self.w = nn.Parameter(torch.randn(experts, dim, dim, generator=g, dtype=D))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        top, idx = self.router(x).softmax(-1).topk(self.k, dim=-1)
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
