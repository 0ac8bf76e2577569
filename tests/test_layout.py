"""The package's layout holds: every package only looks down, private modules stay behind
their package's ``__all__``, and no import goes around an ``__all__``.

Read from the source with ``ast`` (nothing is guessed from names at run time), over the
gateway itself, the tests, the benchmarks and the dashboard generator. httpx keeps such a
test (``tests/test_exported_members.py``); this one also keeps the layers.
"""

from __future__ import annotations

import ast
import importlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "gateway"

LAYERS: dict[str, int] = {
    # The shared vocabulary: imports nothing of the packages below.
    "gateway.config": 0, "gateway.errors": 0, "gateway.clock": 0, "gateway.events": 0, "gateway.records": 0,
    "gateway.codec": 0, "gateway.signing": 0, "gateway.verify": 0,
    "gateway.store": 1, "gateway.observability": 1,
    "gateway.delivery": 2,
    "gateway.streaming": 3, "gateway.ops": 3,
    "gateway.api": 4,
    # The faces: they may use anything, each other included.
    "gateway.publisher": 5, "gateway.embedded": 5, "gateway.cli": 5, "gateway.__main__": 5, "gateway": 5,
}
"""Each unit of the tree (a package, or a module at the top) and its layer: a unit imports
only from lower layers, or from itself. The top-level modules of the lowest layer, and
the faces of the highest, may also import each other."""

SHARED_LAYERS = (0, 5)


def unit_of(module: str) -> str:
    """The unit a module belongs to: its package under ``gateway``, or itself at the top."""
    parts = module.split(".")
    if len(parts) >= 2 and (PACKAGE / parts[1]).is_dir():
        return ".".join(parts[:2])
    return module if module in LAYERS else ".".join(parts[:2])


def is_module(name: str) -> bool:
    """Whether ``name`` is a module or package of the tree (not an object in one)."""
    where = ROOT.joinpath(*name.split("."))
    return where.with_suffix(".py").is_file() or (where / "__init__.py").is_file()


def module_name(path: Path) -> str:
    relative = path.relative_to(ROOT).with_suffix("")
    parts = list(relative.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


@dataclass(frozen=True)
class Import:
    path: Path
    line: int
    importer: str
    module: str
    """Absolute."""
    names: tuple[str, ...]
    """Empty for ``import module``."""

    def __str__(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}: {self.module} {', '.join(self.names)}".rstrip()


def sources() -> Iterator[Path]:
    for folder in ("gateway", "tests", "bench"):
        yield from sorted((ROOT / folder).rglob("*.py"))
    yield ROOT / "observability" / "grafana" / "dashboard.py"
    yield ROOT / "conftest.py"


def imports() -> Iterator[Import]:
    """Every import of a gateway module, anywhere, made absolute."""
    for path in sources():
        importer = module_name(path)
        package = importer if path.name == "__init__.py" else importer.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[: len(base) - (node.level - 1)]
                    module = ".".join([*base, *([node.module] if node.module else [])])
                else:
                    module = node.module or ""
                if module == "gateway" or module.startswith("gateway."):
                    names = tuple(a.name for a in node.names)
                    submodules = [n for n in names if is_module(f"{module}.{n}")]
                    for name in submodules:  # `from gateway import streaming`: an import of the module
                        yield Import(path, node.lineno, importer, f"{module}.{name}", ())
                    rest = tuple(n for n in names if n not in submodules)
                    if rest or not names:
                        yield Import(path, node.lineno, importer, module, rest)
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name == "gateway" or alias.name.startswith("gateway."):
                        yield Import(path, node.lineno, importer, alias.name, ())


def is_private(module: str) -> bool:
    return any(part.startswith("_") and part != "__main__" for part in module.split("."))


def home(module: str) -> str:
    """The package whose ``__all__`` a private module sits behind."""
    parts = module.split(".")
    first_private = next(i for i, part in enumerate(parts) if part.startswith("_"))
    return ".".join(parts[:first_private])


def test_the_layers_are_known_and_every_module_has_one() -> None:
    units = {unit_of(module_name(p)) for p in PACKAGE.rglob("*.py")}
    assert units == set(LAYERS), f"units without a layer: {sorted(units - set(LAYERS))}"


def test_every_package_only_looks_down() -> None:
    """A package importing one beside it or above it is a loop in the making (the delivery
    side importing the streaming side, the store importing what it serves)."""
    upward = []
    for found in imports():
        if not found.importer.startswith("gateway"):
            continue
        importer, imported = unit_of(found.importer), unit_of(found.module)
        if importer == imported or (LAYERS[importer] == LAYERS[imported] and LAYERS[importer] in SHARED_LAYERS):
            continue
        if LAYERS[imported] >= LAYERS[importer]:
            upward.append(f"{found}  ({importer}, layer {LAYERS[importer]}, imports {imported}, "
                          f"layer {LAYERS[imported]})")
    assert not upward, "imports that do not look down:\n" + "\n".join(upward)


def test_private_modules_are_imported_only_inside_their_package() -> None:
    around = [str(found) for found in imports()
              if is_private(found.module) and not found.importer.startswith(home(found.module) + ".")
              and found.importer != home(found.module)]
    assert not around, "imports of a private module from outside its package:\n" + "\n".join(around)


def test_no_import_goes_around_an_all() -> None:
    """What is imported from a gateway module is in its ``__all__`` (or is a module)."""
    around = []
    for found in imports():
        module = importlib.import_module(found.module)
        exported = set(getattr(module, "__all__", ()))
        for name in found.names:
            if name == "*" or name in exported:
                continue
            around.append(f"{found}: {name} is not in {found.module}.__all__")
    assert not around, "\n".join(around)


@pytest.mark.parametrize("unit", sorted(set(LAYERS) - {"gateway.__main__"}))
def test_every_exported_name_exists_and_is_listed_once(unit: str) -> None:
    module = importlib.import_module(unit)
    exported = list(getattr(module, "__all__", ()))
    assert len(exported) == len(set(exported)), f"{unit}.__all__ repeats a name"
    missing = [name for name in exported if not hasattr(module, name)]
    assert not missing, f"{unit}.__all__ names what it does not have: {missing}"


@pytest.mark.parametrize("package", sorted(u for u in LAYERS if (PACKAGE / u.split(".")[-1]).is_dir()))
def test_a_package_exports_what_its_modules_export_and_nothing_private(package: str) -> None:
    """A name of the package's ``__all__`` is its module's own object, and no ``_name``
    leaks out. (A private module may export more, to the modules beside it only.)"""
    module = importlib.import_module(package)
    folder = PACKAGE / package.split(".")[-1]
    owners: dict[str, ModuleType] = {}
    for path in sorted(folder.glob("_*.py")):
        if path.name != "__init__.py":
            inner = importlib.import_module(f"{package}.{path.stem}")
            owners |= dict.fromkeys(inner.__all__, inner)
    for name in module.__all__:
        assert not name.startswith("_"), f"{package} exports a private name: {name}"
        assert name in owners, f"{package} exports {name}, which none of its modules lists in its __all__"
        assert getattr(module, name) is getattr(owners[name], name)


def test_every_module_of_a_package_is_private() -> None:
    """Inside a package every module is private: the package is the interface."""
    public = [str(p.relative_to(ROOT)) for p in PACKAGE.glob("*/*.py")
              if p.name != "__init__.py" and not p.name.startswith("_")]
    assert not public, f"public modules inside a package: {public}"
