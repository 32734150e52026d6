"""experiments/quadratic.py and experiments/metanet.py: smoke runs write the protocol's keys, bad flags fail
cleanly, and no development run touches a test task (tuning never does, even for the final numbers)."""
import importlib
import json
import os

import pytest

import learned_opt.evaluate as evaluate_mod
import learned_opt.meta.trainer as meta_mod
from tests.test_experiments import ROOT, run_script

PROTOCOL_KEYS = ("meta_training_seeds", "validation_tasks", "ci", "tuning_metric", "test_split")
PAIRED_KEYS = ("ratio", "ci_low", "ci_high", "ci", "wilcoxon_p", "wilcoxon_floor", "wilcoxon_claim", "win_rate")


def check_paired(p, seeds):
    for key in PAIRED_KEYS:
        assert key in p, key
    assert p["ci_low"] <= p["ratio"] <= p["ci_high"] or p["ci_low"] == p["ci_high"]
    assert 0.0 <= p["win_rate"] <= 1.0 and 0.0 <= p["wilcoxon_p"] <= 1.0
    assert p["n_seeds"] == seeds and len(p["per_seed_ratio"]) == seeds


def test_quadratic_smoke_writes_protocol_paired_and_targets(tmp_path):
    out = tmp_path / "quad"
    proc = run_script("quadratic.py", "--preset", "smoke", "--out_dir", str(out), timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    s = json.loads((out / "summary.json").read_text())
    for key in PROTOCOL_KEYS:
        assert key in s["protocol"], key
    assert s["protocol"]["meta_training_seeds"] == 2 and s["protocol"]["validation_tasks"] == 2
    assert s["protocol"]["ci"] == "hierarchical_bootstrap"
    assert s["protocol"]["test_draw"] is None and "no test task" in s["protocol"]["test_split"]
    assert set(s["paired"]) == {"at_10", "at_20"}  # the smoke horizons
    for h in (10, 20):
        p = s["paired"][f"at_{h}"]
        check_paired(p, seeds=2)
        assert p["n_tasks"] == 2 * 4  # per-problem units: eval_tasks x problems_per_task
        assert s[f"learned_over_best_baseline_at_{h}"] == p["ratio_of_means"]
        assert s[f"win_rate_vs_best_baseline_at_{h}"] == p["win_rate"]
        assert s[f"best_baseline_at_{h}"] == p["baseline"]
        assert len(s["per_seed"][f"at_{h}"]["seeds"]) == 2
    targets = s["targets"]
    assert set(targets) == {"mean_loss_ratio_at_10", "win_rate_at_10"}
    assert targets["mean_loss_ratio_at_10"]["bound"] == 0.5 and targets["win_rate_at_10"]["bound"] == 0.75
    assert all(t["verdict"].startswith(("met", "not met")) for t in targets.values())
    assert [r["seed"] for r in s["meta_training"]] == [0, 1]
    assert (out / "table.md").exists() and (out / "loss_curves.png").exists()
    assert (out / "run" / "seed1" / "lopt.pt").exists()
    assert "| learned |" in proc.stdout  # the table is printed


def test_metanet_smoke_writes_protocol_and_paired_comparisons(tmp_path):
    out = tmp_path / "metanet"
    proc = run_script("metanet.py", "--preset", "smoke", "--out_dir", str(out), timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    s = json.loads((out / "summary.json").read_text())
    for key in PROTOCOL_KEYS:
        assert key in s["protocol"], key
    assert s["protocol"]["tuning_metric"].startswith("val_loss")
    assert set(s["paired"]) == {"vs_best_tuned", "vs_adam_1e-3"}
    for p in s["paired"].values():
        check_paired(p, seeds=2)
        assert p["n_tasks"] == 3
    assert s["paired"]["vs_best_tuned"]["baseline"] == s["best_tuned"] in ("sgd", "adam")
    assert s["learned_over_best_tuned_test"] == s["paired"]["vs_best_tuned"]["ratio_of_means"]
    assert s["learned_over_reference_test"] == s["paired"]["vs_adam_1e-3"]["ratio_of_means"]
    assert len(s["optimizers"]["learned"]["per_seed_test_at_stop"]) == 2
    table = (out / "table.md").read_text()
    assert table.index("| learned") < table.index("(tuned, best)") < table.index("(reference)")


@pytest.mark.parametrize("script, flags, message", [
    ("quadratic.py", ("--truncation", "30"), "truncation 30 is longer than the horizon 10"),
    ("metanet.py", ("--patience", "0"), "patience must be an integer >= 1"),
    ("metanet.py", ("--baselines", "sgd,adamm"), "unknown baseline 'adamm'"),
])
def test_bad_flag_exits_with_one_error_line(tmp_path, script, flags, message):
    out = tmp_path / "out"
    proc = run_script(script, "--preset", "smoke", "--out_dir", str(out), *flags, timeout=60)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], proc.stderr
    assert not out.exists()  # checked before any work or output


@pytest.mark.parametrize("script", ["quadratic", "metanet"])
@pytest.mark.parametrize("final", [False, True])
def test_tuning_and_development_runs_touch_no_test_task(tmp_path, monkeypatch, script, final):
    """Every task seed goes through ``task_seed``: record its split, and whether tuning asked for it."""
    monkeypatch.syspath_prepend(os.path.join(ROOT, "experiments"))
    monkeypatch.setenv("WANDB_MODE", "disabled")
    mod = importlib.import_module(script)
    phase, calls = ["other"], []
    real_seed, real_tune = evaluate_mod.task_seed, evaluate_mod.tune

    def seed_spy(split, *args, **kwargs):
        calls.append((phase[-1], split, kwargs.get("stream", "")))
        return real_seed(split, *args, **kwargs)

    def tune_spy(*args, **kwargs):
        phase.append("tune")
        try:
            return real_tune(*args, **kwargs)
        finally:
            phase.pop()

    monkeypatch.setattr(evaluate_mod.run, "task_seed", seed_spy)
    monkeypatch.setattr(meta_mod, "task_seed", seed_spy)
    monkeypatch.setattr(evaluate_mod.tuning, "tune", tune_spy)  # what tune_baseline calls
    if hasattr(mod, "tune"):
        monkeypatch.setattr(mod, "tune", tune_spy)
    mod.main(["--preset", "smoke", "--workers", "1", "--final", str(final).lower(),
              "--out_dir", str(tmp_path / "out")])
    tuning = {split for ph, split, _ in calls if ph == "tune"}
    others = {(split, stream) for ph, split, stream in calls if ph != "tune"}
    assert tuning == {"val"}  # tuning asked for tasks, all of them validation tasks
    assert ("train", "") in others  # meta-training tasks, from the train split
    assert ("val", "select") in others or script == "quadratic"  # metanet's smoke selects checkpoints
    if final:
        assert ("test", "") in others  # the reported numbers come from the final-test split
        assert ("val", "dev") not in others
    else:
        assert all(split != "test" for _, split, _ in calls)
        assert ("val", "dev") in others
