"""docs/design.md's table of rooms is the package's import graph: derived from the source
(imports inside functions included), it has no circle and equals the table."""

import ast
import re
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "stability"


def room(module: str) -> str | None:
    """A module's room: its subpackage ("models/") or its own name ("loop")."""
    parts = module.split(".")[1:]
    if not parts:
        return None
    if (PKG / parts[0]).is_dir():
        return parts[0] + "/"
    return parts[0] if (PKG / f"{parts[0]}.py").exists() else None  # None: a package attribute


def import_graph() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = defaultdict(set)
    for f in PKG.rglob("*.py"):
        module = ".".join(f.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        src = room(module)
        if src is None:  # stability/__init__.py
            continue
        edges[src]  # a room that imports nothing is still a room
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = (
                    [f"stability.{a.name}" for a in node.names]
                    if node.module == "stability"
                    else [node.module]
                )
            else:
                continue
            for t in targets:
                if t.split(".")[0] == "stability" and (r := room(t)) and r != src:
                    edges[src].add(r)
    return dict(edges)


def documented() -> dict[str, set[str]]:
    text = (ROOT / "docs" / "design.md").read_text()
    table = text[text.index("## Rooms") :].split("\n## ")[0]
    rows = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0].startswith("`"):
            rows[cells[0].strip("`")] = set(re.findall(r"`([^`]+)`", cells[2]))
    return rows


def test_the_import_graph_has_no_circle():
    graph, done, active = import_graph(), set(), []

    def visit(node):
        assert node not in active, " -> ".join([*active[active.index(node) :], node])
        if node in done:
            return
        active.append(node)
        for nxt in graph.get(node, ()):
            visit(nxt)
        active.pop()
        done.add(node)

    for node in graph:
        visit(node)


def test_the_design_docs_table_is_the_import_graph():
    graph, table = import_graph(), documented()
    assert set(table) == set(graph), set(table) ^ set(graph)
    for name, imports in graph.items():
        assert table[name] == imports, (
            name,
            "doc only:",
            table[name] - imports,
            "code only:",
            imports - table[name],
        )


def test_one_version():
    """The release written into checkpoints is the package's version, as pyproject.toml says."""
    import tomllib

    from stability import __version__
    from stability.loop import RELEASE

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert RELEASE == __version__ == project["version"]
