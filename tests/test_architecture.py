"""The layering of ARCHITECTURE.md holds in the code: no upward or sideways import, no import circle, no file over
500 lines, no class over 250, no function over 100, and the picture in ARCHITECTURE.md is the code's import graph.

The checker (tools/layering.py) is itself tested on a small synthetic package with the faults it must catch.
"""
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import layering  # noqa: E402


@pytest.fixture(scope="module")
def graph():
    return layering.import_graph()


def test_every_import_runs_down_the_layers(graph):
    assert layering.layering_violations(graph) == []


def test_no_import_circle_inside_the_package(graph):
    assert layering.cycles(graph) == []


def test_tasks_and_control_import_nothing_from_optim(graph):
    for module, targets in graph.items():
        if layering.component(module) in ("tasks", "control"):
            assert not [t for t in targets if layering.component(t) == "optim"], module


def test_no_file_class_or_function_over_its_size_limit():
    folders = [os.path.join(ROOT, "learned_opt"), os.path.join(ROOT, "experiments")]
    assert layering.size_violations(folders) == []


def test_architecture_note_shows_the_current_import_graph(graph):
    text = open(os.path.join(ROOT, "ARCHITECTURE.md")).read()
    assert layering.mermaid(graph) in text, "regenerate the picture: python tools/layering.py"


def _write(root, rel, text):
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_checker_finds_upward_imports_lazy_imports_circles_and_long_functions(tmp_path):
    pkg = "learned_opt"
    _write(tmp_path, f"{pkg}/__init__.py", "")
    _write(tmp_path, f"{pkg}/validate.py", "")
    _write(tmp_path, f"{pkg}/control.py", "from .optim.base import x\n")  # upwards
    _write(tmp_path, f"{pkg}/tasks/__init__.py", "def f():\n    from ..optim import base\n")  # lazy, upwards
    _write(tmp_path, f"{pkg}/optim/__init__.py", "")
    _write(tmp_path, f"{pkg}/optim/base.py", "from ..validate import check\nfrom . import lstm\n")
    _write(tmp_path, f"{pkg}/optim/lstm.py", "from .base import y\n")  # circle base <-> lstm
    _write(tmp_path, f"{pkg}/optim/typed.py",
           "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..meta import Z\n")  # not an arrow
    _write(tmp_path, f"{pkg}/newthing.py", "")  # in no layer
    _write(tmp_path, f"{pkg}/long.py", "def g():\n" + "    x = 1\n" * 100)
    graph = layering.import_graph(str(tmp_path), pkg)
    assert graph[f"{pkg}.tasks"] == {f"{pkg}.optim.base"}
    assert graph[f"{pkg}.optim.typed"] == set()
    bad = layering.layering_violations(graph)
    assert any(b.startswith(f"{pkg}.control imports {pkg}.optim.base") for b in bad)
    assert any(b.startswith(f"{pkg}.tasks imports {pkg}.optim.base") for b in bad)
    assert any("'newthing' is in no layer" in b for b in bad) and len(bad) == 4  # long.py: in no layer either
    assert layering.cycles(graph) == [[f"{pkg}.optim.base", f"{pkg}.optim.lstm"]]
    sizes = layering.size_violations([str(tmp_path / pkg)])
    assert len(sizes) == 1 and "function g is 101 lines" in sizes[0]
