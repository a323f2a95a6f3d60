"""The package layout holds: no import circle in agent/, the vehicle side never imports
the fleet side, config.py imports nothing of the command path, and every package says
what it owns.

The graph counts lazy imports too (inside functions): a circle hidden in a function is
still a circle for the reader. ``from pkg import sub`` counts as an import of the
submodule; any other name taken from a package counts as an import of its __init__.
"""

from __future__ import annotations

import ast
from pathlib import Path

AGENT = Path(__file__).resolve().parents[1] / "agent"


def _module_name(path: Path) -> str:
    parts = path.relative_to(AGENT.parent).with_suffix("").parts
    name = ".".join(parts)
    return name.removesuffix(".__init__")


def import_graph() -> dict[str, set[str]]:
    """Each agent module → the agent modules it imports (absolute imports, any depth)."""
    paths = {_module_name(p): p for p in AGENT.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in paths}
    for mod, path in paths.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                graph[mod] |= {a.name for a in node.names if a.name in paths}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module in paths:
                subs = {f"{node.module}.{a.name}" for a in node.names} & paths.keys()
                graph[mod] |= subs
                if len(subs) < len(node.names):
                    graph[mod].add(node.module)
        graph[mod].discard(mod)
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            v, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[v] = min(low[v], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                component = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    component.append(w)
                    if w == v:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_the_circle_finder_finds_a_circle() -> None:
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert circles({"a": {"b"}, "b": set()}) == []


def test_no_import_circle_in_agent() -> None:
    assert circles(import_graph()) == []


def test_vehicle_side_never_imports_the_fleet_side() -> None:
    graph = import_graph()
    offenders = {m: sorted(t for t in targets if t == "agent.fleet" or t.startswith("agent.fleet."))
                 for m, targets in graph.items()
                 if not m.startswith(("agent.fleet", "agent.cli"))}
    assert {m: t for m, t in offenders.items() if t} == {}


def test_config_imports_nothing_of_the_command_path() -> None:
    """config.py may use the key loader (a leaf) but nothing that could import it back."""
    graph = import_graph()
    reached: set[str] = set()
    todo = ["agent.config"]
    while todo:
        for target in graph[todo.pop()] - reached:
            reached.add(target)
            todo.append(target)
    assert "agent.config" not in reached
    assert not {m for m in reached if m.startswith("agent.commands.")} - {"agent.commands.keys"}


def test_every_package_says_what_it_owns_and_may_import() -> None:
    for init in sorted(AGENT.rglob("__init__.py")):
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        assert "import" in doc.lower(), f"{init}: the docstring should say what it may import"
