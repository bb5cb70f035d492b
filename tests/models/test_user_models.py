"""Users' own models: mixed module/functional code, reused modules, torch.add skips,
custom rules for unknown ops and leaf submodules; numerical stability when deep."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from helpers import HIGH, LOW
from reference_lrp import Node, affine_from, propagate_dag
from torch import nn

import relprop


class UserCNN(nn.Module):
    """Module and functional forms mixed, conv_shared used twice, a torch.add skip."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(2, 3, 3, padding=1)
        self.conv_shared = nn.Conv2d(3, 3, 3, padding=1)
        self.act = nn.ReLU()
        self.head = nn.Linear(3 * 5 * 5, 4)

    def forward(self, x):
        a = self.act(self.conv_in(x))
        b = torch.relu(self.conv_shared(a))
        c = self.conv_shared(b)  # the same module again
        s = F.relu(torch.add(a, c))
        return self.head(s.flatten(1))


def user_dag(model: UserCNN, rules: dict[str, dict]) -> list[Node]:
    conv_in = affine_from(model.conv_in, (2, 5, 5))
    shared = affine_from(model.conv_shared, (3, 5, 5))
    head = affine_from(model.head, (75,))
    return [
        Node("input"),
        Node("affine", (0,), *conv_in, rule=rules["first"]),     # 1
        Node("relu", (1,)),                                       # 2 a
        Node("affine", (2,), *shared, rule=rules["conv"]),        # 3
        Node("relu", (3,)),                                       # 4 b
        Node("affine", (4,), *shared, rule=rules["conv"]),        # 5 c
        Node("add", (2, 5)),                                      # 6
        Node("relu", (6,)),                                       # 7
        Node("affine", (7,), *head, rule=rules["linear"]),        # 8
    ]


RULESETS = {
    "epsilon": {k: {"name": "epsilon", "epsilon": 1e-6} for k in ("first", "conv", "linear")},
    "epsilon_gamma_box": {"first": {"name": "zbox", "low": LOW, "high": HIGH},
                          "conv": {"name": "gamma", "gamma": 0.25},
                          "linear": {"name": "epsilon", "epsilon": 1e-6}},
    "epsilon_alpha2_beta1": {"first": {"name": "alpha_beta", "alpha": 2.0, "beta": 1.0},
                             "conv": {"name": "alpha_beta", "alpha": 2.0, "beta": 1.0},
                             "linear": {"name": "epsilon", "epsilon": 1e-6}},
    "epsilon_plus_flat": {"first": {"name": "flat"},
                          "conv": {"name": "alpha_beta", "alpha": 1.0, "beta": 0.0},
                          "linear": {"name": "epsilon", "epsilon": 1e-6}},
}


@pytest.mark.parametrize("composite", list(RULESETS))
def test_user_cnn_matches_the_reference(composite: str) -> None:
    model = UserCNN().double().eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.normal_(0, 0.2)
    x = torch.randn(3, 2, 5, 5, dtype=torch.float64)
    expl = relprop.explain(model, x, target=2, composite=composite, low=LOW, high=HIGH)
    dag = user_dag(model, RULESETS[composite])
    for i in range(len(x)):
        ref = propagate_dag(dag, x[i].reshape(-1).numpy(), 2)
        np.testing.assert_allclose(expl.relevance[i].reshape(-1).numpy(), ref, rtol=1e-6,
                                   atol=1e-10)


# ------------------------------------------------------------------ user rules

@torch.fx.wrap
def scaled_tanh(x):
    return 1.7 * torch.tanh(x)


class Swishy(nn.Module):
    """A user activation module relprop has no rule for."""

    def forward(self, x):
        return x * torch.sigmoid(1.5 * x)


