"""Meta-tests of the plugin contract: every hook is documented, and every hook has a test."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from charfw import hookspecs

REPO = Path(__file__).resolve().parents[1]


def test_hooks_exist() -> None:
    assert len(hookspecs.HOOK_NAMES) >= 14
    assert all(name.startswith(("register_", "build_", "stage_")) for name in hookspecs.HOOK_NAMES)


@pytest.mark.parametrize("name", hookspecs.HOOK_NAMES)
def test_every_hook_is_documented(name: str) -> None:
    doc = getattr(hookspecs, name).__doc__ or ""
    assert len(doc.strip()) > 40, f"{name} needs a docstring that says when it is called and what to do"
    readme = (REPO / "README.md").read_text()
    assert f"`{hookspecs.hook_signature(name)}`" in readme, f"README's hook table lacks {hookspecs.hook_signature(name)}"


def _test_functions() -> set[str]:
    names = set()
    for path in (REPO / "tests").rglob("test_*.py"):
        tree = ast.parse(path.read_text())
        names |= {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name.startswith("test_")}
    return names


@pytest.mark.parametrize("name", hookspecs.HOOK_NAMES)
def test_every_hook_has_a_test(name: str) -> None:
    assert f"test_hook_{name}" in _test_functions(), f"add a test named test_hook_{name}"


@pytest.mark.parametrize("name", hookspecs.HOOK_NAMES)
def test_every_hook_test_calls_its_hook(name: str) -> None:
    """Each ``test_hook_<hook>`` ran with a recording plugin loaded (tests/conftest.py):
    the hook must have been called during it, not just named in it. Runs after them."""
    from conftest import HOOK_CALLS

    test = f"test_hook_{name}"
    if test not in HOOK_CALLS:
        pytest.skip(f"{test} did not run in this session")
    assert name in HOOK_CALLS[test], f"{test} never called the {name} hook; it called {sorted(set(HOOK_CALLS[test]))}"


def test_registration_hooks_cover_every_component_kind() -> None:
    from charfw.components import KINDS

    assert {hook for _, hook, _ in KINDS.values()} <= set(hookspecs.HOOK_NAMES)
