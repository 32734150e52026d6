"""`make reproduce` regenerates every results/ folder README.md cites and never ships weights: every experiment script
whose output folder the README cites is run, no line passes --ship, and only `make promote` names
learned_opt/pretrained. Also: estimators.py takes the horizon numbers from the horizon script's own summary."""
import ast
import fnmatch
import glob
import json
import os
import re
import shlex
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def recipes(text: str) -> dict:
    """Target -> its recipe lines (continuations joined) of a Makefile's text."""
    out, target = {}, None
    for line in re.sub(r"\s*\\\n\s*", " ", text).splitlines():
        if line.startswith("\t") and target:
            out[target].append(line.strip())
        elif re.match(r"^[A-Za-z0-9_.-]+\s*:(?!=)", line):
            target = line.split(":")[0].strip()
            out[target] = []
        elif line.strip() and not line.startswith("#"):
            target = None
    return out


def default_out_dir(path: str):
    """The ``out_dir`` default of a script's config dataclass, read from its source (None without one)."""
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.AnnAssign) and getattr(node.target, "id", None) == "out_dir" and node.value:
            return ast.literal_eval(node.value)
    return None


def cited_patterns() -> set:
    """The results/ paths (globs included) README.md names, without file names."""
    text = open(os.path.join(ROOT, "README.md")).read()
    paths = set()
    for p in re.findall(r"results/[A-Za-z0-9_*./-]*", text):
        parts = [x for x in p.rstrip("/.").split("/") if x]
        if "." in parts[-1]:  # a file: its folder is what is cited
            parts = parts[:-1]
        paths.add("/".join(parts))
    return paths


def cited_scripts() -> set:
    """Experiment scripts whose default output folder README.md cites (the folder or anything inside it)."""
    scripts = set()
    for path in sorted(glob.glob(os.path.join(ROOT, "experiments", "*.py"))):
        out = default_out_dir(path)
        if out and out.startswith("results/") and any(
                c == out or c.startswith(out + "/") or fnmatch.fnmatch(out, c) for c in cited_patterns()):
            scripts.add("experiments/" + os.path.basename(path))
    return scripts


def makefile_recipes() -> dict:
    return recipes(open(os.path.join(ROOT, "Makefile")).read())


def test_parser_reads_recipes():
    parsed = recipes("a: b\n\t$(PY) x.py --f 1 \\\n\t  --g 2\n# note\nc:\n\techo c\nV := 1\n")
    assert parsed == {"a": ["$(PY) x.py --f 1 --g 2"], "c": ["echo c"]}


def test_reproduce_runs_every_cited_experiment():
    lines = makefile_recipes()["reproduce"]
    run = {w for line in lines for w in shlex.split(line) if w.startswith("experiments/") and w.endswith(".py")}
    scripts = cited_scripts()
    # the README's folders map to these scripts (a change of out_dir or README citation shows up here)
    assert {"experiments/estimators_horizon.py", "experiments/general.py", "experiments/general_train.py",
            "experiments/digits.py", "experiments/estimators.py"} <= scripts
    assert scripts - run == set(), f"make reproduce does not run {sorted(scripts - run)}"


def test_reproduce_runs_final_where_a_script_has_a_final_split():
    for line in makefile_recipes()["reproduce"]:
        words = shlex.split(line)
        script = next((w for w in words if w.startswith("experiments/")), None)
        if script and "final: bool" in open(os.path.join(ROOT, script)).read() + _protocol_text(script):
            assert "--final" in words and words[words.index("--final") + 1] == "true", line


def _protocol_text(script: str) -> str:
    """common.py's text when ``script`` builds on its ProtocolConfig (which holds the ``final`` flag)."""
    src = open(os.path.join(ROOT, script)).read()
    return open(os.path.join(ROOT, "experiments", "common.py")).read() if "ProtocolConfig)" in src else ""


def test_reproduce_never_ships_and_only_promote_names_pretrained():
    all_recipes = makefile_recipes()
    assert not [ln for ln in all_recipes["reproduce"] if "--ship" in ln]
    for target, lines in all_recipes.items():
        if target != "promote":
            assert not [ln for ln in lines if "learned_opt/pretrained" in ln], target
    promote = all_recipes["promote"]  # the shipping rule decides (experiments/general_promote.py)
    assert any("experiments/general_promote.py" in ln for ln in promote)
    assert not [ln for t, lines in all_recipes.items() for ln in lines if "--ship true" in ln]


def test_estimators_copies_horizon_keys_from_the_horizon_summary(tmp_path):
    sys.path.insert(0, os.path.join(ROOT, "experiments"))
    import estimators

    targets = {"pes_over_tbptt_loss_at_10x": {"value": 0.5, "verdict": "met"}}
    horizon = {"config": {"final": True}, "targets": targets, "pes_over_tbptt_loss_at_10x": 0.5}
    path = tmp_path / "horizon.json"
    path.write_text(json.dumps(horizon))
    summary = {"targets": {}, "not_implemented": ["horizon generalisation on digits"]}
    estimators.horizon_part(str(path), summary)
    assert summary["pes_over_tbptt_loss_at_10x"] == 0.5 and summary["targets"] == targets
    assert summary["not_implemented"] == [] and summary["horizon_generalisation"] == str(path)
    # a development run of the horizon script gives no numbers; nor does a missing summary
    path.write_text(json.dumps(dict(horizon, config={"final": False})))
    for where in (str(path), str(tmp_path / "missing.json")):
        fresh = {"targets": {}, "not_implemented": ["horizon generalisation on digits"]}
        estimators.horizon_part(where, fresh)
        assert "pes_over_tbptt_loss_at_10x" not in fresh and fresh["not_implemented"]


@pytest.mark.parametrize("target", ["reproduce", "promote"])
def test_targets_are_phony(target):
    text = open(os.path.join(ROOT, "Makefile")).read()
    assert re.search(r"^\.PHONY:.*\b" + target + r"\b", text, re.M)
