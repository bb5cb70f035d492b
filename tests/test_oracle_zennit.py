"""Zennit 0.5.1 (an independent PyTorch implementation) agrees with relprop on VGG.

Zennit carries relevance through module hooks; relprop rewrites the traced
graph. On torchvision's VGG11/VGG16 (plain Sequential CNNs, where Zennit needs
no canonizer) the two must agree for the presets both define, with zero and
with random non-zero biases. Both start from the target logit's value.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
import torchvision
from zennit import composites as zc
from zennit.attribution import Gradient

import relprop

LOW, HIGH = -3.0, 3.0


def zennit_composite(name: str, x: torch.Tensor):
    if name == "epsilon_gamma_box":
        return zc.EpsilonGammaBox(low=torch.full_like(x, LOW), high=torch.full_like(x, HIGH))
    return {"epsilon_plus": zc.EpsilonPlus, "epsilon_plus_flat": zc.EpsilonPlusFlat,
            "epsilon_alpha2_beta1": zc.EpsilonAlpha2Beta1}[name]()


def zennit_relevance(model, x, target: int, name: str) -> torch.Tensor:
    with Gradient(model=model, composite=zennit_composite(name, x)) as attributor:
        out = model(x)
        seed = torch.zeros_like(out)
        seed[:, target] = out[:, target].detach()
        _, relevance = attributor(x, seed)
    return relevance


@functools.cache
def vgg(arch: str, biases: bool) -> torch.nn.Module:
    """Built once per case family (construction dominates the run time); never modified."""
    model = getattr(torchvision.models, arch)(weights=None).double().eval()
    if biases:
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, torch.nn.Conv2d | torch.nn.Linear):
                    m.bias.normal_(0.0, 0.05)
    return model


COMPOSITES = ["epsilon_gamma_box", "epsilon_plus", "epsilon_plus_flat", "epsilon_alpha2_beta1"]
CASES = [(a, c, b) for a in ("vgg11", "vgg16") for c in COMPOSITES for b in (False, True)]


@pytest.mark.parametrize(("arch", "composite", "biases"), CASES,
                         ids=[f"{a}-{c}-{'bias' if b else 'nobias'}" for a, c, b in CASES])
def test_vgg_matches_zennit(arch: str, composite: str, biases: bool) -> None:
    model = vgg(arch, biases)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    target = 7
    expected = zennit_relevance(model, x, target, composite).numpy()
    expl = relprop.explain(model, x, target=target, composite=composite, low=LOW, high=HIGH)
    got = expl.relevance.numpy()
    scale = np.abs(expected).max()
    assert scale > 0
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6 * scale)
