"""Mamba explained unchanged as MambaLRP (issue 19), on its pure-PyTorch path (no CUDA
kernels): the selective scan's input-dependent Delta, A, B and C held constant, so the
scan is linear in its input; the gate (scan + u D) * silu(z) uniform; SiLU and RMSNorm
identity; the causal conv1d a linear layer. Against the explicit reference
(tests/reference_families.py) in float64, and the family contract.

Hugging Face's Mamba returns its logits in float32 (`lm_head(h).float()`), and casts
B, u and RMSNorm to float32 inside the float64 model: the comparisons allow that rounding.
"""

from __future__ import annotations

import pytest
import torch
from test_families import IDS, LEFT_PADDED, check_contract

import relprop

fam = pytest.importorskip("reference_families")


def _deviation(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("residual_in_fp32", [pytest.param(False, marks=pytest.mark.slow),
                                              True])  # True: MambaConfig's default
def test_mamba_matches_reference(residual_in_fp32: bool) -> None:
    """attnlrp's defaults (epsilon -> 0, sums unstabilised): within 1e-6 of max|R|, at
    two positions."""
    model = fam.tiny_mamba(0, residual_in_fp32=residual_in_fp32)
    explainer = relprop.Explainer(model, "attnlrp")
    for position in (6, 3):
        got = explainer(IDS, target=(position, 4))
        want = fam.mamba_relevance(model, IDS, position=position, token=4)
        assert _deviation(got.embeddings, want) < 1e-6
        torch.testing.assert_close(got.relevance, want.sum(-1), rtol=0,
                                   atol=1e-6 * float(want.abs().max()))
        assert torch.all(got.relevance[:, position + 1:] == 0)  # causal
    with torch.no_grad():
        hf = model(IDS).logits
    reference = fam.mamba_forward(model, IDS).logits
    torch.testing.assert_close(reference.float(), hf, rtol=0, atol=1e-6)


def test_mamba_runs_unchanged() -> None:
    """The contract, left-padded (the mixer's input masked): nothing leaks (no softmax),
    the conv1d's bias takes its share, padded tokens 0."""
    check_contract(fam.tiny_mamba(0), IDS, 4, {"attention_mask": LEFT_PADDED},
                   padded=LEFT_PADDED == 0, softmax=False)


class _Selection(torch.nn.Module):
    """x_proj(u) split into (dt, B, C), Delta = softplus(dt_proj(dt)); with `into_layer`
    the first piece also enters a layer (as Mamba2's split of its input projection)."""

    def __init__(self, into_layer: bool) -> None:
        super().__init__()
        self.into_layer = into_layer
        self.x_proj = torch.nn.Linear(4, 12)
        self.dt_proj = torch.nn.Linear(4, 4)
        self.w = torch.nn.Parameter(torch.randn(4, 4))  # (functional, as relprop's graphs are)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        dt, b, c = self.x_proj(u).split(4, -1)
        delta = torch.nn.functional.softplus(self.dt_proj(dt))
        x = torch.nn.functional.linear(dt, self.w) if self.into_layer else u
        return x * delta * b * c


def test_only_a_split_of_scan_parameters_is_held() -> None:
    from relprop.passes.scan import hold_selection

    held = hold_selection(torch.fx.symbolic_trace(_Selection(False)).graph)
    assert [n.name for n in held] == ["split"]
    assert hold_selection(torch.fx.symbolic_trace(_Selection(True)).graph) == set()


class _ScatterWrite(torch.nn.Module):
    """x with a slice (and one row) overwritten by another activation: the functional form
    of an in-place write through a view (mambapy's parallel scan, functionalized)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(4, 6, bias=False)
        self.b = torch.nn.Linear(4, 6, bias=False)
        self.head = torch.nn.Linear(6, 3, bias=False)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        a, b = self.a(u).view(-1, 3, 2), self.b(u).view(-1, 3, 2)
        a = torch.slice_scatter(a, b[:, :2], dim=1, start=0, end=2)
        a = torch.select_scatter(a, 2 * b[:, 2], dim=1, index=2)
        return self.head(a.flatten(1))


def test_a_scatter_write_is_a_move() -> None:
    """select_scatter / slice_scatter: the written slice's relevance goes back to what was
    written, the rest to the base; on a bias-free linear model the whole explanation is
    then gradient x input (LRP-0), and the overwritten values of the base get none."""
    torch.manual_seed(0)
    model = _ScatterWrite().double()
    u = torch.randn(2, 4, dtype=torch.float64)
    got = relprop.Explainer(model, "attnlrp", record=True)(u, target=1)
    x = u.clone().requires_grad_()
    (g,) = torch.autograd.grad(model(x)[:, 1].sum(), x)
    torch.testing.assert_close(got.relevance, g * u, rtol=0, atol=1e-12)
    assert float(got.layers["a"].abs().max()) == 0  # every value of a was overwritten
