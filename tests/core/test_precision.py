"""Half precision: float16 / bfloat16 models are explained in float32 and answered in
their own dtype; never NaN or Inf where float32 is finite."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import relprop


class _CNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 4 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = F.max_pool2d(torch.relu(self.bn(self.c1(x))), 2)
        b = torch.relu(self.c2(a)) + a
        return self.fc(torch.flatten(F.avg_pool2d(b, 2), 1))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("composite", relprop.PRESETS)
def test_half_models_match_float32_on_the_same_rounded_weights(dtype, composite) -> None:
    model = _CNN().eval()
    half = copy.deepcopy(model).to(dtype)
    reference = copy.deepcopy(half).float()  # the same rounded weights, in float32
    x = torch.randn(2, 3, 16, 16).to(dtype)
    for record in (False, True):
        got = relprop.explain(half, x, target=1, composite=composite, low=-4.0, high=4.0,
                              record=record)
        want = relprop.explain(reference, x.float(), target=1, composite=composite,
                               low=-4.0, high=4.0, record=record)
        assert got.relevance.dtype == dtype and got.output.dtype == dtype
        assert torch.isfinite(got.relevance).all()
        err = (got.relevance.float() - want.relevance).norm() / want.relevance.norm()
        assert err < 1e-2
    assert all(p.dtype == dtype for p in half.parameters())  # the model is left in half


def test_zplus_with_no_positive_contribution_is_zero_not_nan_in_float16() -> None:
    layer = nn.Linear(3, 2).half()
    with torch.no_grad():
        layer.weight.fill_(-1.0)
        layer.bias.zero_()
    expl = relprop.explain(layer, torch.ones(1, 3).half(), target=0, composite="zplus")
    assert expl.relevance.dtype == torch.float16
    assert torch.equal(expl.relevance, torch.zeros(1, 3, dtype=torch.float16))
