"""The public API: targets, start relevance, contexts, chunking, errors, model untouched."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from checks import snapshot
from models import FunctionalCNN, ModuleCNN, SeedMLP, with_biases
from torch import nn

import relprop


@pytest.fixture
def cnn() -> nn.Module:
    return with_biases(ModuleCNN()).eval()


def test_explainer_call_and_one_shot_agree(cnn) -> None:
    x = torch.randn(3, 3, 8, 8)
    explainer = relprop.Explainer(cnn, composite="epsilon_gamma_box", low=-3.0, high=3.0)
    a = explainer.explain(x, target=None)
    b = explainer(x)
    c = relprop.explain(cnn, x, composite="epsilon_gamma_box", low=-3.0, high=3.0)
    assert torch.equal(a.relevance, b.relevance) and torch.equal(a.relevance, c.relevance)
    assert a.relevance.shape == x.shape
    assert torch.equal(a.target, cnn(x).argmax(1))
    torch.testing.assert_close(a.output, cnn(x))


def test_target_forms(cnn) -> None:
    x = torch.randn(4, 3, 8, 8)
    ex = relprop.Explainer(cnn, composite="epsilon")
    by_int = ex(x, target=2).relevance
    by_tensor = ex(x, target=torch.full((4,), 2)).relevance
    assert torch.equal(by_int, by_tensor)
    per_sample = torch.tensor([0, 1, 2, 3])
    mixed = ex(x, target=per_sample).relevance
    for i in range(4):
        assert torch.equal(mixed[i], ex(x, target=int(per_sample[i])).relevance[i])


def test_several_targets_per_sample_are_one_call_and_match_single_calls(cnn) -> None:
    x = torch.randn(3, 3, 8, 8)
    for composite in ["epsilon", "epsilon_gamma_box", "epsilon_alpha2_beta1", "epsilon_plus_flat"]:
        ex = relprop.Explainer(cnn, composite=composite, low=-3.0, high=3.0)
        many = ex(x, target=[[0, 3, 4]])  # (1, K): the same K classes for every sample
        assert many.relevance.shape == (3, 3, 3, 8, 8)
        assert many.target.shape == (3, 3)
        for k, t in enumerate([0, 3, 4]):
            torch.testing.assert_close(many.relevance[:, k], ex(x, target=t).relevance,
                                       rtol=1e-5, atol=1e-7)


def test_record_with_several_targets(cnn) -> None:
    x = torch.randn(2, 3, 8, 8)
    ex = relprop.Explainer(cnn, composite="epsilon")
    many = ex(x, target=torch.tensor([[1, 2], [1, 2]]), record=True)  # (B, K)
    assert many.ledger.explained.shape == (2, 2)
    for name, r in many.layers.items():
        assert r.shape[:2] == (2, 2), name
    single = ex(x, target=2, record=True)
    for name in single.layers:
        torch.testing.assert_close(many.layers[name][:, 1], single.layers[name])


def test_layers_are_in_forward_order_and_start_with_the_input(cnn) -> None:
    x = torch.randn(2, 3, 8, 8)
    expl = relprop.explain(cnn, x, composite="epsilon", record=True)
    names = list(expl.layers)
    assert names[0] == "x"
    torch.testing.assert_close(expl.layers["x"], expl.relevance)
    assert names.index("conv1") < names.index("conv2") < names.index("fc")
    # the output node holds the starting relevance: the logit at the target
    out = expl.layers["fc"]
    assert torch.equal(out.argmax(1), expl.target)
    torch.testing.assert_close(out.sum(1), expl.explained)


def test_start_options_and_output_relevance() -> None:
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 4)).double()
    x = torch.randn(3, 5, dtype=torch.float64)
    ex = relprop.Explainer(model, composite="epsilon", bias="ignore", epsilon=1e-12)
    logits = model(x)
    one = ex(x, target=1, start="one")
    torch.testing.assert_close(one.explained, torch.ones(3, dtype=torch.float64))
    torch.testing.assert_close(one.relevance.sum(1), torch.ones(3, dtype=torch.float64),
                               rtol=1e-6, atol=1e-9)
    soft = ex(x, target=1, start="softmax")
    torch.testing.assert_close(soft.relevance.sum(1), logits.softmax(1)[:, 1].detach(),
                               rtol=1e-6, atol=1e-9)
    seed = torch.randn(3, 4, dtype=torch.float64)
    custom = ex(x, output_relevance=seed)
    torch.testing.assert_close(custom.relevance.sum(1), seed.sum(1), rtol=1e-6, atol=1e-9)
    # linearity: the custom seed is the sum of per-class seeds
    parts = sum(ex(x, output_relevance=seed * F.one_hot(torch.tensor(k), 4)).relevance
                for k in range(4))
    torch.testing.assert_close(custom.relevance, parts)


@pytest.mark.parametrize("context", ["no_grad", "inference_mode"])
def test_works_inside_no_grad_and_inference_mode(cnn, context: str) -> None:
    x = torch.randn(2, 3, 8, 8)
    expected = relprop.explain(cnn, x, composite="epsilon_plus").relevance
    ctx = torch.no_grad() if context == "no_grad" else torch.inference_mode()
    with ctx:
        x2 = x.clone()
        got = relprop.explain(cnn, x2, composite="epsilon_plus").relevance
    assert torch.equal(got, expected)


def test_float64_and_inputs_that_require_grad(cnn) -> None:
    model = cnn.double()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, requires_grad=True)
    expl = relprop.explain(model, x, composite="epsilon")
    assert expl.relevance.dtype == torch.float64
    assert x.grad is None and not expl.relevance.requires_grad


def test_batch_size_chunks_give_the_same_answer(cnn, capsys) -> None:
    x = torch.randn(5, 3, 8, 8)
    ex = relprop.Explainer(cnn, composite="epsilon_gamma_box", low=-3.0, high=3.0)
    whole = ex(x, target=torch.tensor([0, 1, 2, 3, 4]))
    chunked = ex(x, target=torch.tensor([0, 1, 2, 3, 4]), batch_size=2, progress=True)
    torch.testing.assert_close(chunked.relevance, whole.relevance)
    assert torch.equal(chunked.target, whole.target)
    assert "5/5" in capsys.readouterr().err


def test_explainer_sees_parameter_updates(cnn) -> None:
    x = torch.randn(2, 3, 8, 8)
    ex = relprop.Explainer(cnn, composite="epsilon_plus")
    before = ex(x, target=0).relevance
    with torch.no_grad():
        cnn.conv1.weight.mul_(2.0)
    after = ex(x, target=0).relevance
    fresh = relprop.explain(cnn, x, target=0, composite="epsilon_plus").relevance
    assert not torch.allclose(before, after)
    assert torch.equal(after, fresh)


# ------------------------------------------------------------------ errors

def test_target_out_of_range(cnn) -> None:
    with pytest.raises(relprop.TargetError, match=r"target 5 is out of range.*5 outputs"):
        relprop.explain(cnn, torch.randn(2, 3, 8, 8), target=5)
    with pytest.raises(relprop.TargetError, match="out of range"):
        relprop.explain(cnn, torch.randn(2, 3, 8, 8), target=[1, -1])
    with pytest.raises(relprop.TargetError, match="3 entries but the batch has 2 samples"):
        relprop.explain(cnn, torch.randn(2, 3, 8, 8), target=torch.tensor([0, 1, 2]))
    with pytest.raises(relprop.TargetError, match="dtype"):
        relprop.explain(cnn, torch.randn(2, 3, 8, 8), target=torch.tensor([0.0, 1.0]))


def test_wrong_input_shape_names_the_layer(cnn) -> None:
    with pytest.raises(relprop.InputError, match=r"conv1.*\(2, 5, 8, 8\)"):
        relprop.explain(cnn, torch.randn(2, 5, 8, 8))


def test_nan_and_integer_inputs_are_refused(cnn) -> None:
    x = torch.randn(2, 3, 8, 8)
    x[1, 2, 3, 4] = float("nan")
    with pytest.raises(relprop.InputError, match=r"NaN or Inf.*\(1, 2, 3, 4\)"):
        relprop.explain(cnn, x)
    with pytest.raises(relprop.InputError, match="floating-point"):
        relprop.explain(cnn, torch.ones(2, 3, 8, 8, dtype=torch.long))


class CumProd(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return torch.cumprod(self.fc(x), dim=1)


class Nested(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Sequential(nn.Linear(4, 4), nn.Hardshrink())

    def forward(self, x):
        return self.block(x)


def test_unsupported_op_is_named_with_its_place() -> None:
    with pytest.raises(relprop.UnsupportedOperationError,
                       match=r"torch\.cumprod.*in the model's forward.*test_api\.py"):
        relprop.Explainer(CumProd(), composite="epsilon")
    with pytest.raises(relprop.UnsupportedOperationError, match=r"module 'block\.1'.*Hardshrink"):
        relprop.Explainer(Nested(), composite="epsilon")


def test_bad_composites_are_explained() -> None:
    with pytest.raises(relprop.CompositeError, match="unknown composite 'nope'"):
        relprop.Explainer(SeedMLP(), composite="nope")
    with pytest.raises(relprop.CompositeError, match="needs low= and high="):
        relprop.Explainer(SeedMLP(), composite="epsilon_gamma_box")
    with pytest.raises(relprop.CompositeError, match="alpha - beta = 1"):
        relprop.Explainer(SeedMLP(), composite="alpha_beta", alpha=2.0, beta=2.0)
    with pytest.raises(relprop.CompositeError, match="bias="):
        relprop.Explainer(SeedMLP(), composite="epsilon", bias="drop")


# ------------------------------------------------------------------ model untouched

@pytest.mark.parametrize("factory", [ModuleCNN, FunctionalCNN])
def test_model_is_byte_identical_after_explaining(factory) -> None:
    model = with_biases(factory())
    model.train()  # mixed modes must survive too
    model.conv2.eval()
    model.fc.weight.requires_grad_(False)
    calls = []
    model.conv1.register_forward_hook(lambda *a: calls.append(1))
    before = snapshot(model)
    x = torch.randn(2, 3, 8, 8)
    for composite in ["epsilon_gamma_box", "epsilon_plus", "lrp0"]:
        relprop.explain(model, x, target=[[0, 1]], composite=composite, low=-3.0, high=3.0,
                        record=True)
    with pytest.raises(relprop.InputError):
        relprop.explain(model, torch.randn(2, 4, 8, 8))
    with pytest.raises(relprop.TargetError):
        relprop.explain(model, x, target=99)
    after = snapshot(model)
    assert before == after
    assert calls == []  # the user's hooks never fired: relprop does not call their modules


def test_train_mode_model_explains_with_inference_semantics() -> None:
    model = nn.Sequential(nn.Linear(6, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Dropout(0.5),
                          nn.Linear(6, 2))
    x = torch.randn(4, 6)
    model.train()
    a = relprop.explain(model, x, composite="epsilon")
    model.eval()
    b = relprop.explain(model, x, composite="epsilon")
    assert torch.equal(a.relevance, b.relevance)


# ------------------------------------------------------- Captum's target convention

def test_targets_follow_captum(cnn) -> None:
    """A list or 1-d tensor of B entries is one target per sample (not B maps each)."""
    x = torch.randn(2, 3, 8, 8)
    ex = relprop.Explainer(cnn, composite="epsilon")
    per_sample = ex(x, target=[3, 1])
    assert per_sample.relevance.shape == x.shape
    assert per_sample.target.tolist() == [3, 1]
    torch.testing.assert_close(per_sample.relevance[0], ex(x, target=3).relevance[0])
    torch.testing.assert_close(per_sample.relevance[1], ex(x, target=1).relevance[1])
    torch.testing.assert_close(ex(x, target=torch.tensor([3, 1])).relevance,
                               per_sample.relevance)
    rows = ex(x, target=[[3, 0], [1, 2]])  # (B, K): K maps per sample, own classes
    assert rows.relevance.shape == (2, 2, 3, 8, 8) and rows.target.tolist() == [[3, 0], [1, 2]]
    torch.testing.assert_close(rows.relevance[:, 0], per_sample.relevance)
    with pytest.raises(relprop.TargetError, match=r"\(B, K\) or \(1, K\)"):
        ex(x, target=[0, 1, 2])
    chunked = ex(x, target=[3, 1], batch_size=1)  # per-sample targets split with the batch
    torch.testing.assert_close(chunked.relevance, per_sample.relevance)


def test_tuple_targets_index_a_multidimensional_output() -> None:
    class Grid(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 6)

        def forward(self, x):
            return self.fc(x).reshape(-1, 2, 3)

    model = Grid().eval()
    x = torch.randn(2, 4)
    expl = relprop.explain(model, x, target=(1, 2), composite="epsilon")
    flat = relprop.explain(model, x, target=5, composite="epsilon")  # (1, 2) -> 1 * 3 + 2
    torch.testing.assert_close(expl.relevance, flat.relevance)
    both = relprop.explain(model, x, target=[(0, 1), (1, 2)], composite="epsilon")
    assert both.target.tolist() == [1, 5]
    with pytest.raises(relprop.TargetError, match="needs 2 ints"):
        relprop.explain(model, x, target=(1,), composite="epsilon")


def test_explainer_needs_no_arguments_but_the_model(cnn) -> None:
    """The default composite needs no input bounds, so it works on any model."""
    expl = relprop.Explainer(cnn)(torch.randn(2, 3, 8, 8))
    assert torch.isfinite(expl.relevance).all() and expl.relevance.abs().sum() > 0
    assert expl.composite == "epsilon_plus"


def test_ledger_without_record_is_an_attribute_error(cnn) -> None:
    expl = relprop.explain(cnn, torch.randn(1, 3, 8, 8), composite="epsilon")
    assert not hasattr(expl, "ledger")
    with pytest.raises(relprop.NoLedgerError, match="record=True"):
        _ = expl.ledger


def test_every_public_rule_is_a_class() -> None:
    assert isinstance(relprop.LRP0(), relprop.LRP0) and isinstance(relprop.LRP0(), relprop.Epsilon)
    assert isinstance(relprop.ZPlus(), relprop.ZPlus) and relprop.ZPlus().beta == 0
    for name in ("LRP0", "Epsilon", "Gamma", "ZPlus", "AlphaBeta", "Flat", "WSquare", "ZBox"):
        assert isinstance(getattr(relprop, name), type), name


def test_an_output_object_with_logits_is_explained_by_its_logits(cnn) -> None:
    """Hugging Face models return an output object (a dict with "logits")."""

    class WithOutput(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return {"logits": self.inner(x), "hidden": x}

    x = torch.randn(2, 3, 8, 8)
    got = relprop.explain(WithOutput(cnn).eval(), x, target=1, composite="epsilon")
    want = relprop.explain(cnn, x, target=1, composite="epsilon")
    torch.testing.assert_close(got.relevance, want.relevance)


def test_an_explanation_shows_itself_in_jupyter(cnn) -> None:
    expl = relprop.explain(cnn, torch.randn(2, 3, 8, 8), target=[[0, 1]], composite="epsilon")
    png = expl._repr_png_()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    fig = expl.plot(samples=1)
    assert len(fig.axes) >= 2  # one panel per target
