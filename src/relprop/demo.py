"""`relprop demo`: real digits, a shipped CNN, heatmaps from several composites."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from .datasets import load_mnist
from .explain import Explainer
from .visualize import heatmap, save_grid
from .zoo import accuracy, mnist_cnn, train_mnist_cnn

COMPOSITES = ["lrp0", "epsilon", "epsilon_plus", "epsilon_gamma_box", "epsilon_alpha2_beta1"]


def run_demo(out: Path, n: int = 8, retrain: bool = False) -> Path:
    start = time.perf_counter()
    x, y = load_mnist("test")
    if retrain:
        model, _ = train_mnist_cnn()
    else:
        model = mnist_cnn()
    print(f"MNIST CNN: test accuracy {accuracy(model, x, y):.3f} on {len(x)} real digits")
    images, labels = x[:n], y[:n]
    rows = [[img[0].numpy()] for img in images]
    for name in COMPOSITES:
        explainer = Explainer(model, composite=name, low=0.0, high=1.0)  # pixels in [0, 1]
        expl = explainer(images, record=True)
        totals = expl.ledger.totals()
        kept = (expl.relevance.sum((1, 2, 3)) / expl.explained).mean().item()
        print(f"{name:>22}: input relevance / logit = {kept:.3f} "
              f"(bias took {totals['bias'].mean().item():+.3f}, "
              f"stabilisers {totals['stabiliser'].mean().item():+.1e} on average)")
        for row, rel in zip(rows, expl.relevance, strict=True):
            row.append(heatmap(rel, cmap="bwr"))
    predicted = expl.target
    titles = [f"label {int(t)}, pred {int(p)}" for t, p in zip(labels, predicted, strict=True)]
    path = save_grid(rows, Path(out) / "mnist_heatmaps.png", col_titles=["input", *COMPOSITES],
                     row_titles=titles)
    print(f"wrote {path.resolve()} in {time.perf_counter() - start:.1f} s")
    return path


if __name__ == "__main__":  # pragma: no cover
    torch.set_num_threads(2)
    run_demo(Path("relprop-out"))
