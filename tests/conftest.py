"""Shared fixtures: paths to outside oracles, deterministic seeds."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def shared_dir() -> Path:
    """../shared beside the repository (CI clones main with shared/ next to it)."""
    env = os.environ.get("RELPROP_SHARED")
    return Path(env) if env else REPO.parent / "shared"


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
