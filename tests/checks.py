"""Checks several test files share: the model left untouched, the ledger's balance."""

from __future__ import annotations

import io

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
