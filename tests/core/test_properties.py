"""Property-based tests: README claims checked on random tiny models (hypothesis).

The models (tests/strategies.py) are random MLPs and 1-d / 2-d CNNs in float64
with residual adds, torch.cat, BatchNorm with random running statistics,
max / average / adaptive pooling, flatten / view / reshape, ReLU, LeakyReLU,
tanh, sigmoid, SiLU, GELU, dropout, biases on and off and a layer used twice,
each built both as a composition of modules and as functional code. Only the
public API is used (relprop.explain, relprop.Explainer).

The default run is derandomized (the same examples every time) and takes a few
seconds per test. For a deeper search with fresh random examples:

    RELPROP_HYPOTHESIS_EXAMPLES=2000 OMP_NUM_THREADS=1 .venv/bin/python -m pytest -q \
        tests/core/test_properties.py

(every test then runs that many examples; the all-presets test, which explains
each example 28 times, a tenth of them). A failure prints the shrunk model as
functional code (the `note` lines) and a `@reproduce_failure` blob.
"""

from __future__ import annotations

import os
import random

import pytest
import torch
from checks import snapshot
from helpers import grad_x_input
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st
from strategies import ACTIVATIONS, PIECEWISE_LINEAR, ModelSpec, model_specs

import relprop

_ENV = os.environ.get("RELPROP_HYPOTHESIS_EXAMPLES")


def examples(default: int, cost: int = 1) -> settings:
    """`default` examples, or RELPROP_HYPOTHESIS_EXAMPLES // cost when that is set."""
    n = max(1, int(_ENV) // cost) if _ENV else default
    return settings(max_examples=n, deadline=None, database=None, derandomize=_ENV is None,
                    print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.function_scoped_fixture])


FORMS = st.sampled_from(("module", "functional"))
TARGETS = st.none() | st.integers(0, 3)
BIAS_MODES = ("absorb", "ignore", "distribute")
# Activations whose output is neither 0 nor vanishingly small unless their input is: not
# ReLU (0 on half the line), not GELU (exactly 0 below about -8.3 in float64), not sigmoid
# or SiLU (1e-12 and less at inputs below about -27, within reach of these models).
NEVER_ZERO = ("leaky_relu", "tanh")
# Activations with f(0) = 0: relevance never lands on a zero-valued unit.
ZERO_AT_ZERO = tuple(a for a in ACTIVATIONS if a != "sigmoid")
# tiny epsilon and sum stabilizer: what they absorb is far below the 1e-6 checked
TINY = {"epsilon": 1e-12, "stabilizer": 1e-12}


def setup(spec: ModelSpec, form: str, target: int | None):
    note(f"form={form}, target={target}\n{spec.code()}")
    model = spec.build(form)
    x = spec.make_input()
    return model, x, None if target is None else target % spec.n_out


def per_sample(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1).sum(1)


def abs_per_sample(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1).abs().sum(1)


def assert_close_to_scale(got: torch.Tensor, expected: torch.Tensor, scale: float | torch.Tensor,
                          rel: float, what: str) -> None:
    """|got - expected| <= rel * scale, elementwise (scale: a number or per element)."""
    err = (got - expected).abs()
    bound = rel * torch.as_tensor(scale, dtype=err.dtype)
    assert (err <= bound).all(), (
        f"{what}: max |difference| {err.max().item():.3g}, allowed {bound.max().item():.3g}"
        f"\n got      {got.flatten()[:8].tolist()}\n expected {expected.flatten()[:8].tolist()}")


def assert_conserved(expl, what: str) -> None:
    """Per sample: input relevance sums to the explained output, to 1e-6 relative, plus
    float64 rounding of the sum itself and 1e-9 absolute: a stabilizer of 1e-12 takes up
    to 1e-12 per unit of c = R / z at each layer, which is not small next to an explained
    output of 1e-10 (the output layer's own stabilizer, where c = 1, already is)."""
    total = per_sample(expl.relevance)
    err = (total - expl.explained).abs()
    bound = 1e-6 * expl.explained.abs() + 1e-10 * abs_per_sample(expl.relevance) + 1e-9
    totals = {k: v.tolist() for k, v in expl.ledger.totals().items()}
    assert (err <= bound).all(), (
        f"{what}: not conserved: input relevance sums {total.tolist()}, explained "
        f"{expl.explained.tolist()} (|difference| {err.tolist()}); ledger totals {totals}")


