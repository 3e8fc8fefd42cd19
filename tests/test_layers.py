"""The import contracts of pyproject.toml ([tool.importlinter]) hold, and they catch what they are for.

lint-imports runs as a subprocess on the package; the second group of tests breaks a copy of the package
on purpose and checks that the contract concerned fails, naming the import that broke it.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("importlinter", reason="import-linter is in the dev extra")

ROOT = Path(__file__).resolve().parents[1]
TORCH_FREE = "runtime and serve import neither torch nor the training code"
LAYERS = "Layers: each imports only from the layers below it"


def lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    """lint-imports with ``root``'s pyproject.toml on the package in ``root`` (whichever nasxserve is
    installed), one contract per line of output."""
    script = Path(sys.executable).with_name("lint-imports")
    command = str(script) if script.exists() else shutil.which("lint-imports")
    if command is None:
        pytest.skip("lint-imports is not on the PATH")
    path = [str(root), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(path), COLUMNS="400")   # one line per verdict
    return subprocess.run([command, "--no-cache", "--no-logo"], cwd=root, env=env, capture_output=True,
                          text=True, timeout=120)


def verdict(output: str, contract: str) -> str:
    """The line lint-imports printed for ``contract`` (named by the start of its name): KEPT or BROKEN."""
    lines = [line for line in output.splitlines() if line.startswith(contract)]
    assert lines, f"no verdict for {contract!r} in:\n{output}"
    return lines[0]


def test_the_import_contracts_hold():
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "BROKEN" not in result.stdout and "0 broken" in result.stdout


@pytest.fixture
def package_copy(tmp_path: Path) -> Path:
    """A copy of the package and its pyproject.toml, to break."""
    shutil.copytree(ROOT / "nasxserve", tmp_path / "nasxserve", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def _append(path: Path, code: str) -> None:
    path.write_text(path.read_text(encoding="utf-8") + "\n" + code + "\n", encoding="utf-8")


def _breach(package_copy: Path, module: str, code: str, contract: str) -> str:
    """Append ``code`` to ``module`` of the copy; lint-imports must fail with ``contract`` broken. Its output."""
    _append(package_copy / module, code)
    result = lint_imports(package_copy)
    assert result.returncode != 0
    assert verdict(result.stdout, contract).endswith("BROKEN"), result.stdout
    return result.stdout


def test_runtime_importing_torch_breaks_the_torch_free_contract(package_copy: Path):
    out = _breach(package_copy, "nasxserve/runtime/format.py", "import torch  # noqa: E402", TORCH_FREE)
    assert "nasxserve.runtime.format -> torch" in out
    # serve reaches torch through runtime, and is named too
    assert "nasxserve.serve is not allowed to import torch" in out


def test_a_lazy_import_of_training_in_serve_breaks_the_torch_free_contract(package_copy: Path):
    """A function-level import counts: serve may not reach training even where nothing imports it at load."""
    out = _breach(package_copy, "nasxserve/serve/batcher.py",
                  "def _lazy():\n    from nasxserve.training import trainer\n    return trainer", TORCH_FREE)
    assert "nasxserve.serve is not allowed to import nasxserve.training" in out
    assert "nasxserve.serve.batcher -> nasxserve.training.trainer" in out


def test_training_importing_export_breaks_the_layers(package_copy: Path):
    out = _breach(package_copy, "nasxserve/training/hessian.py", "from nasxserve.export import graph  # noqa: E402",
                  LAYERS)
    assert "KEPT" in verdict(out, TORCH_FREE)
    assert "nasxserve.training is not allowed to import nasxserve.export" in out
    assert "nasxserve.training.hessian -> nasxserve.export.graph" in out
