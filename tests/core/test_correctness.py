"""Gradient x input, conservation, the ledger, and module/functional twins."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import grad_x_input
from models import (
    BottleneckSiLUNet,
    FunctionalCNN,
    ModuleCNN,
    SeedMLP,
    SeedMLPFunctional,
    with_biases,
    without_biases,
)
from torch import nn

import relprop


@pytest.mark.parametrize("factory", [ModuleCNN, FunctionalCNN])
def test_lrp0_on_relu_network_is_gradient_times_input(factory) -> None:
    model = with_biases(factory()).double().eval()
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    expl = relprop.explain(model, x, target=2, composite="lrp0")
    torch.testing.assert_close(expl.relevance, grad_x_input(model, x, 2), rtol=1e-6,
                               atol=1e-10)


def test_lrp0_mlp_with_biases_is_gradient_times_input() -> None:
    model = with_biases(nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 3)))
    x = torch.randn(6, 10)
    expl = relprop.explain(model, x, target=0, composite="lrp0")
    torch.testing.assert_close(expl.relevance, grad_x_input(model, x, 0), rtol=1e-6,
                               atol=1e-7)


@pytest.mark.parametrize("composite", ["lrp0", "epsilon", "zplus", "gamma"])
@pytest.mark.parametrize("factory", [ModuleCNN, FunctionalCNN])
def test_bias_free_relevance_is_conserved(composite: str, factory) -> None:
    model = without_biases(factory()).double().eval()
    # inputs scaled so pre-activations are O(1): the 1e-6 stabilizer then absorbs < 1e-5
    x = 10 * torch.randn(3, 3, 8, 8, dtype=torch.float64)
    expl = relprop.explain(model, x, composite=composite, record=True)
    total = expl.relevance.sum((1, 2, 3))
    torch.testing.assert_close(total, expl.explained, rtol=1e-5, atol=1e-12)
    # and what the stabilizers did absorb is on the books, to the last digit
    torch.testing.assert_close(total + expl.ledger.totals()["stabilizer"], expl.explained,
                               rtol=1e-9, atol=1e-12)
    # every recorded node carries the full relevance too (per-layer conservation)
    ledger = expl.ledger
    for entry in ledger:
        torch.testing.assert_close(entry.relevance_out, entry.relevance_in, rtol=1e-5,
                                   atol=1e-12)


@pytest.mark.parametrize("composite", ["epsilon", "gamma", "zplus", "alpha_beta"])
def test_ledger_accounts_for_bias_leaks(composite: str) -> None:
    model = with_biases(ModuleCNN(), 0.3).double().eval()
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    expl = relprop.explain(model, x, composite=composite, record=True)
    ledger = expl.ledger
    at_input = expl.relevance.sum((1, 2, 3))
    totals = ledger.totals()
    # what left the output and did not reach the input is exactly what the nodes leaked
    torch.testing.assert_close(expl.explained - at_input, totals["leaked"], rtol=1e-6,
                               atol=1e-9)
    # biases are where it went; stabilizer and the rest are small
    assert (totals["bias"].abs() > 1e-4).all()
    torch.testing.assert_close(totals["leaked"], totals["bias"] + totals["stabilizer"],
                               rtol=1e-6, atol=1e-6)
    assert "bias" in ledger.table()


@pytest.mark.parametrize("bias", ["ignore", "distribute"])
def test_bias_ignore_and_distribute_conserve(bias: str) -> None:
    model = with_biases(nn.Sequential(nn.Linear(8, 12), nn.ReLU(), nn.Linear(12, 6), nn.ReLU(),
                                      nn.Linear(6, 3)), 0.5).double()
    x = 10 * torch.randn(5, 8, dtype=torch.float64)
    # conserved up to the stabilizer, which is set small here (pre-activations near 0.1
    # occur with these random weights, and 1e-6 of 0.1 is already 1e-5)
    expl = relprop.explain(model, x, composite="epsilon", bias=bias, epsilon=1e-9, record=True)
    torch.testing.assert_close(expl.relevance.sum(1), expl.explained, rtol=1e-5, atol=1e-10)
    totals = expl.ledger.totals()
    assert (totals["bias"] == 0).all()
    torch.testing.assert_close(expl.relevance.sum(1) + totals["stabilizer"], expl.explained,
                               rtol=1e-9, atol=1e-12)


def test_seed_mlp_module_and_functional_twins_agree() -> None:
    a = SeedMLP().eval()
    b = SeedMLPFunctional().eval()
    with torch.no_grad():
        for (src, dst) in zip([a.net[0], a.net[2], a.net[4]], [b.fc1, b.fc2, b.fc3],
                              strict=True):
            dst.load_state_dict(src.state_dict())
    x = torch.randn(7, 10)
    for composite in ["epsilon", "gamma", "zplus", "alpha_beta", "lrp0", "epsilon_plus_flat"]:
        ra = relprop.explain(a, x, composite=composite)
        rb = relprop.explain(b, x, composite=composite)
        assert torch.equal(ra.relevance, rb.relevance)
        # sigmoid at the output passes its value on (identity rule): the logit layer
        # receives R = sigmoid(z), which the epsilon rule then splits
    a, x = a.double(), x.double()
    expl = relprop.explain(a, x, composite="epsilon", bias="ignore", record=True)
    # what reaches the input is the sigmoid output, less only what stabilizers absorbed
    stabilizer = expl.ledger.totals()["stabilizer"]
    torch.testing.assert_close(expl.relevance.sum(1) + stabilizer, a(x)[:, 0].detach(),
                               rtol=1e-5, atol=1e-6)
    assert stabilizer.abs().max() < 1e-2


def test_cnn_module_and_functional_twins_agree() -> None:
    a = with_biases(ModuleCNN()).eval()
    b = FunctionalCNN().eval()
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 3, 8, 8)
    for composite in ["epsilon_gamma_box", "epsilon_plus", "epsilon_alpha2_beta1", "lrp0"]:
        ra = relprop.explain(a, x, composite=composite, low=-3.0, high=3.0)
        rb = relprop.explain(b, x, composite=composite, low=-3.0, high=3.0)
        torch.testing.assert_close(ra.relevance, rb.relevance, rtol=1e-6, atol=1e-8)


def test_batchnorm_is_folded_into_the_preceding_conv() -> None:
    conv = nn.Conv2d(3, 4, 3, padding=1)
    bn = nn.BatchNorm2d(4)
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.normal_()
        bn.bias.normal_()
    model = nn.Sequential(conv, bn, nn.ReLU(), nn.Flatten(), nn.Linear(4 * 25, 3)).eval()
    folded = nn.Conv2d(3, 4, 3, padding=1)
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    with torch.no_grad():
        folded.weight.copy_(conv.weight * scale[:, None, None, None])
        folded.bias.copy_((conv.bias - bn.running_mean) * scale + bn.bias)
    twin = nn.Sequential(folded, nn.ReLU(), nn.Flatten(), model[4]).eval()
    x = torch.randn(2, 3, 5, 5)
    for composite in ["epsilon", "gamma", "zplus"]:
        r1 = relprop.explain(model, x, target=1, composite=composite).relevance
        r2 = relprop.explain(twin, x, target=1, composite=composite).relevance
        torch.testing.assert_close(r1, r2, rtol=1e-4, atol=1e-6)
    names = [s.op for s in relprop.Explainer(model, "epsilon").describe().steps
             if s.kind == "layer"]
    assert names[0] == "Conv2d+BatchNorm2d"


def test_lone_batchnorm_is_an_affine_layer() -> None:
    bn = nn.BatchNorm1d(6)
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2)
        bn.weight.normal_()
    # tanh before: the BatchNorm has nothing to fold into, and no input is exactly zero
    # (an output made of bias alone would have nowhere to send relevance under "ignore")
    model = nn.Sequential(nn.Tanh(), bn, nn.Linear(6, 2)).double().eval()
    x = torch.randn(4, 6, dtype=torch.float64)
    expl = relprop.explain(model, x, composite="epsilon", bias="ignore", record=True)
    totals = expl.ledger.totals()
    assert (totals["bias"] == 0).all()
    torch.testing.assert_close(expl.relevance.sum(1) + totals["stabilizer"], expl.explained,
                               rtol=1e-9, atol=1e-12)
    assert any(e.op == "BatchNorm1d" and e.rule.startswith("epsilon") for e in expl.ledger)


def test_top_k_filter_keeps_the_fraction_asked() -> None:
    model = nn.Sequential(nn.Linear(10, 40), nn.ReLU(), nn.Linear(40, 3)).double()
    x = torch.randn(2, 10, dtype=torch.float64)
    expl = relprop.explain(model, x, target=0, composite="epsilon", top_k=0.25)
    # by hand: relevance at the hidden layer, keep the 10 largest |R| of 40, epsilon below
    lin1, lin2 = model[0], model[2]
    with torch.no_grad():
        z1 = lin1(x)
        a1 = z1.relu()
        z2 = lin2(a1)
        r2 = torch.zeros_like(z2)
        r2[:, 0] = z2[:, 0]
        st = lambda d: d + 1e-6 * torch.where(d >= 0, 1.0, -1.0)  # noqa: E731
        r1 = a1 * ((r2 / st(z2)) @ lin2.weight)
        keep = r1.abs() >= r1.abs().topk(10, dim=1).values[:, -1:]
        r1 = torch.where(keep, r1, 0.0)
        r0 = x * ((r1 / st(z1)) @ lin1.weight)
    torch.testing.assert_close(expl.relevance, r0, rtol=1e-9, atol=1e-12)
    full = relprop.explain(model, x, target=0, composite="epsilon")
    assert not torch.allclose(full.relevance, r0)


@pytest.mark.parametrize("factory", [ModuleCNN, BottleneckSiLUNet])
@pytest.mark.parametrize("composite", ["epsilon", "epsilon_gamma_box", "epsilon_plus",
                                       "epsilon_alpha2_beta1", "gamma", "lrp0"])
def test_fast_path_equals_the_general_path(composite: str, factory) -> None:
    """Layers run fused with their activation (and sums with their ReLU) unless
    recording; both must give the same relevance."""
    model = with_biases(factory(), 0.2).double().eval()
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    ex = relprop.Explainer(model, composite=composite, low=-3.0, high=3.0)
    assert any(s.fused for s in ex.describe().steps) or composite == "lrp0"
    fast = ex(x, target=1)
    general = ex(x, target=1, record=True)
    torch.testing.assert_close(fast.relevance, general.relevance, rtol=1e-9, atol=1e-12)
    # several targets share one forward; the fused backward must not consume its factors
    both = ex(x, target=[[3, 1]]).relevance
    torch.testing.assert_close(both[:, 1], fast.relevance, rtol=1e-12, atol=0.0)
    torch.testing.assert_close(both[:, 0], ex(x, target=3).relevance, rtol=1e-12, atol=0.0)


def test_fast_path_covers_residual_branches_and_smooth_activations() -> None:
    """The layer ending a residual branch, SiLU/GELU layers (gamma and alpha-beta on
    signed inputs included), the dense head and the sum -> ReLU take the fast path."""
    model = BottleneckSiLUNet().eval()

    def fast(composite: str) -> set[str]:
        ex = relprop.Explainer(model, composite=composite, low=-3.0, high=3.0)
        return {s.name for s in ex.describe().steps if s.fused}

    everything = {"branch2", "add", "relu_2", "dw", "silu", "pw", "gelu", "fc"}
    assert everything | {"stem", "relu"} <= fast("epsilon_gamma_box")  # z-box + its ReLU
    assert everything <= fast("epsilon")
    assert everything <= fast("epsilon_alpha2_beta1")
    assert everything <= fast("epsilon_plus")


def test_zbox_bounds_per_sample_and_shared() -> None:
    """Shared bounds are cached for one sample and broadcast, whatever the batch size;
    per-sample bounds give each sample its own box."""
    model = with_biases(ModuleCNN(), 0.2).double().eval()
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    ex = relprop.Explainer(model, composite="epsilon_gamma_box", low=-3.0, high=3.0)
    batch = ex(x, target=1).relevance
    for i in range(3):  # a batch of one after a batch of three: the cache is shape-free
        torch.testing.assert_close(batch[i], ex(x[i:i + 1], target=1).relevance[0])
    lows = torch.tensor([-3.0, -4.0, -5.0], dtype=torch.float64).view(3, 1, 1, 1)
    per = relprop.Explainer(model, composite="epsilon_gamma_box", low=lows.expand_as(x),
                            high=-lows.expand_as(x))
    mixed = per(x, target=1).relevance
    for i, low in enumerate((-3.0, -4.0, -5.0)):
        own = relprop.Explainer(model, composite="epsilon_gamma_box", low=low, high=-low)
        torch.testing.assert_close(mixed[i], own(x[i:i + 1], target=1).relevance[0])
    assert not torch.allclose(mixed[2], batch[2])


class PoolZoo(nn.Module):
    """Max pooling in the forms the lean backward replaces (1-3 d, padding, dilation,
    ceil_mode, overlapping windows, adaptive)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.conv1d = nn.Conv1d(4, 4, 3, padding=1)
        self.conv3d = nn.Conv3d(1, 2, 3, padding=1)

    def forward(self, x):
        a = torch.relu(self.conv(x))
        p = F.max_pool2d(a, 3, stride=2, padding=1, ceil_mode=True)  # overlapping windows
        q = F.max_pool2d(a, 2, stride=1, dilation=2)
        r = F.adaptive_max_pool2d(a, (3, 2))
        s = F.max_pool1d(torch.relu(self.conv1d(a.mean(3))), 2)
        t = F.adaptive_max_pool3d(torch.relu(self.conv3d(a[:, :1, None])), 2)
        return torch.cat([p.flatten(1), q.flatten(1), r.flatten(1), s.flatten(1),
                          t.flatten(1)], 1)


