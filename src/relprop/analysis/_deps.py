"""The analysis extras (CoRelAy, scikit-learn, h5py, ViRelAy) are optional: imported when used."""

from __future__ import annotations

import importlib
from types import ModuleType

from ..errors import MissingDependencyError

ANALYSIS_EXTRA = "pip install 'relprop[analysis]'"


def need(module: str) -> ModuleType:
    """Import an analysis dependency, or say in one line how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        top = module.split(".")[0]
        raise MissingDependencyError(f"the analysis needs {top}, which is not installed: "
                                     f"{ANALYSIS_EXTRA}") from exc
