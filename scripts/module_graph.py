"""Draw llamaforge's module graph from the code: docs/architecture.png (+ .dot).

    python scripts/module_graph.py [--out docs/architecture.png]

Edges are the imports of the package's own modules found anywhere in a file (function bodies too).
The picture leaves out edges implied by others (a -> c when a -> b -> c) so that layers stay
readable; `import_graph()` keeps them all, and tests/test_imports.py checks it has no cycle.
Drawn with Graphviz `dot` when installed, else with matplotlib.
"""
from __future__ import annotations

import argparse
import ast
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "src" / "llamaforge"


def modules(pkg: Path = PKG) -> dict[str, Path]:
    """Dotted name -> file of every module of the package (a package by its __init__.py; no __main__)."""
    out = {}
    for p in sorted(pkg.rglob("*.py")):
        rel = p.relative_to(pkg.parent).with_suffix("")
        parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
        if parts[-1] != "__main__":   # runs the CLI when imported, by design
            out[".".join(parts)] = p
    return out


def import_graph(pkg: Path = PKG) -> dict[str, set[str]]:
    """Module -> the package's modules it imports anywhere in its file (function bodies included).

    A package counts as its __init__.py; a module's implicit import of the packages it sits in is
    not an edge (Python runs a package's __init__ before any of its submodules).
    """
    mods = modules(pkg)
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
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        work = [(root, iter(sorted(graph[root])))]
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


def _reach(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """Module -> every module it imports directly or indirectly."""
    out = {}
    for v in graph:
        seen, todo = set(), list(graph[v])
        while todo:
            w = todo.pop()
            if w not in seen:
                seen.add(w)
                todo.extend(graph[w])
        out[v] = seen
    return out


def reduced(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """The graph without edges that a longer path implies (edges inside a cycle all stay)."""
    reach = _reach(graph)
    return {v: {w for w in ws if not any(w in reach[u] and u not in reach[w] for u in ws if u != w)} for v, ws in graph.items()}


def _short(name: str) -> str:
    return name.removeprefix("llamaforge.") if name != "llamaforge" else "llamaforge (lazy exports)"


def to_dot(graph: dict[str, set[str]]) -> str:
    """Graphviz text: one cluster per subpackage, arrows from importer to imported."""
    pkgs = {n for n, p in modules().items() if p.name == "__init__.py" and n != "llamaforge"}
    groups: dict[str, list[str]] = {}
    for m in graph:
        parts = m.split(".")
        groups.setdefault(parts[1] if len(parts) > 1 and f"llamaforge.{parts[1]}" in pkgs else "", []).append(m)
    lines = ["digraph llamaforge {", '  rankdir=BT; node [shape=box, style="rounded,filled", fillcolor="#f4f4f4", '
             'fontname="Helvetica", fontsize=11]; edge [color="#777777", arrowsize=0.6];']
    for group, members in sorted(groups.items()):
        if group:
            lines.append(f'  subgraph "cluster_{group}" {{ label="{group}/"; style="rounded"; color="#9bb8d3";')
        for m in sorted(members):
            lines.append(f'    "{m}" [label="{_short(m)}"];')
        if group:
            lines.append("  }")
    for v in sorted(graph):
        for w in sorted(graph[v]):
            lines.append(f'  "{v}" -> "{w}";')
    lines.append("}")
    return "\n".join(lines) + "\n"


def draw_matplotlib(graph: dict[str, set[str]], out: Path) -> None:
    """Layered drawing: a module sits one row above the highest module it imports."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    level: dict[str, int] = {}

    def depth(v: str, seen: frozenset = frozenset()) -> int:
        if v not in level:
            level[v] = 1 + max((depth(w, seen | {v}) for w in graph[v] if w not in seen), default=-1)
        return level[v]

    for v in graph:
        depth(v)
    rows: dict[int, list[str]] = {}
    for v, lv in level.items():
        rows.setdefault(lv, []).append(v)
    pos = {}
    width = max(len(r) for r in rows.values())
    for lv, members in rows.items():
        for i, v in enumerate(sorted(members)):
            pos[v] = ((i + 0.5) * width / len(members), lv)
    fig, ax = plt.subplots(figsize=(max(12, width * 1.6), 1.4 * len(rows) + 1))
    for v, ws in graph.items():
        for w in ws:
            ax.annotate("", xy=pos[w], xytext=pos[v],
                        arrowprops=dict(arrowstyle="->", color="#999999", lw=0.6, shrinkA=10, shrinkB=10))
    for v, (x, y) in pos.items():
        ax.text(x, y, _short(v), ha="center", va="center", fontsize=8,
                bbox=dict(boxstyle="round", fc="#f4f4f4", ec="#9bb8d3"))
    ax.set_axis_off()
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "architecture.png")
    ap.add_argument("--full", action="store_true", help="draw every edge (no transitive reduction)")
    a = ap.parse_args(argv)
    graph = import_graph()
    found = cycles(graph)
    if found:
        print(f"import cycles: {found}", file=sys.stderr)
    shown = graph if a.full else reduced(graph)
    dot_text = to_dot(shown)
    a.out.with_suffix(".dot").write_text(dot_text, encoding="utf-8")
    if shutil.which("dot"):
        subprocess.run(["dot", "-Tpng", "-Gdpi=80", "-o", str(a.out)], input=dot_text, text=True, check=True)
    else:
        draw_matplotlib(shown, a.out)
    n_edges = sum(len(v) for v in graph.values())
    print(f"{a.out}: {len(graph)} modules, {n_edges} import edges ({sum(len(v) for v in shown.values())} drawn), "
          f"{len(found)} cycles")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
