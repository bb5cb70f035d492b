"""Every torchvision classification CNN explains unchanged, with no per-model code."""

from __future__ import annotations

import pytest
import torch
from checks import assert_ledger_accounts_for_biases
from zoo import CNNS, HEAVY, bias_free, build, with_random_biases

import relprop

FUSED_CHECK = ("epsilon", "epsilon_gamma_box", "epsilon_alpha2_beta1", "epsilon_plus_flat")


def params(names):
    return [pytest.param(n, marks=pytest.mark.slow) if n in HEAVY else n for n in names]


@pytest.mark.parametrize("name", params(CNNS))
def test_bias_free_epsilon_conserves(name: str) -> None:
    model = bias_free(build(name))
    # inputs of scale 10: pre-activations well above the 1e-6 stabilizer in every layer
    # (with scale 1 the light models' logits are ~0.1 and stabilizers absorb up to 2e-4)
    x = 10 * torch.randn(2, 3, CNNS[name], CNNS[name], dtype=torch.float64)
    # the stabilizer is the only leak in a bias-free network, and the ledger books it
    expl = relprop.explain(model, x, composite="epsilon", record=True)
    assert torch.isfinite(expl.relevance).all()
    total = expl.relevance.sum((1, 2, 3))
    stab = expl.ledger.totals()["stabilizer"]
    torch.testing.assert_close(total + stab, expl.explained, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(total, expl.explained, rtol=1e-4, atol=0.0)


@pytest.mark.parametrize("name", params(CNNS))
def test_ledger_accounts_for_biases(name: str) -> None:
    model = with_random_biases(build(name))
    x = torch.randn(1, 3, CNNS[name], CNNS[name], dtype=torch.float64)
    expl = relprop.explain(model, x, composite="epsilon", record=True)
    assert_ledger_accounts_for_biases(expl)


@pytest.mark.parametrize("name", params(CNNS))
def test_every_composite_runs(name: str) -> None:
    model = build(name)
    x = torch.randn(1, 3, CNNS[name], CNNS[name], dtype=torch.float64)
    for composite in relprop.PRESETS:
        expl = relprop.explain(model, x, composite=composite, low=-4.0, high=4.0)
        assert expl.relevance.shape == x.shape
        assert torch.isfinite(expl.relevance).all(), composite
        assert expl.relevance.abs().sum() > 0, composite
        if composite in FUSED_CHECK:  # the fused fast path equals the general path
            general = relprop.explain(model, x, composite=composite, low=-4.0, high=4.0,
                                      record=True)
            torch.testing.assert_close(expl.relevance, general.relevance, rtol=1e-7,
                                       atol=1e-12, msg=composite)
