"""Composite and rule arguments: refused clearly before any model work, never dropped, visible.

Issue 10: a mistaken value (gamma=-0.5 gave a relevance sum of 6e5 for a logit
of -0.6) or a misspelt keyword must stop with a CompositeError naming it; an
explicit epsilon= must reach the LSTM rule too; describe() shows what was used.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import relprop
from relprop import (
    AlphaBeta,
    Composite,
    CompositeError,
    Epsilon,
    Flat,
    Gamma,
    RecurrentRule,
    ZBox,
    make_composite,
)
from relprop.composites import PARAMETERS


class Untouchable(nn.Module):
    """Counts and refuses every forward call: argument errors must come before any."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 2)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        raise AssertionError("the model was run before the arguments were checked")


BAD_PRESET_ARGS = [
    ("epsilon", {"epsilon": -1.0}, "epsilon=-1"),
    ("epsilon", {"epsilon": math.nan}, "epsilon=nan"),
    ("gamma", {"gamma": -0.5}, "gamma=-0.5"),
    ("epsilon_gamma_box", {"gamma": -0.5, "low": 0.0, "high": 1.0}, "gamma=-0.5"),
    ("zbox", {"low": 1.0, "high": 0.0}, "low > high"),
    ("epsilon_gamma_box", {"low": torch.zeros(1, 3, 1, 1),
                           "high": torch.tensor([1.0, -1.0, 1.0]).view(1, 3, 1, 1)},
     r"low > high at index \(0, 1, 0, 0\)"),
    ("epsilon", {"top_k": 0.0}, r"top_k=0.0.*\(0, 1\]"),
    ("epsilon", {"top_k": 1.5}, r"top_k=1.5.*\(0, 1\]"),
    ("epsilon", {"stabilizer": -1e-3}, "stabilizer=-0.001"),
    ("alpha_beta", {"alpha": 3.0, "beta": 1.0}, r"alpha - beta = 1.*not conserve relevance"),
    ("alpha_beta", {"alpha": -1.0, "beta": -2.0}, r"alpha=-1.0, beta=-2.0.*>= 0"),
    ("epsilon", {"bias": "drop"}, "bias='drop'"),
]


@pytest.mark.parametrize(("composite", "kwargs", "message"), BAD_PRESET_ARGS,
                         ids=[f"{c}-{'-'.join(k)}-{i}" for i, (c, k, _) in
                              enumerate(BAD_PRESET_ARGS)])
def test_bad_preset_arguments_are_refused_before_the_model_runs(composite, kwargs,
                                                                 message) -> None:
    model = Untouchable()
    with pytest.raises(CompositeError, match=message):
        relprop.Explainer(model, composite, **kwargs)
    with pytest.raises(CompositeError, match=message):
        relprop.explain(model, torch.randn(2, 4), composite=composite, **kwargs)
    assert model.calls == 0


@pytest.mark.parametrize(("build", "message"), [
    (lambda: Epsilon(epsilon=-1), "epsilon=-1"),
    (lambda: Gamma(gamma=-0.5), "gamma=-0.5"),
    (lambda: Gamma(gamma=0.25, epsilon=-1e-6), "epsilon=-1e-06"),
    (lambda: Flat(epsilon=-1.0), "epsilon=-1.0"),
    (lambda: ZBox(low=1, high=0), "low > high"),
    (lambda: ZBox(low=torch.zeros(2, 3), high=torch.tensor([[1.0, 1, 1], [1, 1, -2]])),
     r"low > high at index \(1, 2\).*1 of 6"),
    (lambda: ZBox(low=0.0, high=torch.tensor([1.0, math.nan])), "low > high"),
    (lambda: AlphaBeta(alpha=3, beta=1), "alpha - beta = 1"),
    (lambda: AlphaBeta(alpha=0.5, beta=-0.5), "beta=-0.5"),
    (lambda: RecurrentRule(epsilon=-1), "epsilon=-1"),
    (lambda: RecurrentRule(bias_factor=-1.0), "bias_factor=-1.0"),
    (lambda: Composite(stabilizer=-1.0), "stabilizer=-1.0"),
    (lambda: Composite(top_k=0.0), "top_k=0.0"),
], ids=["epsilon", "gamma", "gamma-epsilon", "flat", "zbox", "zbox-tensor", "zbox-nan",
        "alpha-beta", "alpha-beta-negative", "recurrent", "bias-factor", "stabilizer", "top_k"])
def test_rule_classes_refuse_bad_values_themselves(build, message) -> None:
    with pytest.raises(CompositeError, match=message):
        build()


