"""No code outside the pynetdicom seam touches a private part of a third-party package.

An AST scan of ``pacs/`` and ``adapters/`` (docs/architecture.md, "pynetdicom's
internals"):

(a) ``obj._name`` where ``obj`` is not ``self`` / ``cls`` and ``_name`` is not a private
    name the project's own code defines (``self._name = …``, ``def _name``, a class
    attribute or a module-level name outside the seam);
(b) imports of private modules or private names of third-party packages
    (``from pynetdicom import _config``, ``import pynetdicom._globals``,
    ``from pynetdicom.x import _y``);
(c) classes that subclass a pynetdicom class and define, call or read a member whose
    name starts with ``_`` that exists on the pynetdicom base.

All three are allowed only under ``pacs/dimse/seam/``, the one place that knows which
pynetdicom version it was written for (:data:`pacs.dimse.seam.SUPPORTED_VERSIONS`).
Names defined inside the seam do not count as the project's own: the seam defines them
on pynetdicom's objects.
"""

from __future__ import annotations

import ast
import importlib
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("pacs", "adapters")
#: Where private parts of pynetdicom may be used.
SEAM = ROOT / "pacs" / "dimse" / "seam"
#: First-party top-level packages: their private names are the project's business.
FIRST_PARTY = {"pacs", "adapters", "tests"}
#: Documented members of the standard library whose names start with "_".
STDLIB_DOCUMENTED = {"_exit", "_getframe", "_current_frames", "_asdict", "_replace",
                     "_fields", "_make", "_field_defaults"}

#: Private attributes the project itself sets on objects of others (not a third
#: party's private part), with where and why.
PROJECT_MARKERS = {
    "_redacted": "pacs/core/logs.py: set on a LogRecord the filter has already rewritten",
}

#: Files outside the seam allowed a third-party private access while a change that
#: removes it is under way: path -> what is left.  Empty: none is left (pydicom's
#: ``Dataset._dict``, minio's ``_build_headers`` and gunicorn's
#: ``_expected_100_continue`` are gone); an entry is a debt, never a permission.
KNOWN_ELSEWHERE: dict[str, str] = {}


@dataclass(frozen=True)
class Finding:
    """One private access outside the seam."""

    path: str
    line: int
    what: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.what}"


def _files() -> list[Path]:
    return sorted(p for package in PACKAGES for p in (ROOT / package).rglob("*.py"))


def _in_seam(path: Path) -> bool:
    return SEAM in path.parents


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _trees() -> dict[Path, ast.Module]:
    return {path: ast.parse(path.read_text(), str(path)) for path in _files()}


TREES = _trees()