def ledger_scale(expl) -> torch.Tensor:
    """Per sample: the relevance that moved through the ledger's nodes (rounding scale)."""
    scale = expl.explained.abs() + abs_per_sample(expl.relevance)
    for e in expl.ledger:
        scale = scale + e.relevance_in.abs() + e.relevance_out.abs()
    return scale


# ------------------------------------------------------------------ every preset


@examples(6, cost=10)
@given(spec=model_specs(), form=FORMS, target=TARGETS)
def test_every_preset_is_finite_and_recording_changes_nothing(spec, form, target) -> None:
    """Every preset gives finite relevance shaped like x; record=True gives the same
    relevance as the fast path; the explained output is the output at the target."""
    model, x, t = setup(spec, form, target)
    low, high = spec.bounds(x)
    out = model(x).detach()
    for preset in relprop.PRESETS:
        ex = relprop.Explainer(model, preset, low=low, high=high)
        fast = ex(x, t)
        rec = ex(x, t, record=True)
        for name, e in (("record=False", fast), ("record=True", rec)):
            assert e.relevance.shape == x.shape, (preset, name)
            assert torch.isfinite(e.relevance).all(), f"{preset} {name}: non-finite relevance"
        assert torch.equal(rec.target, fast.target)
        torch.testing.assert_close(fast.explained, out[torch.arange(len(x)), fast.target],
                                   rtol=1e-12, atol=0.0)
        scale = fast.relevance.abs().max() + fast.explained.abs().max()
        assert_close_to_scale(rec.relevance, fast.relevance, scale, 1e-9,
                              f"{preset}: record=True vs record=False")


# ------------------------------------------------------------------ LRP-0


@examples(25)
@given(spec=model_specs(acts=PIECEWISE_LINEAR), form=FORMS, target=TARGETS)
def test_lrp0_is_gradient_times_input_on_piecewise_linear_nets(spec, form, target) -> None:
    """README: LRP-0 on ReLU nets is gradient x input (biases absorbed, sums and average
    pooling unstabilised, max pooling winner-takes-all, BatchNorm folded or affine)."""
    model, x, t = setup(spec, form, target)
    expl = relprop.explain(model, x, t, composite="lrp0")
    ref = grad_x_input(model, x, expl.target)
    scale = ref.abs().max() + expl.explained.abs().max()
    assert_close_to_scale(expl.relevance, ref, scale, 1e-9, "lrp0 vs gradient x input")


# ------------------------------------------------------------------ conservation


@examples(25)
@given(spec=model_specs(bias="none", acts=ZERO_AT_ZERO), form=FORMS, target=TARGETS)
def test_bias_free_epsilon_conserves(spec, form, target) -> None:
    """No bias anywhere (BatchNorm: running mean 0, bias 0): epsilon hands the explained
    output to the input in full, less what the (tiny) stabilizers absorb; identity rules
    (tanh, SiLU, GELU) pass relevance on unchanged. (Sigmoid is left out here: sigmoid(0)
    = 1/2 puts relevance on a bias-free unit whose inputs are all 0, which the epsilon
    rule can only hand to its stabilizer; the next test checks that this is booked.)"""
    model, x, t = setup(spec, form, target)
    expl = relprop.explain(model, x, t, composite="epsilon", record=True, **TINY)
    assert_conserved(expl, "bias-free epsilon")


