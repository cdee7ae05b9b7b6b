"""The import graph as tools see it (tests/test_import_graph.py reads the source itself).

- The import-linter contract in pyproject.toml (``make lint`` runs it too): ``gateway`` on
  top, ``consent`` and ``export`` independent of each other, ``identity`` at the base.
- No module imports itself back through others: no cycles between modules, counting
  imports inside functions too.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grimp
import networkx as nx

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("gateway", "identity", "consent", "export")


def test_layers_hold() -> None:
    lint = Path(sys.executable).with_name("lint-imports")
    done = subprocess.run([str(lint)], cwd=ROOT, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "broken" in done.stdout and "0 broken" in done.stdout


def test_no_import_cycles_between_modules() -> None:
    graph = grimp.build_graph(*PACKAGES)
    edges = nx.DiGraph()
    for module in graph.modules:
        for imported in graph.find_modules_directly_imported_by(module):
            if imported.split(".")[0] in PACKAGES and imported != module:
                edges.add_edge(module, imported)
    # a package's __init__ importing its own submodules is not a cycle worth reporting
    for node in list(edges.nodes):
        for imported in list(edges.successors(node)):
            if imported.startswith(node + "."):
                edges.remove_edge(node, imported)
    cycles = list(nx.simple_cycles(edges, length_bound=6))
    assert not cycles, f"import cycles: {cycles[:5]}"
