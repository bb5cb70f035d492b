"""relprop.evaluate.quantus_explain_func: relprop as Quantus' explain_func, scored by a
faithfulness and a robustness metric of Quantus 0.6.0 on the shipped MNIST CNN."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import relprop
import relprop.evaluate as ev
from relprop.apps.datasets import load_mnist
from relprop.apps.zoo import mnist_cnn
from relprop.errors import CompositeError


@pytest.fixture(scope="module")
def digits() -> tuple[torch.nn.Module, np.ndarray, np.ndarray]:
    x, _ = load_mnist("test")
    model = mnist_cnn()
    x = x[:12]
    with torch.no_grad():
        y = model(x).argmax(1)  # explain what the model predicts
    return model, x.numpy(), y.numpy()


NOISE = np.random.default_rng(0)


def random_explain_func(model, inputs, targets, **kwargs) -> np.ndarray:
    """The explanation to beat: fresh noise on every call."""
    return NOISE.random(inputs.shape).astype(np.float32)


def test_numpy_in_numpy_out_as_relprop_explains(digits) -> None:
    model, x, y = digits
    params = {"composite": "epsilon_gamma_box", "low": 0.0, "high": 1.0}
    a = ev.quantus_explain_func(model=model, inputs=x, targets=y, **params)
    assert isinstance(a, np.ndarray) and a.dtype == np.float32 and a.shape == x.shape
    expected = relprop.explain(model, torch.from_numpy(x), torch.from_numpy(y), **params)
    np.testing.assert_array_equal(a, expected.relevance.numpy())
    # one int for every sample, float64 inputs, Quantus' device keyword
    b = ev.quantus_explain_func(model, x[:3].astype(np.float64), 7, device="cpu",
                                composite="epsilon")
    c = relprop.explain(model, torch.from_numpy(x[:3]), 7, composite="epsilon").relevance
    np.testing.assert_allclose(b, c.numpy(), rtol=1e-5, atol=1e-7)


def test_quantus_pixel_flipping_scores_relprop_above_noise(quantus, digits) -> None:
    """Faithfulness: flipping the pixels relprop ranks first hurts the logit faster."""
    model, x, y = digits
    metric = quantus.PixelFlipping(features_in_step=28, perturb_baseline="black",
                                   disable_warnings=True, display_progressbar=False)

    def area(explain_func, **kwargs) -> float:
        curves = metric(model=model, x_batch=x, y_batch=y, a_batch=None, device="cpu",
                        softmax=False, explain_func=explain_func, explain_func_kwargs=kwargs)
        return float(np.mean([np.trapezoid(c) for c in curves]))

    ours = area(ev.quantus_explain_func, composite="epsilon_plus")
    noise = area(random_explain_func)
    assert np.isfinite(ours) and ours < noise - 0.1 * abs(noise)
    # explain_func_kwargs reach relprop: a misspelt composite parameter is named
    with pytest.raises(CompositeError, match="epsilonn"):
        area(ev.quantus_explain_func, composite="epsilon", epsilonn=0.1)


def test_quantus_max_sensitivity_scores_relprop(quantus, digits) -> None:
    """Robustness: relprop's maps barely move under small input noise; noise maps do."""
    model, x, y = digits
    metric = quantus.MaxSensitivity(nr_samples=4, lower_bound=0.02, disable_warnings=True,
                                    display_progressbar=False)

    def scores(explain_func, **kwargs) -> np.ndarray:
        return np.asarray(metric(model=model, x_batch=x, y_batch=y, a_batch=None,
                                 device="cpu", softmax=False, explain_func=explain_func,
                                 explain_func_kwargs=kwargs))

    ours = scores(ev.quantus_explain_func, composite="epsilon_gamma_box", low=0.0, high=1.0)
    noise = scores(random_explain_func)
    assert ours.shape == (len(x),) and np.isfinite(ours).all() and (ours >= 0).all()
    assert ours.mean() < noise.mean()
