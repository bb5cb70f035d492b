"""Helpers several test files share: the independent answers tests compare relprop with.

Assertions shared across files live in checks.py; fixtures (quantus, the registry
restorer) in conftest.py.
"""

from __future__ import annotations

import torch
from torch import nn

# z-box bounds the reference and oracle tests give relprop and the reference alike
LOW, HIGH = -3.0, 3.0


def grad_x_input(model: nn.Module, x: torch.Tensor, target: int | torch.Tensor) -> torch.Tensor:
    """Gradient x input of the target logit: one class for all, or one per sample.

    LRP-0 on a network of ReLUs, max pooling and linear maps equals it exactly, so it is
    the independent answer for those networks."""
    x = x.clone().requires_grad_()
    out = model(x)
    picked = torch.as_tensor(target, device=out.device).expand(x.shape[0])
    (g,) = torch.autograd.grad(out[torch.arange(x.shape[0]), picked].sum(), x)
    return (g * x).detach()


def rules_for(composite: str, n: int, bias: str | None = None) -> list[dict]:
    """The reference's (tests/reference_lrp.py) rule per weighted layer for a preset.

    n weighted layers, the last one dense. bias: the bias mode the reference applies to
    rules that have one; None leaves the reference's default."""
    b = {} if bias is None else {"bias": bias}
    eps = {"name": "epsilon", "epsilon": 1e-6, **b}
    gam = {"name": "gamma", "gamma": 0.25, **b}
    zp = {"name": "alpha_beta", "alpha": 1.0, "beta": 0.0, **b}
    ab = {"name": "alpha_beta", "alpha": 2.0, "beta": 1.0, **b}
    box = {"name": "zbox", "low": LOW, "high": HIGH}  # the bias cancels in z-box
    flat = {"name": "flat"}  # no bias at all
    uniform = {"lrp0": {"name": "lrp0", **b}, "epsilon": eps, "gamma": gam, "zplus": zp,
               "alpha_beta": ab, "flat": flat, "wsquare": {"name": "wsquare", **b},
               "zbox": box}
    if composite in uniform:
        return [uniform[composite]] * n
    # mixed presets: every layer but the last is a conv layer in the reference tests' models,
    # and gets the composite's conv rule; the first one may get its own
    conv = {"epsilon_gamma_box": gam, "epsilon_plus": zp, "epsilon_alpha2_beta1": ab,
            "epsilon_plus_flat": zp}[composite]
    first = {"epsilon_gamma_box": box, "epsilon_plus_flat": flat}.get(composite, conv)
    return [first] + [conv] * (n - 2) + [eps]
