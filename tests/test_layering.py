"""Imports run one way: experiments -> server -> clients -> fl."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FORBIDDEN = {"fl": {"clients", "server", "experiments"}, "clients": {"server", "experiments"},
             "server": {"experiments"}}


def _imported_packages(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_a_layer_never_imports_the_layers_above_it(package):
    offenders = {str(path.relative_to(REPO)): sorted(_imported_packages(path) & FORBIDDEN[package])
                 for path in (REPO / package).rglob("*.py")}
    assert {k: v for k, v in offenders.items() if v} == {}
