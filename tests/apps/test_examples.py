"""The shipped recurrent examples run and say something true."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from relprop.apps.datasets import load_mnist
from relprop.apps.zoo import accuracy, mnist_lstm

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def test_mnist_lstm_reads_real_digits(tmp_path) -> None:
    x, y = load_mnist("test")
    assert accuracy(mnist_lstm(), x, y) > 0.9
    path = load("lstm_mnist").main(tmp_path, n=3)
    assert path.exists() and path.stat().st_size > 10_000


def test_lstm_relevance_lands_on_the_evidence() -> None:
    example = load("lstm_sequence_1d")
    model, acc = example.train()
    assert acc > 0.95
    share, _, _ = example.bump_share(model)
    # the bump covers 15% of the time steps; a blind map would put ~15% of relevance there
    assert share > 0.35
