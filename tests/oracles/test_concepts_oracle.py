"""zennit-crp 0.6.0 (the CRP authors' code, on zennit 0.5.1) agrees with relprop.concepts.

zennit-crp masks the gradient at module outputs with hooks (its relevance is zennit's);
relprop gates the traced graph. In float64 the conditional heatmaps must agree to 1e-6 of
their largest value: a VGG-like CNN (EpsilonPlusFlat; EpsilonGammaBox with zennit's
BatchNorm canonizer), a ResNet with exclude_parallel both ways and joint conditions,
channels at three depths. zennit-crp is installed with `pip install --no-deps
zennit-crp==0.6.0` (its declared pins, torch < 2 and numpy <= 1.23.5, are not needed for
CondAttribution), as the Makefile does.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision
from torch import nn
from zennit import composites as zc
from zennit.torchvision import ResNetCanonizer, VGGCanonizer

import relprop
import relprop.concepts as rc

crp = pytest.importorskip("crp.attribution", reason="pip install --no-deps zennit-crp==0.6.0")


class FullHeatmap(crp.CondAttribution):
    """CondAttribution returning the whole input relevance (not its sum over channels)."""

    def heatmap_modifier(self, data, on_device=None):
        return data.grad.detach().clone()


def crp_maps(model: nn.Module, x: torch.Tensor, target: int, conditions: list[dict],
             composite, exclude_parallel: bool = True) -> torch.Tensor:
    """(K, C, H, W): zennit-crp's heatmap of one sample per condition."""
    attribution = FullHeatmap(model, no_param_grad=False)
    data = x.clone().requires_grad_(True)
    conditions = [{"y": [target], **c} for c in conditions]
    return attribution(data, conditions, composite, exclude_parallel=exclude_parallel).heatmap


def assert_agree(got: torch.Tensor, expected: torch.Tensor) -> None:
    scale = expected.abs().max()
    assert scale > 0
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6 * float(scale))


def vgg_like(batchnorm: bool = False) -> nn.Module:
    torch.manual_seed(0)

    def block(i: int, o: int) -> list[nn.Module]:
        return [nn.Conv2d(i, o, 3, padding=1), *([nn.BatchNorm2d(o)] if batchnorm else []),
                nn.ReLU()]

    m = nn.Sequential(*block(3, 8), *block(8, 12), nn.MaxPool2d(2), *block(12, 16),
                      *block(16, 16), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(64, 32),
                      nn.ReLU(), nn.Linear(32, 10)).double().eval()
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.Conv2d | nn.Linear):
                mod.bias.normal_(0, 0.05)
            if isinstance(mod, nn.BatchNorm2d):
                mod.eps = 0.0  # zennit's canonizer leaves sqrt(1 + eps) behind otherwise
                mod.running_mean.normal_(0, 0.2)
                mod.running_var.uniform_(0.5, 1.5)
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.normal_(0, 0.1)
    return m


def top_channels(explainer: relprop.Explainer, x: torch.Tensor, target: int, layer: str,
                 k: int) -> list[int]:
    return [i for i, _, _ in rc.relevance(explainer, x, target, layer).top(k, by="abs")]


def test_vgg_epsilon_plus_flat_three_depths() -> None:
    model = vgg_like()
    x = torch.randn(1, 3, 16, 16, dtype=torch.float64)
    explainer = relprop.Explainer(model, "epsilon_plus_flat")
    for layer in ("2", "5", "7", "12"):  # three convolutions and a dense layer
        ids = top_channels(explainer, x, 4, layer, 3)
        got = explainer(x, target=4, condition={layer: ids}).relevance[0]
        expected = crp_maps(model, x, 4, [{layer: [c]} for c in ids], zc.EpsilonPlusFlat())
        assert_agree(got, expected)


def test_vgg_batchnorm_epsilon_gamma_box() -> None:
    model = vgg_like(batchnorm=True)
    x = torch.randn(1, 3, 16, 16, dtype=torch.float64).clamp(-3, 3)
    explainer = relprop.Explainer(model, "epsilon_gamma_box", low=-3.0, high=3.0)
    composite = zc.EpsilonGammaBox(low=torch.full_like(x, -3.0), high=torch.full_like(x, 3.0),
                                   canonizers=[VGGCanonizer()])
    for layer in ("3", "6", "10"):  # three depths, named by their (folded) BatchNorm
        ids = top_channels(explainer, x, 2, layer, 3)
        got = explainer(x, target=2, condition={layer: ids}).relevance[0]
        assert_agree(got, crp_maps(model, x, 2, [{layer: [c]} for c in ids], composite))


