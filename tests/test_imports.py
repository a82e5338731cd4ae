"""No import circles: the package's import graph (imports inside functions count) has no cycle, and
every module imports on its own and in reverse order in fresh interpreters."""
from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import llamaforge

PKG = Path(llamaforge.__file__).resolve().parent


def modules() -> dict[str, Path]:
    """Dotted name -> file of every module of the package (packages by their __init__.py)."""
    out = {}
    for p in sorted(PKG.rglob("*.py")):
        rel = p.relative_to(PKG.parent).with_suffix("")
        parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
        if parts[-1] != "__main__":   # runs the CLI when imported, by design
            out[".".join(parts)] = p
    return out


def import_graph() -> dict[str, set[str]]:
    """Module -> the package's modules it imports anywhere in its file (function bodies included).

    A package counts as its __init__.py; a module's implicit import of the packages it sits in is
    not an edge (Python runs a package's __init__ before any of its submodules).
    """
    mods = modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for name, path in mods.items():
        base = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                prefix = base[:len(base) - node.level + 1] if node.level else []
                mod = ".".join(prefix + ([node.module] if node.module else []))
                targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in mods else mod for a in node.names]
            for t in targets:
                while t and t not in mods and "." in t:
                    t = t.rsplit(".", 1)[0]
                if t in mods and t != name and not name.startswith(t + "."):
                    graph[name].add(t)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            v, children = work[-1]
            w = next(children, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def test_cycle_finder_finds_a_planted_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_import_graph_has_no_cycles():
    graph = import_graph()
    # the graph sees imports in function bodies and through packages
    assert "llamaforge.tokenizer" in graph["llamaforge.formats.common"]
    assert {"llamaforge.formats.gguf", "llamaforge.formats.hf", "llamaforge.formats.meta"} <= graph["llamaforge.formats"]
    assert cycles(graph) == []


_IMPORT_EACH = """
import importlib, sys, traceback
failed = []
for name in sys.argv[1:]:
    for m in [m for m in sys.modules if m == "llamaforge" or m.startswith("llamaforge.")]:
        del sys.modules[m]
    try:
        importlib.import_module(name)
    except Exception:
        failed.append(name + ": " + traceback.format_exc(limit=-3).strip().splitlines()[-1])
print("\\n".join(failed))
sys.exit(1 if failed else 0)
"""

_IMPORT_ALL = """
import importlib, sys
for name in sys.argv[1:]:
    importlib.import_module(name)
"""


def _run(script: str, names: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", script, *names], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(PKG.parent)})


def test_every_module_imports_on_its_own():
    """Each module imported with no llamaforge module loaded before it. Third-party modules stay
    cached between modules (a fresh interpreter per module would mostly time torch's import): they
    cannot take part in a cycle of llamaforge modules."""
    r = _run(_IMPORT_EACH, sorted(modules()))
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]


def test_all_modules_import_in_reverse_order():
    r = _run(_IMPORT_ALL, sorted(modules(), reverse=True))
    assert r.returncode == 0, r.stderr[-3000:]
