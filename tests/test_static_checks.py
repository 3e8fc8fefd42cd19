"""The linter and the type checker pass on the code base, with the settings of pyproject.toml.

Both run as subprocesses from the repository root, as a developer would run them (docs/development.md).
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_ruff_finds_nothing():
    pytest.importorskip("ruff", reason="ruff is in the dev extra")
    result = _run("ruff", "check", "--no-cache", "nasxserve", "tests", timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.timeout(600)
def test_mypy_finds_nothing():
    """About 30-60 s from scratch; .mypy_cache (git-ignored) makes later runs faster."""
    pytest.importorskip("mypy", reason="mypy is in the dev extra")
    result = _run("mypy", timeout=600)   # files and settings: [tool.mypy]
    assert result.returncode == 0, result.stdout + result.stderr
