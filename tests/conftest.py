"""Shared fixtures: deterministic seeds. Tests read nothing outside the repository."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
