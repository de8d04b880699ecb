"""The shape of the package (issue 21): stages stand on a shared core and never on each other (import-linter's
contracts in pyproject.toml), and no module imports another's private name."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src" / "ichpipe"


def test_the_import_contracts_hold():
    lint = Path(sys.executable).parent / "lint-imports"
    res = subprocess.run([str(lint), "--config", str(REPO / "pyproject.toml")], capture_output=True, text=True,
                         cwd=REPO)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    assert "Contracts: 3 kept, 0 broken." in res.stdout


def private_imports(root: Path) -> list[str]:
    """``module -> other: _name`` for every private name one module of ``root`` imports from another."""
    found = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("ichpipe"):
                found += [f"{path.relative_to(root)} -> {node.module}: {a.name}" for a in node.names
                          if a.name.startswith("_") and not a.name.startswith("__")]
    return found


def test_no_module_imports_a_private_name_of_another(tmp_path):
    assert private_imports(SRC) == []
    (tmp_path / "a.py").write_text("from ichpipe.dicom import _hidden, public\n")  # the check itself can fail
    assert private_imports(tmp_path) == ["a.py -> ichpipe.dicom: _hidden"]


def long_functions(root: Path, limit: int = 80) -> list[str]:
    """``module:function (lines)`` for every function of ``root`` longer than ``limit`` lines."""
    found = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= limit:
                found.append(f"{path.relative_to(root)}:{node.name} ({node.end_lineno - node.lineno + 1})")
    return found


def test_no_function_is_over_80_lines(tmp_path):
    assert long_functions(SRC) == []
    (tmp_path / "a.py").write_text("def f():\n" + "    x = 1\n" * 80)  # the check itself can fail
    assert long_functions(tmp_path) == ["a.py:f (81)"]