def test_boundary_values_are_accepted() -> None:
    Epsilon(epsilon=0.0)
    Gamma(gamma=0.0)
    ZBox(low=1.0, high=1.0)
    ZBox(low=torch.zeros(1, 3, 1, 1), high=torch.ones(3, 1, 1))  # broadcasting shapes
    AlphaBeta(alpha=1, beta=0)
    RecurrentRule(epsilon=0.0)
    Composite(stabilizer=0.0, top_k=1.0)
    make_composite("epsilon", epsilon=0.0, top_k=1.0, stabilizer=0.0)


@pytest.mark.parametrize("call", ["explain", "Explainer"])
@pytest.mark.parametrize(("key", "hint"), [("epsilonn", "epsilon"), ("gama", "gamma"),
                                           ("temperature", None)])
def test_unknown_keyword_is_named_with_the_valid_ones(call, key, hint) -> None:
    model = Untouchable()
    with pytest.raises(CompositeError) as info:
        if call == "explain":
            relprop.explain(model, torch.randn(2, 4), composite="epsilon", **{key: 0.1})
        else:
            relprop.Explainer(model, "epsilon", **{key: 0.1})
    message = str(info.value)
    assert f"{key}=" in message
    assert all(f"{p}=" in message for p in PARAMETERS)
    assert "make_composite" not in message
    if hint is not None:
        assert f"did you mean {hint}=?" in message
    assert model.calls == 0


def test_keywords_with_a_custom_composite_are_refused_not_ignored() -> None:
    custom = Composite(default=Epsilon(epsilon=0.1))
    with pytest.raises(CompositeError, match=r"epsilon=.*a Composite carries its own rules"):
        relprop.Explainer(Untouchable(), custom, epsilon=1e-6)
    assert make_composite(custom) is custom


# --------------------------------------------------------- keywords reach every rule

class TinyLSTM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(3, 5, batch_first=True)
        self.head = nn.Linear(5, 2)

    def forward(self, x):
        return self.head(self.lstm(x)[0][:, -1])


def test_epsilon_reaches_the_recurrent_rule() -> None:
    model = TinyLSTM().double().eval()
    x = torch.randn(3, 6, 3, dtype=torch.float64)
    ex = relprop.Explainer(model, "epsilon", epsilon=1e-6)
    assert ex.composite.describe()["recurrent"] == {
        "rule": "RecurrentRule", "epsilon": 1e-6, "bias": "absorb", "bias_factor": 1.0}
    got = ex(x, target=1).relevance
    explicit = Composite(default=Epsilon(epsilon=1e-6), recurrent=RecurrentRule(epsilon=1e-6))
    want = relprop.explain(model, x, target=1, composite=explicit).relevance
    assert torch.equal(got, want)
    # and the keyword matters: Arras' default 1e-3 gives measurably different numbers
    arras = Composite(default=Epsilon(epsilon=1e-6), recurrent=RecurrentRule(epsilon=1e-3))
    old = relprop.explain(model, x, target=1, composite=arras).relevance
    assert (got - old).abs().max() > 1e-5 * got.abs().max()


def test_recurrent_default_and_bias_keyword() -> None:
    # no epsilon given: the LSTM keeps Arras' 1e-3 (documented); bias= reaches it
    assert make_composite("epsilon").recurrent == RecurrentRule(epsilon=1e-3)
    assert make_composite("epsilon_plus", bias="ignore").recurrent == \
        RecurrentRule(epsilon=1e-3, bias="ignore")
    assert make_composite("gamma", epsilon=1e-4).recurrent.epsilon == 1e-4
    assert make_composite("lrp0", epsilon=1e-4).recurrent.epsilon == 1e-4
    model = TinyLSTM().double().eval()
    x = torch.randn(2, 4, 3, dtype=torch.float64)
    got = relprop.explain(model, x, target=0, composite="epsilon", bias="ignore").relevance
    explicit = Composite(default=Epsilon(bias="ignore"), recurrent=RecurrentRule(bias="ignore"))
    assert torch.equal(got, relprop.explain(model, x, target=0, composite=explicit).relevance)


def test_epsilon_zero_on_an_lstm_is_guarded_against_zero_over_zero() -> None:
    model = TinyLSTM().double().eval()
    with torch.no_grad():
        for p in model.lstm.parameters():
            if p.dim() == 1:
                p.zero_()
    x = torch.randn(2, 5, 3, dtype=torch.float64)
    x[:, :2] = 0  # leading zero padding: the cell's sums are exactly 0 there
    expl = relprop.explain(model, x, target=0, composite="epsilon", epsilon=0.0)
    assert torch.isfinite(expl.relevance).all()
    assert make_composite("epsilon", epsilon=0.0).recurrent.epsilon > 0


