"""The shape of the package: the layers are folders, each imports only the folders below it and the stages never
import each other (import-linter's contracts in pyproject.toml); no module imports another's private name; no
function is over 80 lines."""

from __future__ import annotations

import ast
import re
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


LAYERS = ("base", "imaging", "networks", "scoring", "clinical", "synthetic", "fitting", "stages")  # bottom to top


def test_every_module_lives_in_a_layer_folder_and_the_contracts_name_folders():
    assert sorted(p.name for p in SRC.glob("*.py")) == ["__init__.py", "__main__.py"]
    assert sorted(p.name for p in SRC.iterdir() if p.is_dir() and not p.name.startswith("__")) == sorted(LAYERS)
    contracts = (REPO / "pyproject.toml").read_text().split("[tool.importlinter]")[1]
    named = {name.split(".")[1] for name in re.findall(r"ichpipe\.[a-z_]+[.a-z_*]*", contracts)}
    assert named <= set(LAYERS)  # folders, never a list of modules to keep in step


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
    (tmp_path / "a.py").write_text("from ichpipe.imaging.dicom import _hidden, public\n")  # the check itself can fail
    assert private_imports(tmp_path) == ["a.py -> ichpipe.imaging.dicom: _hidden"]


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
