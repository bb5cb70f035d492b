"""The package's layout: the library core imports nothing from the application side.

relprop.apps (command line, demo, reports, shipped models and data, loading models by
name) is built on the library; nothing outside it may import it, so the library works,
and imports, without any of it. The one exception is __main__.py, the `python -m relprop`
entry point, which is the command line.
"""

from __future__ import annotations

import ast
from pathlib import Path

import relprop

PACKAGE = Path(relprop.__file__).resolve().parent
APPS = PACKAGE / "apps"
ENTRY_POINTS = {PACKAGE / "__main__.py"}


def _module_parts(path: Path) -> list[str]:
    """relprop/dataset/run.py -> ["relprop", "dataset", "run"] (a package's __init__ is
    the package)."""
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    return parts[:-1] if parts[-1] == "__init__" else parts


def _imported(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in the file, relative ones resolved
    (`from . import apps` counts as relprop.apps)."""
    tree = ast.parse(path.read_text(), str(path))
    package = _module_parts(path)
    if path.name != "__init__.py":
        package = package[:-1]
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.append((node.lineno, module))
            found += [(node.lineno, f"{module}.{alias.name}") for alias in node.names]
    return found


def _core_files() -> list[Path]:
    return [p for p in sorted(PACKAGE.rglob("*.py"))
            if APPS not in p.parents and p not in ENTRY_POINTS]


def test_the_walk_sees_the_core_and_resolves_relative_imports():
    files = _core_files()
    assert PACKAGE / "explain.py" in files and PACKAGE / "dataset" / "run.py" in files
    assert not [p for p in files if APPS in p.parents]
    run = dict((m, n) for n, m in _imported(PACKAGE / "dataset" / "run.py"))
    assert "relprop.explain" in run and "relprop.dataset.images" in run  # `..` and `.`


def test_nothing_outside_apps_imports_apps():
    offenders = [f"{p.relative_to(PACKAGE.parent)}:{line}: {module}"
                 for p in _core_files() for line, module in _imported(p)
                 if module == "relprop.apps" or module.startswith("relprop.apps.")]
    assert not offenders, "the library core imports the application side:\n" + \
        "\n".join(offenders)


def test_importing_relprop_loads_no_application_module():
    import subprocess
    import sys

    code = ("import sys, relprop, relprop.dataset, relprop.evaluate, relprop.visualize; "
            "print(sorted(m for m in sys.modules if m.startswith('relprop.apps')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"


def test_one_progress_bar_for_explain_and_explain_dataset(capsys):
    """explain(progress=True) draws relprop.progress's bar, the one explain_dataset draws
    (tests/apps/test_explain_dataset.py checks its samples/s and ETA there)."""
    import importlib

    import torch
    from torch import nn

    from relprop.progress import Progress

    explain_module = importlib.import_module("relprop.explain")  # relprop.explain: the function
    assert importlib.import_module("relprop.dataset.job").Progress is Progress
    assert not [name for name in vars(explain_module) if "progress" in name.lower()]
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)).eval()
    relprop.explain(model, torch.randn(5, 4), target=0, batch_size=2, progress=True)
    err = capsys.readouterr().err
    assert "explaining 5/5 [" in err and "samples/s, ETA 0:00:00" in err
    assert err.endswith("\n")
