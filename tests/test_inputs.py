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
