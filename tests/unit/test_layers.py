"""Imports run one way (DESIGN.md): leaves <- schemas <- nats <- eventstore <- security <-
projections <- agents <- core <- cli (security: keys, signatures and the audit trail of the
log, which read the event store). A module importing a layer above its own fails here."""

from __future__ import annotations

import ast
from pathlib import Path

SOURCE = Path(__file__).resolve().parents[2] / "src" / "newfuse"
LEAVES = {"errors", "config", "telemetry", "reliability", "health", "_closing", "_files"}
LAYERS = ["schemas", "nats", "eventstore", "security", "projections", "agents", "core", "cli"]


def layer_of(module: str) -> int | None:
    """0 for leaves, 1.. for the layers in order; None for the package root and __main__."""
    parts = module.split(".")
    if len(parts) < 2:
        return None
    name = parts[1]
    if name in LEAVES:
        return 0
    return LAYERS.index(name) + 1 if name in LAYERS else None


def imports_of(path: Path) -> list[str]:
    found: list[str] = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append(node.module)
        elif isinstance(node, ast.Import):
            found.extend(alias.name for alias in node.names)
    return [name for name in found if name.startswith("newfuse.")]


def test_no_module_imports_a_layer_above_its_own() -> None:
    upward = []
    for path in sorted(SOURCE.rglob("*.py")):
        module = "newfuse." + ".".join(path.relative_to(SOURCE).with_suffix("").parts)
        own = layer_of(module)
        if own is None:
            continue
        for imported in imports_of(path):
            other = layer_of(imported)
            if other is not None and other > own:
                upward.append(f"{module} imports {imported}")
    assert upward == []


def test_every_package_module_is_in_a_known_layer() -> None:
    unknown = [
        path.name
        for path in SOURCE.iterdir()
        if not path.name.startswith("__")
        and path.name != "py.typed"
        and layer_of(f"newfuse.{path.stem}") is None
    ]
    assert unknown == []
