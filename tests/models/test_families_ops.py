"""The vocabulary entries issue 19's families need, one by one on small modules (float64,
LRP-0 without stabilizer, relevance at the output = the output):

- gathers (gather, take_along_dim, index_select, x[idx], advanced indexing) are moves:
  each gathered copy's relevance goes back to its position, copies summed;
- masked_fill passes the kept entries' relevance, the filled entries hold none (the
  ledger books theirs as leaked);
- an L2 normalisation x / sqrt(sum(x^2)) (pow(s, 0.5), or norm) holds the norm constant:
  relevance passes the division unchanged; x ** 2 on the relevance path has no rule.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

import relprop
from relprop.errors import UnsupportedOperationError

D = torch.float64
IDX = torch.tensor([0, 2, 2, 3])


class _Fn(torch.nn.Module):
    def __init__(self, fn: Callable[..., torch.Tensor]) -> None:
        super().__init__()
        self.fn = fn
        self.register_buffer("idx", IDX)
        self.register_buffer("mask", torch.tensor([True, False, False, True, False]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(self, x)


def _explain(fn: Callable[..., torch.Tensor], x: torch.Tensor) -> relprop.Explanation:
    model = _Fn(fn)
    with torch.no_grad():
        out = model(x)
    return relprop.Explainer(model, "lrp0", stabilizer=0.0, record=True)(
        x, output_relevance=out)


GATHERS = {
    "gather": lambda m, x: x.gather(1, m.idx.expand(x.shape[0], 4)),
    "torch.gather": lambda m, x: torch.gather(x, 1, m.idx[None].expand(x.shape[0], 4)),
    "take_along_dim": lambda m, x: torch.take_along_dim(x, m.idx[None], 1),
    "index_select": lambda m, x: x.index_select(1, m.idx),
    "index": lambda m, x: x[:, m.idx],
}


@pytest.mark.parametrize("name", list(GATHERS))
def test_a_gather_is_a_move(name: str) -> None:
    x = torch.randn(2, 5, dtype=D, generator=torch.Generator().manual_seed(0))
    expl = _explain(GATHERS[name], x)
    want = torch.zeros_like(x).index_add_(1, IDX, x[:, IDX])  # position 2 twice, 1 and 4 none
    torch.testing.assert_close(expl.relevance, want, rtol=0, atol=1e-12)
    assert float(expl.ledger.totals()["leaked"].abs().max()) < 1e-12


def test_advanced_indexing_pools_one_row_per_sample() -> None:
    """CLIP's pooling x[arange(B), eos]: each sample's pooled row goes back to its token."""
    x = torch.randn(2, 4, 3, dtype=D, generator=torch.Generator().manual_seed(1))
    eos = torch.tensor([3, 1])
    expl = relprop.Explainer(_Fn(lambda m, x: x[torch.arange(2), eos]), "lrp0", stabilizer=0.0)(
        x, output_relevance=x[torch.arange(2), eos])
    want = torch.zeros_like(x)
    want[0, 3], want[1, 1] = x[0, 3], x[1, 1]
    torch.testing.assert_close(expl.relevance, want, rtol=0, atol=1e-12)


def test_masked_fill_keeps_the_kept_entries_relevance() -> None:
    x = torch.randn(2, 5, dtype=D, generator=torch.Generator().manual_seed(2))
    expl = _explain(lambda m, x: x.masked_fill(m.mask, 0.25) * 2.0, x)
    want = torch.where(_Fn(None).mask, 0.0, 2.0 * x)
    torch.testing.assert_close(expl.relevance, want, rtol=0, atol=1e-12)
    # what the filled entries held (2 x 0.25 each, two of them) reached no input
    torch.testing.assert_close(expl.ledger.totals()["leaked"], torch.full((2,), 1.0, dtype=D),
                               rtol=0, atol=1e-12)


NORMS = {
    "pow": lambda m, x: x / x.pow(2).sum(-1, keepdim=True).pow(0.5),
    "torch.pow": lambda m, x: x / torch.pow(torch.pow(x, 2).sum(-1, keepdim=True), 0.5),
    "sqrt": lambda m, x: x / (x ** 2).sum(-1, keepdim=True).sqrt(),
    "norm": lambda m, x: x / x.norm(dim=-1, keepdim=True),
    "rsqrt-like": lambda m, x: x * x.pow(2).sum(-1, keepdim=True).pow(-0.5),
}


@pytest.mark.parametrize("name", list(NORMS))
def test_an_l2_normalisation_holds_the_norm(name: str) -> None:
    x = torch.randn(2, 5, dtype=D, generator=torch.Generator().manual_seed(3))
    expl = _explain(NORMS[name], x)
    torch.testing.assert_close(expl.relevance, x / x.norm(dim=-1, keepdim=True), rtol=0,
                               atol=1e-12)


def test_a_square_on_the_relevance_path_has_no_rule() -> None:
    with pytest.raises(UnsupportedOperationError, match="pow"):
        _explain(lambda m, x: x ** 2, torch.randn(2, 5, dtype=D))


def test_an_einsum_is_linear_in_its_one_input_dependent_operand() -> None:
    """einsum with a constant operand is a linear layer: LRP-0 is gradient x input, and
    nothing leaks; with two input-dependent operands it is refused by name."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(5, 3, dtype=D, generator=gen)
    x = torch.randn(2, 5, dtype=D, generator=gen)
    expl = _explain(lambda m, x: torch.einsum("bi,ij->bj", x, w), x)
    want = x * (w.sum(1))[None]  # output relevance = output: R_i = x_i * sum_j w_ij
    torch.testing.assert_close(expl.relevance, want, rtol=0, atol=1e-12)
    assert float(expl.ledger.totals()["leaked"].abs().max()) < 1e-12
    with pytest.raises(UnsupportedOperationError, match="einsum of two or more"):
        _explain(lambda m, x: torch.einsum("bi,bj->bij", x, x), x)
