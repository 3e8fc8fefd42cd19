"""The training package stays in pieces a reader can hold: no module over 400 lines, no function or method
over 60 (from its def line to the last line of its body, docstring included; decorators not counted)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TRAINING = ROOT / "nasxserve" / "training"
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60


def long_functions(path: Path, limit: int) -> list[str]:
    """``name (lines)`` of every function and method in ``path`` longer than ``limit`` lines, nested ones too."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return [f"{node.name} ({node.end_lineno - node.lineno + 1})" for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno is not None and node.end_lineno - node.lineno + 1 > limit]


MODULES = sorted(TRAINING.rglob("*.py"))


def test_the_walk_finds_the_subpackages():
    assert TRAINING / "strategies" / "p_darts.py" in MODULES


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(TRAINING)))
def test_training_modules_and_functions_are_short(path: Path):
    lines = len(path.read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_MODULE_LINES, f"{path.relative_to(ROOT)} has {lines} lines (at most {MAX_MODULE_LINES})"
    assert long_functions(path, MAX_FUNCTION_LINES) == []


def test_a_long_function_is_caught(tmp_path: Path):
    lines = [f"x{i} = {i}" for i in range(59)]
    method = "\n".join("        " + line for line in lines)      # def + 59 lines: at the limit
    function = "\n".join("    " + line for line in lines)        # def + docstring + 59: one over
    path = tmp_path / "m.py"
    path.write_text(f"class C:\n    @staticmethod\n    def ok():\n{method}\n\n\n"
                    f"def long():\n    \"\"\"doc\"\"\"\n{function}\n", encoding="utf-8")
    assert long_functions(path, MAX_FUNCTION_LINES) == ["long (61)"]