def test_lean_max_pooling_routes_like_the_gradient() -> None:
    """LRP-0 on ReLU/max-pool networks is gradient x input, through every pooling form."""
    model = with_biases(PoolZoo()).double().eval()
    x = torch.randn(3, 2, 9, 9, dtype=torch.float64)
    ex = relprop.Explainer(model, composite="lrp0")
    pools = [s for s in ex.describe().steps if "pool" in s.name]
    assert len(pools) == 5 and all(s.fused for s in pools), pools
    for target in (0, 40, 70):
        torch.testing.assert_close(ex(x, target=target).relevance,
                                   grad_x_input(model, x, target), rtol=1e-9, atol=1e-12)


def test_per_sample_zbox_bounds_refuse_a_different_batch_clearly() -> None:
    model = ModuleCNN().eval()
    x = torch.randn(6, 3, 8, 8)
    ex = relprop.Explainer(model, composite="epsilon_gamma_box", low=torch.full_like(x, -3.0),
                           high=torch.full_like(x, 3.0))
    assert ex(x, target=1).relevance.shape == x.shape
    with pytest.raises(relprop.InputError, match=r"low= holds 6 samples but the batch has 2"):
        ex(x, target=1, batch_size=2)


class _ClassToken(nn.Module):
    """A constant class token joined to the input's tokens with `cat`, mixed in, pooled."""

    def __init__(self) -> None:
        super().__init__()
        self.token = nn.Parameter(torch.randn(1, 1, 4))
        self.mix = nn.Linear(4, 4, bias=False)
        self.head = nn.Linear(4, 3, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.cat([self.token.expand(x.shape[0], -1, -1), x], 1)
        return self.head(self.mix(h).sum(1))


def test_a_constant_piece_of_a_cat_is_booked_as_a_bias() -> None:
    """What reaches a class token joined by `cat` stays there: the ledger books it as the
    constant's (bias), not as an unexplained leak ('other')."""
    torch.manual_seed(0)
    model = _ClassToken().double()
    x = torch.randn(2, 5, 4, dtype=torch.float64)
    expl = relprop.Explainer(model, "lrp0", stabilizer=0.0, record=True)(x, target=1)
    cat = expl.ledger["cat"]
    assert float(cat.bias.abs().min()) > 1e-6  # the token took some
    torch.testing.assert_close(cat.bias, cat.leaked, rtol=0, atol=1e-12)
    totals = expl.ledger.totals()
    assert float(totals["other"].abs().max()) < 1e-12
    torch.testing.assert_close(expl.relevance.flatten(1).sum(1) + totals["bias"],
                               expl.explained, rtol=0, atol=1e-12)
