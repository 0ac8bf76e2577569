"""The README's module map ("Where things are") names every module of the package in the
row of its folder, so a newcomer finds each one there and a new module cannot land
without its row; and it answers the four questions a newcomer asked, each with a place
that exists."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def section() -> str:
    readme = (ROOT / "README.md").read_text()
    return readme.split("\n## Where things are\n", 1)[1].split("\n## ", 1)[0]


def module_map() -> set[str]:
    """``folder/module.py`` for every module a row of the map names."""
    named: set[str] = set()
    for line in section().splitlines():
        if line.startswith("| `gateway/"):
            folder, modules = line.split("|")[1:3]
            named |= {folder.strip().strip("`") + name for name in re.findall(r"`(\w+\.py)`", modules)}
    return named


def test_every_module_of_the_package_has_its_row() -> None:
    modules = {str(p.relative_to(ROOT)) for p in (ROOT / "gateway").rglob("*.py")
               if p.name not in ("__init__.py", "__main__.py")}
    listed = module_map()
    assert not modules - listed, f"modules the README's map does not name: {sorted(modules - listed)}"
    assert not listed - modules, f"the README's map names modules that are gone: {sorted(listed - modules)}"


def test_the_four_questions_are_answered_by_places_that_exist() -> None:
    text = section()
    for question, where, name in (
        ("Where is the retry schedule decided?", "gateway/delivery/_retry.py", "next_step"),
        ("Where is the per-endpoint in-flight cap?", "gateway/delivery/_pool.py", "class EndpointPool"),
        ("Where is the SSRF check?", "gateway/delivery/_destinations.py", "def refusal"),
        ("Where does the API check a token?", "gateway/api/_auth.py", "def require_token"),
    ):
        answer = text.split(question, 1)[1].split("\n- **", 1)[0]
        assert f"`{where}`" in answer, question
        assert name in (ROOT / where).read_text(), f"{where} has no {name}"
