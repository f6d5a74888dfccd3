"""The package's import boundaries, checked rather than hoped for."""

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "flashsale"
PURE_CORE = ["actors/messages.py", "actors/product.py", "actors/invariants.py"]


def imports_of(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
    return found


def modules_in(folder: str) -> list[Path]:
    return sorted((PACKAGE / folder).rglob("*.py"))


@pytest.mark.parametrize("name", PURE_CORE)
def test_the_pure_core_imports_only_the_standard_library_and_msgspec(name: str) -> None:
    for module in imports_of(PACKAGE / name):
        top = module.split(".")[0]
        allowed = top in sys.stdlib_module_names or top == "msgspec" or module in {
            "flashsale.actors.messages", "flashsale.actors.product"}
        assert allowed, f"{name} imports {module}"


def test_http_does_not_reach_into_the_write_ahead_log() -> None:
    internals = {"flashsale.persistence.wal", "flashsale.persistence.replay",
                 "flashsale.persistence.frames", "asyncpg.copy"}
    for path in modules_in("http"):
        assert not imports_of(path) & internals, path.name


def test_payments_know_nothing_of_ray_or_the_actors() -> None:
    for path in modules_in("payments"):
        for module in imports_of(path):
            assert module.split(".")[0] != "ray", path.name
            assert not module.startswith("flashsale.actors"), path.name


def test_timeouts_use_asyncio_timeout_not_wait_for() -> None:
    """Python 3.11's asyncio.wait_for swallows a cancel that meets the awaited result in the
    same loop iteration; a background task cancelled that way runs on, and stopping it hangs."""
    for path in modules_in("."):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr == "wait_for":
                raise AssertionError(f"{path.relative_to(PACKAGE)} uses wait_for")
