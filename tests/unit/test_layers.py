"""The layers of docs/architecture.rst that .importlinter does not state: no import
cycle anywhere in the library, and the loader modules (outside the package, so
outside import-linter's reach) speak to the library through its public names only."""

import ast
from pathlib import Path

import grimp
import pytest

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]


def _cycles(edges: dict[str, set[str]]) -> list[set[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in edges.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(component)

    for node in edges:
        if node not in index:
            visit(node)
    return found


def test_the_library_has_no_import_cycle():
    graph = grimp.build_graph("salt_kvm", exclude_type_checking_imports=True)
    edges = {m: graph.find_modules_directly_imported_by(m) for m in graph.modules}
    assert _cycles(edges) == []


def test_the_cycle_finder_finds_one():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [{"a", "b", "c"}]


def _salt_kvm_imports(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("salt_kvm"):
            yield node


@pytest.mark.parametrize(
    "path",
    sorted((REPO / "_modules").glob("*.py")) + sorted((REPO / "_states").glob("*.py")),
    ids=lambda p: f"{p.parent.name}/{p.name}",
)
def test_loader_modules_use_the_library_s_public_names(path):
    private = [
        f"{node.module}.{alias.name} (line {node.lineno})"
        for node in _salt_kvm_imports(path)
        for alias in node.names
        if alias.name.startswith("_") or any(p.startswith("_") for p in node.module.split("."))
    ]
    assert private == []
    # and never another loader module (Salt loads them; __salt__ reaches them)
    for node in _salt_kvm_imports(path):
        assert not node.module.startswith(("salt_kvm._modules", "salt_kvm._states")), node.module
