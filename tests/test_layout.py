"""Tests mirror the code: each route module `api/routes/X.py` has `tests/api/routes/test_X.py`
and each public store module `registry/store/X.py` has `tests/registry/store/test_X.py`, each of
those defines at least one test, and no test module there mirrors a module that is gone."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MIRRORED = [("api/routes", "tests/api/routes"), ("registry/store", "tests/registry/store")]


def _modules(package: str) -> list[str]:
    """The package's public modules: not `__init__`, not private (`_db`), not `base` (protocols)."""
    return sorted(p.stem for p in (REPO / package).glob("*.py")
                  if not p.stem.startswith("_") and p.stem != "base")  # fmt: skip


def _tests(path: Path) -> list[str]:
    """The test functions a module defines at its top level or in its `Test` classes."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in tree.body:
        body = (
            node.body if isinstance(node, ast.ClassDef) and node.name.startswith("Test") else [node]
        )
        found += [f.name for f in body if isinstance(f, ast.FunctionDef | ast.AsyncFunctionDef)
                  and f.name.startswith("test")]  # fmt: skip
    return found


@pytest.mark.parametrize(("package", "tests"), MIRRORED)
def test_each_module_has_a_test_module_that_defines_tests(package: str, tests: str) -> None:
    modules = _modules(package)
    assert len(modules) >= 5, modules  # the packages were found
    missing = [m for m in modules if not (REPO / tests / f"test_{m}.py").is_file()]
    assert missing == [], f"{package}: no {tests}/test_<module>.py for {missing}"
    empty = [m for m in modules if not _tests(REPO / tests / f"test_{m}.py")]
    assert empty == [], f"{tests}: no test function in the modules for {empty}"
    assert (REPO / tests / "__init__.py").is_file()


@pytest.mark.parametrize(("package", "tests"), MIRRORED)
def test_each_test_module_there_mirrors_a_module(package: str, tests: str) -> None:
    """No test module is left behind by a module renamed or removed (helpers are not tests)."""
    modules = {p.stem for p in (REPO / package).glob("*.py")}
    stray = [p.name for p in sorted((REPO / tests).glob("test_*.py"))
             if p.stem.removeprefix("test_") not in modules]  # fmt: skip
    assert stray == [], f"{tests}: {stray} mirror nothing in {package}"
