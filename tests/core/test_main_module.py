"""`python -m relprop` runs the command line; importing relprop.__main__ runs nothing."""

from __future__ import annotations

import importlib
import subprocess
import sys


def test_importing_the_main_module_runs_nothing(capsys, monkeypatch) -> None:
    monkeypatch.setattr(sys, "argv", ["relprop", "--help"])  # the CLI would print and exit
    sys.modules.pop("relprop.__main__", None)
    module = importlib.import_module("relprop.__main__")
    assert callable(module.main)
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""


def test_python_dash_m_relprop_runs_the_command_line() -> None:
    done = subprocess.run([sys.executable, "-m", "relprop", "--help"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "explain" in done.stdout
