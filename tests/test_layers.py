"""Imports only point down the layer order; the order lives in LAYERS, and nowhere else.

Every module of the package is read with ``ast`` (function-level imports included), so a lazy
import against the order fails here as surely as a top-level one.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Lowest first. A module may import its own layer and any layer below it, never one above.
LAYERS = (
    ("root utilities", ("errors", "atomic", "platforms", "settings", "output")),
    ("kernels", ("kernels",)),
    ("models", ("models",)),
    ("engine", ("engine",)),
    ("train", ("train",)),
    ("application", ("pipeline", "report", "serve", "client", "launch", "plan")),
    # Measures the application and everything below it; nothing but the CLI reaches up to it.
    ("benchmarks", ("benchmarks",)),
    ("cli", ("cli", "cliopts", "__main__")),
)
RANK = {name: rank for rank, (_, names) in enumerate(LAYERS) for name in names}
NOT_PACKAGE = {"tests", ".venv", "build", "out"}


def _modules() -> list[Path]:
    """Every module of the package but its root ``__init__`` (a lazy table of names; it imports
    only the root utility ``platforms``)."""
    return sorted(
        path
        for path in ROOT.rglob("*.py")
        if not NOT_PACKAGE & set(path.relative_to(ROOT).parts) and path != ROOT / "__init__.py"
    )


def _layer_of(path: Path) -> str:
    return path.relative_to(ROOT).parts[0].removesuffix(".py")


def _imported_layers(path: Path) -> set[str]:
    """First components below ``dynrules`` of every import in the file (relative ones resolved)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative imports stay inside their own package
                names = [f"dynrules.{_layer_of(path)}"]
            else:
                module = node.module or ""
                names = (
                    [module] if module != "dynrules" else [f"dynrules.{a.name}" for a in node.names]
                )
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "dynrules" and len(parts) > 1:
                found.add(parts[1])
    return found


def test_every_module_has_a_layer():
    unplaced = {_layer_of(p) for p in _modules()} - set(RANK)
    assert not unplaced, f"add these to LAYERS: {sorted(unplaced)}"


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_point_down(path):
    here = _layer_of(path)
    upward = sorted(
        target for target in _imported_layers(path) if RANK.get(target, -1) > RANK[here]
    )
    assert not upward, f"{path.relative_to(ROOT)} ({here}) imports a higher layer: {upward}"


def test_the_checker_sees_a_violation(tmp_path):
    """The checker itself: a lazy upward import inside a function is found."""
    module = tmp_path / "engine" / "x.py"
    module.parent.mkdir()
    module.write_text("def f():\n    from dynrules.train import trainer\n")
    assert _imported_layers(module) == {"train"}


def test_benchmarks_are_checked_and_only_the_cli_reaches_them():
    """benchmarks/ is part of the package: its modules are read like any other, and it ranks
    above every layer it measures and below the CLI that runs it."""
    assert ROOT / "benchmarks" / "rewardmodel.py" in _modules()
    assert RANK["serve"] < RANK["benchmarks"] < RANK["cli"]
