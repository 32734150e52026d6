"""tools/numerics_trace.py: the comparison of two op traces names the first kernel that departs."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import numerics_trace as nt  # noqa: E402


def run(rows, weights):
    return {"trace": rows, "weights": weights}


def test_identical_runs_are_bitwise():
    rows = [["aten.mm.default", "(2, 2)", "a|b", "c"], ["aten.add.Tensor", "(2,)", "c|d", "e"]]
    c = nt.compare(run(rows, [[1.0, 2.0]]), run([list(r) for r in rows], [[1.0, 2.0]]))
    assert c["bitwise"] and "first_difference" not in c and c["max_rel_weight_diff_per_iteration"] == [0.0]


def test_first_kernel_with_same_inputs_and_different_output_is_named():
    a = [["aten.mm.default", "(2, 2)", "a|b", "c"], ["aten.add.Tensor", "(2,)", "c|d", "e"]]
    b = [["aten.mm.default", "(2, 2)", "a|b", "X"], ["aten.add.Tensor", "(2,)", "X|d", "Y"]]
    c = nt.compare(run(a, [[1.0, 2.0]]), run(b, [[1.0, 2.5]]))
    assert not c["bitwise"]
    assert c["first_difference"]["op"] == "aten.mm.default" and c["first_difference"]["index"] == 0
    assert c["first_difference"]["kind"].startswith("kernel")
    assert c["max_rel_weight_diff_per_iteration"] == [0.25]


def test_a_difference_in_inputs_is_not_blamed_on_the_kernel():
    a = [["aten.empty.memory_format", "", "", "-"], ["aten.mul.Tensor", "(2,)", "p", "q"]]
    b = [["aten.empty.memory_format", "", "", "-"], ["aten.mul.Tensor", "(2,)", "P", "Q"]]
    c = nt.compare(run(a, [[1.0]]), run(b, [[1.0]]))
    assert c["first_difference"]["index"] == 1 and c["first_difference"]["kind"].startswith("inputs differ")