def _defined_names(tree: ast.Module) -> Iterator[str]:
    """Private names a module defines: functions, classes, module-level and class-level
    names, and attributes assigned on ``self`` / ``cls``."""
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            yield node.name
        elif isinstance(node, ast.Assign | ast.AnnAssign | ast.AugAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                for element in ast.walk(target):
                    if isinstance(element, ast.Name):
                        yield element.id
                    elif (isinstance(element, ast.Attribute)
                          and isinstance(element.value, ast.Name)
                          and element.value.id in ("self", "cls")):
                        yield element.attr
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in \
                FIRST_PARTY:
            yield from (alias.asname or alias.name for alias in node.names)


#: Private names the project's own code (outside the seam) defines.
OWN = {name for path, tree in TREES.items() if not _in_seam(path)
       for name in _defined_names(tree) if _private(name)}


def _third_party(module: str) -> bool:
    top = module.split(".")[0]
    return bool(top) and top not in FIRST_PARTY and top not in sys.stdlib_module_names


def private_imports(tree: ast.Module) -> Iterator[tuple[int, str]]:
    """(b): private modules or names imported from third-party packages."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if _third_party(alias.name) and any(_private(part)
                                                    for part in alias.name.split(".")):
                    yield node.lineno, f"import {alias.name}"
        elif isinstance(node, ast.ImportFrom) and not node.level:
            module = node.module or ""
            if not _third_party(module):
                continue
            if any(_private(part) for part in module.split(".")):
                yield node.lineno, f"from {module} import …"
                continue
            for alias in node.names:
                if _private(alias.name):
                    yield node.lineno, f"from {module} import {alias.name}"


def private_attributes(tree: ast.Module) -> Iterator[tuple[int, str]]:
    """(a): ``obj._name`` on anything but ``self`` / ``cls``, for a name the project
    does not define."""
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute) or not _private(node.attr):
            continue
        if isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"):
            continue
        if node.attr in OWN or node.attr in STDLIB_DOCUMENTED or node.attr in PROJECT_MARKERS:
            continue
        yield node.lineno, f"{ast.unparse(node.value)}.{node.attr}"


def _pynetdicom_names(tree: ast.Module) -> dict[str, str]:
    """Local name -> 'module:Name' for every name imported from pynetdicom."""
    found = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == \
                "pynetdicom":
            for alias in node.names:
                found[alias.asname or alias.name] = f"{node.module}:{alias.name}"
    return found


def _resolve(reference: str) -> object | None:
    module, _, name = reference.partition(":")
    try:
        return getattr(importlib.import_module(module), name, None)
    except ImportError:
        return None


def _members_used(cls: ast.ClassDef) -> Iterator[tuple[int, str]]:
    """Private names a class defines, or uses on ``self`` / ``super()``."""
    for node in cls.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            yield node.lineno, node.name
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                if isinstance(target, ast.Name):
                    yield node.lineno, target.id
    for node in ast.walk(cls):
        if not isinstance(node, ast.Attribute):
            continue
        owner = node.value
        if (isinstance(owner, ast.Name) and owner.id in ("self", "cls")) or (
                isinstance(owner, ast.Call) and isinstance(owner.func, ast.Name)
                and owner.func.id == "super"):
            yield node.lineno, node.attr


def private_overrides(tree: ast.Module) -> Iterator[tuple[int, str]]:
    """(c): members of a pynetdicom base class defined or used by a subclass."""
    imported = _pynetdicom_names(tree)
    for node in ast.walk(tree):
        if not isinstance(node, ast.ClassDef):
            continue
        bases = [_resolve(imported[base.id]) for base in node.bases
                 if isinstance(base, ast.Name) and base.id in imported]
        bases = [base for base in bases if isinstance(base, type)]
        for line, name in _members_used(node):
            if _private(name) and any(hasattr(base, name) for base in bases):
                yield line, f"{node.name}.{name} (on pynetdicom's {bases[0].__name__})"


def findings() -> list[Finding]:
    """Every private access outside the seam."""
    found = []
    for path, tree in TREES.items():
        if _in_seam(path):
            continue
        relative = path.relative_to(ROOT).as_posix()
        for check, label in ((private_imports, "private import"),
                             (private_attributes, "private attribute"),
                             (private_overrides, "private member of a pynetdicom base")):
            found += [Finding(relative, line, f"{label} {what}") for line, what in check(tree)]
    return found


def test_the_scan_sees_the_seam() -> None:
    """The seam itself is full of what the scan looks for: the checks work."""
    seam = {path: tree for path, tree in TREES.items() if _in_seam(path)}
    assert seam, "pacs/dimse/seam is missing"
    assert any(list(private_imports(tree)) for tree in seam.values())
    assert any(list(private_attributes(tree)) for tree in seam.values())
    assert any(list(private_overrides(tree)) for tree in seam.values())


@pytest.mark.parametrize("source, expected", [
    ("from pynetdicom import _config", ["from pynetdicom import _config"]),
    ("import pynetdicom._globals", ["import pynetdicom._globals"]),
    ("from pynetdicom._handlers import x", ["from pynetdicom._handlers import …"]),
    ("from pynetdicom.dul import _helper", ["from pynetdicom.dul import _helper"]),
    ("from pynetdicom import evt\nimport os", []),
])
def test_private_imports_are_found(source: str, expected: list[str]) -> None:
    assert [what for _, what in private_imports(ast.parse(source))] == expected


def test_private_attributes_of_others_are_found() -> None:
    source = "def f(assoc, self):\n    assoc._reactor_checkpoint.set()\n    self._mine = 1\n"
    assert [what for _, what in private_attributes(ast.parse(source))] == [
        "assoc._reactor_checkpoint"]


def test_subclass_members_of_the_pynetdicom_base_are_found() -> None:
    source = ("from pynetdicom.service_class import QueryRetrieveServiceClass\n"
              "class Mine(QueryRetrieveServiceClass):\n"
              "    def _c_find_scp(self, req, cx):\n"
              "        super()._get_scp(req, cx)\n"
              "        self._own_helper()\n"
              "    def _own_helper(self):\n"
              "        pass\n")
    found = [what for _, what in private_overrides(ast.parse(source))]
    assert found == ["Mine._c_find_scp (on pynetdicom's QueryRetrieveServiceClass)",
                     "Mine._get_scp (on pynetdicom's QueryRetrieveServiceClass)"]


def test_no_private_access_outside_the_seam() -> None:
    found = [f for f in findings() if f.path not in KNOWN_ELSEWHERE]
    assert found == [], "\n".join(str(f) for f in found)
