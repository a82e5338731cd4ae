"""No import circles: the package's import graph (imports inside functions count) has no cycle, and
every module imports on its own and in reverse order in fresh interpreters."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import llamaforge

# the graph code lives with the script that draws it (docs/architecture.png)
_spec = importlib.util.spec_from_file_location("module_graph", Path(__file__).resolve().parents[1] / "scripts" / "module_graph.py")
module_graph = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(module_graph)
PKG = Path(llamaforge.__file__).resolve().parent
cycles = module_graph.cycles


def modules() -> dict[str, Path]:
    return module_graph.modules(PKG)


def import_graph() -> dict[str, set[str]]:
    return module_graph.import_graph(PKG)


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
