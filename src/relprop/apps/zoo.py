"""Small models that ship with relprop, with their weights (trained here on real data)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

DATA = Path(__file__).parent / "data"
MNIST_WEIGHTS = DATA / "mnist_cnn.pt"
MNIST_LSTM_WEIGHTS = DATA / "mnist_lstm.pt"


class MnistCNN(nn.Module):
    """A small CNN for 28x28 digits in [0, 1]: two conv blocks, two dense layers."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(32 * 7 * 7, 64), nn.ReLU(), nn.Dropout(0.25),
            nn.Linear(64, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def mnist_cnn(weights: Path | str | None = MNIST_WEIGHTS) -> MnistCNN:
    """The demo CNN in eval mode, with the shipped weights (or `weights`)."""
    return _loaded(MnistCNN(), weights)


def _loaded(model: nn.Module, weights: Path | str | None) -> nn.Module:
    if weights is not None:
        model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    return model.eval()


def train_mnist_cnn(epochs: int = 10, seed: int = 0, log=print) -> tuple[MnistCNN, float]:
    """Train the demo CNN on the 4,000 training digits; returns it and its test accuracy."""
    torch.manual_seed(seed)
    return _train(MnistCNN(), epochs, 2e-3, log)


def _train(model: nn.Module, epochs: int, lr: float, log) -> tuple[nn.Module, float]:
    """Adam on the 4,000 MNIST training digits, batch 64; test accuracy after each epoch."""
    from .datasets import load_mnist

    x, y = load_mnist("train")
    xt, yt = load_mnist("test")
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    acc = 0.0
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(x))
        for i in range(0, len(x), 64):
            idx = order[i:i + 64]
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        acc = accuracy(model, xt, yt)
        log(f"epoch {epoch + 1}: loss {loss.item():.3f}, test accuracy {acc:.3f}")
    return model.eval(), acc


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return (model(x).argmax(1) == y).float().mean().item()


class MnistLSTM(nn.Module):
    """Reads a 28x28 digit row by row (28 steps of 28 pixels); classifies the last state."""

    def __init__(self, hidden: int = 64) -> None:
        super().__init__()
        self.lstm = nn.LSTM(28, hidden, batch_first=True)
        self.fc = nn.Linear(hidden, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(x.reshape(x.shape[0], 28, 28))
        return self.fc(out[:, -1])


def mnist_lstm(weights: Path | str | None = MNIST_LSTM_WEIGHTS) -> MnistLSTM:
    """The row-reading LSTM in eval mode, with the shipped weights (or `weights`)."""
    return _loaded(MnistLSTM(), weights)


def train_mnist_lstm(epochs: int = 12, seed: int = 0, log=print) -> tuple[MnistLSTM, float]:
    """Train the row-reading LSTM on the 4,000 training digits; returns it and test accuracy."""
    torch.manual_seed(seed)
    return _train(MnistLSTM(), epochs, 3e-3, log)
