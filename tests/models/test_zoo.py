"""Every torchvision classification CNN explains unchanged, with no per-model code."""

from __future__ import annotations

import pytest
import torch
from checks import (
    assert_bias_free_epsilon_conserves,
    assert_every_composite_runs,
    assert_ledger_accounts_for_biases,
)
from zoo import CNNS, HEAVY, bias_free, build, with_random_biases

import relprop

# one of each structure (residual + BatchNorm, squeeze-excitation gates with hardswish,
# concatenating fire modules, inception branches, channel shuffle, SiLU + stochastic depth):
# the default run checks these (every preset on three of them), `make bench` all 23
REPRESENTATIVE = {"resnet18", "mobilenet_v3_small", "squeezenet1_1", "googlenet",
                  "shufflenet_v2_x0_5", "efficientnet_b0"}
EVERY_PRESET = {"resnet18", "mobilenet_v3_small", "googlenet"}


def params(names, default=None):
    """The zoo as parameters: HEAVY ones, and those outside `default` if given, slow."""
    return [pytest.param(n, marks=pytest.mark.slow)
            if n in HEAVY or (default is not None and n not in default) else n for n in names]


@pytest.mark.parametrize("name", params(CNNS, REPRESENTATIVE))
def test_bias_free_epsilon_conserves(name: str) -> None:
    # inputs of scale 10: pre-activations well above the 1e-6 stabilizer in every layer
    # (with scale 1 the light models' logits are ~0.1 and stabilizers absorb up to 2e-4)
    x = 10 * torch.randn(2, 3, CNNS[name], CNNS[name], dtype=torch.float64)
    assert_bias_free_epsilon_conserves(bias_free(build(name)), x)


@pytest.mark.parametrize("name", params(CNNS, REPRESENTATIVE))
def test_ledger_accounts_for_biases(name: str) -> None:
    model = with_random_biases(build(name))
    x = torch.randn(1, 3, CNNS[name], CNNS[name], dtype=torch.float64)
    expl = relprop.explain(model, x, composite="epsilon", record=True)
    assert_ledger_accounts_for_biases(expl)


@pytest.mark.parametrize("name", params(CNNS, EVERY_PRESET))
def test_every_composite_runs(name: str) -> None:
    x = torch.randn(1, 3, CNNS[name], CNNS[name], dtype=torch.float64)
    assert_every_composite_runs(build(name), x)
