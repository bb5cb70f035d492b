"""Parameters with defaults are traced as the model runs when they are left out."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import relprop


class Masked(nn.Module):
    """`mask` is optional: explaining with x alone must not take the mask branch."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.out = nn.Linear(3, 2)

    def forward(self, x, mask=None):
        y = torch.relu(self.fc(x))
        if mask is not None:
            y = y + mask
        return self.out(y)


class MultipliedMask(Masked):
    """The issue's case: traced with mask as an input, `y * mask` is a product of two
    input-dependent tensors, which relprop refuses; x alone never reaches it."""

    def forward(self, x, mask=None):
        y = torch.relu(self.fc(x))
        if mask is not None:
            y = y * mask
        return self.out(y)


class Unmasked(Masked):
    def forward(self, x):
        return self.out(torch.relu(self.fc(x)))


class AlwaysMasked(Masked):
    def forward(self, x, mask):
        return self.out(torch.relu(self.fc(x)) + mask)


class Scaled(Masked):
    def forward(self, x, scale: float = 2.0, pair=(1, 3), *, shift: int = 1,
                bias_off: bool = False):
        y = torch.relu(self.fc(x)) * scale + shift * pair[1]
        return self.out(y) if not bias_off else y


class ScaledTwin(Masked):
    def forward(self, x):
        return self.out(torch.relu(self.fc(x)) * 2.0 + 3)


class NeedsOther(Masked):
    """Fails with its default (None has no .flip): only traceable with `other` given."""

    def forward(self, x, other=None):
        return self.out(torch.relu(self.fc(x)) + other.flip(0))


class Required(Masked):
    def forward(self, x, other):
        return self.out(torch.relu(self.fc(x)) + other.flip(0))


def _twins(*classes: type[nn.Module]) -> list[nn.Module]:
    first = classes[0]().eval()
    rest = [cls().eval() for cls in classes[1:]]
    for m in rest:
        m.load_state_dict(first.state_dict())
    return [first, *rest]


def test_multiplied_mask_left_out_is_never_traced() -> None:
    model, plain = _twins(MultipliedMask, Unmasked)
    x = torch.randn(5, 4)
    got = relprop.explain(model, x, target=0, composite="epsilon_plus")
    want = relprop.explain(plain, x, target=0, composite="epsilon_plus")
    assert torch.equal(got.relevance, want.relevance)


@pytest.mark.parametrize("composite", ["epsilon", "epsilon_plus"])
def test_left_out_mask_follows_the_default_branch(composite: str) -> None:
    model, plain, masked = _twins(Masked, Unmasked, AlwaysMasked)
    x, mask = torch.randn(5, 4), torch.randn(5, 3)
    ex = relprop.Explainer(model, composite=composite)
    assert [n.name for n in ex.program.traced.graph.nodes if n.op == "placeholder"] == ["x"]

    got = ex(x, target=1)
    want = relprop.explain(plain, x, target=1, composite=composite)
    assert torch.equal(got.relevance, want.relevance)
    assert torch.equal(got.output, plain(x))

    # More inputs than the graph takes: traced again with mask as an input.
    got = ex((x, mask), target=1)
    want = relprop.Explainer(masked, composite=composite)((x, mask), target=1)
    assert torch.equal(got.output, model(x, mask))
    for g, w in zip(got.relevance, want.relevance, strict=True):
        assert torch.equal(g, w)

    # Both traces are kept: x alone still uses the first one.
    assert torch.equal(ex(x, target=1).relevance,
                       relprop.explain(plain, x, target=1, composite=composite).relevance)


def test_plain_defaults_are_constants_keyword_only_and_tuples_too() -> None:
    model, twin = _twins(Scaled, ScaledTwin)
    x = torch.randn(3, 4)
    ex = relprop.Explainer(model, composite="epsilon")
    graph = ex.program.traced.graph
    assert [n.name for n in graph.nodes if n.op == "placeholder"] == ["x"]
    assert not any("assert" in str(n.target) for n in graph.nodes)  # fx's checks pruned
    graph.lint()
    got = ex(x, target=0)
    want = relprop.explain(twin, x, target=0, composite="epsilon")
    assert torch.equal(got.relevance, want.relevance)
    assert torch.equal(got.output, model(x))


def test_default_that_cannot_trace_is_traced_again_with_the_input_given() -> None:
    model, twin = _twins(NeedsOther, Required)
    x, other = torch.randn(3, 4), torch.randn(3, 3)
    ex = relprop.Explainer(model, composite="epsilon")
    assert ex._program is None  # fx could not trace with other=None
    got = ex((x, other), target=0)
    assert ex.program.traced.method == "fx"
    want = relprop.explain(twin, (x, other), target=0, composite="epsilon")
    for g, w in zip(got.relevance, want.relevance, strict=True):
        assert torch.equal(g, w)


