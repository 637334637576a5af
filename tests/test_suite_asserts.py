"""Static checks of the suite itself: every test function asserts something, and pytest's configuration does what
its words say. An ast walk over tests/*.py, no test is run (well under a second)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from waits import ENV, time_factor, wait_s

TESTS = Path(__file__).resolve().parent
# context managers that assert (the block must raise or warn)
ASSERTING_CONTEXTS = {"raises", "warns", "deprecated_call"}


def _name(node: ast.AST) -> str:
    """The last name of a call's target: ``assert_close`` for ``torch.testing.assert_close``."""
    if isinstance(node, ast.Attribute):
        return node.attr
    return node.id if isinstance(node, ast.Name) else ""


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return node.id if isinstance(node, ast.Name) else ""


def _asserts(node: ast.AST, helpers: set[str]) -> bool:
    """Whether ``node`` holds an assert statement, a pytest.raises/warns block, a ``*.testing.*`` call, a call of a
    helper named assert*/check* or of a helper of this module that asserts, or a ``pytest.fail``."""
    for sub in ast.walk(node):
        if isinstance(sub, ast.Assert):
            return True
        context = sub.context_expr if isinstance(sub, ast.withitem) else None
        if isinstance(context, ast.Call) and _name(context.func) in ASSERTING_CONTEXTS:
            return True
        if isinstance(sub, ast.Call):
            name = _name(sub.func).lstrip("_")
            if name.startswith(("assert", "check")) or name in helpers or ".testing." in f".{_dotted(sub.func)}.":
                return True
            if _dotted(sub.func) == "pytest.fail":
                return True
    return False


def _functions(tree: ast.Module) -> list[tuple[str, ast.FunctionDef]]:
    """(qualified name, function) of the module's functions and its classes' methods."""
    out = []
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            out.append((node.name, node))
        elif isinstance(node, ast.ClassDef):
            out += [(f"{node.name}.{n.name}", n) for n in node.body if isinstance(n, ast.FunctionDef)]
    return out


def unasserted_tests(path: Path) -> list[str]:
    """The test functions of ``path`` (``test_*``, at module level or in a class) that assert nothing."""
    functions = _functions(ast.parse(path.read_text(), filename=str(path)))
    helpers: set[str] = set()
    changed = True
    while changed:  # helpers that assert, or call helpers that do
        changed = False
        for _, f in functions:
            name = f.name.lstrip("_")
            if not f.name.startswith("test_") and name not in helpers and _asserts(f, helpers):
                helpers.add(name)
                changed = True
    return [f"{path.name}::{q}" for q, f in functions if f.name.startswith("test_") and not _asserts(f, helpers)]


def test_every_test_function_asserts_something():
    files = sorted(TESTS.glob("test_*.py"))
    assert len(files) > 40
    missing = [name for path in files for name in unasserted_tests(path)]
    assert missing == [], f"tests that assert nothing: {missing}"


def test_the_check_finds_a_test_without_assertions(tmp_path):
    source = """
def _check_sum(x):
    assert sum(x) == 3

def _runs(x):
    return x

def test_plain_assert():
    assert 1

def test_raises():
    with pytest.raises(ValueError):
        int("x")

def test_testing_call():
    torch.testing.assert_close(1.0, 1.0)

def test_helper():
    _check_sum([1, 2])

def test_calls_but_checks_nothing():
    _runs(1)

class TestGroup:
    def test_in_a_class(self):
        print("no check")
"""
    path = tmp_path / "test_sample.py"
    path.write_text(source)
    assert unasserted_tests(path) == ["test_sample.py::test_calls_but_checks_nothing",
                                              "test_sample.py::TestGroup.test_in_a_class"]  # fmt: skip


def test_slow_tests_are_left_out_of_the_default_run_as_the_marker_says(pytestconfig):
    (slow,) = [m for m in pytestconfig.getini("markers") if m.startswith("slow:")]
    assert "excluded from the default run" in slow
    addopts = pytestconfig.getini("addopts")
    assert addopts[addopts.index("-m") + 1] == "not slow"


def test_hard_waits_scale_with_one_factor(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    assert (time_factor(), wait_s(120)) == (1.0, 120.0)
    monkeypatch.setenv(ENV, "2.5")
    assert wait_s(60) == 150.0
    for bad in ("0", "-1", "fast", "nan"):
        monkeypatch.setenv(ENV, bad)
        with pytest.raises(ValueError, match=rf"^{ENV}='{bad}' must be a number > 0 \(e.g. 3 on a slow machine\)$"):
            wait_s(1)
