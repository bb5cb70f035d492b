"""How much does autograd keep for the backward pass? relprop vs the plain gradient.

Counts the distinct storages packed by autograd's saved-tensor hooks during one
forward pass (weights the gradient's convolutions keep count too).

    python benchmarks/saved_tensors.py [--model vgg16] [--batch 2] [--composite epsilon_gamma_box]
"""

from __future__ import annotations

import argparse

import torch
import torchvision

import relprop


def saved_mb(fn) -> float:
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values()) / 2**20


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="vgg16")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--composite", default="epsilon_gamma_box")
    args = p.parse_args()
    torch.manual_seed(0)
    model = getattr(torchvision.models, args.model)(weights=None).eval()
    x = torch.randn(args.batch, 3, 224, 224)
    explainer = relprop.Explainer(model, composite=args.composite, low=-3.0, high=3.0)
    gradient = saved_mb(lambda: model(x.clone().requires_grad_()))
    ours = saved_mb(lambda: explainer.program.run([x.clone().requires_grad_()]))
    print(f"{args.model}, batch {args.batch}: saved for backward: gradient {gradient:.0f} MB, "
          f"relprop {args.composite} {ours:.0f} MB")


if __name__ == "__main__":
    main()
