"""torchvision's classification CNNs with the smallest inputs each accepts, built once."""

from __future__ import annotations

import functools

import torch
import torchvision
from torch import nn

# name -> input side (small where the architecture allows)
CNNS = {
    "alexnet": 64, "vgg11": 32, "vgg11_bn": 32, "vgg16_bn": 32,
    "resnet18": 32, "resnet50": 32, "resnext50_32x4d": 32, "wide_resnet50_2": 32,
    "densenet121": 32, "squeezenet1_0": 48, "squeezenet1_1": 48, "googlenet": 32,
    "inception_v3": 80, "mobilenet_v2": 32, "mobilenet_v3_small": 32,
    "mobilenet_v3_large": 32, "mnasnet0_5": 32, "shufflenet_v2_x0_5": 32,
    "efficientnet_b0": 32, "efficientnet_v2_s": 32, "regnet_x_400mf": 32,
    "regnet_y_400mf": 32, "convnext_tiny": 32,
}
# the heaviest to build and run; checked by the benchmark job (pytest -m slow)
HEAVY = {"wide_resnet50_2", "vgg16_bn", "convnext_tiny", "efficientnet_v2_s", "inception_v3",
         "resnext50_32x4d", "densenet121"}


@functools.cache
def build(name: str) -> nn.Module:
    torch.manual_seed(0)
    kwargs = {"aux_logits": False, "init_weights": True} if name in ("googlenet",
                                                                    "inception_v3") else {}
    model = getattr(torchvision.models, name)(weights=None, **kwargs).double().eval()
    with torch.no_grad():  # BatchNorm with non-trivial statistics
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
    return model


def unit_gain(model: nn.Module) -> nn.Module:
    """Re-draw dense/conv weights with He's variance (2 / fan-in), in place.

    Some torchvision inits (GoogLeNet, Inception, AlexNet: std 0.01) shrink the
    signal at every layer, leaving random-weight logits near 1e-11, where any
    fixed stabilizer dominates. With unit gain the logits are O(1), as in a
    trained network.
    """
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d | nn.Linear):
                fan_in = m.weight[0].numel()
                m.weight.normal_(0.0, (2.0 / fan_in) ** 0.5)
    return model


def bias_free(model: nn.Module) -> nn.Module:
    """A unit-gain copy with every bias, BatchNorm shift and LayerNorm shift set to zero."""
    import copy

    model = unit_gain(copy.deepcopy(model))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.zero_()
            if getattr(m, "bias", None) is not None and isinstance(m.bias, torch.Tensor):
                m.bias.zero_()
    return model


def with_random_biases(model: nn.Module, std: float = 0.05) -> nn.Module:
    import copy

    model = copy.deepcopy(model)
    with torch.no_grad():
        for m in model.modules():
            if getattr(m, "bias", None) is not None and isinstance(m.bias, torch.Tensor):
                m.bias.normal_(0, std)
    return model
