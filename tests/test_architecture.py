"""The layout README's architecture section describes is the layout of the code.

README's "Rooms" table names, for each room (a folder of the repository), the rooms it may import. This test
reads that table and every project import of every module (module-level or inside functions), and fails when a
module imports a room its row does not list, when a room has no row, or when a source file outgrows the
600-line limit. So the table cannot drift from the imports, and no arrow can run back up the house.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROJECT = ("ddcore", "transforms", "damm", "drdm", "data_prep", "benchmarks")
ROOMS_SCANNED = (*PROJECT, "label")
MAX_LINES = 600


def _rooms_table() -> dict[str, set[str]]:
    """``{room: rooms it may import}`` from README's table (first column room, last column allowed rooms)."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("### Rooms", 1)[1].split("\n#", 1)[0]
    rooms: dict[str, set[str]] = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 3 or not cells[0].startswith("`"):
            continue
        room = cells[0].strip("`").rstrip("/")
        rooms[room] = {r.rstrip("/") for r in re.findall(r"`([^`]+)`", cells[-1])}
    return rooms


def _room_of(module: str, rooms: dict[str, set[str]]) -> str | None:
    """The most specific room holding a dotted module name (``damm.networks.fusion`` -> ``damm/networks``)."""
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        candidate = "/".join(parts[:n])
        if candidate in rooms:
            return candidate
    return None


def _project_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return {m for m in found if m.split(".")[0] in PROJECT}


def _sources() -> list[Path]:
    return sorted(p for pkg in ROOMS_SCANNED for p in (ROOT / pkg).rglob("*.py"))


def test_readme_table_covers_every_package():
    rooms = _rooms_table()
    assert {"ddcore", "transforms", "damm", "drdm", "data_prep", "benchmarks"} <= set(rooms)
    assert rooms["ddcore"] == set(), "the core imports nothing of the project"
    for room, allowed in rooms.items():
        assert allowed <= set(rooms), f"README rooms table: {room} may import unknown rooms {allowed - set(rooms)}"


@pytest.mark.parametrize("path", _sources(), ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_follow_the_rooms_table(path):
    rooms = _rooms_table()
    module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    own = _room_of(module, rooms)
    assert own is not None, f"{path}: no row for its room in README's rooms table"
    bad = []
    for imported in _project_imports(path):
        target = _room_of(imported, rooms)
        if target is None or not any(target == r or target.startswith(r + "/") for r in {own, *rooms[own]}):
            bad.append(imported)
    assert not bad, f"{path.relative_to(ROOT)} ({own}) imports {sorted(bad)}; README allows {sorted(rooms[own])}"


def test_no_source_file_over_the_limit():
    long = {str(p.relative_to(ROOT)): n for p in _sources() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"files over {MAX_LINES} lines: {long}"


def test_the_rules_catch_a_violation(tmp_path):
    """The checker itself: imports inside functions are found, and modules map to their most specific room."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from damm.tasks import impute\n    import ddcore.atomic\n")
    assert _project_imports(bad) == {"damm.tasks.impute", "ddcore.atomic"}
    rooms = {"ddcore": set(), "damm": {"ddcore"}, "damm/networks": {"ddcore"}}
    assert _room_of("damm.networks.fusion", rooms) == "damm/networks"
    assert _room_of("damm.tasks.impute", rooms) == "damm"
