"""The house rules of the import graph (DESIGN.md, "Floors"): `pdserve/` on top; `router/` and
the worker packages below it; `control/`, `kvtransfer/`, `engine/` and `loadtest/` on the
ground. Nothing imports upward, no worker package imports the other, and no two packages
import each other, directly or through others. Read from the source (every import statement,
function-level ones included), so a lazy import cannot hide a circle."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FLOOR = {"pdserve": 2, "router": 1, "prefill_worker": 1, "decode_worker": 1,
         "control": 0, "kvtransfer": 0, "engine": 0, "loadtest": 0}


def package_imports() -> dict[str, dict[str, list[str]]]:
    """package -> imported package -> the files that import it."""
    graph: dict[str, dict[str, list[str]]] = {p: {} for p in FLOOR}
    for pkg in FLOOR:
        for path in (ROOT / pkg).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    top = name.split(".")[0]
                    if top in FLOOR and top != pkg:
                        graph[pkg].setdefault(top, []).append(str(path.relative_to(ROOT)))
    return graph


def test_nothing_imports_upward_or_sideways_between_workers():
    graph = package_imports()
    bad = [f"{pkg} -> {dep} ({', '.join(sorted(set(files)))})" for pkg, deps in graph.items()
           for dep, files in deps.items() if FLOOR[dep] > FLOOR[pkg]]
    bad += [f"{a} -> {b}" for a, b in (("prefill_worker", "decode_worker"), ("decode_worker", "prefill_worker"))
            if b in graph[a]]
    assert not bad, "imports against the floors: " + "; ".join(bad)


def test_the_package_graph_has_no_circle():
    graph = {pkg: set(deps) for pkg, deps in package_imports().items()}

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        return any(d == goal or (d not in seen and reaches(d, goal, seen | {d})) for d in graph[start])

    circles = sorted(p for p in graph if reaches(p, p, {p}))
    assert not circles, f"packages in an import circle: {circles}"


def test_every_module_states_its_job():
    """Each file opens with a docstring: a reader should learn what it is for before how."""
    missing = [str(p.relative_to(ROOT)) for pkg in FLOOR for p in (ROOT / pkg).rglob("*.py")
               if p.stat().st_size and not ast.get_docstring(ast.parse(p.read_text()))]
    assert not missing, f"files without an opening docstring: {missing}"


def module_imports() -> dict[str, set[str]]:
    """module -> the modules of this repository it imports (relative imports resolved;
    `from pkg import name` counts as pkg.name where that is a module, else as pkg)."""
    modules = {}
    for pkg in FLOOR:
        for path in (ROOT / pkg).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            is_pkg = parts[-1] == "__init__"
            name = ".".join(parts[:-1] if is_pkg else parts)
            modules[name] = (path, is_pkg)
    graph: dict[str, set[str]] = {}
    for name, (path, is_pkg) in modules.items():
        here = name if is_pkg else name.rpartition(".")[0]
        deps = graph.setdefault(name, set())
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = here.split(".")[: len(here.split(".")) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            else:
                continue
            deps.update(t for t in targets if t in modules and t != name)
    return graph


def test_no_module_import_circle():
    """No circle of modules either (a package's __init__ importing its own modules is not one:
    those modules never import the package's __init__ back)."""
    graph = module_imports()
    index, low, stack, on_stack, circles = {}, {}, [], set(), []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for v in list(graph):
        if v not in index:
            visit(v)
    assert not circles, f"module import circles: {circles}"