class TwoBranches(nn.Module):
    """A sum of two branches: the relevance split there uses the composite's stabilizer."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 6, bias=False), nn.Linear(4, 6, bias=False)
        self.head = nn.Linear(6, 2)

    def forward(self, x):
        return self.head(torch.relu(self.a(x) + self.b(x)))


def test_tiny_epsilon_lowers_the_stabilizer() -> None:
    assert make_composite("epsilon").stabilizer == 1e-6
    assert make_composite("epsilon", epsilon=0.1).stabilizer == 1e-6
    assert make_composite("epsilon_plus", epsilon=1e-9).stabilizer == 1e-9
    assert make_composite("epsilon", epsilon=1e-9, stabilizer=1e-4).stabilizer == 1e-4
    assert make_composite("lrp0").stabilizer == 0.0
    assert make_composite("lrp0", stabilizer=1e-3).stabilizer == 1e-3  # explicit: kept
    model = TwoBranches().double().eval()
    x = 1e-5 * torch.randn(3, 4, dtype=torch.float64)  # sums of order 1e-5
    got = relprop.explain(model, x, target=0, composite="epsilon", epsilon=1e-12).relevance
    follows = Composite(default=Epsilon(epsilon=1e-12), stabilizer=1e-12)
    fixed = Composite(default=Epsilon(epsilon=1e-12), stabilizer=1e-6)
    assert torch.equal(got, relprop.explain(model, x, target=0, composite=follows).relevance)
    old = relprop.explain(model, x, target=0, composite=fixed).relevance
    assert (got - old).abs().max() > 1e-3 * got.abs().max()


# ------------------------------------------------------------------ describe()

def test_describe_lists_every_rule_with_its_parameters() -> None:
    low = torch.full((1, 3, 1, 1), -2.0)
    d = make_composite("epsilon_gamma_box", gamma=0.5, epsilon=0.01, low=low, high=2.0,
                       bias="ignore", top_k=0.5).describe()
    assert d["name"] == "epsilon_gamma_box"
    assert d["by_type"]["conv"] == {"rule": "Gamma", "gamma": 0.5, "epsilon": 1e-6,
                                    "bias": "ignore"}
    for key in ("Linear", "linear", "affine"):
        assert d["by_type"][key] == {"rule": "Epsilon", "epsilon": 0.01, "bias": "ignore"}
    assert d["default"] == {"rule": "Epsilon", "epsilon": 0.01, "bias": "ignore"}
    assert d["first"]["rule"] == "ZBox" and d["first"]["high"] == 2.0
    assert "(1, 3, 1, 1)" in d["first"]["low"] and "-2" in d["first"]["low"]
    assert d["recurrent"] == {"rule": "RecurrentRule", "epsilon": 0.01, "bias": "ignore",
                              "bias_factor": 1.0}
    assert d["stabilizer"] == 1e-6 and d["top_k"] == 0.5 and d["last"] is None
    text = make_composite("epsilon_gamma_box", gamma=0.5, low=0.0, high=1.0).summary()
    assert "by_type[conv]: Gamma(bias='absorb', gamma=0.5, epsilon=1e-06)" in text
    assert "recurrent: RecurrentRule(epsilon=0.001" in text
    assert "stabilizer: 1e-06" in text


def test_describe_covers_custom_and_layer_position_composites() -> None:
    d = make_composite("layer_position", low=0.0, high=1.0, gamma=0.1).describe()
    assert d["gamma_rule"]["gamma"] == 0.1
    assert d["last"] == {"rule": "LRP0", "epsilon": 0.0, "bias": "absorb"}
    custom = Composite(by_name={"lstm": RecurrentRule(epsilon=1e-5)},
                       by_type={nn.Conv2d: Gamma(gamma=0.3)}, stabilizer=1e-4)
    d = custom.describe()
    assert d["by_name"]["lstm"]["epsilon"] == 1e-5
    assert d["by_type"]["Conv2d"]["gamma"] == 0.3
    assert d["stabilizer"] == 1e-4 and d["name"] == "custom"


def test_the_explanation_and_the_ledger_show_the_values_used() -> None:
    model = TinyLSTM().double().eval()
    x = torch.randn(1, 4, 3, dtype=torch.float64)
    expl = relprop.explain(model, x, target=0, composite="epsilon", epsilon=1e-6, record=True)
    assert expl.parameters["recurrent"]["epsilon"] == 1e-6
    assert expl.parameters["default"] == {"rule": "Epsilon", "bias": "absorb", "epsilon": 1e-6}
    rules = {e.rule for e in expl.ledger}
    assert "recurrent(eps=1e-06, absorb)" in rules and "epsilon(1e-06)" in rules
