"""Relevance that gradient form cannot carry reaches the input (relprop.shadow).

bias="distribute" hands every connected input a share of the bias, also to a
unit whose activation is 0; that share must go on down through the unit's own
pre-activation. Identity-rule activations with f(0) != 0 (sigmoid) pass their
relevance also to an input that is exactly 0.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import relprop

TINY = {"epsilon": 1e-12, "stabilizer": 1e-12}


def _issue_mlp(*middle: nn.Module) -> nn.Sequential:
    """Linear(W=[[1,1],[-1,-1]]) -> middle -> Linear(w=[1,1], b=1): logit 3 at x = [1, 1]."""
    first = nn.Linear(2, 2, bias=False)
    first.weight.data = torch.tensor([[1.0, 1.0], [-1.0, -1.0]])
    last = nn.Linear(2, 1)
    last.weight.data = torch.tensor([[1.0, 1.0]])
    last.bias.data = torch.tensor([1.0])
    return nn.Sequential(first, *middle, last).double().eval()


@pytest.mark.parametrize("middle", [
    [nn.ReLU()], [nn.ReLU(), nn.Dropout()], [nn.ReLU(), nn.Flatten()], [nn.Tanh()],
    [nn.ReLU(), nn.Tanh()], [nn.LeakyReLU(0.1)]], ids=lambda m: "-".join(
        type(q).__name__ for q in m))
@pytest.mark.parametrize("record", [False, True])
def test_distributed_bias_reaches_the_input_through_switched_off_units(middle, record) -> None:
    model = _issue_mlp(*middle)
    x = torch.tensor([[1.0, 1.0]], dtype=torch.float64)
    expl = relprop.explain(model, x, target=0, composite="epsilon", bias="distribute",
                           record=record, **TINY)
    torch.testing.assert_close(expl.relevance.sum(), model(x).sum(), rtol=1e-9, atol=1e-9)
    if record:
        assert expl.ledger.totals()["other"].abs().max() < 1e-12


class _SmallCNN(nn.Module):
    """Conv, max pool, a residual add, average pool, linear: the issue's small CNN."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(2, 4, 3, padding=1)
        self.c2 = nn.Conv2d(4, 4, 3, padding=1, bias=False)  # one layer without a bias
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = F.max_pool2d(torch.relu(self.c1(x)), 2)
        b = torch.relu(self.bn(self.c2(a))) + a
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(b, 1), 1))


def _small_cnn() -> _SmallCNN:
    model = _SmallCNN().double().eval()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 2.0)
        model.bn.bias.uniform_(-0.5, 0.5)
        for p in (model.c1.bias, model.fc.bias):
            p.uniform_(-1.0, 1.0)
    return model


