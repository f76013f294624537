"""The layout's checks, read from the source with `ast` (nothing is imported)."""

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "rap"


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def import_time_imports(name: str, path: Path) -> set[str]:
    """rap modules `name` imports when it is imported: module-level statements, including those
    under a module-level `if`/`try` (function bodies run later, so their imports cannot cycle)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    nodes = []
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            nodes.append(node)
        elif isinstance(node, (ast.If, ast.Try)):
            nodes.extend(n for n in ast.walk(node) if isinstance(n, (ast.Import, ast.ImportFrom)))
    out = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
            continue
        if node.level:
            base = package.split(".")[: len(package.split(".")) - node.level + 1]
            target = ".".join(base + ([node.module] if node.module else []))
        else:
            target = node.module or ""
        for a in node.names:  # `from .x import y` imports the module x.y when there is one
            out.add(f"{target}.{a.name}" if f"{target}.{a.name}" in MODULES else target)
    return {m for m in out if m in MODULES and m != name}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
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
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_a_planted_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_rap_module_imports_itself_back_at_import_time():
    graph = {name: import_time_imports(name, path) for name, path in MODULES.items()}
    assert len(graph) > 30 and any(graph.values())  # the walk saw the package and its imports
    assert cycles(graph) == []


def all_imports(name: str, path: Path) -> set[str]:
    """Every rap module `name` imports anywhere in its source (function bodies included)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names)
    return {m for m in out if m in MODULES}


def test_library_modules_never_import_the_cli_or_the_report():
    library = {n: p for n, p in MODULES.items() if n != "rap.cli" and not n.startswith("rap.cli.")
               and n not in ("rap.__main__", "rap.report")}
    upward = {n: sorted(m for m in all_imports(n, p) if m == "rap.cli" or m.startswith("rap.cli.") or m == "rap.report")
              for n, p in library.items()}
    assert len(library) > 30 and "rap.cli.serve" in MODULES  # the commands live in the CLI package
    assert {n: m for n, m in upward.items() if m} == {}


def test_every_module_over_600_lines_says_why_in_its_docstring():
    long = {}
    for name, path in MODULES.items():
        text = path.read_text(encoding="utf-8")
        if text.count("\n") > 600 and "Why this module is long" not in (ast.get_docstring(ast.parse(text)) or ""):
            long[name] = text.count("\n")
    assert long == {}
