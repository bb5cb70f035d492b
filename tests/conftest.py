"""Shared fixtures: deterministic seeds, Quantus, the user registry restored after a test.

Tests read nothing outside the repository. Shared helpers are in helpers.py, shared
assertions in checks.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from types import ModuleType

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def quantus() -> ModuleType:
    import quantus  # a test dependency (pip install quantus); its absence must fail the test

    return quantus


@pytest.fixture
def registry() -> Iterator[ModuleType]:
    """relprop.registry, with every table it keeps put back as it was after the test.

    A test that registers a function or module family otherwise leaks it into every later
    test (one that expects the function unknown then passes or fails by test order)."""
    import relprop.registry as reg

    tables = {name: value for name, value in vars(reg).items() if isinstance(value, dict)
              and not name.startswith("__")}
    saved = {name: dict(table) for name, table in tables.items()}
    yield reg
    for name, table in tables.items():
        table.clear()
        table.update(saved[name])
