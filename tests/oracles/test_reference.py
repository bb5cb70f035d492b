"""The engine agrees with the slow explicit-matrix reference (tests/reference_lrp.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import HIGH, LOW, rules_for
from reference_lrp import REFERENCES, Layer, affine_from, maxpool_layer, propagate
from torch import nn

import relprop


def mlp(biases: bool = True) -> nn.Sequential:
    m = nn.Sequential(nn.Linear(6, 9), nn.ReLU(), nn.Linear(9, 7), nn.ReLU(), nn.Linear(7, 4))
    with torch.no_grad():
        for layer in m[::2]:
            layer.bias.normal_(0, 0.3 if biases else 0.0)
    return m.double().eval()


def mlp_layers(model: nn.Sequential):
    def explicit(x: np.ndarray) -> list[Layer]:
        out = []
        for layer in model:
            if isinstance(layer, nn.ReLU):
                out.append(Layer("relu"))
            else:
                out.append(Layer("affine", layer.weight.detach().numpy(),
                                 layer.bias.detach().numpy()))
        return out
    return explicit


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 3, 3, padding=1)
        self.conv2 = nn.Conv2d(3, 4, 3, stride=2)
        self.fc = nn.Linear(4 * 2 * 2, 3)

    def forward(self, x):
        x = self.conv1(x).relu()
        x = nn.functional.max_pool2d(x, 2)  # 6x6 -> 3x3 ... see shapes below
        x = torch.relu(self.conv2(nn.functional.pad(x, (1, 1, 1, 1))))
        x = nn.functional.avg_pool2d(x, 1)
        return self.fc(torch.flatten(x, 1))


def cnn_layers(model: SmallCNN):
    def explicit(x: np.ndarray) -> list[Layer]:
        t = torch.from_numpy(x).reshape(1, 2, 6, 6)
        layers = []
        W, b = affine_from(model.conv1, (2, 6, 6))
        layers += [Layer("affine", W, b), Layer("relu")]
        a = model.conv1(t).relu()[0].detach()
        layers.append(maxpool_layer(a, 2))
        pad = lambda v: nn.functional.pad(v, (1, 1, 1, 1))  # noqa: E731
        W, b = affine_from(lambda v: model.conv2(pad(v)), (3, 3, 3))
        layers += [Layer("affine", W, b), Layer("relu")]
        layers.append(Layer("affine", np.eye(16), np.zeros(16), proportional=True))  # avg_pool
        W, b = affine_from(model.fc, (16,))
        layers.append(Layer("affine", W, b))
        return layers
    return explicit


MLP_COMPOSITES = ["lrp0", "epsilon", "gamma", "zplus", "alpha_beta", "flat", "wsquare", "zbox"]


@pytest.mark.parametrize("composite", MLP_COMPOSITES)
@pytest.mark.parametrize("biases", [False, True])
def test_mlp_matches_reference(composite: str, biases: bool) -> None:
    model = mlp(biases)
    x = torch.randn(5, 6, dtype=torch.float64)
    expl = relprop.explain(model, x, composite=composite, low=LOW, high=HIGH)
    for i in range(len(x)):
        ref = propagate(mlp_layers(model), x[i].numpy(), int(expl.target[i]),
                        rules_for(composite, 3))
        np.testing.assert_allclose(expl.relevance[i].numpy(), ref, rtol=1e-6, atol=1e-9)


CNN_COMPOSITES = ["lrp0", "epsilon", "gamma", "zplus", "alpha_beta", "epsilon_gamma_box",
                  "epsilon_plus", "epsilon_plus_flat", "epsilon_alpha2_beta1"]


@pytest.mark.parametrize("composite", CNN_COMPOSITES)
def test_cnn_matches_reference(composite: str) -> None:
    model = SmallCNN().double().eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.normal_(0, 0.2)
    x = torch.randn(3, 2, 6, 6, dtype=torch.float64)
    expl = relprop.explain(model, x, target=1, composite=composite, low=LOW, high=HIGH)
    for i in range(len(x)):
        ref = propagate(cnn_layers(model), x[i].reshape(-1).numpy(), 1,
                        rules_for(composite, 3), sum_eps=0.0 if composite == "lrp0" else 1e-6)
        np.testing.assert_allclose(expl.relevance[i].reshape(-1).numpy(), ref, rtol=1e-6,
                                   atol=1e-9)


def public_rules() -> list[type[relprop.Rule]]:
    """Every rule class relprop exports (relprop.Rule itself aside)."""
    names = set(relprop.__all__) | {n for n in vars(relprop) if not n.startswith("_")}
    found = {getattr(relprop, n) for n in names}
    return sorted((c for c in found if isinstance(c, type) and issubclass(c, relprop.Rule)
                   and c is not relprop.Rule), key=lambda c: c.__name__)


def test_every_public_rule_has_a_reference() -> None:
    """A rule lands with its slow reference: `@replicates(TheRule)` in reference_lrp.py."""
    assert len(public_rules()) >= 8
    missing = [c.__name__ for c in public_rules() if c not in REFERENCES]
    assert not missing, f"rules without a reference in tests/reference_lrp.py: {missing}"


@pytest.mark.parametrize("rule_class", public_rules(), ids=lambda c: c.__name__)
@pytest.mark.parametrize("bias", ["absorb", "ignore", "distribute"])
def test_every_public_rule_matches_its_reference(rule_class, bias: str) -> None:
    """Each rule, with its default parameters, on every layer of an MLP with biases,
    against the reference its class is tied to (the rule object itself is handed over)."""
    rule = rule_class(bias=bias)
    model = mlp(biases=True)
    x = torch.randn(4, 6, dtype=torch.float64)
    expl = relprop.explain(model, x, composite=relprop.Composite(default=rule))
    for i in range(len(x)):
        ref = propagate(mlp_layers(model), x[i].numpy(), int(expl.target[i]), [rule] * 3)
        np.testing.assert_allclose(expl.relevance[i].numpy(), ref, rtol=1e-6, atol=1e-9)
