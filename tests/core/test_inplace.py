"""In-place forms explain exactly like their out-of-place twins (passes.inplace.out_of_place).

relprop runs every in-place op out of place (its rules keep values for the
backward, and it never writes into the user's tensors); reads of the mutated
tensor later in the graph see the new value, as in eager PyTorch.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import relprop
from relprop.errors import UnsupportedOperationError

Step = Callable[[Tensor, Tensor], Tensor]


def _iadd(h: Tensor, s: Tensor) -> Tensor:
    h += s
    return h


def _add_(h: Tensor, s: Tensor) -> Tensor:
    h.add_(s)  # the result is dropped: `h` must read the mutated value
    return h


def _sub_(h: Tensor, s: Tensor) -> Tensor:
    h.sub_(s)
    return h


def _mul_(h: Tensor, s: Tensor) -> Tensor:
    h.mul_(0.5)
    return h


def _div_(h: Tensor, s: Tensor) -> Tensor:
    h.div_(2.0)
    return h


def _gate_(h: Tensor, s: Tensor) -> Tensor:
    h.mul_(torch.sigmoid(s))
    return h


def _relu_method(h: Tensor, s: Tensor) -> Tensor:
    h.relu_()
    return h


def _chain(h: Tensor, s: Tensor) -> Tensor:
    h.add_(s)
    y = torch.relu_(h)  # y is h
    h.mul_(2.0)  # mutates y too
    return F.relu(h, True) + y


def _chain_twin(h: Tensor, s: Tensor) -> Tensor:
    h = 2.0 * torch.relu(h + s)
    return F.relu(h) + h


# (in-place step, its out-of-place twin)
PAIRS: dict[str, tuple[Step, Step]] = {
    "x += y": (_iadd, lambda h, s: h + s),
    "operator.iadd": (lambda h, s: __import__("operator").iadd(h, s), lambda h, s: h + s),
    "x.add_(y)": (_add_, lambda h, s: h + s),
    "x.sub_(y)": (_sub_, lambda h, s: h - s),
    "x.mul_(c)": (_mul_, lambda h, s: h * 0.5),
    "x.div_(c)": (_div_, lambda h, s: h / 2.0),
    "x.mul_(gate)": (_gate_, lambda h, s: h * torch.sigmoid(s)),
    "x.relu_()": (_relu_method, lambda h, s: torch.relu(h)),
    "torch.relu_": (lambda h, s: torch.relu_(h), lambda h, s: torch.relu(h)),
    "F.relu_": (lambda h, s: F.relu_(h), lambda h, s: F.relu(h)),
    "F.relu(inplace=True)": (lambda h, s: F.relu(h, inplace=True), lambda h, s: F.relu(h)),
    "F.relu(x, True)": (lambda h, s: F.relu(h, True), lambda h, s: F.relu(h)),
    "F.relu6(inplace=True)": (lambda h, s: F.relu6(h, inplace=True), lambda h, s: F.relu6(h)),
    "F.hardtanh(x, -1, 1, True)": (lambda h, s: F.hardtanh(h, -1.0, 1.0, True),
                                   lambda h, s: F.hardtanh(h, -1.0, 1.0)),
    "F.leaky_relu_": (lambda h, s: F.leaky_relu_(h, 0.1), lambda h, s: F.leaky_relu(h, 0.1)),
    "F.leaky_relu(x, a, True)": (lambda h, s: F.leaky_relu(h, 0.1, True),
                                 lambda h, s: F.leaky_relu(h, 0.1)),
    "F.elu_": (lambda h, s: F.elu_(h), lambda h, s: F.elu(h)),
    "F.silu(inplace=True)": (lambda h, s: F.silu(h, inplace=True), lambda h, s: F.silu(h)),
    "F.hardswish(inplace=True)": (lambda h, s: F.hardswish(h, inplace=True),
                                  lambda h, s: F.hardswish(h)),
    "x.sigmoid_()": (lambda h, s: h.sigmoid_(), lambda h, s: torch.sigmoid(h)),
    "x.tanh_()": (lambda h, s: h.tanh_(), lambda h, s: torch.tanh(h)),
    "F.dropout(inplace=True)": (lambda h, s: F.dropout(h, 0.5, False, True), lambda h, s: h),
    "torch.dropout_": (lambda h, s: torch.dropout_(h, 0.5, False), lambda h, s: h),
    "F.dropout2d(inplace=True)": (lambda h, s: F.dropout2d(h, 0.5, False, inplace=True),
                                  lambda h, s: h),
    "chain of in-place ops": (_chain, _chain_twin),
}


class StepNet(nn.Module):
    """conv -> step(h, skip) -> conv -> linear, the step given as a function or module."""

    def __init__(self, step: Step | nn.Module, assigned: bool = True) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv3 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.head = nn.Linear(4 * 6 * 6, 3)
        if isinstance(step, nn.Module):
            self.act = step
        else:
            self.step = step
        self.assigned = assigned

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(x)
        s = self.conv2(x)
        if hasattr(self, "act"):
            if self.assigned:
                h = self.act(h)
            else:
                self.act(h)  # an in-place module: `h` itself holds its output
        else:
            h = self.step(h, s)
        h = self.conv3(torch.relu(h))
        return self.head(h.flatten(1))


def twins(a: nn.Module, b_step: Step | nn.Module, assigned: bool = True) -> nn.Module:
    """A copy of `a` (same weights) with another step."""
    b = StepNet(b_step, assigned)
    state = {k: v for k, v in a.state_dict().items() if not k.startswith("act.")}
    b.load_state_dict(state, strict=False)
    return b.double().eval()


def assert_same_explanations(model: nn.Module, twin: nn.Module) -> None:
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    with torch.no_grad():
        expected = twin(x)
        # the in-place model's own output (on a copy: it may write into its input)
        torch.testing.assert_close(model(x.clone()), expected)
    for composite, record in (("epsilon", False), ("epsilon", True), ("zplus", False)):
        got = relprop.explain(model, x, composite=composite, record=record)
        want = relprop.explain(twin, x, composite=composite, record=record)
        torch.testing.assert_close(got.output, expected)
        torch.testing.assert_close(got.relevance, want.relevance, rtol=1e-12, atol=1e-14)
        if record:
            for key in ("bias", "stabilizer", "other"):
                torch.testing.assert_close(got.ledger.totals()[key], want.ledger.totals()[key],
                                           rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("form", list(PAIRS))
def test_inplace_function_matches_out_of_place_twin(form: str) -> None:
    inplace, out_of_place = PAIRS[form]
    model = StepNet(inplace).double().eval()
    assert_same_explanations(model, twins(model, out_of_place))


INPLACE_MODULES: dict[str, tuple[nn.Module, nn.Module]] = {
    "ReLU": (nn.ReLU(inplace=True), nn.ReLU()),
    "ReLU6": (nn.ReLU6(inplace=True), nn.ReLU6()),
    "Hardtanh": (nn.Hardtanh(-0.5, 0.5, inplace=True), nn.Hardtanh(-0.5, 0.5)),
    "LeakyReLU": (nn.LeakyReLU(0.2, inplace=True), nn.LeakyReLU(0.2)),
    "ELU": (nn.ELU(inplace=True), nn.ELU()),
    "SELU": (nn.SELU(inplace=True), nn.SELU()),
    "CELU": (nn.CELU(inplace=True), nn.CELU()),
    "SiLU": (nn.SiLU(inplace=True), nn.SiLU()),
    "Mish": (nn.Mish(inplace=True), nn.Mish()),
    "Hardswish": (nn.Hardswish(inplace=True), nn.Hardswish()),
    "Hardsigmoid": (nn.Hardsigmoid(inplace=True), nn.Hardsigmoid()),
    "Dropout": (nn.Dropout(0.5, inplace=True), nn.Identity()),
    "Dropout2d": (nn.Dropout2d(0.5, inplace=True), nn.Identity()),
    "AlphaDropout": (nn.AlphaDropout(0.5, inplace=True), nn.Identity()),
}


@pytest.mark.parametrize("assigned", [True, False], ids=["h = act(h)", "act(h)"])
@pytest.mark.parametrize("name", list(INPLACE_MODULES))
def test_inplace_module_matches_out_of_place_twin(name: str, assigned: bool) -> None:
    inplace, out_of_place = (copy.deepcopy(m) for m in INPLACE_MODULES[name])
    model = StepNet(inplace, assigned).double().eval()
    assert_same_explanations(model, twins(model, out_of_place, assigned=True))


class ReadBeforeAndAfter(nn.Module):
    """conv2 reads z before the in-place ReLU, conv3 after it."""

    def __init__(self, inplace: bool) -> None:
        super().__init__()
        self.inplace = inplace
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.conv3 = nn.Conv2d(4, 4, 3, padding=1)
        self.head = nn.Linear(4 * 6 * 6, 3)

    def forward(self, x: Tensor) -> Tensor:
        z = self.conv1(x)
        a = self.conv2(z)
        if self.inplace:
            z.relu_()
            b = self.conv3(z)
        else:
            b = self.conv3(torch.relu(z))
        return self.head((a + b).flatten(1))


def test_mutating_a_value_another_node_read_does_not_corrupt_it() -> None:
    model = ReadBeforeAndAfter(inplace=True).double().eval()
    twin = copy.deepcopy(model)
    twin.inplace = False
    assert_same_explanations(model, twin)


class ExportOnly(nn.Module):
    """Python control flow on a shape: torch.fx cannot trace it, torch.export can; its
    graph keeps ATen's in-place ops (aten.add_, aten.relu_, aten.dropout_)."""

    def __init__(self, inplace: bool) -> None:
        super().__init__()
        self.inplace = inplace
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(3, 4, 3, padding=1)
        self.act = nn.ReLU(inplace=inplace)
        self.drop = nn.Dropout(0.3, inplace=inplace)
        self.head = nn.Linear(4 * 6 * 6, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(x)
        if x.shape[-1] > 1:
            if self.inplace:
                h += self.conv2(x)
                h.mul_(0.5)
            else:
                h = (h + self.conv2(x)) * 0.5
        h = self.drop(self.act(h))
        return self.head(h.flatten(1))


def test_inplace_aten_ops_from_torch_export() -> None:
    model = ExportOnly(inplace=True).double().eval()
    twin = copy.deepcopy(model)
    twin.inplace = False
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    explainer = relprop.Explainer(model, "epsilon")
    got = explainer.explain(x)
    assert explainer.program.traced.method == "export"
    targets = {str(s.node.meta.get("relprop_label")) for s in explainer.program.steps}
    assert {"aten.add_", "aten.relu_", "aten.mul_"} <= targets
    want = relprop.explain(twin, x, composite="epsilon")
    torch.testing.assert_close(got.output, want.output)
    torch.testing.assert_close(got.relevance, want.relevance, rtol=1e-12, atol=1e-14)


class MutatedView(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Linear(4 * 6 * 6, 3)

    def forward(self, x: Tensor) -> Tensor:
        z = self.conv(x)
        v = z.flatten(1)  # a view of z, read after z changes
        z.relu_()
        return self.head(v)


def test_inplace_change_seen_through_a_view_is_refused() -> None:
    x = torch.randn(1, 3, 6, 6)
    with pytest.raises(UnsupportedOperationError, match="views"):
        relprop.explain(MutatedView().eval(), x)


def test_inputs_and_parameters_are_not_written() -> None:
    class Scales(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 2)

        def forward(self, x: Tensor) -> Tensor:
            x.mul_(2.0)
            return self.lin(x)

    model = Scales().double().eval()
    x = torch.randn(3, 4, dtype=torch.float64)
    before = copy.deepcopy(model.state_dict())
    x0 = x.clone()
    expl = relprop.explain(model, x, composite="epsilon")
    torch.testing.assert_close(x, x0)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k])
    with torch.no_grad():
        torch.testing.assert_close(expl.output, model(x0.clone()))


