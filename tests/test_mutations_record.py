"""The mutation record (tests/mutations/) stays applicable: every recorded protocol bug still names code that exists
exactly once, and a guard test that exists. The slow half, that each guard fails under its mutation, is
``make test-mutations``; this fast half makes ``make test`` fail as soon as an edit leaves a mutation stale."""
import ast
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests", "mutations"))
import run as mutations  # noqa: E402

MUTATIONS = mutations.load_mutations()


@pytest.mark.parametrize("name", sorted(MUTATIONS))
def test_mutation_snippet_occurs_once_and_its_guard_exists(name):
    m = MUTATIONS[name]
    with open(os.path.join(ROOT, m["file"])) as f:
        assert f.read().count(m["old"]) == 1, f"{name}: stale mutation, rewrite its snippet"
    path, _, test = m["caught_by"].partition("::")
    with open(os.path.join(ROOT, path)) as f:
        names = {n.name for n in ast.walk(ast.parse(f.read())) if isinstance(n, ast.FunctionDef)}
    assert test.split("[")[0] in names, f"{name}: caught_by names no test"


def test_every_letter_of_the_audit_has_a_mutation():
    assert {n[0] for n in MUTATIONS} >= set("abcdef")
