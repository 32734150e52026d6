"""`make demo` (experiments/demo.py, issue 25) on its smoke preset: its outputs exist, every optimizer of a model
trained from the same init on the same minibatches, AdamW's lr was chosen on the validation split only (spied on),
and each verdict line states the measured numbers."""
import json
import math
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "experiments"))
import demo  # noqa: E402


@pytest.fixture(scope="module")
def spied(tmp_path_factory):
    """One in-process smoke run (one worker, so the spies see every run) and what the spies recorded."""
    out = tmp_path_factory.mktemp("demo")
    calls, batches, evals = [], [], []
    mp = pytest.MonkeyPatch()
    train_run, evaluate = demo.train_run, demo.evaluate

    def spy_train_run(cfg, kind, spec, split):
        batches.append([])
        run = train_run(cfg, kind, spec, split)
        calls.append({"kind": kind, "role": spec["role"], "lr": spec.get("lr"), "split": split, "run": run})
        return run

    def spy_evaluate(task, model, split):
        evals.append(split)
        return evaluate(task, model, split)

    for cls in demo.TASKS.values():
        def spy_loss(self, model, idx, *rest, _loss=cls.loss):
            if not rest or rest[0] is None:  # a training minibatch (scoring passes its split's data)
                batches[-1].append(idx.tolist())
            return _loss(self, model, idx, *rest)
        mp.setattr(cls, "loss", spy_loss)
    mp.setattr(demo, "train_run", spy_train_run)
    mp.setattr(demo, "evaluate", spy_evaluate)
    try:
        summary = demo.main(["--preset", "smoke", "--workers", "1", "--out_dir", str(out)])
    finally:
        mp.undo()
    return {"out": out, "summary": summary, "calls": calls, "batches": batches, "evals": evals}


def test_outputs_exist_and_the_summary_is_what_main_returned(spied):
    out = spied["out"]
    for name in ("demo.png", "table.md", "summary.json"):
        assert (out / name).stat().st_size > 0, name
    saved = json.loads((out / "summary.json").read_text())
    assert set(saved["models"]) == {"text", "digits"} and saved["verdicts"] == spied["summary"]["verdicts"]
    assert saved["text"]["chars"] > 10000 and saved["text"]["modules"] == list(demo.TEXT_MODULES)
    for kind, ratio in saved["default_lr_offsuite"].items():  # issue #24: held-out loss at defaults / tuned AdamW
        runs = saved["models"][kind]["runs"]
        assert ratio == pytest.approx(runs["general"]["eval"]["loss"] / runs["tuned"]["eval"]["loss"])


def test_the_vit_model_trains_on_the_digits_splits(tmp_path):
    summary = demo.main(["--preset", "smoke", "--workers", "1", "--models", "vit", "--out_dir", str(tmp_path)])
    runs = summary["models"]["vit"]["runs"]
    assert set(summary["default_lr_offsuite"]) == {"vit"} and set(runs) == {"general", "default", "tuned"}
    assert all(math.isfinite(r["eval"]["loss"]) and 0 <= r["eval"]["accuracy"] <= 1 for r in runs.values())
    assert min(runs["tuned"]["train_losses"]) < runs["tuned"]["train_losses"][0]
    assert isinstance(demo.ViTTask(demo.Config()).model().vit, demo.nn.Module)


def test_every_optimizer_trained_from_the_same_init_on_the_same_minibatches(spied):
    calls, batches = spied["calls"], spied["batches"]
    for kind in ("text", "digits"):
        mine = [i for i, c in enumerate(calls) if c["kind"] == kind]
        roles = {calls[i]["role"] for i in mine}
        assert roles == {"general", "default", "grid", "tuned"}
        # the minibatches each run actually trained on, as the task's loss saw them
        seen = [batches[i] for i in mine]
        assert len(seen[0]) == demo.TASKS[kind](demo.Config(**demo.PRESETS["smoke"])).steps
        assert all(s == seen[0] for s in seen), kind
        assert len({calls[i]["run"]["init_sha256"] for i in mine}) == 1
        assert spied["summary"]["models"][kind]["same_init_and_data"] == {"init": True, "data_order": True}


