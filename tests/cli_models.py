"""A model factory for the `module:callable` form of `relprop explain --model`."""

from __future__ import annotations

from torch import nn

from relprop.apps.zoo import mnist_cnn


class _RGBToGrey(nn.Module):
    def forward(self, x):
        return x.mean(1, keepdim=True)


def rgb_mnist() -> nn.Module:
    """The shipped MNIST CNN behind an RGB -> grey step (CLI images are RGB)."""
    return nn.Sequential(_RGBToGrey(), mnist_cnn())
