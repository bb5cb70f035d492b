"""Transposed convolutions (nn.ConvTranspose1d/2d/3d, F.conv_transpose1d/2d/3d).

Every rule and bias mode against the explicit per-element reference
(tests/reference_lrp.py), on the general path and the fused fast path; module
and functional forms are one node; BatchNorm after a transposed convolution
folds into it (the BN scales the weight's second axis, per group).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import HIGH, LOW, rules_for
from reference_lrp import Layer, affine_from, conv_transpose_layer, propagate
from torch import nn

import relprop

CONV_T = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def net1d(bias: bool = True) -> nn.Sequential:
    """Signed input; output_padding 2 >= stride 1 (allowed by dilation 3): W^T is cropped."""
    return nn.Sequential(
        nn.ConvTranspose1d(3, 4, 3, stride=2, padding=1, output_padding=1, bias=bias),  # 5->10
        nn.ReLU(),
        nn.ConvTranspose1d(4, 4, 2, dilation=3, output_padding=2, groups=2, bias=bias),  # ->15
        nn.ReLU(),
        nn.ConvTranspose1d(4, 2, 3, stride=3, padding=2, bias=bias),  # -> 41
        nn.Flatten(), nn.Linear(2 * 41, 3, bias=bias))


def net2d(bias: bool = True) -> nn.Sequential:
    return nn.Sequential(
        nn.ConvTranspose2d(2, 4, 3, stride=2, padding=1, output_padding=1, groups=2,
                           bias=bias),  # 3x3 -> 6x6
        nn.ReLU(),
        nn.ConvTranspose2d(4, 3, (2, 3), stride=(1, 2), padding=(0, 1), dilation=(2, 1),
                           bias=bias),  # -> 8x11
        nn.Flatten(), nn.Linear(3 * 8 * 11, 4, bias=bias))


def net3d(bias: bool = True) -> nn.Sequential:
    return nn.Sequential(
        nn.ConvTranspose3d(2, 2, 2, stride=2, groups=2, bias=bias),  # 2^3 -> 4^3
        nn.ReLU(),
        nn.ConvTranspose3d(2, 3, (2, 1, 2), stride=(1, 2, 1), padding=(0, 0, 1),
                           output_padding=(0, 1, 0), dilation=(2, 1, 1), bias=bias),  # 6x8x3
        nn.Flatten(), nn.Linear(3 * 6 * 8 * 3, 4, bias=bias))


NETS = {"1d": (net1d, (3, 5)), "2d": (net2d, (2, 3, 3)), "3d": (net3d, (2, 2, 2, 2))}


def make(nd: str, bias: bool = True) -> tuple[nn.Sequential, torch.Tensor]:
    factory, shape = NETS[nd]
    model = factory(bias).double().eval()
    if bias:
        with torch.no_grad():
            for m in model:
                if getattr(m, "bias", None) is not None:
                    m.bias.normal_(0, 0.3)
    return model, torch.randn(2, *shape, dtype=torch.float64)


def explicit_layers(model: nn.Sequential, in_shape: tuple[int, ...]) -> list[Layer]:
    """The model as explicit matrices (fixed for all samples: no max pooling here)."""
    layers: list[Layer] = []
    shape = in_shape
    for m in model:
        if isinstance(m, nn.ReLU):
            layers.append(Layer("relu"))
        elif isinstance(m, CONV_T):
            layers.append(conv_transpose_layer(m, shape))
        elif isinstance(m, nn.Linear):
            layers.append(Layer("affine", *affine_from(m, shape)))
        with torch.no_grad():
            shape = tuple(m(torch.zeros(1, *shape, dtype=torch.float64)).shape[1:])
    return layers


BIASED = ["lrp0", "epsilon", "gamma", "zplus", "alpha_beta", "wsquare"]  # rules with bias=
MIXED = ["epsilon_gamma_box", "epsilon_plus_flat", "epsilon_alpha2_beta1"]
def _cases() -> list:
    cases = []
    for nd in NETS:
        for c in BIASED:
            cases += [pytest.param(nd, c, b) for b in ("ignore", "distribute")]
        for c in [*BIASED, *MIXED, "flat", "zbox"]:
            cases.append(pytest.param(nd, c, "absorb"))
    return cases


def reference(model: nn.Sequential, x: torch.Tensor, target: int, composite: str,
              bias: str) -> np.ndarray:
    layers = explicit_layers(model, tuple(x.shape[1:]))
    rules = rules_for(composite, sum(lay.kind == "affine" for lay in layers), bias=bias)
    return np.stack([propagate(lambda _: layers, xi.reshape(-1).numpy(), target, rules)
                     for xi in x]).reshape(x.shape)


@pytest.mark.parametrize(("nd", "composite", "bias"), _cases())
def test_every_rule_matches_the_reference(nd: str, composite: str, bias: str) -> None:
    """Fast path (default) and general path (record=True) both equal the reference (only
    bias="absorb" is fused: otherwise both runs take the general path)."""
    model, x = make(nd)
    ex = relprop.Explainer(model, composite=composite, bias=bias, low=LOW, high=HIGH)
    ref = reference(model, x, 1, composite, bias)
    scale = np.abs(ref).max()
    for record in (False, True) if bias == "absorb" else (False,):
        got = ex(x, target=1, record=record).relevance.numpy()
        np.testing.assert_allclose(got, ref, rtol=1e-8, atol=1e-10 * scale,
                                   err_msg=f"record={record}")


FUSED = ["epsilon", "gamma", "zplus", "alpha_beta", "epsilon_gamma_box", "epsilon_plus",
         "epsilon_alpha2_beta1"]


def _fast_equals_general(model: nn.Module, x: torch.Tensor, composite: str) -> None:
    ex = relprop.Explainer(model, composite=composite, low=LOW, high=HIGH)
    fast_steps = {s.name for s in ex.program.layer_steps() if s.fast is not None}
    convs = {s.name for s in ex.program.layer_steps() if "ConvTranspose" in s.node.meta.get(
        "relprop_label", "")}
    if composite in ("epsilon", "gamma"):  # fusable on inputs of both signs
        assert convs and convs <= fast_steps, (convs, fast_steps)
    else:  # alpha-beta / z-plus fuse on inputs >= 0: every layer after the first
        assert convs & fast_steps, (convs, fast_steps)
    fast = ex(x, target=1).relevance
    general = ex(x, target=1, record=True).relevance
    torch.testing.assert_close(fast, general, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("nd", list(NETS))
@pytest.mark.parametrize("composite", FUSED)
def test_fast_path_equals_general_path(nd: str, composite: str) -> None:
    model, x = make(nd)
    _fast_equals_general(model, x, composite)


@pytest.mark.parametrize("composite", ["gamma", "zplus"])
def test_fast_path_without_bias(composite: str) -> None:
    model, x = make("2d", bias=False)
    _fast_equals_general(model, x, composite)


class Functional(nn.Module):
    """The modules of a net as F.conv_transpose*d calls on its parameters (kwargs form)."""

    def __init__(self, model: nn.Sequential) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for m in self.model:
            if isinstance(m, CONV_T):
                fn = {nn.ConvTranspose1d: F.conv_transpose1d, nn.ConvTranspose2d:
                      F.conv_transpose2d, nn.ConvTranspose3d: F.conv_transpose3d}[type(m)]
                x = fn(x, m.weight, bias=m.bias, stride=m.stride, padding=m.padding,
                       output_padding=m.output_padding, groups=m.groups, dilation=m.dilation)
            else:
                x = m(x)
        return x


@pytest.mark.parametrize("nd", list(NETS))
def test_module_and_functional_forms_are_one_node(nd: str) -> None:
    """Same relevance to the last digit, on the fast path (first five composites, fused
    or plain gradient) and the general one (flat, w-square, z-box, distribute: not fused)."""
    model, x = make(nd)
    twin = Functional(model)
    for composite, bias in [("lrp0", "absorb"), ("epsilon", "absorb"), ("gamma", "absorb"),
                            ("epsilon_plus", "absorb"), ("epsilon_gamma_box", "absorb"),
                            ("flat", "absorb"), ("wsquare", "ignore"), ("zbox", "absorb"),
                            ("alpha_beta", "distribute")]:
        a = relprop.explain(model, x, target=2, composite=composite, bias=bias, low=LOW,
                            high=HIGH)
        b = relprop.explain(twin, x, target=2, composite=composite, bias=bias, low=LOW,
                            high=HIGH)
        torch.testing.assert_close(a.relevance, b.relevance, rtol=0.0, atol=0.0,
                                   msg=composite)


def test_composite_matches_the_transposed_conv_class() -> None:
    """by_type with nn.ConvTranspose2d reaches the module and the functional form alike;
    nn.Conv2d (another class) does not."""
    model, x = make("2d")
    flat_t = relprop.Composite(by_type={nn.ConvTranspose2d: relprop.Flat()})
    flat_c = relprop.Composite(by_type={nn.Conv2d: relprop.Flat()})
    a = relprop.explain(model, x, target=0, composite=flat_t).relevance
    b = relprop.explain(Functional(model), x, target=0, composite=flat_t).relevance
    c = relprop.explain(model, x, target=0, composite=flat_c).relevance
    eps = relprop.explain(model, x, target=0, composite="epsilon").relevance
    torch.testing.assert_close(a, b, rtol=0.0, atol=0.0)
    torch.testing.assert_close(c, eps, rtol=0.0, atol=0.0)
    assert not torch.allclose(a, eps)


def bn_net(groups: int) -> tuple[nn.Sequential, torch.Tensor]:
    """ConvT (in 2 != out 6) + BatchNorm with non-trivial statistics, then more layers."""
    model = nn.Sequential(
        nn.ConvTranspose2d(2, 6, 3, stride=2, padding=1, output_padding=1, groups=groups),
        nn.BatchNorm2d(6), nn.ReLU(),
        nn.ConvTranspose2d(6, 2, 2, stride=1, groups=2, bias=False), nn.BatchNorm2d(2),
        nn.Flatten(), nn.Linear(2 * 7 * 7, 3)).double().eval()
    with torch.no_grad():
        for bn in (model[1], model[4]):
            bn.running_mean.normal_(0, 0.5)
            bn.running_var.uniform_(0.3, 3.0)
            bn.weight.normal_(1, 0.5)
            bn.bias.normal_(0, 0.3)
    return model, torch.randn(2, 2, 3, 3, dtype=torch.float64)


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("composite", ["epsilon", "gamma", "zplus", "alpha_beta", "wsquare"])
def test_batchnorm_folds_into_the_transposed_conv(groups: int, composite: str) -> None:
    """The folded layer, with the composite's rule, equals the reference on the merged
    map BN(ConvT(x)); a BN scaling the wrong axis (the input channels) would not."""
    model, x = bn_net(groups)
    layers = [conv_transpose_layer(model[0], (2, 3, 3), after=model[1]), Layer("relu"),
              conv_transpose_layer(model[3], (6, 6, 6), after=model[4]),
              Layer("affine", *affine_from(model[6], (2 * 7 * 7,)))]
    rules = rules_for(composite, 3, bias="absorb")
    ref = np.stack([propagate(lambda _: layers, xi.reshape(-1).numpy(), 1, rules)
                    for xi in x]).reshape(x.shape)
    ex = relprop.Explainer(model, composite=composite)
    general = ex(x, target=1, record=True)
    assert [e.op for e in general.ledger if "ConvTranspose" in e.op] == \
        ["ConvTranspose2d+BatchNorm2d"] * 2
    for got in (general.relevance, ex(x, target=1).relevance):
        np.testing.assert_allclose(got.numpy(), ref, rtol=1e-8, atol=1e-10 * np.abs(ref).max())


def test_output_size_argument_is_refused_clearly() -> None:
    class WithOutputSize(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.up = nn.ConvTranspose2d(2, 2, 3, stride=2)

        def forward(self, x):
            return self.up(x, output_size=[8, 8]).flatten(1)

    with pytest.raises(relprop.UnsupportedOperationError, match="output_size"):
        relprop.explain(WithOutputSize(), torch.randn(1, 2, 3, 3), target=0)


class ShapeBranch(nn.Module):
    """Python control flow on shapes: fx refuses, torch.export gives aten.conv_transpose."""

    def __init__(self, model: nn.Sequential) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] > 1:
            x = x * 1.0
        return self.model(x)


def test_export_graphs_take_the_same_rule() -> None:
    model, x = make("2d")
    ex = relprop.Explainer(ShapeBranch(model), composite="epsilon_gamma_box", low=LOW,
                           high=HIGH)
    got = ex(x, target=1).relevance
    assert ex.program.traced.method == "export"
    want = relprop.explain(model, x, target=1, composite="epsilon_gamma_box", low=LOW,
                           high=HIGH).relevance
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