def test_distribute_conserves_per_sample_on_a_biased_cnn_and_the_ledger_names_nothing_lost(
) -> None:
    model = _small_cnn()
    x = torch.randn(3, 2, 8, 8, dtype=torch.float64)
    expl = relprop.explain(model, x, target=1, composite="epsilon", bias="distribute",
                           record=True, **TINY)
    torch.testing.assert_close(expl.relevance.sum((1, 2, 3)), expl.explained, rtol=1e-6,
                               atol=1e-9)
    totals = expl.ledger.totals()
    assert totals["other"].abs().max() < 1e-9  # before the shadow channel: 29% of a conv's
    assert totals["bias"].abs().max() == 0
    fast = relprop.explain(model, x, target=1, composite="epsilon", bias="distribute", **TINY)
    torch.testing.assert_close(fast.relevance, expl.relevance, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("composite", ["flat", "wsquare", "zbox"])
def test_rules_that_hand_out_relevance_directly_conserve_through_relus(composite) -> None:
    """flat / w-square / z-box on every layer, bias ignored: nothing may be lost on zeros."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(5, 6, bias=False), nn.ReLU(), nn.Linear(6, 6, bias=False),
                          nn.ReLU(), nn.Linear(6, 2, bias=False)).double().eval()
    x = torch.rand(4, 5, dtype=torch.float64)
    expl = relprop.explain(model, x, target=0, composite=composite, low=-1.0, high=2.0,
                           record=True, **TINY)
    torch.testing.assert_close(expl.relevance.sum(1), expl.explained, rtol=1e-6, atol=1e-9)
    assert expl.ledger.totals()["other"].abs().max() < 1e-9


def test_sigmoid_passes_relevance_to_an_input_that_is_exactly_zero() -> None:
    model = nn.Sequential(nn.Sigmoid(), nn.Linear(3, 1, bias=False)).double().eval()
    x = torch.tensor([[0.0, 1.0, 0.0]], dtype=torch.float64)
    expl = relprop.explain(model, x, target=0, composite="epsilon", record=True, **TINY)
    y = torch.sigmoid(x)
    w = model[1].weight[0]
    expected = y * w  # epsilon on the linear layer, then the identity rule
    torch.testing.assert_close(expl.relevance, expected.detach(), rtol=1e-9, atol=1e-12)
    assert expl.relevance[0, 0] != 0
    assert expl.ledger.totals()["other"].abs().max() < 1e-12


def test_gates_do_not_switch_on_the_shadow_channel() -> None:
    """A sigmoid used only as a gate carries no relevance: no shadow, fast paths kept."""

    class SE(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.squeeze = nn.Conv2d(4, 4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            a = torch.relu(self.conv(x))
            gate = torch.sigmoid(self.squeeze(F.adaptive_avg_pool2d(a, 1)))
            return (a * gate).sum((2, 3))

    ex = relprop.Explainer(SE().eval(), "epsilon")
    assert not any(s.shadow_out or s.producer for s in ex.program.steps)


def test_sum_of_zeros_splits_the_arriving_relevance_equally() -> None:
    """relu(a) + relu(b) = 0 with both parts 0: a bias share arriving there is split 1:1."""

    class Twin(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(2, 1, bias=False)
            self.b = nn.Linear(2, 1, bias=False)
            self.head = nn.Linear(1, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(torch.relu(self.a(x)) + torch.relu(self.b(x)))

    model = Twin().double().eval()
    with torch.no_grad():
        model.a.weight.fill_(-1.0)
        model.b.weight.copy_(torch.tensor([[-2.0, 1.0]]))
        model.head.weight.fill_(1.0)
        model.head.bias.fill_(2.0)
    x = torch.tensor([[1.0, 0.5]], dtype=torch.float64)  # a(x) = -1.5, b(x) = -1.5
    expl = relprop.explain(model, x, target=0, composite="epsilon", bias="distribute",
                           record=True, **TINY)
    torch.testing.assert_close(expl.relevance.sum(), torch.tensor(2.0, dtype=torch.float64))
    # each branch gets 1 at its pre-activation -1.5, which the epsilon rule hands on
    # in proportion to x_i w_i / z: branch a: [2/3, 1/3]; branch b: [4/3, -1/3]
    torch.testing.assert_close(expl.relevance, torch.tensor([[2.0, 0.0]], dtype=torch.float64))


def test_bias_ignore_books_a_unit_with_all_zero_inputs_as_stabilizer() -> None:
    """z = b when every input is 0: with the bias left out of the denominator the unit has
    nowhere to send its relevance; the ledger books it at that layer's stabilizer."""
    first = nn.Linear(2, 2)
    second = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        first.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
        first.bias.copy_(torch.tensor([0.5, 2.0]))
        second.weight.fill_(1.0)
    model = nn.Sequential(first, nn.ReLU(), second).double().eval()
    x = torch.tensor([[3.0, 0.0]], dtype=torch.float64)  # unit 2 sees only a zero input
    expl = relprop.explain(model, x, target=0, composite="epsilon", bias="ignore",
                           record=True, **TINY)
    entry = expl.ledger["0"]
    # unit 1 (z = 3.5) hands its 3.5 on; unit 2 (z = b = 2) keeps its 2 in the stabilizer
    torch.testing.assert_close(expl.relevance.sum(), torch.tensor(3.5, dtype=torch.float64))
    torch.testing.assert_close(entry.stabilizer, torch.tensor([2.0], dtype=torch.float64))
    assert entry.bias.abs().max() == 0


def test_the_shadow_passes_a_gate_to_the_signal() -> None:
    """signal * sigmoid-gate hands all relevance to the signal, on the shadow channel too
    (flat everywhere: every layer hands relevance out directly)."""

    class Gated(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(2, 4, 3, bias=False)
            self.squeeze = nn.Conv2d(4, 4, 1, bias=False)
            self.head = nn.Linear(4 * 6 * 6, 3, bias=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            a = torch.relu(self.conv(x))
            gate = torch.sigmoid(self.squeeze(F.adaptive_avg_pool2d(a, 1)))
            return self.head(torch.flatten(a * gate, 1))

    model = Gated().double().eval()
    x = torch.randn(2, 2, 8, 8, dtype=torch.float64)
    expl = relprop.explain(model, x, target=0, composite="flat", record=True, **TINY)
    torch.testing.assert_close(expl.relevance.sum((1, 2, 3)), expl.explained, rtol=1e-6,
                               atol=1e-9)
    assert expl.ledger.totals()["other"].abs().max() < 1e-9


def test_a_shadow_with_nothing_below_falls_back_to_gradient_form() -> None:
    """flat after a LayerNorm (which the shadow cannot cross) through a permute: the
    relevance must still reach the input in gradient form, not vanish on a dead shadow."""

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm = nn.LayerNorm(4)
            self.conv = nn.Conv2d(4, 3, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
            return self.conv(y).sum((2, 3))

    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    expl = relprop.explain(Block().double().eval(), x, target=0, composite="flat", **TINY)
    assert expl.relevance.abs().sum() > 0


def test_bias_ignore_divides_by_w_x_not_by_z_minus_b() -> None:
    """|b| >> |W x|: z - b by subtraction loses the digits the rule divides by (found by
    tests/core/test_properties.py); the ledger must still balance to the last digits."""
    layer = nn.Linear(1, 1).double()
    with torch.no_grad():
        layer.weight.fill_(1.0)
        layer.bias.fill_(1.0)
    x = torch.full((1, 1), 1e-9, dtype=torch.float64)
    expl = relprop.explain(layer, x, target=0, composite="epsilon", bias="ignore",
                           record=True, **TINY)
    totals = expl.ledger.totals()
    assert (expl.relevance.sum() + totals["stabilizer"] - expl.explained).abs().max() < 1e-15
    assert totals["other"].abs().max() < 1e-15


def test_a_reshape_by_size_keeps_the_non_negative_flag() -> None:
    """x.view(x.size(0), -1) after a ReLU is as non-negative as torch.flatten(x, 1): the
    size argument is no data, so both forms give bit-identical relevance (found by
    tests/core/test_properties.py)."""

    class Flat(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(2, 3, 3)
            self.fc = nn.Linear(3 * 4 * 4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(torch.flatten(torch.relu(self.conv(x)), 1))

    class Viewed(Flat):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = torch.relu(self.conv(x))
            return self.fc(h.view(h.size(0), -1))

    a = Flat().double().eval()
    b = Viewed().double().eval()
    b.load_state_dict(a.state_dict())
    x = torch.randn(4, 2, 6, 6, dtype=torch.float64)
    for composite in ("gamma", "epsilon_plus", "epsilon_alpha2_beta1"):
        ra = relprop.explain(a, x, target=1, composite=composite).relevance
        rb = relprop.explain(b, x, target=1, composite=composite).relevance
        assert torch.equal(ra, rb), composite