def test_adamw_lr_is_chosen_on_the_validation_split_only(spied):
    calls = spied["calls"]
    # each run scored exactly the split it was given, once
    assert spied["evals"] == [c["split"] for c in calls]
    for kind in ("text", "digits"):
        grid = [c for c in calls if c["kind"] == kind and c["role"] == "grid"]
        tuned = [c for c in calls if c["kind"] == kind and c["role"] == "tuned"]
        assert len(grid) >= len(demo.PRESETS["smoke"]["lr_grid"]) and {c["split"] for c in grid} == {"val"}
        assert len(tuned) == 1 and tuned[0]["split"] == "test"
        assert calls.index(tuned[0]) > max(calls.index(c) for c in grid)  # scored on test after the choice
        val = {c["lr"]: c["run"]["eval"]["loss"] for c in grid}
        best = min(sorted(val), key=lambda lr: val[lr] if math.isfinite(val[lr]) else math.inf)
        tuning = spied["summary"]["models"][kind]["tuning"]
        assert tuned[0]["lr"] == best == tuning["chosen_lr"] and tuning["val_loss"] == val
        # the reported (held-out) runs were scored on the test split
        for role in ("general", "default", "tuned"):
            assert spied["summary"]["models"][kind]["runs"][role]["eval"]["split"] == "test"


def test_verdict_lines_state_the_measured_numbers(spied, capsys):
    table = (spied["out"] / "table.md").read_text()
    for kind, res in spied["summary"]["models"].items():
        line = res["verdict"]
        g, d, t = (res["runs"][r]["eval"]["loss"] for r in ("general", "default", "tuned"))
        lr = res["tuning"]["chosen_lr"]
        assert line.startswith(f"{kind}: general (untuned): held-out loss {g:.3f} vs AdamW default {d:.3f} and "
                               f"tuned AdamW (lr {lr:g}) {t:.3f}: ")
        assert demo.compare(g, t, "tuned AdamW") in line and demo.compare(g, d, "AdamW default") in line
        if kind == "digits":
            acc = [100 * res["runs"][r]["eval"]["accuracy"] for r in ("general", "default", "tuned")]
            assert f"test accuracy {acc[0]:.1f}% vs {acc[1]:.1f}% and {acc[2]:.1f}%" in line
        assert f"- {line}" in table


def test_comparison_words_follow_the_numbers():
    assert demo.compare(1.12, 1.0, "tuned AdamW") == "worse than tuned AdamW by 12%"
    assert demo.compare(0.97, 1.0, "x") == "better than x by 3%"
    assert demo.compare(1.003, 1.0, "x") == "level with x (within 0.5%)"
    assert demo.compare(19.1, 1.0, "x") == "worse than x: 19.1x its loss"
    assert demo.compare(math.nan, 1.0, "x").startswith("diverged")


def test_the_grid_widens_by_one_value_only_at_an_edge():
    grid = [1e-4, 3e-4, 1e-3, 3e-3, 1e-2]
    assert demo.widen(grid, 1e-2) == 3e-2 and demo.widen(grid, 1e-4) == 3e-5 and demo.widen(grid, 1e-3) is None
    assert demo.choose_lr({1e-3: 2.0, 3e-3: 1.5, 1e-2: math.inf}) == 3e-3
    with pytest.raises(ValueError, match="validation split"):
        demo.val_score({"eval": {"split": "test", "loss": 1.0}})


def test_command_line_smoke_run_in_two_processes_prints_the_verdicts(tmp_path):
    out = tmp_path / "cli"
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "demo.py"), "--preset", "smoke",
                           "--workers", "2", "--out_dir", str(out)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    for line in summary["verdicts"]:
        assert line in proc.stdout
    assert (out / "demo.png").exists() and re.search(r"Ran in \d+ s wall", proc.stdout)


def test_make_demo_runs_this_script():
    text = open(os.path.join(ROOT, "Makefile")).read()
    recipe = re.search(r"^demo:(.*)\n((?:\t.*\n)+)", text, re.M)
    assert "$(STAMP)" in recipe.group(1) and "experiments/demo.py" in recipe.group(2)
