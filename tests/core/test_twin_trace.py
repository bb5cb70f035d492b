"""The twin test: a model explains the same whichever way relprop traced it.

Each model here takes a flag that adds one line of Python control flow on its input
(`if x.dim() > 0:`), which torch.fx cannot trace, so relprop falls back to
torch.export. Same weights, same input, float64: relevance and every ledger column
must agree to 1e-9 for every composite, bias mode and record setting. Export graphs
spell every op as an ATen overload (`aten.max_pool2d_with_indices`, `aten.leaky_relu`,
...); fx graphs as torch functions, methods and modules. What an op *is* must not
depend on the spelling (relprop.ops.meaning).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import relprop
from relprop.ops import Kind

ACTIVATIONS = {"relu": F.relu, "leaky_relu": F.leaky_relu, "silu": F.silu, "tanh": torch.tanh}


class Twin(nn.Module):
    """Base: `breaks=True` adds control flow on the input (fx fails, export traces)."""

    def __init__(self, breaks: bool) -> None:
        super().__init__()
        self.breaks = breaks

    def check(self, x: torch.Tensor) -> None:
        if self.breaks and x.dim() > 0:  # data-dependent Python: fx cannot trace this
            pass


class SmallCNN(Twin):
    """conv, activation, max pooling, a residual with a division, adaptive pooling."""

    def __init__(self, breaks: bool, act: str = "relu", dims: int = 2) -> None:
        super().__init__(breaks)
        conv = {1: nn.Conv1d, 2: nn.Conv2d}[dims]
        self.dims, self.act = dims, ACTIVATIONS[act]
        self.conv1 = conv(3, 6, 3, padding=1)
        self.conv2 = conv(6, 6, 3, padding=1)
        self.conv3 = conv(6, 8, 3, padding=1)
        self.fc = nn.Linear(8 + 6, 4)

    def forward(self, x):
        self.check(x)
        pool = F.max_pool1d if self.dims == 1 else F.max_pool2d
        adaptive_max = F.adaptive_max_pool1d if self.dims == 1 else F.adaptive_max_pool2d
        adaptive_avg = F.adaptive_avg_pool1d if self.dims == 1 else F.adaptive_avg_pool2d
        a = self.act(self.conv1(x))
        b = self.act(self.conv2(a))
        s = pool((a + b) / 2, 2)
        c = torch.relu(self.conv3(s))
        feats = torch.cat([torch.flatten(adaptive_avg(c, 1), 1),
                           adaptive_max(s, 1).flatten(1)], dim=1)
        return self.fc(F.dropout(feats, 0.5, training=False))


class SmallMLP(Twin):
    def __init__(self, breaks: bool, widths: tuple[int, ...], act: str) -> None:
        super().__init__(breaks)
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths, widths[1:],
                                                                      strict=False))
        self.act = ACTIVATIONS[act]

    def forward(self, x):
        self.check(x)
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = self.act(x)
        return x


class SmallBNResNet(Twin):
    """BatchNorm (folded), a residual add, max pooling, global average pooling."""

    def __init__(self, breaks: bool) -> None:
        super().__init__(breaks)
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        self.check(x)
        x = F.max_pool2d(F.relu(self.bn1(self.stem(x))), 2)
        x = F.relu(x + self.bn2(self.conv(x)))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def _pair(make, seed: int):
    torch.manual_seed(seed)
    fx_model = make(False).double().eval()
    export_model = make(True).double().eval()
    export_model.load_state_dict(fx_model.state_dict())
    for m in (fx_model, export_model):
        for bn in m.modules():
            if isinstance(bn, nn.BatchNorm2d):
                g = torch.Generator().manual_seed(seed)
                bn.running_mean.copy_(torch.randn(bn.num_features, generator=g) * 0.1)
                bn.running_var.copy_(torch.rand(bn.num_features, generator=g) + 0.5)
    return fx_model, export_model


SETTINGS = [
    ("epsilon", {"bias": "absorb"}), ("epsilon", {"bias": "distribute"}),
    ("epsilon", {"bias": "ignore"}), ("gamma", {"bias": "distribute"}),
    ("zplus", {}), ("alpha_beta", {"bias": "distribute"}), ("flat", {}), ("wsquare", {}),
    ("zbox", {"low": -3.0, "high": 3.0}), ("epsilon_plus", {}), ("epsilon_plus_flat", {}),
    ("epsilon_gamma_box", {"low": -3.0, "high": 3.0}),
    ("epsilon_alpha2_beta1_flat", {"bias": "distribute"}),
    ("layer_position", {"low": -3.0, "high": 3.0}), ("lrp0", {}),
]

MODELS = {
    "cnn_relu": lambda b: SmallCNN(b, "relu"),
    "cnn_leaky": lambda b: SmallCNN(b, "leaky_relu"),
    "cnn_silu": lambda b: SmallCNN(b, "silu"),
    "cnn1d_tanh": lambda b: SmallCNN(b, "tanh", dims=1),
    "bn_resnet": SmallBNResNet,
    "mlp_relu": lambda b: SmallMLP(b, (7, 9, 5, 3), "relu"),
    "mlp_leaky": lambda b: SmallMLP(b, (6, 8, 8, 2), "leaky_relu"),
}


def _input(name: str, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + 1)
    shape = {"mlp_relu": (3, 7), "mlp_leaky": (3, 6), "cnn1d_tanh": (3, 3, 16)}.get(
        name, (3, 3, 12, 12))
    return torch.randn(*shape, generator=g, dtype=torch.float64)


def _assert_same(a, b, where: str) -> None:
    scale = max(a.relevance.abs().max().item(), 1e-12)
    diff = (a.relevance - b.relevance).abs().max().item() / scale
    assert diff <= 1e-9, f"{where}: input relevance differs by {diff:.3g} of max|R|"
    assert torch.allclose(a.explained, b.explained, rtol=0, atol=1e-12), where


FAMILIES = {k.value for k in Kind} | {"gradient", "proportional", "identity",
                                      "attention softmax"}


def _layer_entries(ledger) -> list:
    """The entries of layers (their rule column names a rule, not a family)."""
    return [e for e in ledger if e.rule not in FAMILIES]


def _assert_same_ledger(a, b, where: str) -> None:
    la, lb = a.ledger, b.ledger
    scale = max(la.explained.abs().max().item(), 1e-12)
    ta, tb = la.totals(), lb.totals()
    for col in ("bias", "stabilizer", "other", "leaked"):
        d = (ta[col] - tb[col]).abs().max().item() / scale
        assert d <= 1e-9, f"{where}: ledger total {col} differs by {d:.3g}"
    assert (la.at_input - lb.at_input).abs().max().item() / scale <= 1e-9, where
    layers_a, layers_b = _layer_entries(la), _layer_entries(lb)
    assert [e.path for e in layers_a] == [e.path for e in layers_b], where
    for ea, eb in zip(layers_a, layers_b, strict=True):
        for col in ("relevance_in", "relevance_out", "bias", "stabilizer", "other"):
            d = (getattr(ea, col) - getattr(eb, col)).abs().max().item() / scale
            assert d <= 1e-9, f"{where}: {ea.path} {col} differs by {d:.3g}"


# every setting on a residual CNN and a BatchNorm net; the settings whose relevance
# travels the shadow channel on the rest (all of them on all models: slow)
SHADOW = [SETTINGS[i] for i in (1, 6, 7, 8)]  # distribute, flat, w-square, z-box
FULL = ("cnn_relu",)


def _check_twins(fx_model, export_model, x, settings, where: str) -> None:
    with torch.no_grad():
        classes = fx_model(x).shape[1]
    target = [i % classes for i in range(len(x))]  # a different class per sample
    for composite, kwargs in settings:
        e1 = relprop.Explainer(fx_model, composite, **kwargs)
        e2 = relprop.Explainer(export_model, composite, **kwargs)
        for record in (False, True):  # fused fast paths; every node apart
            at = f"{where} {composite} {kwargs} record={record}"
            a = e1(x, target=target, record=record)
            b = e2(x, target=target, record=record)
            assert e1.program.traced.method == "fx", at
            assert e2.program.traced.method == "export", at
            _assert_same(a, b, at)
            if record:
                _assert_same_ledger(a, b, at)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_fx_and_export_explain_identically(name):
    fx_model, export_model = _pair(MODELS[name], seed=len(name))
    _check_twins(fx_model, export_model, _input(name, 0),
                 SETTINGS if name in FULL else SHADOW, name)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(set(MODELS) - set(FULL)))
def test_fx_and_export_explain_identically_every_setting(name):
    fx_model, export_model = _pair(MODELS[name], seed=len(name))
    _check_twins(fx_model, export_model, _input(name, 0), SETTINGS, name)


def _random_mlp(breaks: bool, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    depth = int(torch.randint(2, 5, (1,), generator=g))
    widths = tuple(int(w) for w in torch.randint(2, 10, (depth + 1,), generator=g))
    act = sorted(ACTIVATIONS)[int(torch.randint(0, len(ACTIVATIONS), (1,), generator=g))]
    return SmallMLP(breaks, widths, act)


def _random_twins(seed: int):
    if seed % 2:
        acts = sorted(ACTIVATIONS)
        make = lambda b: SmallCNN(b, acts[seed % len(acts)], dims=1 + seed % 3 // 2)  # noqa
        fx_model, export_model = _pair(make, seed)
        x = torch.randn(2, 3, *(12,) * fx_model.dims, dtype=torch.float64,
                        generator=torch.Generator().manual_seed(seed))
    else:
        fx_model, export_model = _pair(lambda b: _random_mlp(b, seed), seed)
        width = fx_model.layers[0].in_features
        x = torch.randn(2, width, dtype=torch.float64,
                        generator=torch.Generator().manual_seed(seed))
    return fx_model, export_model, x


@pytest.mark.parametrize("seed", range(2))
def test_random_models_twin(seed):
    """Random MLPs and CNNs (widths, depths, activations), shadow-channel settings."""
    _check_twins(*_random_twins(seed), SHADOW[:2], f"seed {seed}")


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(2, 30))
def test_random_models_twin_many(seed):
    _check_twins(*_random_twins(seed), SETTINGS, f"seed {seed}")


class Wrapped(Twin):
    def __init__(self, breaks: bool, model: nn.Module) -> None:
        super().__init__(breaks)
        self.m = model

    def forward(self, x):
        self.check(x)
        return self.m(x)


@pytest.mark.parametrize("arch", ["resnet18", pytest.param("mobilenet_v3_small",
                                                           marks=pytest.mark.slow)])
def test_zoo_twin(arch):
    """torchvision's residual and pooling nets (BatchNorm folded, max pooling, residual
    adds), traced both ways."""
    import torchvision

    def make(breaks: bool) -> nn.Module:
        torch.manual_seed(0)
        return Wrapped(breaks, getattr(torchvision.models, arch)(weights=None, num_classes=4))

    fx_model, export_model = _pair(make, seed=0)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64,
                    generator=torch.Generator().manual_seed(0))
    settings = [SETTINGS[1], ("epsilon_gamma_box", {"low": -3.0, "high": 3.0})]
    _check_twins(fx_model, export_model, x, settings, arch)
