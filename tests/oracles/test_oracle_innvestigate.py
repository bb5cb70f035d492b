"""iNNvestigate's single-layer reference attributions (Keras/TensorFlow) match relprop.

Each file holds 8 inputs (NHWC) and, per single-layer model `Input -> layer ->
Flatten`, the weights, the outputs and the attribution of the largest output.
The PyTorch twin of each model works on the same NHWC tensor, so relevance is
compared element by element, to rtol 1e-4.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from torch import nn

import relprop
from relprop import LRP0, AlphaBeta, Composite, Epsilon, Flat, WSquare, ZBox, ZPlus

ORACLES = Path(__file__).resolve().parents[1] / "data" / "innvestigate"  # see its README.md
LAYERS = ["Dense", "Dense_relu", "Conv2D", "Conv2D_relu", "AveragePooling2D", "MaxPooling2D"]
IN_EPS = 1e-7  # iNNvestigate's epsilon (K.epsilon())
# iNNvestigate's other rules divide with SafeDivide, which guards only exact zeros
# rather than adding eps * sign(d) everywhere; epsilon=0 is relprop's equivalent
# (a 1e-30 guard). With 1e-7 added everywhere, LRPAlpha2Beta1IgnoreBias/Dense
# differs at one element whose negative denominator is -9e-4 (rel. diff 1.2e-4).
SAFE = 0.0


def _uniform(rule):
    return Composite(default=rule, stabilizer=IN_EPS, name="oracle")


def _preset(conv_rule, first=None):
    eps = Epsilon(epsilon=0.1)
    return Composite(by_type={"linear": eps, "conv": conv_rule}, first=first, default=eps,
                     stabilizer=IN_EPS, name="preset")


COMPOSITES = {
    "LRPZ": _uniform(LRP0()),
    "LRPZIgnoreBias": _uniform(LRP0(bias="ignore")),
    "LRPEpsilon": _uniform(Epsilon(epsilon=IN_EPS)),
    "LRPEpsilonIgnoreBias": _uniform(Epsilon(epsilon=IN_EPS, bias="ignore")),
    "LRPZPlus": _uniform(ZPlus(epsilon=SAFE)),
    "LRPZPlusFast": _uniform(ZPlus(epsilon=SAFE)),
    "LRPAlpha1Beta0": _uniform(AlphaBeta(1, 0, epsilon=SAFE)),
    "LRPAlpha1Beta0IgnoreBias": _uniform(AlphaBeta(1, 0, epsilon=SAFE, bias="ignore")),
    "LRPAlpha2Beta1": _uniform(AlphaBeta(2, 1, epsilon=SAFE)),
    "LRPAlpha2Beta1IgnoreBias": _uniform(AlphaBeta(2, 1, epsilon=SAFE, bias="ignore")),
    "LRPFlat": _uniform(Flat(epsilon=SAFE)),
    "LRPWSquare": _uniform(WSquare(epsilon=SAFE)),
    "LRPZ_boxed_input_layer_rule": Composite(default=LRP0(), first=ZBox(-10.0, 10.0, SAFE),
                                             stabilizer=IN_EPS),
    "LRPZ_Flat_input_layer_rule": Composite(default=LRP0(), first=Flat(epsilon=SAFE),
                                            stabilizer=IN_EPS),
    "LRPSequentialPresetA": _preset(AlphaBeta(1, 0, epsilon=SAFE)),
    "LRPSequentialPresetB": _preset(AlphaBeta(2, 1, epsilon=SAFE)),
    "LRPSequentialPresetAFlat": _preset(AlphaBeta(1, 0, epsilon=SAFE), Flat(epsilon=SAFE)),
    "LRPSequentialPresetBFlat": _preset(AlphaBeta(2, 1, epsilon=SAFE), Flat(epsilon=SAFE)),
}


class ChannelsLast(nn.Module):
    """Run a NCHW torch layer on a NHWC tensor, like the Keras reference model."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x):
        y = self.layer(x.permute(0, 3, 1, 2))
        return y.permute(0, 2, 3, 1).flatten(1)


def build(group: h5py.Group, name: str) -> nn.Module:
    relu = name.endswith("_relu")
    if name.startswith("Dense"):
        k, b = (torch.from_numpy(np.asarray(group["weights"][str(i)])) for i in (0, 1))
        lin = nn.Linear(k.shape[0], k.shape[1])
        with torch.no_grad():
            lin.weight.copy_(k.T)
            lin.bias.copy_(b)
        return nn.Sequential(lin, *([nn.ReLU()] if relu else []), nn.Flatten())
    if name.startswith("Conv2D"):
        k, b = (torch.from_numpy(np.asarray(group["weights"][str(i)])) for i in (0, 1))
        conv = nn.Conv2d(k.shape[2], k.shape[3], k.shape[:2])
        with torch.no_grad():
            conv.weight.copy_(k.permute(3, 2, 0, 1))
            conv.bias.copy_(b)
        return ChannelsLast(nn.Sequential(conv, *([nn.ReLU()] if relu else [])))
    if name == "AveragePooling2D":
        return ChannelsLast(nn.AvgPool2d(2))
    return ChannelsLast(nn.MaxPool2d(2))


CASES = [(a, layer) for a in COMPOSITES for layer in LAYERS]


@pytest.mark.parametrize(("analyzer", "layer"), CASES, ids=[f"{a}-{b}" for a, b in CASES])
def test_matches_innvestigate(analyzer: str, layer: str) -> None:
    with h5py.File(ORACLES / f"{analyzer}.hdf5") as f:
        assert f.attrs["analyzer_name"] == analyzer
        x = torch.from_numpy(np.asarray(f["input"])).double()
        group = f[layer]
        model = build(group, layer).double().eval()
        expected = np.asarray(group["attribution"], dtype=np.float64)
        out = model(x).detach().numpy()
        np.testing.assert_allclose(out, np.asarray(group["output"]), rtol=1e-5, atol=1e-6)
    expl = relprop.explain(model, x, composite=COMPOSITES[analyzer])
    np.testing.assert_allclose(expl.relevance.numpy(), expected, rtol=1e-4, atol=1e-7)
