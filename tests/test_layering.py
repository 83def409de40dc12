"""The import arrows of docs/architecture.md point only down; this walks every module's imports with ast."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "switch"

#: layer -> the switch.* layers it may import (besides itself).
ALLOWED: dict[str, set[str]] = {
    "config": set(),
    "_speedups": set(),
    "codec": {"config", "_speedups", "private_files"},
    "ledger": {"config", "_speedups", "private_files"},
    "routing": {"config", "codec"},
    "processing": {"config", "codec", "routing", "ledger", "merchant"},
    "merchant": {"config", "codec", "ledger"},
    "netio": set(),
    "private_files": set(),
    "sim": {"config", "codec", "netio"},
    "server": {"config", "codec", "routing", "ledger", "processing", "sim", "merchant", "netio"},
    "commands": {"*"},
    "cli": {"*"},
    "__main__": {"*"},
    "__init__": set(),
}


def layer_of(path: Path) -> str:
    rel = path.relative_to(PACKAGE)
    return rel.parts[0].removesuffix(".py")


def imported_layers(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return {n.split(".")[1] for n in names if n.startswith("switch.") and n.count(".") >= 1}


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_point_down(path: Path) -> None:
    layer = layer_of(path)
    allowed = ALLOWED.get(layer)
    assert allowed is not None, f"{layer} is not a known layer; add it to ALLOWED and docs/architecture.md"
    if "*" in allowed:
        return
    bad = {name for name in imported_layers(path) if name != layer and name not in allowed}
    assert not bad, f"{path.relative_to(PACKAGE)} ({layer}) imports {sorted(bad)}"


def test_pure_layers_do_not_import_trio() -> None:
    for layer in ("codec", "ledger", "processing", "config", "merchant"):
        root = PACKAGE / layer
        for path in root.rglob("*.py") if root.is_dir() else [PACKAGE / f"{layer}.py"]:
            tree = ast.parse(path.read_text())
            mods = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
            mods |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
            assert not any(m == "trio" or m.startswith("trio.") for m in mods), f"{path} imports trio"
