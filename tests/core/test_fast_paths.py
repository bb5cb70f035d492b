"""The fused fast path of every rule and preset on inputs of either sign equals the
general path (record=True) in float64, and takes the fast path where it claims to."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from models import ModuleCNN, with_biases
from torch import nn

import relprop
from relprop import AlphaBeta, Composite, Epsilon, Flat, Gamma, WSquare, ZPlus
from relprop.ops import Kind


class SignedNet(nn.Module):
    """Every layer on inputs of either sign, as in EfficientNet and MobileNet: the image,
    SiLU and hardswish outputs, a squeeze-excitation gate, a residual sum without a
    ReLU; a depthwise, a grouped and a transposed conv (their W+ and W- run apart), a
    1x1 and a 3x3 conv and dense layers (stacked in one call)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.expand = nn.Conv2d(8, 16, 1)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.se1 = nn.Conv2d(16, 4, 1)
        self.se2 = nn.Conv2d(4, 16, 1)
        self.project = nn.Conv2d(16, 8, 1)
        self.up = nn.ConvTranspose2d(8, 8, 2, stride=2)
        self.grouped = nn.Conv2d(8, 6, 3, padding=1, groups=2)
        self.fc1 = nn.Linear(6, 7)
        self.fc2 = nn.Linear(7, 5)
        with torch.no_grad():
            self.bn.running_mean.normal_(0, 0.1)
            self.bn.running_var.uniform_(0.5, 2.0)
            self.bn.weight.normal_(1, 0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = F.silu(self.bn(self.stem(x)))
        d = F.silu(self.dw(F.hardswish(self.expand(a))))
        g = torch.sigmoid(self.se2(F.silu(self.se1(d.mean((2, 3), keepdim=True)))))
        r = a + self.project(d * g)  # residual branch: signed relevance, no ReLU
        q = F.hardswish(self.grouped(self.up(r)))
        return self.fc2(F.silu(self.fc1(q.mean((2, 3)))))


LAYERS = {"stem", "expand", "dw", "se1", "se2", "project", "up", "grouped", "fc1", "fc2"}


def _layer_names(ex: relprop.Explainer) -> dict[str, object]:
    """Layer step name -> its step, names as the module names above."""
    return {s.name.replace("_", "."): s for s in ex.program.steps if s.kind is Kind.LAYER}


def _fast(ex: relprop.Explainer) -> set[str]:
    return {s.name for s in ex.describe().steps if s.kind == "layer" and s.fused}


def _check_equal(ex: relprop.Explainer, x: torch.Tensor) -> None:
    fast = ex(x, target=1)
    general = ex(x, target=1, record=True)
    assert fast.relevance.abs().sum() > 0
    torch.testing.assert_close(fast.relevance, general.relevance, rtol=1e-9, atol=1e-12)
    # several targets share one forward: the fused backward must not consume its factors
    both = ex(x, target=[[3, 1]]).relevance
    torch.testing.assert_close(both[:, 1], fast.relevance, rtol=1e-12, atol=0.0)


def _signed_net() -> nn.Module:
    return with_biases(SignedNet(), 0.2).double().eval()


# presets and the layers of SignedNet that must take the fast path: every one, except
# z-box on the stem (it fuses only with a ReLU after it) and, where every layer hands
# relevance out directly (flat, w-square, z-box), those whose output carries a shadow
# (only the head's and the gate's do not)
FAST_LAYERS = {
    "lrp0": LAYERS, "epsilon": LAYERS, "gamma": LAYERS, "zplus": LAYERS,
    "alpha_beta": LAYERS, "epsilon_plus": LAYERS, "epsilon_alpha2_beta1": LAYERS,
    "epsilon_plus_flat": LAYERS, "epsilon_alpha2_beta1_flat": LAYERS,
    "epsilon_gamma_box": LAYERS - {"stem"}, "layer_position": LAYERS - {"stem"},
    "flat": {"se2", "fc2"}, "wsquare": {"se2", "fc2"}, "zbox": set(),
    "attnlrp": LAYERS, "cp_lrp": LAYERS,
}


def test_every_preset_is_listed() -> None:
    assert set(FAST_LAYERS) == set(relprop.PRESETS)


@pytest.mark.parametrize("bias", ["absorb", "ignore"])
@pytest.mark.parametrize("composite", relprop.PRESETS)
def test_every_preset_on_signed_inputs_is_fast_and_exact(composite: str, bias: str) -> None:
    ex = relprop.Explainer(_signed_net(), composite=composite, low=-3.0, high=3.0, bias=bias)
    names = _layer_names(ex)
    assert set(names) == LAYERS
    claimed = FAST_LAYERS[composite] if bias == "absorb" else {
        n for n in FAST_LAYERS[composite] if names[n].rule.fusable(False)}
    assert _fast(ex) == {names[n].name for n in claimed}, composite
    _check_equal(ex, torch.randn(3, 3, 8, 8, dtype=torch.float64))


RULES = [ZPlus(), AlphaBeta(), AlphaBeta(alpha=3.0, beta=2.0), AlphaBeta(alpha=1.5, beta=0.5),
         Gamma(), Epsilon(), Flat(), WSquare(), WSquare(bias="ignore"), Flat(bias="distribute"),
         ZPlus(epsilon=0.0), AlphaBeta(epsilon=0.0), Gamma(epsilon=0.0)]


@pytest.mark.parametrize("rule", RULES, ids=lambda r: f"{r.describe()}-{r.bias}")
def test_every_rule_on_every_signed_layer_is_fast_and_exact(rule) -> None:
    """The rule on one layer at a time (z-plus elsewhere): at the image, after SiLU and
    hardswish, after a gate, on a residual branch, as depthwise, grouped, transposed and
    dense layer. Flat and w-square hand their relevance to the input's shadow."""
    model = _signed_net()
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    for layer in sorted(LAYERS):
        composite = Composite(by_name={layer: rule}, default=ZPlus(), name="one")
        ex = relprop.Explainer(model, composite=composite)
        step = _layer_names(ex)[layer]
        if rule.hands_out_directly:
            assert step.producer
        if step.shadow_out:  # a producer below it: relevance may arrive on its shadow
            assert layer in ("se1", "se2", "dw", "expand", "stem") and step.fast is None
        else:
            assert step.fast is not None, (layer, rule)
        _check_equal(ex, x)


@pytest.mark.parametrize("rule", [Flat(), WSquare()], ids=lambda r: r.describe())
def test_flat_and_wsquare_fuse_their_relu_and_keep_relevance_on_zeros(rule) -> None:
    """On a ReLU net (inputs >= 0 with many exact zeros) the first layer fuses with its
    ReLU; its relevance reaches input pixels that are exactly 0 (through the shadow)."""
    model = with_biases(ModuleCNN(), 0.2).double().eval()
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64).clamp(min=0)
    ex = relprop.Explainer(model, composite=Composite(first=rule, default=ZPlus()))
    first = next(s for s in ex.program.steps if s.kind is Kind.LAYER)
    assert first.fast is not None
    relu = next(iter(first.node.users))
    assert next(s for s in ex.program.steps if s.node is relu).fast is not None
    _check_equal(ex, x)
    assert ex(x, target=1).relevance[x == 0].abs().sum() > 0