@examples(20)
@given(spec=model_specs(bias="none"), form=FORMS, target=TARGETS)
def test_bias_free_epsilon_books_every_loss_as_stabilizer(spec, form, target) -> None:
    """Bias-free nets with every activation (sigmoid included): the ledger books nothing as
    bias, and what the input does not receive is what the stabilizers absorbed."""
    model, x, t = setup(spec, form, target)
    expl = relprop.explain(model, x, t, composite="epsilon", record=True, **TINY)
    totals = expl.ledger.totals()
    assert (totals["bias"] == 0).all(), totals["bias"]
    assert_close_to_scale(per_sample(expl.relevance) + totals["stabilizer"], expl.explained,
                          ledger_scale(expl), 1e-9, "input + stabilizer vs explained")


@examples(25)
@given(spec=model_specs(bias="all"), form=FORMS, target=TARGETS)
def test_bias_distribute_conserves(spec, form, target) -> None:
    """README: bias="distribute" (each of the n inputs gets b_j / n) conserves: on biased
    nets with pooling, residuals, concatenation, BatchNorm and every activation, the
    input relevance sums to the explained output per sample."""
    model, x, t = setup(spec, form, target)
    expl = relprop.explain(model, x, t, composite="epsilon", bias="distribute", record=True,
                           **TINY)
    assert_conserved(expl, 'bias="distribute"')
    assert (expl.ledger.totals()["bias"] == 0).all()


@examples(20)
@given(spec=model_specs(bias="all", acts=NEVER_ZERO, zero_inputs=False),
       form=FORMS, target=TARGETS)
def test_bias_ignore_conserves(spec, form, target) -> None:
    """README: bias="ignore" (bias left out of the denominator) conserves except at a unit
    whose inputs are all zero (z = b): it has nowhere to send its relevance, and the
    stabilizer takes it (next test). The same holds, in part, where the inputs' share
    z - b is as small as the epsilon (1e-12 here). So the models here have no exact or
    vanishing zeros: no zero inputs, only LeakyReLU and tanh."""
    model, x, t = setup(spec, form, target)
    expl = relprop.explain(model, x, t, composite="epsilon", bias="ignore", record=True,
                           **TINY)
    assert_conserved(expl, 'bias="ignore"')


@examples(20)
@given(spec=model_specs(bias="all"), form=FORMS, target=TARGETS)
def test_bias_ignore_books_every_loss_as_stabilizer(spec, form, target) -> None:
    """bias="ignore" on any biased net: nothing is absorbed by biases; what the input does
    not receive is what the stabilizers absorbed (nothing is lost unbooked)."""
    model, x, t = setup(spec, form, target)
    expl = relprop.explain(model, x, t, composite="epsilon", bias="ignore", record=True,
                           **TINY)
    totals = expl.ledger.totals()
    assert (totals["bias"] == 0).all(), totals["bias"]
    assert_close_to_scale(per_sample(expl.relevance) + totals["stabilizer"], expl.explained,
                          ledger_scale(expl), 1e-9, "input + stabilizer vs explained")


# ------------------------------------------------------------------ the ledger


@examples(30)
@given(spec=model_specs(), form=FORMS, target=TARGETS,
       preset=st.sampled_from(relprop.PRESETS), bias=st.sampled_from(BIAS_MODES))
def test_ledger_balances(spec, form, target, preset, bias) -> None:
    """What left the output and did not reach the input is exactly what the nodes leaked;
    the ledger's totals are the explanation's; bias="ignore"/"distribute" leak nothing
    to biases."""
    model, x, t = setup(spec, form, target)
    note(f"preset={preset}, bias={bias}")
    low, high = spec.bounds(x)
    expl = relprop.explain(model, x, t, composite=preset, bias=bias, low=low, high=high,
                           record=True)
    ledger = expl.ledger
    at_input = per_sample(expl.relevance)
    scale = ledger_scale(expl)
    assert torch.equal(ledger.explained, expl.explained)
    assert_close_to_scale(ledger.at_input, at_input, scale, 1e-12, "ledger.at_input")
    totals = ledger.totals()
    assert_close_to_scale(expl.explained - at_input, totals["leaked"], scale, 1e-9,
                          "explained - at input vs leaked")
    first = next(iter(expl.layers.values()))  # the input node's map comes first
    torch.testing.assert_close(first, expl.relevance, rtol=1e-12, atol=0.0)
    if bias != "absorb":
        assert (totals["bias"] == 0).all(), totals["bias"]


