"""The README's module table ("Where things are") names every module of the package, so a
newcomer finds each one there and a new module cannot land without its row."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def module_table() -> set[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## Where things are\n", 1)[1].split("\n## ", 1)[0]
    names: set[str] = set()
    for line in section.splitlines():
        if line.startswith("| `gateway/"):
            first_column = line.split("|")[1]
            names |= set(re.findall(r"(\w+)\.py", first_column))
    return names


def test_every_module_of_the_package_has_its_row() -> None:
    modules = {p.stem for p in (ROOT / "gateway").glob("*.py")} - {"__init__", "__main__"}
    listed = module_table()
    assert not modules - listed, f"modules the README's table does not name: {sorted(modules - listed)}"
    assert not listed - modules, f"the README's table names modules that are gone: {sorted(listed - modules)}"