@pytest.mark.parametrize("composite", ["epsilon_plus", "epsilon_alpha2_beta1", "wsquare"])
def test_dense_layers_on_sequences_of_signed_features(composite: str) -> None:
    """Dense layers over the last dimension of (batch, time, features): the stacked
    weights split the last dimension."""
    model = nn.Sequential(nn.Linear(5, 6), nn.SiLU(), nn.Linear(6, 4), nn.Flatten(),
                          nn.Linear(12, 4))
    model = with_biases(model, 0.2).double().eval()
    ex = relprop.Explainer(model, composite=composite)
    assert all(s.fast is not None for s in ex.program.steps if s.kind is Kind.LAYER
               and not s.shadow_out)
    _check_equal(ex, torch.randn(4, 3, 5, dtype=torch.float64))


def test_zplus_where_no_contribution_is_positive() -> None:
    """Outputs whose positive contributions are all exactly 0 (P = 0: R / eps meets only
    weights that are exactly 0) and inputs exactly 0: the sign split keeps every digit."""
    conv = nn.Conv2d(2, 3, 3, padding=1)
    with torch.no_grad():
        conv.weight.copy_(-conv.weight.abs())  # every contribution of x >= 0 is <= 0
        conv.weight[1] *= -1
        conv.bias.fill_(-0.1)
    model = nn.Sequential(conv, nn.SiLU(), nn.Flatten(), nn.Linear(3 * 16, 4)).double().eval()
    x = torch.randn(2, 2, 4, 4, dtype=torch.float64)
    x[0] = x[0].abs()
    x[1, :, :2] = 0.0
    for composite in ("epsilon_plus", "epsilon_alpha2_beta1"):
        _check_equal(relprop.Explainer(model, composite=composite), x)


@pytest.mark.parametrize("nonneg", [True, False])
def test_alpha_beta_where_eps_is_below_the_last_digit_of_p(nonneg: bool) -> None:
    """float32, N == 0 exactly and P >= 64, whose last digit exceeds eps = 1e-6: the
    computed eps - N would be 0; the fused form keeps it >= eps (finite, as the general)."""
    first = nn.Linear(4, 4)
    head = nn.Linear(4, 2)
    with torch.no_grad():
        first.weight.copy_(torch.eye(4) * 50.0)
        first.bias.zero_()
        head.weight.copy_(torch.tensor([[1.0, 2.0, 0.5, 1.0], [1.0, -1.0, 1.0, -1.0]]))
        head.bias.zero_()
    model = nn.Sequential(first, nn.ReLU() if nonneg else nn.SiLU(), head).eval()
    x = torch.rand(3, 4) + 1.0
    ex = relprop.Explainer(model, composite=Composite(default=AlphaBeta()))
    assert all(s.fused for s in ex.describe().steps if s.kind == "layer")
    fast = ex(x, target=0).relevance
    assert torch.isfinite(fast).all()
    torch.testing.assert_close(fast, ex(x, target=0, record=True).relevance, rtol=1e-5,
                               atol=1e-6)
