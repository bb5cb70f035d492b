"""Models torch.fx cannot trace symbolically are traced with torch.export instead."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import relprop


class ShapeBranch(nn.Module):
    """Python control flow on shapes and a loop: fx refuses, torch.export specialises."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        y = F.relu(self.bn(self.conv(x)))
        if x.shape[-1] > 4:
            y = F.max_pool2d(y, 2)
        for _ in range(2):
            y = y + 0.5 * y
        return self.fc(torch.flatten(y.mean((2, 3)), 1))


class Twin(ShapeBranch):
    """The same computation written without Python control flow (fx traces it)."""

    def forward(self, x):
        y = F.max_pool2d(F.relu(self.bn(self.conv(x))), 2)
        y = y + 0.5 * y
        y = y + 0.5 * y
        return self.fc(torch.flatten(y.mean((2, 3)), 1))


def test_export_fallback_matches_the_fx_twin() -> None:
    model = ShapeBranch().eval()
    with torch.no_grad():
        model.bn.running_mean.normal_()
        model.bn.running_var.uniform_(0.5, 2)
    twin = Twin().eval()
    twin.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 8, 8)
    ex = relprop.Explainer(model, composite="epsilon_plus")
    assert ex._program is None  # fx failed; export happens on the first input
    got = ex(x, target=1)
    assert ex.program.traced.method == "export"
    want = relprop.explain(twin, x, target=1, composite="epsilon_plus")
    torch.testing.assert_close(got.relevance, want.relevance, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(got.output, want.output)


class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        if x.sum() > 0:  # depends on values: neither tracer can follow it
            return self.fc(x)
        return -self.fc(x)


def test_untraceable_model_gets_a_clear_error() -> None:
    ex = relprop.Explainer(DataDependent(), composite="epsilon")
    with pytest.raises(relprop.TraceError, match=r"torch\.fx could not trace DataDependent.*"
                       r"neither torch\.fx nor torch\.export"):
        ex(torch.randn(2, 4))


def test_explaining_many_models_leaves_the_registries_the_same_size() -> None:
    """Export traces read the op vocabulary; nothing is registered per call."""
    from relprop.ops import vocabulary as v

    class Loop(nn.Module):  # a Python loop over the shape: fx cannot trace it, export can
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            for _ in range(x.shape[1] // 2):
                x = torch.relu(self.fc(x))
            return x

    x = torch.randn(2, 4)
    relprop.explain(Loop().eval(), x, target=0, composite="epsilon")
    sizes = (len(v._BY_FUNCTION), len(v._BY_METHOD), len(v._BY_ATEN))
    for _ in range(5):
        relprop.explain(Loop().eval(), x, target=0, composite="epsilon")
    assert (len(v._BY_FUNCTION), len(v._BY_METHOD), len(v._BY_ATEN)) == sizes


class TokenLoop(nn.Module):
    """A Python loop over the tokens (as Mamba's pure-PyTorch scan): torch.export fixes
    the sequence length it was asked to leave free, and guards it."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.fc = nn.Embedding(20, 6), nn.Linear(6, 4)

    def forward(self, ids):
        h = self.embed(ids)
        state = torch.zeros_like(h[:, 0])
        for t in range(ids.shape[1]):
            state = 0.5 * state + h[:, t]
        return self.fc(state)


def test_a_trace_fixed_to_one_length_is_traced_again_for_another() -> None:
    """Each length (and batch size) gets its own program, equal to a fresh Explainer's;
    before, the second length failed at export's guard."""
    torch.manual_seed(0)
    model = TokenLoop().double().eval()
    explainer = relprop.Explainer(model, "lrp0")
    for shape in ((2, 5), (2, 7), (1, 7), (2, 5)):
        ids = torch.randint(0, 20, shape)
        got = explainer(ids, target=1)
        want = relprop.Explainer(model, "lrp0")(ids, target=1)
        torch.testing.assert_close(got.relevance, want.relevance, rtol=0, atol=0)
        # LRP-0 conserves all but the head's bias
        torch.testing.assert_close(got.relevance.sum(1), got.explained - model.fc.bias[1],
                                   rtol=1e-9, atol=1e-12)
    assert explainer.describe(torch.randint(0, 20, (1, 7))).traced == "export"


class BatchGuard(nn.Module):
    """A branch on sizes that export cannot decide for every batch: it guards it (as
    SigLIP's attention-pooling head's `N % (B * N) != 0`, N patches), and a batch of one
    fails that guard. Both branches compute the same sum."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.fc = nn.Embedding(20, 6), nn.Linear(6, 4)

    def forward(self, ids):
        h = self.embed(ids)
        batch, half = ids.shape[0], ids.shape[1] // 2
        if half % (batch * half) != 0:  # several rows
            return self.fc(h.reshape(-1, 6)).reshape(batch, -1, 4).sum(1)
        return self.fc(h[0]).sum(0, keepdim=True)


def test_a_batch_its_guards_fail_is_traced_again_with_every_other_size_free() -> None:
    """A trace at batch 2 does not serve batch 1 (its guard fails there): batch 1 gets a
    program of its own (the batch fixed at 1, the length free), traced once for every
    length; batch 3 is the first program's. Each equals the batch's rows explained alone."""
    from relprop.trace import serves, sizes

    torch.manual_seed(0)
    model = BatchGuard().double().eval()
    explainer = relprop.Explainer(model, "lrp0", record=True)
    ids = torch.randint(0, 20, (3, 8))
    several = explainer(ids[:2], target=1, record=False)
    (first,) = explainer._programs.values()
    assert sizes(first.traced) == (("ids", (None, None)),)
    assert not serves(first.traced, (ids[:1],)) and serves(first.traced, (ids,))
    for length in (8, 4, 6):
        one = explainer(ids[:1, :length], target=1)  # recorded: the ledger balances
        torch.testing.assert_close(one.output, model(ids[:1, :length]), rtol=0, atol=1e-12)
        torch.testing.assert_close(one.relevance.sum(1), one.explained - model.fc.bias[1]
                                   * length, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(explainer(ids[:1], target=1).relevance, several.relevance[:1],
                               rtol=0, atol=1e-12)
    recorded = explainer(ids[:2], target=1)  # record=True: one row at a time, at batch 1
    torch.testing.assert_close(recorded.relevance, several.relevance, rtol=0, atol=1e-12)
    explainer(ids, target=1, record=False)
    programs = list(explainer._programs.values())
    assert len(programs) == 2 and sizes(programs[1].traced) == (("ids", (1, None)),)
