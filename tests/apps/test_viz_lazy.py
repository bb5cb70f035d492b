"""Pictures are optional and polite: `import relprop` needs neither matplotlib nor Pillow,
a picture without them says how to install them, and drawing never changes the caller's
matplotlib backend. An Explanation draws itself (the grid Jupyter shows)."""

from __future__ import annotations

import io
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

import relprop
from relprop.apps.zoo import mnist_lstm
from relprop.visualize import explanation_figure, explanation_png

ROOT = Path(__file__).resolve().parents[2]


def run_python(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_no_pictures_needed_and_the_callers_backend_kept() -> None:
    """One fresh interpreter: first without matplotlib and Pillow, then with them."""
    out = run_python("""
        import sys
        sys.modules["matplotlib"] = None  # as if not installed: importing it fails
        sys.modules["PIL"] = None
        import torch, relprop, relprop.visualize, relprop.evaluate, relprop.apps.loading
        model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.Flatten())
        expl = relprop.explain(model, torch.randn(2, 1, 5, 5), composite="epsilon")
        print("explained", tuple(expl.relevance.shape))
        for draw in (lambda: relprop.visualize.heatmap(torch.ones(3, 4, 4)),
                     lambda: relprop.visualize.explanation_png(expl)):
            try:
                draw()
            except ImportError as exc:
                print("refused:", exc)
        del sys.modules["matplotlib"], sys.modules["PIL"]  # now installed
        import matplotlib
        matplotlib.use("svg")  # the user's choice
        from relprop import visualize as v
        png = v.explanation_png(expl)
        v.save_grid([[v.heatmap(torch.randn(4, 4))]], "/dev/null")
        print("png", png[:4] == b"\\x89PNG", "backend", matplotlib.get_backend(),
              "pyplot", "matplotlib.pyplot" in sys.modules)
    """)
    assert "explained (2, 1, 5, 5)" in out
    assert out.count("refused:") == 2 and "pip install 'relprop[viz]'" in out
    assert "png True backend svg pyplot False" in out


def test_pictures_are_an_extra_not_a_dependency() -> None:
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    runtime = " ".join(meta["dependencies"]).lower()
    assert "torch" in runtime and "numpy" in runtime
    assert "matplotlib" not in runtime and "pillow" not in runtime
    viz = " ".join(meta["optional-dependencies"]["viz"]).lower()
    assert "matplotlib" in viz and "pillow" in viz
    # `make setup` installs .[test,demo]: both bring the pictures
    for extra in ("demo", "test"):
        assert "relprop[viz]" in meta["optional-dependencies"][extra]


def decode(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def red_pixels(img: np.ndarray) -> int:
    return int(((img[..., 0] > 200) & (img[..., 1] < 80) & (img[..., 2] < 80)).sum())


def test_explanation_png_grid_of_images_and_targets() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 8 * 8, 5)).eval()
    x = torch.rand(3, 3, 8, 8)
    one = decode(explanation_png(relprop.explain(model, x, composite="epsilon")))
    three = relprop.explain(model, x, target=torch.tensor([[0, 1, 2]]), composite="epsilon")
    grid = decode(explanation_png(three))
    assert grid.shape[0] == one.shape[0]  # a row per sample
    assert grid.shape[1] > 2.5 * one.shape[1]  # a column per target
    assert red_pixels(grid) > 50  # heatmaps in colour, not blank
    fig = explanation_figure(three, samples=2, class_names=["cat", "dog", "owl", "a", "b"])
    assert len(fig.axes) == 2 * 3
    assert fig.axes[1].get_title().startswith("1 dog")  # class and name in the title


def test_explanation_png_for_sequences_and_vectors() -> None:
    torch.manual_seed(0)
    lstm = mnist_lstm()
    seq = relprop.explain(lstm, torch.rand(2, 28, 28), composite="epsilon")
    fig = explanation_figure(seq)
    assert len(fig.axes) == 2 and all(ax.images for ax in fig.axes)  # time x feature maps
    dense = relprop.explain(nn.Linear(6, 3), torch.randn(2, 6), composite="epsilon")
    fig = explanation_figure(dense)
    assert len(fig.axes) == 2 and len(fig.axes[0].patches) == 6  # one bar per feature
    assert decode(explanation_png(dense)).shape[0] > 100
