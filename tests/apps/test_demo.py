"""The main job: `relprop demo` on the real MNIST digits, offline."""

from __future__ import annotations

import numpy as np
from PIL import Image

from relprop.apps.cli import main
from relprop.apps.datasets import load_mnist
from relprop.apps.zoo import accuracy, mnist_cnn
from relprop.visualize import heatmap


def test_shipped_cnn_classifies_real_digits() -> None:
    x, y = load_mnist("test")
    assert x.shape == (1000, 1, 28, 28) and x.min() >= 0 and x.max() <= 1
    assert accuracy(mnist_cnn(), x, y) > 0.93


def test_demo_writes_a_heatmap_grid_and_a_report(tmp_path, capsys) -> None:
    assert main(["demo", "--out", str(tmp_path), "--n", "3"]) == 0
    out = capsys.readouterr().out
    png = tmp_path / "mnist_heatmaps.png"
    assert str(png.resolve()) in out and "test accuracy" in out
    report = (tmp_path / "report.html").read_text()
    # CNN grid and LSTM grid, all embedded; step 5: a spectrum, a 2x7 cluster grid, 5x3 before/after
    assert report.count("<img") == 3 * 6 + 3 * 2 + 1 + 2 * 7 + 5 * 3
    assert "AOPC" in report and "LSTM" in report
    # step 6: the concepts table links the atlas page written beside the report
    assert "6. concepts: " in out and "href='concepts.html'" in report
    assert (tmp_path / "concepts.html").read_text().count("<h2>Concept ") == 4
    img = np.asarray(Image.open(png).convert("RGB"))
    assert img.shape[0] > 200 and img.shape[1] > 500
    # the heatmaps are coloured: red (positive) pixels are present
    red = (img[..., 0] > 200) & (img[..., 1] < 100) & (img[..., 2] < 100)
    assert red.sum() > 20


def test_heatmap_is_diverging_and_centred() -> None:
    r = np.zeros((4, 4))
    r[0, 0], r[3, 3] = 2.0, -1.0
    rgb = heatmap(r, cmap="bwr")
    assert tuple(rgb[1, 1]) == (255, 255, 255) or rgb[1, 1].min() > 250  # zero is white
    assert rgb[0, 0, 0] > 200 and rgb[0, 0, 2] < 50  # positive is red
    assert rgb[3, 3, 2] > 200 and rgb[3, 3, 0] < 200  # negative is blue (half strength)
    dark = heatmap(r, cmap="coldnhot")
    assert dark[1, 1].max() < 10  # coldnhot: zero is black
