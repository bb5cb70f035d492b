"""Every padding module and F.pad mode, and convs with padding_mode != "zeros".

Rules (passes.padding.normalize_padding): zero, reflect, replicate and circular padding
move values, copies included: the gradient is the rule, and the relevance at
every copy sums back to its source. A constant c != 0 is pad(x, 0) + C (C = c on
the border): relevance reaching the border goes to the constant and the ledger
books it as bias. Checked against the same padding written as an explicit index
map (a gather), and module against functional form.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import relprop

SIDE = {1: 6, 2: 5, 3: 4}
CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
CONV_F = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}

# (module, F.pad mode, F.pad value)
PADS: dict[str, tuple[nn.Module, str, float | None]] = {
    "ZeroPad1d": (nn.ZeroPad1d((1, 2)), "constant", 0.0),
    "ZeroPad2d": (nn.ZeroPad2d((0, 1, 0, 1)), "constant", 0.0),
    "ZeroPad3d": (nn.ZeroPad3d(1), "constant", 0.0),
    "ConstantPad1d": (nn.ConstantPad1d((2, 1), 1.5), "constant", 1.5),
    "ConstantPad2d": (nn.ConstantPad2d((1, 1, 2, 0), -0.75), "constant", -0.75),
    "ConstantPad3d": (nn.ConstantPad3d((1, 0, 0, 1, 1, 1), 2.0), "constant", 2.0),
    "ReflectionPad1d": (nn.ReflectionPad1d((2, 1)), "reflect", None),
    "ReflectionPad2d": (nn.ReflectionPad2d((1, 2, 2, 1)), "reflect", None),
    "ReflectionPad3d": (nn.ReflectionPad3d(1), "reflect", None),
    "ReplicationPad1d": (nn.ReplicationPad1d((3, 1)), "replicate", None),
    "ReplicationPad2d": (nn.ReplicationPad2d((1, 0, 2, 1)), "replicate", None),
    "ReplicationPad3d": (nn.ReplicationPad3d((1, 2, 0, 1, 1, 0)), "replicate", None),
    "CircularPad1d": (nn.CircularPad1d((2, 3)), "circular", None),
    "CircularPad2d": (nn.CircularPad2d((1, 2, 1, 0)), "circular", None),
    "CircularPad3d": (nn.CircularPad3d(1), "circular", None),
}


def _nd(name: str) -> int:
    return int(name[-2])


def _pad_tuple(module: nn.Module) -> tuple[int, ...]:
    return tuple(module.padding)


class PadNet(nn.Module):
    """conv -> ReLU -> padding (module, F.pad, or an explicit index map) -> conv -> linear."""

    def __init__(self, nd: int, pad: nn.Module, mode: str, value: float | None,
                 form: str) -> None:
        super().__init__()
        self.form, self.mode, self.value = form, mode, value
        self.pads = _pad_tuple(pad)
        self.pad = pad
        self.conv_in = CONV[nd](2, 3, 3, padding=1)
        self.conv_out = CONV[nd](3, 2, 2)
        shape = (SIDE[nd],) * nd
        # where each padded position reads from: a flat input index, or n (the constant)
        n = SIDE[nd] ** nd
        source = torch.arange(n, dtype=torch.float64).view(1, 1, *shape)
        fill = {"value": -1.0} if mode == "constant" else {}
        index = F.pad(source, self.pads, mode, **fill)[0, 0]
        self.padded = tuple(index.shape)
        index = index.long().flatten()
        self.register_buffer("index", torch.where(index < 0, n, index))
        out = [s - 1 for s in self.padded]
        self.head = nn.Linear(2 * int(torch.tensor(out).prod()), 3)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.conv_in(x))
        if self.form == "module":
            h = self.pad(h)
        elif self.form == "functional":
            h = F.pad(h, self.pads, mode=self.mode, value=self.value)
        else:  # the reference: a gather from the flattened input plus one constant column
            flat = h.flatten(2)
            const = flat.new_full((flat.shape[0], flat.shape[1], 1), self.value or 0.0)
            h = torch.cat([flat, const], 2)[:, :, self.index].unflatten(2, self.padded)
        return self.head(self.conv_out(h).flatten(1))


def nets(name: str) -> dict[str, nn.Module]:
    module, mode, value = PADS[name]
    torch.manual_seed(1)
    base = PadNet(_nd(name), copy.deepcopy(module), mode, value, "module").double().eval()
    out = {"module": base}
    for form in ("functional", "index map"):
        twin = copy.deepcopy(base)
        twin.form = form
        out[form] = twin
    return out


def _input(name: str, batch: int = 2) -> Tensor:
    nd = _nd(name)
    return torch.randn(batch, 2, *(SIDE[nd],) * nd, dtype=torch.float64)


@pytest.mark.parametrize("name", list(PADS))
def test_module_and_functional_padding_are_one_op(name: str) -> None:
    models, x = nets(name), _input(name)
    with torch.no_grad():
        expected = models["index map"](x)
        for m in models.values():
            torch.testing.assert_close(m(x), expected)
    for composite in ("epsilon", "zplus", "epsilon_gamma_box"):
        a = relprop.explain(models["module"], x, composite=composite, low=-4.0, high=4.0)
        b = relprop.explain(models["functional"], x, composite=composite, low=-4.0, high=4.0)
        torch.testing.assert_close(a.output, expected)
        torch.testing.assert_close(a.relevance, b.relevance, rtol=0.0, atol=0.0)


@pytest.mark.parametrize("name", list(PADS))
def test_padding_matches_an_explicit_index_map(name: str) -> None:
    """The gradient of a gather sums the relevance of copies back to their source."""
    models, x = nets(name), _input(name)
    exact = PADS[name][2] in (None, 0.0)
    for composite in ("lrp0", "epsilon"):
        got = relprop.explain(models["module"], x, composite=composite)
        want = relprop.explain(models["index map"], x, composite=composite)
        # c != 0: inside the border the sum x + 0 takes the stabiliser (leaks <= R eps/|x|)
        atol = 1e-14 if exact or composite == "lrp0" else 1e-4 * want.relevance.abs().max()
        torch.testing.assert_close(got.relevance, want.relevance, rtol=1e-12, atol=atol)


def _entry(expl: relprop.Explanation, op: str) -> str:
    names = [e.node for e in expl.ledger if e.op.startswith(op)]
    assert len(names) == 1, [(e.node, e.op) for e in expl.ledger]
    return names[0]


@pytest.mark.parametrize("name", [n for n in PADS if PADS[n][2] is None or PADS[n][2] == 0.0])
def test_relevance_at_copies_sums_back_to_the_source(name: str) -> None:
    model, x = nets(name)["module"], _input(name)
    expl = relprop.explain(model, x, composite="epsilon", record=True)
    padded = expl.layers[_entry(expl, name)].flatten(2)
    source = expl.layers[_entry(expl, "torch.relu")].flatten(2)
    inside = model.index < source.shape[2]  # zero padding: the border holds no relevance
    assert padded[:, :, ~inside].abs().sum() == 0
    summed = torch.zeros_like(source).index_add_(2, model.index[inside], padded[:, :, inside])
    torch.testing.assert_close(summed, source, rtol=1e-12, atol=1e-14)
    assert expl.ledger[_entry(expl, name)].leaked.abs().max() < 1e-12


@pytest.mark.parametrize("name", [n for n in PADS if PADS[n][2] not in (None, 0.0)])
def test_constant_border_absorbs_like_a_bias(name: str) -> None:
    model = nets(name)["module"]
    with torch.no_grad():  # no other bias: what leaks is the border's and the stabilisers'
        for m in (model.conv_in, model.conv_out, model.head):
            m.bias.zero_()
    x = 10 * _input(name)
    expl = relprop.explain(model, x, composite="epsilon", record=True)
    totals = expl.ledger.totals()
    border = model.index.view(model.padded) == SIDE[_nd(name)] ** _nd(name)
    padded = expl.layers[_entry(expl, f"{name} (+ border")]
    at_border = padded[:, :, border].sum(-1).sum(-1)
    entry = expl.ledger[_entry(expl, f"{name} (+ border")]
    torch.testing.assert_close(entry.bias, at_border, rtol=1e-5, atol=1e-9)
    assert at_border.abs().min() > 1e-3  # the border did get relevance
    torch.testing.assert_close(totals["other"], torch.zeros_like(totals["other"]), rtol=0.0,
                               atol=1e-9)
    total = expl.relevance.flatten(1).sum(1)
    torch.testing.assert_close(total + totals["bias"] + totals["stabilizer"], expl.explained,
                               rtol=1e-9, atol=1e-12)


class ConvNet(nn.Module):
    """A conv with padding_mode, or its twin: F.pad then an unpadded conv (as torch does)."""

    def __init__(self, nd: int, mode: str, padding: int | str, kernel: int,
                 explicit: bool = False) -> None:
        super().__init__()
        self.explicit, self.nd = explicit, nd
        self.conv = CONV[nd](2, 3, kernel, padding=padding, padding_mode=mode)
        self.mode = mode
        self.head = nn.Linear(3 * SIDE[nd] ** nd, 2)

    def forward(self, x: Tensor) -> Tensor:
        if self.explicit:
            c = self.conv
            x = F.pad(x, c._reversed_padding_repeated_twice, self.mode)
            h = CONV_F[self.nd](x, c.weight, c.bias, c.stride, 0, c.dilation, c.groups)
        else:
            h = self.conv(x)
        return self.head(torch.relu(h).flatten(1))


CONV_CASES = [(nd, mode, 1, 3) for nd in (1, 2, 3) for mode in ("reflect", "replicate",
                                                                 "circular")]
CONV_CASES += [(2, "reflect", "same", 4), (1, "circular", "same", 2)]  # asymmetric "same"


@pytest.mark.parametrize(("nd", "mode", "padding", "kernel"), CONV_CASES)
def test_conv_padding_mode_is_pad_then_conv(nd: int, mode: str, padding, kernel: int) -> None:
    model = ConvNet(nd, mode, padding, kernel).double().eval()
    twin = copy.deepcopy(model)
    twin.explicit = True
    x = torch.randn(2, 2, *(SIDE[nd],) * nd, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(twin(x), model(x))
    for composite in ("epsilon", "zplus"):
        got = relprop.explain(model, x, composite=composite, record=True)
        want = relprop.explain(twin, x, composite=composite, record=True)
        torch.testing.assert_close(got.output, want.output)
        torch.testing.assert_close(got.relevance, want.relevance, rtol=1e-12, atol=1e-14)
        assert any(f"padding_mode={mode!r}" in e.op for e in got.ledger)


class ExportOnly(nn.Module):
    """Every F.pad mode in a row, behind Python control flow on a shape (torch.fx cannot
    trace it, torch.export can: ATen's aten.pad)."""

    def __init__(self, guarded: bool) -> None:
        super().__init__()
        self.guarded = guarded
        self.conv = nn.Conv2d(2, 2, 3)
        self.head = nn.Linear(2 * 11 * 11, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.conv(x))
        if not self.guarded or x.shape[-1] > 1:
            h = F.pad(h, (1, 1, 1, 1), "reflect")
            h = F.pad(h, (1, 0, 0, 1), "replicate")
            h = F.pad(h, (1, 1, 1, 1), "circular")
            h = F.pad(h, (1, 0, 1, 0), value=0.5)
            h = nn.functional.pad(h, (0, 1, 0, 1))
        return self.head(h.flatten(1))


def test_padding_in_torch_export_graphs() -> None:
    model = ExportOnly(guarded=True).double().eval()
    twin = copy.deepcopy(model)
    twin.guarded = False
    x = torch.randn(2, 2, 6, 6, dtype=torch.float64)
    explainer = relprop.Explainer(model, "lrp0", record=True)
    got = explainer.explain(x)
    assert explainer.program.traced.method == "export"
    want = relprop.explain(twin, x, composite="lrp0", record=True)
    torch.testing.assert_close(got.output, want.output)
    torch.testing.assert_close(got.relevance, want.relevance, rtol=1e-12, atol=1e-14)
    for key in ("bias", "other"):
        torch.testing.assert_close(got.ledger.totals()[key], want.ledger.totals()[key],
                                   rtol=1e-9, atol=1e-12)
