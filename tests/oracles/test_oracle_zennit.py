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
from helpers import HIGH, LOW
from zennit import composites as zc
from zennit.attribution import Gradient

import relprop


def zennit_composite(name: str, x: torch.Tensor, canonizers: list | None = None):
    if name == "epsilon_gamma_box":
        return zc.EpsilonGammaBox(low=torch.full_like(x, LOW), high=torch.full_like(x, HIGH),
                                  canonizers=canonizers)
    return {"epsilon_plus": zc.EpsilonPlus, "epsilon_plus_flat": zc.EpsilonPlusFlat,
            "epsilon_alpha2_beta1": zc.EpsilonAlpha2Beta1}[name](canonizers=canonizers)


def zennit_relevance(model, x, target: int, name: str, canonizer=None) -> torch.Tensor:
    """Zennit's relevance, starting from the target logit's value."""
    canonizers = None if canonizer is None else [canonizer]
    with Gradient(model=model, composite=zennit_composite(name, x, canonizers)) as attributor:
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
# VGG16 (the deeper twin of VGG11, same layer types) and the bias-free cases (biases set to
# zero: a special case of the random ones) run in `make bench` (pytest -m slow)
CASES = [pytest.param(a, c, b, id=f"{a}-{c}-{'bias' if b else 'nobias'}",
                      marks=[pytest.mark.slow] if a == "vgg16" or not b else [])
         for a in ("vgg11", "vgg16") for c in COMPOSITES for b in (False, True)]


@pytest.mark.parametrize(("arch", "composite", "biases"), CASES)
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


# ---------------------------------------------------------- networks needing canonizers

@functools.cache
def with_batchnorm_statistics(arch: str, bn_eps: float = 0.0) -> torch.nn.Module:
    """Random weights, random biases, and BatchNorm statistics that make folding matter.

    BatchNorm eps is 0 by default here: Zennit's canonizer merges a BatchNorm into
    its conv and then leaves the BatchNorm in place as "identity" with running_var
    = 1, which still divides by sqrt(1 + eps). With eps = 1e-5 every merged
    BatchNorm scales its output by 1 - 5e-6, so Zennit explains a slightly
    different function (see test_zennit_canonizer_changes_the_function).
    """
    model = getattr(torchvision.models, arch)(weights=None).double().eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.eps = bn_eps
                m.running_mean.normal_(0, 0.2)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
            elif isinstance(m, torch.nn.Linear | torch.nn.Conv2d) and m.bias is not None:
                m.bias.normal_(0, 0.05)
    return model


# ResNet50 (bottleneck blocks of ResNet18's parts) and VGG16-BN (the same BatchNorm
# canonizer as ResNet18's, after convolutions without residuals) run in `make bench`
CANON = [pytest.param(a, c, id=f"{a}-{c}", marks=[pytest.mark.slow] if a != "resnet18" else [])
         for a in ("resnet18", "resnet50", "vgg16_bn")
         for c in ("epsilon_plus", "epsilon_alpha2_beta1", "epsilon_gamma_box")]


@pytest.mark.parametrize(("arch", "composite"), CANON)
def test_canonized_networks_match_zennit(arch: str, composite: str) -> None:
    from zennit.torchvision import ResNetCanonizer, VGGCanonizer

    model = with_batchnorm_statistics(arch)
    canonizer = ResNetCanonizer() if arch.startswith("resnet") else VGGCanonizer()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    expected = zennit_relevance(model, x, 5, composite, canonizer).numpy()
    got = relprop.explain(model, x, target=5, composite=composite, low=LOW, high=HIGH)
    scale = np.abs(expected).max()
    np.testing.assert_allclose(got.relevance.numpy(), expected, rtol=1e-4, atol=1e-6 * scale)


def test_zennit_canonizer_changes_the_function() -> None:
    """Why the comparison above uses BatchNorm eps = 0 (a defect of Zennit 0.5.1)."""
    from zennit.torchvision import ResNetCanonizer

    model = with_batchnorm_statistics("resnet18", 1e-5)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    original = model(x).detach()
    composite = zc.EpsilonPlus(canonizers=[ResNetCanonizer()])
    with Gradient(model=model, composite=composite):
        canonized = model(x).detach()
    drift = ((canonized - original).abs().max() / original.abs().max()).item()
    assert drift > 1e-6  # Zennit's canonized ResNet18 is not the same function
    expl = relprop.explain(model, x, target=5, composite="epsilon_plus")
    torch.testing.assert_close(expl.output, original, rtol=1e-9, atol=1e-13)  # relprop's is
