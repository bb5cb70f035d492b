"""A 1-D sequence example: does the LSTM look where the evidence is?

A signal of 40 steps of noise; class 1 sequences carry a short bump (a
half-sine of 6 steps) at a random place, class 0 sequences do not. A small
LSTM learns to detect it; LRP (Arras et al.'s rules) should put the relevance
for "bump" on the bump's time steps. Prints the share of relevance that lands
inside the bump and writes a plot.

    python examples/lstm_sequence_1d.py [--out docs]
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
from torch import nn

import relprop

STEPS, WIDTH = 40, 6


def make_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Signals (n, STEPS, 1), labels (n,), bump start (-1 for class 0)."""
    g = torch.Generator().manual_seed(seed)
    x = 0.3 * torch.randn(n, STEPS, 1, generator=g)
    y = torch.randint(0, 2, (n,), generator=g)
    start = torch.randint(0, STEPS - WIDTH, (n,), generator=g)
    bump = torch.sin(torch.linspace(0, math.pi, WIDTH))
    for i in range(n):
        if y[i] == 1:
            x[i, start[i]:start[i] + WIDTH, 0] += 1.5 * bump
    return x, y, torch.where(y == 1, start, -1)


class Detector(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(1, 16, batch_first=True)
        self.fc = nn.Linear(16, 2)

    def forward(self, x):
        return self.fc(self.lstm(x)[0][:, -1])


def train(seed: int = 0, epochs: int = 25) -> tuple[Detector, float]:
    torch.manual_seed(seed)
    x, y, _ = make_data(2000, seed)
    xt, yt, _ = make_data(500, seed + 1)
    model = Detector()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(epochs):
        for i in range(0, len(x), 100):
            loss = nn.functional.cross_entropy(model(x[i:i + 100]), y[i:i + 100])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        acc = (model(xt).argmax(1) == yt).float().mean().item()
    return model, acc


def bump_share(model: Detector, n: int = 200, seed: int = 2) -> tuple[float, torch.Tensor,
                                                                       torch.Tensor]:
    """Mean share of positive relevance (class 'bump') inside the bump, on class-1 signals."""
    x, y, start = make_data(n, seed)
    keep = y == 1
    x, start = x[keep], start[keep]
    expl = relprop.explain(model, x, target=1, composite="epsilon", bias="distribute")
    rel = expl.relevance[..., 0].clamp(min=0)
    inside = torch.stack([rel[i, s:s + WIDTH].sum() for i, s in enumerate(start.tolist())])
    return (inside / rel.sum(1)).mean().item(), x, expl.relevance[..., 0]


def main(out: Path) -> None:
    model, acc = train()
    share, x, rel = bump_share(model)
    print(f"test accuracy {acc:.3f}; share of positive relevance inside the bump "
          f"{share:.2f} (the bump covers {WIDTH / STEPS:.2f} of the steps)")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 1, figsize=(7, 5), sharex=True)
    for ax, i in zip(axes, range(3), strict=True):
        ax.plot(x[i, :, 0], color="k", lw=1)
        ax.bar(range(STEPS), rel[i] / rel[i].abs().max(), color=["#c00" if v > 0 else "#00c"
                                                              for v in rel[i]], alpha=0.6)
    axes[0].set_title("signal (black) and relevance for 'bump' (bars, scaled)")
    out.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out / "lstm_sequence_1d.png", dpi=100)
    print(f"wrote {out / 'lstm_sequence_1d.png'}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("docs"))
    main(parser.parse_args().out)