class _BakedMask(nn.Module):
    """MultipliedMask with one fixed mask held as a buffer: the reference for forward_kwargs."""

    def __init__(self, source: Masked, mask: torch.Tensor) -> None:
        super().__init__()
        self.fc, self.out = source.fc, source.out
        self.register_buffer("mask", mask)

    def forward(self, x):
        return self.out(torch.relu(self.fc(x)) * self.mask)


@pytest.mark.parametrize("batch_size", [None, 2])
def test_keyword_inputs_are_constants_not_explained(batch_size) -> None:
    """forward_kwargs: an attention-mask-like input passed as a constant (y * mask is then
    scaling by a constant), the same relevance as a model that holds the mask itself;
    with batch_size= a per-sample mask is split with the batch."""
    model = MultipliedMask().double().eval()
    x = torch.randn(5, 4, dtype=torch.float64)
    mask = (torch.rand(5, 3) > 0.4).double()
    expl = relprop.explain(model, x, target=1, composite="epsilon", batch_size=batch_size,
                           forward_kwargs={"mask": mask})
    torch.testing.assert_close(expl.output, model(x, mask=mask).detach())
    for i in range(5):  # the reference holds one sample's mask
        ref = relprop.explain(_BakedMask(model, mask[i:i + 1]), x[i:i + 1], target=1,
                              composite="epsilon")
        torch.testing.assert_close(expl.relevance[i:i + 1], ref.relevance)


def test_keyword_inputs_are_checked_against_forward() -> None:
    model = MultipliedMask().eval()
    with pytest.raises(relprop.TraceError, match="no parameter 'maks'.*x, mask"):
        relprop.explain(model, torch.randn(2, 4), forward_kwargs={"maks": torch.ones(2, 3)})
    with pytest.raises(relprop.TraceError, match="'x' is already given as input 0"):
        relprop.explain(model, torch.randn(2, 4), forward_kwargs={"x": torch.ones(2, 4)})


def test_several_inputs_get_one_relevance_each() -> None:
    """Captum's multi-input convention: a tuple of inputs gives a tuple of relevances."""

    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(3, 4, bias=False), nn.Linear(2, 4, bias=False)
            self.head = nn.Linear(4, 2, bias=False)

        def forward(self, x1, x2):
            return self.head(torch.relu(self.a(x1) + self.b(x2)))

    model = Two().double().eval()
    x1, x2 = torch.randn(3, 3, dtype=torch.float64), torch.randn(3, 2, dtype=torch.float64)
    expl = relprop.explain(model, (x1, x2), target=0, composite="lrp0")
    r1, r2 = expl.relevance
    assert r1.shape == x1.shape and r2.shape == x2.shape
    a, b = x1.clone().requires_grad_(), x2.clone().requires_grad_()
    model(a, b)[:, 0].sum().backward()
    torch.testing.assert_close(r1, a.grad * x1)  # LRP-0 on a ReLU net: gradient x input
    torch.testing.assert_close(r2, b.grad * x2)
    torch.testing.assert_close(r1.sum(1) + r2.sum(1), expl.explained)


def test_an_empty_batch_is_refused_with_a_message_that_says_so() -> None:
    with pytest.raises(relprop.InputError, match="the batch is empty"):
        relprop.explain(Unmasked().eval(), torch.randn(0, 4))


def test_unused_var_keyword_parameters_are_no_input() -> None:
    """forward(x, **kwargs) (Hugging Face style) explains with x alone."""

    class Kw(Unmasked):
        def forward(self, x, **kwargs):
            return self.out(torch.relu(self.fc(x)))

    model = Kw().eval()
    x = torch.randn(2, 4)
    got = relprop.explain(model, x, target=0, composite="epsilon")
    plain = Unmasked().eval()
    plain.load_state_dict(model.state_dict())
    torch.testing.assert_close(got.relevance, relprop.explain(plain, x, target=0,
                                                              composite="epsilon").relevance)


def test_an_exported_module_explains() -> None:
    """torch.export's module refuses .eval(); tracing sets the flags directly."""
    model = Unmasked().eval()
    x = torch.randn(2, 4)
    exported = torch.export.export(model, (x,)).module()
    got = relprop.explain(exported, x, target=1, composite="epsilon")
    torch.testing.assert_close(got.relevance, relprop.explain(model, x, target=1,
                                                              composite="epsilon").relevance)
