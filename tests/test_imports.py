"""The import graph, drawn from the code with ``ast``: imports point down and never go round.

Every ``import`` counts, at module level or inside a function (a lazy import is still a
dependency). Layers: ``storage`` -> ``tasks`` -> ``flows``; ``deployments`` is how flows run
and may use tasks, but tasks never reach into ``deployments``; benchmarks never import tests.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("storage", "tasks", "flows", "deployments", "benchmarks")
LOWER_THAN = {  # a package may not import these
    "storage": ("tasks", "flows", "deployments", "prefect"),
    "tasks": ("flows", "deployments"),
    "benchmarks": ("tests",),
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def _is_type_checking(node: ast.AST) -> bool:
    """An ``if TYPE_CHECKING:`` block: imports for annotations only, never run."""
    return isinstance(node, ast.If) and getattr(node.test, "id", getattr(node.test, "attr", None)) == "TYPE_CHECKING"


def _imported(name: str, path: Path) -> set[str]:
    """Every module ``name`` imports (as written, absolute)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    tree = ast.parse(path.read_text(), str(path))
    typing_only = {id(n) for block in ast.walk(tree) if _is_type_checking(block) for s in block.body for n in ast.walk(s)}
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def import_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports (``from pkg import sub`` counts as ``pkg.sub``)."""
    modules = _modules()
    return {name: {m for m in _imported(name, path) if m in modules and m != name} for name, path in modules.items()}


def test_imports_point_down():
    bad = []
    for name, path in _modules().items():
        forbidden = LOWER_THAN.get(name.split(".")[0], ())
        for imported in sorted(_imported(name, path)):
            if imported.split(".")[0] in forbidden:
                bad.append(f"{name} imports {imported}")
    assert not bad, "imports that point the wrong way:\n" + "\n".join(bad)


def test_no_import_cycles():
    graph = import_graph()
    cycles, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [node, nxt]) if nxt in stack else f"{node} -> {nxt}")
            elif nxt not in state:
                visit(nxt, stack + [node])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_every_name_imported_from_the_project_exists():
    """``from storage.x import y`` (at module level or lazily in a function) names something
    that is there: a renamed function otherwise breaks only the rarely run script (a benchmark)
    that still imports the old name."""
    import importlib

    modules = _modules()
    missing = []
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if not isinstance(node, ast.ImportFrom) or node.level or node.module not in modules:
                continue
            target = importlib.import_module(node.module)
            for alias in node.names:
                if alias.name != "*" and not hasattr(target, alias.name) and f"{node.module}.{alias.name}" not in modules:
                    missing.append(f"{name} imports {alias.name!r} from {node.module}, which has no such name")
    assert not missing, "\n".join(missing)