class SliceWrittenMask(nn.Module):
    """A constant mask written slice by slice into a new tensor (Swin's shift mask), under
    torch.export (the shape branch); `leak` writes the input into it instead."""

    def __init__(self, leak: bool = False) -> None:
        super().__init__()
        self.leak = leak
        self.fc = nn.Linear(6, 6)
        self.head = nn.Linear(36, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = self.fc(x)
        if x.shape[-1] > 1:
            mask = h.new_zeros((6, 6))
            mask[:3, :3] = 1.0
            mask[3:, 3:] = -2.0
            if self.leak:
                mask[0] = h[0, 0]
            h = h + mask
        return self.head(h.flatten(1))


def test_constant_writes_run_in_place_input_dependent_ones_are_refused() -> None:
    model = SliceWrittenMask().double().eval()
    twin = copy.deepcopy(model)
    twin.leak = None  # the mask as a ready constant
    mask = torch.zeros(6, 6, dtype=torch.float64)
    mask[:3, :3], mask[3:, 3:] = 1.0, -2.0
    twin.forward = lambda x: twin.head((twin.fc(x) + mask).flatten(1))
    x = torch.randn(2, 6, 6, dtype=torch.float64)
    explainer = relprop.Explainer(model, "epsilon")
    got = explainer(x, target=1)
    assert explainer.program.traced.method == "export"
    want = relprop.explain(twin, x, composite="epsilon", target=1)
    torch.testing.assert_close(got.output, model(x), rtol=0, atol=1e-12)
    torch.testing.assert_close(got.relevance, want.relevance, rtol=1e-12, atol=1e-14)
    with pytest.raises(relprop.UnsupportedOperationError, match="in-place"):
        relprop.explain(SliceWrittenMask(leak=True).double().eval(), x, composite="epsilon")
