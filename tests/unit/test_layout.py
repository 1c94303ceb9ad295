"""The layout's import rules, read from the source (every import, lazy ones included).

- the core (:mod:`pacs.core`) is protocol-free: no falcon, gunicorn or pynetdicom, and
  nothing from the edges, the node's plumbing or the CLI;
- the edges (DIMSE, DICOMweb, viewer) do not import each other, the node or the CLI;
- the node's plumbing (:mod:`pacs.node`) may import edges and core, never the CLI;
- nothing imports the CLI but ``python -m pacs``;
- no import cycle between modules.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("pacs", "adapters")
FRAMEWORKS = ("falcon", "gunicorn", "pynetdicom")
EDGES = ("pacs.dimse", "adapters.dicomweb", "adapters.viewer")


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, name: str) -> Iterator[str]:
    """Every module ``path`` imports (``from a import b`` yields ``a`` and ``a.b``)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            yield module
            yield from (f"{module}.{alias.name}" for alias in node.names)


def _graph() -> dict[str, set[str]]:
    """Module → the modules of the project and frameworks it imports."""
    files = {_module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        targets = set()
        for imported in _imports(path, name):
            top = imported.split(".")[0]
            if top in FRAMEWORKS:
                targets.add(top)
            elif imported in files:
                targets.add(imported)
        targets.discard(name)
        graph[name] = targets
    return graph


GRAPH = _graph()


def _within(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def _violations(source: str, forbidden: tuple[str, ...]) -> list[str]:
    return sorted(f"{module} imports {target}"
                  for module, targets in GRAPH.items() if _within(module, source)
                  for target in targets
                  if any(_within(target, banned) for banned in forbidden))


def test_the_graph_is_read() -> None:
    assert "pacs.core.ingest" in GRAPH and "pacs.core.attributes" in GRAPH["pacs.core.ingest"]
    assert "falcon" in GRAPH["adapters.dicomweb.app"]


def test_the_core_is_protocol_free() -> None:
    forbidden = FRAMEWORKS + EDGES + ("adapters", "pacs.node", "pacs.cli")
    assert _violations("pacs.core", forbidden) == []


@pytest.mark.parametrize("edge", EDGES)
def test_edges_do_not_import_each_other_nor_the_node(edge: str) -> None:
    others = tuple(other for other in EDGES if other != edge)
    assert _violations(edge, (*others, "pacs.node", "pacs.cli")) == []


def test_shared_http_support_imports_no_edge() -> None:
    assert _violations("adapters.http", (*EDGES, "pacs.node", "pacs.cli")) == []


def test_nothing_imports_the_cli() -> None:
    importers = sorted(m for m, targets in GRAPH.items() if "pacs.cli" in targets)
    assert importers == ["pacs.__main__"]


def test_no_import_cycles() -> None:
    """Tarjan's strongly connected components: each must be one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in GRAPH.get(node, ()):
            if target not in GRAPH:
                continue
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(GRAPH):
        if node not in index:
            visit(node)
    assert cycles == []
