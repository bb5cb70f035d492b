"""Checks several test files share: the model left untouched, the ledger's balance."""

from __future__ import annotations

import io
import shutil
import subprocess
from pathlib import Path

import torch
from torch import nn

import relprop


def snapshot(model: nn.Module) -> dict:
    """Everything explaining must leave as it was: bytes, flags, grads, hooks, versions."""
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return {
        "state": buf.getvalue(),
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "grads": [p.grad for p in model.parameters()],
        "training": [m.training for m in model.modules()],
        "hooks": [(dict(m._forward_hooks), dict(m._forward_pre_hooks),
                   dict(m._backward_hooks)) for m in model.modules()],
        "ids": [id(p) for p in model.parameters()],
        "versions": [p._version for p in model.parameters()],
    }


def assert_ledger_accounts_for_biases(expl: relprop.Explanation) -> None:
    """What did not reach the (image) input is exactly what biases and stabilizers took."""
    totals = expl.ledger.totals()
    leaked = expl.explained - expl.relevance.sum((1, 2, 3))
    torch.testing.assert_close(totals["leaked"], leaked, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(totals["bias"] + totals["stabilizer"], leaked, rtol=1e-6,
                               atol=1e-9)


# the presets whose fused fast path is compared with the general (recorded) path
FUSED_CHECK = ("epsilon", "epsilon_gamma_box", "epsilon_alpha2_beta1", "epsilon_plus_flat")


def assert_bias_free_epsilon_conserves(model: nn.Module, x: torch.Tensor) -> None:
    """On a bias-free network the stabilizer is the only leak, and the ledger books it.
    x of scale 10 keeps pre-activations well above the 1e-6 stabilizer."""
    expl = relprop.explain(model, x, composite="epsilon", record=True)
    with torch.no_grad():
        torch.testing.assert_close(expl.output, model(x))  # the model's own values
    assert torch.isfinite(expl.relevance).all()
    total = expl.relevance.sum((1, 2, 3))
    stab = expl.ledger.totals()["stabilizer"]
    torch.testing.assert_close(total + stab, expl.explained, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(total, expl.explained, rtol=1e-4, atol=0.0)


def assert_every_composite_runs(model: nn.Module, x: torch.Tensor,
                                composites: tuple[str, ...] = relprop.PRESETS) -> None:
    """Every preset gives finite, non-zero maps of x's shape; where a fast path exists it
    equals the general path."""
    for composite in composites:
        expl = relprop.explain(model, x, composite=composite, low=-4.0, high=4.0)
        assert expl.relevance.shape == x.shape
        assert torch.isfinite(expl.relevance).all(), composite
        assert expl.relevance.abs().sum() > 0, composite
        if composite in FUSED_CHECK:
            general = relprop.explain(model, x, composite=composite, low=-4.0, high=4.0,
                                      record=True)
            torch.testing.assert_close(expl.relevance, general.relevance, rtol=1e-7,
                                       atol=1e-12, msg=composite)


def chromium_dom(url: str, profile: Path, budget_ms: int = 5000) -> str:
    """The DOM headless Chromium (Debian's, which `make test` installs) renders for `url`."""
    chromium = shutil.which("chromium")
    assert chromium, "Debian's chromium is needed for this test (make test installs it)"
    return subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
         "--no-first-run", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", f"--user-data-dir={profile}", f"--virtual-time-budget={budget_ms}",
         "--dump-dom", url], capture_output=True, text=True, timeout=180).stdout


def images_decoded(page: Path, profile: Path) -> tuple[int, int]:
    """(pictures on a relprop page, pictures the browser decoded): the page's own script
    counts them into data-images-total / data-images-ok."""
    dom = chromium_dom(page.as_uri(), profile)
    total = int(dom.split('data-images-total="')[1].split('"')[0])
    ok = int(dom.split('data-images-ok="')[1].split('"')[0])
    return total, ok