class WithCustomOps(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(6, 8), Swishy(), nn.Linear(8, 3)

    def forward(self, x):
        return self.fc2(scaled_tanh(self.act(self.fc1(x))))


@pytest.mark.usefixtures("registry")
def test_unknown_function_and_module_raise_until_registered() -> None:
    model = WithCustomOps().double()
    with pytest.raises(relprop.UnsupportedOperationError, match="scaled_tanh"):
        relprop.Explainer(model, composite="epsilon", leaves={"act": "identity"})
    relprop.register_function(scaled_tanh, "identity")
    relprop.register_module(Swishy, "identity")
    x = torch.randn(4, 6, dtype=torch.float64)
    expl = relprop.explain(model, x, composite="epsilon", bias="ignore", epsilon=1e-12,
                           record=True)
    # identity rule: each activation hands on exactly what it receives
    for entry in expl.ledger:
        if entry.op in ("Swishy", "scaled_tanh"):
            torch.testing.assert_close(entry.relevance_out, entry.relevance_in)
    torch.testing.assert_close(expl.relevance.sum(1), expl.explained, rtol=1e-6, atol=1e-9)


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x):
        return torch.relu(self.conv(x))


class WithBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = Block()
        self.fc = nn.Linear(3 * 16, 2)

    def forward(self, x):
        return self.fc(self.block(x).flatten(1))


def test_leaf_submodule_with_a_chosen_family() -> None:
    model = WithBlock().double()
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    calls = []
    model.block.register_forward_hook(lambda *a: calls.append(1))
    leaf = relprop.Explainer(model, composite="epsilon", leaves={"block": "gradient"})
    steps = [s.op for s in leaf.describe().steps]
    assert "Block" in steps and "Conv2d" not in steps  # one op, not traced into
    # "gradient" on a bias-free conv + ReLU block is LRP-0 for that block
    with torch.no_grad():
        model.block.conv.bias.zero_()
    composite = relprop.Composite(by_name={"block.conv": relprop.LRP0()},
                                  default=relprop.Epsilon())
    want = relprop.explain(model, x, target=1, composite=composite)
    got = leaf(x, target=1)
    torch.testing.assert_close(got.relevance, want.relevance, rtol=1e-6, atol=1e-9)
    assert calls == []


@pytest.mark.usefixtures("registry")
def test_bad_family_is_refused() -> None:
    with pytest.raises(relprop.CompositeError, match="rule family 'magic'"):
        relprop.register_function(scaled_tanh, "magic")


# ------------------------------------------------------------------ stability

@pytest.mark.parametrize("arch", ["resnet50", pytest.param("resnet152", marks=pytest.mark.slow)])
def test_deep_residual_networks_stay_finite_and_conserve(arch: str) -> None:
    model = getattr(torchvision.models, arch)(weights=None).eval()  # float32, as users run it
    x = torch.randn(2, 3, 64, 64)
    for composite in ["epsilon", "epsilon_plus", "epsilon_gamma_box", "epsilon_alpha2_beta1"]:
        expl = relprop.explain(model, x, composite=composite, low=-3.0, high=3.0, record=True)
        assert torch.isfinite(expl.relevance).all(), composite
        totals = expl.ledger.totals()
        # whatever did not reach the input is on the books (float32 accumulation aside)
        gap = expl.explained - expl.relevance.sum((1, 2, 3)) - totals["leaked"]
        assert (gap.abs() <= 1e-3 * expl.explained.abs() + 1e-5).all(), composite


@torch.fx.wrap
def wavy(x):
    return torch.sin(3 * x)


class WithWavy(nn.Module):
    """One activation that keeps the sign of its input (scaled_tanh), one that does not."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x):
        return self.fc3(scaled_tanh(self.fc2(wavy(self.fc1(x)))))


@pytest.mark.usefixtures("registry")
@pytest.mark.parametrize("composite", ["epsilon", "gamma"])
def test_fast_path_fuses_only_sign_preserving_activations(composite: str) -> None:
    relprop.register_function(wavy, "identity")
    relprop.register_function(scaled_tanh, "identity")
    model = WithWavy().double()
    ex = relprop.Explainer(model, composite=composite)
    fast = {s.name for s in ex.describe().steps if s.fused}
    assert {"fc1", "fc2", "scaled_tanh"} <= fast and "wavy" not in fast, fast
    x = torch.randn(5, 6, dtype=torch.float64)
    torch.testing.assert_close(ex(x, target=0).relevance,
                               ex(x, target=0, record=True).relevance, rtol=1e-9, atol=1e-12)
