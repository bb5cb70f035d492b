"""relprop.program.cache: one program per kind of input, torch.fx first and torch.export
where fx cannot trace, and Explainer.describe() saying which served."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import relprop
from relprop.composites import make_composite
from relprop.program.cache import ProgramCache
from relprop.trace import sizes


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x, scale=None):
        y = F.relu(self.conv(x))
        if scale is not None:  # fx traces the default branch; a keyword needs its own trace
            y = y * scale
        return self.fc(y.mean((2, 3)))


class Branchy(Net):
    def forward(self, x, scale=None):
        if x.dim() == 4:  # fx cannot trace a branch on its input
            x = x * 1.0
        return super().forward(x)


class Lookup(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 2)

    def forward(self, x, ids):
        return self.fc(x) + ids.float()[:, :1] * 0


def cache_of(model: nn.Module) -> ProgramCache:
    return ProgramCache(model, make_composite("epsilon_plus"))


def test_fx_traces_at_construction_and_serves_every_size() -> None:
    cache = cache_of(Net())
    assert cache.first is not None and cache.fx_error is None
    assert cache.program.traced.method == "fx"
    for size in (6, 9):
        assert cache.get((torch.randn(2, 3, size, size),)) is cache.first
    assert cache.programs == {}


def test_fx_failure_falls_back_to_export_on_the_first_input_per_size() -> None:
    cache = cache_of(Branchy())
    assert cache.first is None
    assert "torch.fx could not trace Branchy" in str(cache.fx_error)
    with pytest.raises(relprop.RelpropError, match="not traced yet: torch.fx could not"):
        _ = cache.program
    x = torch.randn(2, 3, 6, 6)
    program = cache.get((x,))
    assert program.traced.method == "export" and cache.first is program
    assert cache.get((torch.randn(5, 3, 6, 6),)) is program  # the batch size is free
    other = cache.get((torch.randn(2, 3, 8, 8),))  # export fixed the image size
    assert other is not program
    assert [dims for _, dims in sizes(other.traced)] == [(None, 3, 8, 8)]
    assert cache.get((torch.randn(1, 3, 8, 8),)) is other
    assert len(cache.programs) == 2


def test_keyword_inputs_get_a_trace_of_their_own_once() -> None:
    cache = cache_of(Net())
    x = torch.randn(2, 3, 6, 6)
    scaled = cache.get((x,), {"scale": torch.tensor(2.0)})
    assert scaled is not cache.first and scaled.traced.method == "fx"
    assert list(scaled.traced.constants.values()) == ["scale"]
    assert cache.get((x,), {"scale": torch.tensor(3.0)}) is scaled
    assert cache.get((x,)) is cache.first


def test_integer_inputs_no_embedding_reads_are_refused() -> None:
    cache = cache_of(Lookup())
    with pytest.raises(relprop.InputError, match="input 1 holds integers"):
        cache.get((torch.randn(2, 3), torch.ones(2, 4, dtype=torch.long)))


def test_a_failing_export_says_why_fx_failed_too() -> None:
    class Hopeless(nn.Module):
        def forward(self, x):
            if x.sum() > 0:  # data-dependent: neither fx nor export traces it
                return x * 2
            return x

    cache = cache_of(Hopeless())
    with pytest.raises(relprop.TraceError, match="torch.fx could not trace.*; and neither"):
        cache.get((torch.randn(2, 3),))


def test_describe_names_each_operation_its_rule_and_the_tracer() -> None:
    model = Net()
    explainer = relprop.Explainer(model)
    fx = explainer.describe()
    assert fx.traced == "fx" and fx.inputs == ("x",)
    assert [(s.path, s.kind) for s in fx.steps if s.kind == "layer"] == [
        ("conv", "layer"), ("fc", "layer")]
    assert any(s.op == "F.relu" and s.kind == "gradient" and s.rule is None for s in fx.steps)
    # the same names, ops, paths and rules as the ledger of a recorded explanation
    ledger = explainer(torch.randn(1, 3, 6, 6), record=True).ledger
    rules = {e.node: (e.op, e.path, e.rule) for e in ledger}
    layers = [s for s in fx.steps if s.rule is not None]
    assert layers and all(rules[s.name] == (s.op, s.path, s.rule) for s in layers)
    assert "traced with fx; inputs x" in str(fx)
    x = torch.randn(2, 3, 6, 6)
    explainer = relprop.Explainer(Branchy())
    with pytest.raises(relprop.RelpropError, match="not traced yet"):
        explainer.describe()
    exported = explainer.describe(x)
    assert exported.traced == "export"
    assert [(s.kind, s.rule) for s in exported.steps if s.kind == "layer"] == [
        (s.kind, s.rule) for s in fx.steps if s.kind == "layer"]
    assert explainer.describe() == exported  # the first program is now the export one


def test_explainer_serves_from_its_cache() -> None:
    explainer = relprop.Explainer(Branchy())
    x = torch.randn(2, 3, 6, 6)
    first = explainer(x, 1)
    assert explainer.describe(x).traced == "export"
    again = explainer(x, 1)
    assert torch.equal(first.relevance, again.relevance)
    assert len(explainer._cache.programs) == 1
