"""The shape of the package: no two modules import each other, directly or through others (the
floors themselves are import-linter's contract in pyproject.toml, run by `make lint`)."""
from __future__ import annotations

import subprocess

from tests.conftest import ROOT


def test_no_module_imports_one_that_imports_it_back():
    import grimp

    graph = grimp.build_graph("curate")
    circles = set()
    for module in graph.modules:
        for imported in graph.find_modules_directly_imported_by(module):
            if graph.find_shortest_chain(importer=imported, imported=module):
                circles.add(tuple(sorted((module, imported))))
    assert not circles, sorted(circles)


def test_the_floors_hold():
    r = subprocess.run([str(ROOT / ".venv" / "bin" / "lint-imports")], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout[-3000:]
