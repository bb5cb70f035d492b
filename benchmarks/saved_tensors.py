"""How much does autograd keep for the backward pass? relprop vs the plain gradient.

Walks the autograd graph after one forward pass and adds up the distinct
storages each kind of backward node holds. Parameters do not require grad
here, but some backward nodes (addmm) still keep the weight; those are listed
too and are not extra memory.

    python benchmarks/saved_tensors.py [--model vgg16] [--batch 8] [--composite epsilon_gamma_box]
"""

from __future__ import annotations

import argparse
from collections import Counter

import torch
import torchvision

import relprop


def saved_by_node(output: torch.Tensor) -> Counter:
    """MB of distinct saved storages per backward-node type reachable from `output`."""
    seen: set[int] = set()
    per: Counter = Counter()
    stack, visited = [output.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in visited:
            continue
        visited.add(node)
        tensors = []
        if hasattr(node, "saved_tensors"):  # custom autograd Functions
            tensors = [t for t in node.saved_tensors if t is not None]
        for name in dir(node):  # built-in nodes expose _saved_* attributes
            if name.startswith("_saved_"):
                try:
                    value = getattr(node, name)
                except RuntimeError:  # already freed
                    continue
                if isinstance(value, torch.Tensor):
                    tensors.append(value)
        for t in tensors:
            key = t.untyped_storage().data_ptr()
            if key not in seen:
                seen.add(key)
                per[type(node).__name__] += t.untyped_storage().nbytes() / 2**20
        stack.extend(f for f, _ in node.next_functions)
    return per


def show(label: str, per: Counter) -> None:
    parts = ", ".join(f"{k} {v:.0f}" for k, v in per.most_common() if v >= 1)
    print(f"{label}: {sum(per.values()):.0f} MB ({parts})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="vgg16")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--composite", default="epsilon_gamma_box")
    args = p.parse_args()
    torch.manual_seed(0)
    model = getattr(torchvision.models, args.model)(weights=None).eval()
    for param in model.parameters():
        param.requires_grad_(False)
    x = torch.randn(args.batch, 3, 224, 224)
    explainer = relprop.Explainer(model, composite=args.composite, low=-3.0, high=3.0)
    print(f"{args.model}, batch {args.batch}: saved for the backward pass, MB")
    show("gradient", saved_by_node(model(x.clone().requires_grad_())))
    run = explainer.program.run([x.clone().requires_grad_()])
    show(f"relprop {args.composite}", saved_by_node(run.output))


if __name__ == "__main__":
    main()