# ------------------------------------------------------------------ model untouched


@examples(15)
@given(spec=model_specs(), form=FORMS, target=TARGETS, preset=st.sampled_from(relprop.PRESETS),
       modes=st.integers(0, 2**16))
def test_model_is_untouched_and_modes_do_not_matter(spec, form, target, preset, modes) -> None:
    """README: the model is never modified (parameters, buffers, requires_grad, train/eval
    flags, hooks), also after calls that fail; explanations use inference semantics
    whatever mode the model is in; the user's hooks never fire."""
    model, x, t = setup(spec, form, target)
    low, high = spec.bounds(x)
    reference = relprop.explain(model, x, t, composite=preset, low=low, high=high).relevance
    rng = random.Random(modes)
    for m in model.modules():  # mixed train/eval flags, some frozen parameters
        m.training = rng.random() < 0.5
    for p in model.parameters():
        p.requires_grad_(rng.random() < 0.7)
    calls: list[str] = []
    for name, m in model.named_modules():
        m.register_forward_hook(lambda *a, _n=name: calls.append(f"forward hook {_n!r}"))
        m.register_forward_pre_hook(lambda *a, _n=name: calls.append(f"pre-hook {_n!r}"))
    note(f"training flags {[m.training for m in model.modules()]}")
    before = snapshot(model)

    ex = relprop.Explainer(model, preset, low=low, high=high)
    got = ex(x, t)
    assert torch.equal(got.relevance, reference), "mode changed the explanation"
    ex(x, [[0, spec.n_out - 1]], record=True)  # two classes for every sample
    relprop.explain(model, x, t, composite=preset, low=low, high=high, batch_size=1)
    with pytest.raises(relprop.TargetError):
        ex(x, spec.n_out)
    with pytest.raises(relprop.TargetError):
        relprop.explain(model, x, torch.zeros(len(x) + 1, dtype=torch.long),
                        composite=preset, low=low, high=high)
    wrong = torch.randn((x.shape[0], x.shape[1] + 1, *x.shape[2:]), dtype=x.dtype)
    with pytest.raises(Exception):  # noqa: B017 - any error; the model must survive it
        ex(wrong, t)
    bad = x.clone()
    bad.view(-1)[0] = float("nan")
    with pytest.raises(relprop.InputError):
        ex(bad, t)

    after = snapshot(model)
    for key in before:
        assert before[key] == after[key], f"model changed: {key}"
    assert calls == [], calls[:4]


# ------------------------------------------------------------------ determinism, twins


@examples(20)
@given(spec=model_specs(), form=FORMS, target=TARGETS, preset=st.sampled_from(relprop.PRESETS))
def test_explaining_twice_gives_identical_relevance(spec, form, target, preset) -> None:
    model, x, t = setup(spec, form, target)
    low, high = spec.bounds(x)
    ex = relprop.Explainer(model, preset, low=low, high=high)
    first = ex(x, t).relevance
    assert torch.equal(ex(x, t).relevance, first)
    assert torch.equal(relprop.Explainer(model, preset, low=low, high=high)(x, t).relevance,
                       first)
    rec = ex(x, t, record=True)
    assert torch.equal(ex(x, t, record=True).relevance, rec.relevance)


@examples(20)
@given(spec=model_specs(), target=TARGETS, preset=st.sampled_from(relprop.PRESETS))
def test_module_and_functional_forms_give_identical_relevance(spec, target, preset) -> None:
    """README: module and functional forms are one node and give identical relevance."""
    modules, x, t = setup(spec, "module", target)
    functional = spec.build("functional")
    low, high = spec.bounds(x)
    assert torch.equal(modules(x), functional(x))
    a = relprop.explain(modules, x, t, composite=preset, low=low, high=high)
    b = relprop.explain(functional, x, t, composite=preset, low=low, high=high)
    assert torch.equal(a.relevance, b.relevance), (a.relevance - b.relevance).abs().max()
