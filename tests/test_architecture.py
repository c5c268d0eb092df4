"""The layout docs/architecture.md describes, checked: imports point one way, no target
name is compared outside qcompile/targets/, no module over 500 lines, onnxscript's public
API only."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import networkx as nx
import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "qcompile"

# Each room may import its own layer and the layers above it in this list, never below.
# (docs/architecture.md has the same table.)
LAYERS: list[set[str]] = [
    {"errors", "clocks", "options", "numerics", "profile"},
    {"ir"},
    {"data"},
    {"calibrate"},
    {"passes"},
    {"quantize"},
    {"lower"},
    {"backends"},
    {"targets"},
    {"driver"},
    {"strategies"},
    {"api", "inspect", "fleet"},
    {"cli", "__init__", "__main__"},
]
LAYER_OF = {room: i for i, rooms in enumerate(LAYERS) for room in rooms}


def _modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def _room(path: Path) -> str:
    rel = path.relative_to(PACKAGE)
    return rel.parts[0].removesuffix(".py")


def _imported_rooms(path: Path) -> set[str]:
    """Rooms of qcompile that `path` imports, at module level or inside functions."""
    rooms = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names: list[str] = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "qcompile" and len(parts) > 1 and parts[1] in LAYER_OF:
                rooms.add(parts[1])
    return rooms


def test_every_room_has_a_layer():
    rooms = {_room(p) for p in _modules()}
    assert rooms <= set(LAYER_OF), f"rooms without a layer: {rooms - set(LAYER_OF)}"


def test_imports_point_one_way():
    wrong = []
    for path in _modules():
        room = _room(path)
        for other in _imported_rooms(path):
            if LAYER_OF[other] > LAYER_OF[room]:
                wrong.append(f"{path.relative_to(PACKAGE)} ({room}) imports {other}")
    assert not wrong, "\n".join(wrong)


def test_no_package_level_import_cycle():
    graph = nx.DiGraph()
    for path in _modules():
        room = _room(path)
        for other in _imported_rooms(path):
            if other != room:
                graph.add_edge(room, other)
    assert list(nx.simple_cycles(graph)) == []


TARGET_NAMES = ("cpu", "gpu", "fpga", "npu")
# `x == "fpga"`, `"fpga" in (...)`, `profile.name != "cpu"`, `match name: case "fpga"`...
_NAMES = "|".join(TARGET_NAMES)
_COMPARE = re.compile(
    rf"""(==|!=|\bin\b|\bcase\b)\s*\(?\s*["']({_NAMES})["']|["']({_NAMES})["']\s*(==|!=)"""
)


def test_no_target_name_branches_outside_targets():
    found = []
    for path in _modules():
        if _room(path) == "targets":
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if _COMPARE.search(line) and "device" not in line:  # TVM's "cpu" device
                found.append(f"{path.relative_to(PACKAGE)}:{number}: {line.strip()}")
    assert not found, "\n".join(found)


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_module_under_500_lines(path: Path):
    assert len(path.read_text().splitlines()) <= 500


def test_onnxscript_public_api_only():
    private = []
    for path in _modules():
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            for name in names:
                parts = name.split(".")
                if parts[0] == "onnxscript" and any(p.startswith("_") for p in parts):
                    private.append(f"{path.relative_to(PACKAGE)}: {name}")
        text = path.read_text()
        private += [
            f"{path.relative_to(PACKAGE)}: {m}"
            for m in re.findall(r"\b(?:rewriter|optimizer)\._\w+", text)
        ]
    assert not private, "\n".join(private)