def small_resnet() -> nn.Module:
    torch.manual_seed(0)
    model = torchvision.models.resnet.ResNet(torchvision.models.resnet.BasicBlock,
                                             [1, 1, 1, 1], num_classes=10).double().eval()
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.eps = 0.0
                mod.running_mean.normal_(0, 0.2)
                mod.running_var.uniform_(0.5, 1.5)
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.normal_(0, 0.1)
    return model


@pytest.mark.parametrize("exclude", [True, False])
def test_resnet_both_flavours(exclude: bool) -> None:
    """Beside the residual skips, both flavours; channels at three depths (the last: a
    whole block, its output after the sum)."""
    model = small_resnet()
    x = torch.randn(1, 3, 16, 16, dtype=torch.float64)
    explainer = relprop.Explainer(model, "epsilon_plus")
    composite = zc.EpsilonPlus(canonizers=[ResNetCanonizer()])
    for layer in ("layer1.0.conv1", "layer3.0.conv2", "layer4.0"):
        ids = top_channels(explainer, x, 6, layer, 2)
        got = explainer(x, target=6, condition={layer: ids},
                        exclude_parallel=exclude).relevance[0]
        expected = crp_maps(model, x, 6, [{layer: [c]} for c in ids], composite, exclude)
        assert_agree(got, expected)


@pytest.mark.parametrize("exclude", [True, False])
def test_resnet_joint_conditions(exclude: bool) -> None:
    """Two layers in one condition: the upper one first, as zennit-crp needs."""
    model = small_resnet()
    x = torch.randn(1, 3, 16, 16, dtype=torch.float64)
    explainer = relprop.Explainer(model, "epsilon_plus")
    composite = zc.EpsilonPlus(canonizers=[ResNetCanonizer()])
    upper = top_channels(explainer, x, 1, "layer3.0.conv2", 2)
    lower = top_channels(explainer, x, 1, "layer2.0.conv1", 2)
    conditions = [{"layer3.0.conv2": [u], "layer2.0.conv1": [v]} for u in upper for v in lower]
    got = explainer(x, target=1, condition=conditions, exclude_parallel=exclude).relevance[0]
    assert_agree(got, crp_maps(model, x, 1, conditions, composite, exclude))


@pytest.mark.slow
def test_references_match_feature_visualization(tmp_path) -> None:
    """zennit-crp's FeatureVisualization (RelMax and ActMax, relevance from the label's
    logit, normalised per sample) picks the same reference samples as collect(...,
    target="label", normalize=True), by sums and by maxima. (Its reference *heatmaps*
    differ on purpose: zennit-crp starts them at the layer's activations, relprop at the
    model's output; docs/concepts.md.)"""
    from crp.concepts import ChannelConcept
    from crp.visualization import FeatureVisualization
    from torch.utils.data import TensorDataset

    model = vgg_like()
    g = torch.Generator().manual_seed(2)
    data = TensorDataset(torch.randn(20, 3, 16, 16, dtype=torch.float64, generator=g),
                         torch.randint(0, 10, (20,), generator=g))
    layers = ["2", "7"]
    for target in ("sum", "max"):
        fv = FeatureVisualization(FullHeatmap(model, no_param_grad=False), data,
                                  {k: ChannelConcept() for k in layers}, max_target=target,
                                  abs_norm=True, path=str(tmp_path / f"fv-{target}"))
        fv.run(zc.EpsilonPlus(), 0, len(data), batch_size=8)
        rc.collect(model, data, layers, tmp_path / f"relprop-{target}", "epsilon_plus", n=6,
                   target="label", normalize=True, batch_size=8, shard_size=8,
                   progress=False)
        refs = rc.load(tmp_path / f"relprop-{target}")
        suffix = "" if target == "sum" else "_max"
        for kind, folder in (("relevance", "RelMax"), ("activation", "ActMax")):
            for layer in layers:
                stem = tmp_path / f"fv-{target}" / f"{folder}_{target}_normed" / layer
                indices = torch.from_numpy(np.load(f"{stem}_data.npy"))
                values = torch.from_numpy(np.load(f"{stem}_rel.npy"))
                gap = values[:-1] - values[1:] > 1e-9  # ties (dead units: 0) order freely
                distinct = (torch.cat([torch.ones_like(gap[:1]), gap]) &
                            torch.cat([gap, torch.ones_like(gap[:1])]))[:6]
                for c in range(refs.channels(layer)):
                    top = refs.top(layer, c, by=kind + suffix)
                    ours, theirs = top.indices[distinct[:, c]], indices[:6][distinct[:, c], c]
                    assert ours.tolist() == theirs.long().tolist(), (kind, target, layer, c)
                    torch.testing.assert_close(top.scores.double(), values[:6, c], rtol=1e-5,
                                               atol=1e-7)
                assert distinct.float().mean() > 0.5  # most places are compared
