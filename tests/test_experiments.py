"""Each experiment script runs end to end in a subprocess with tiny settings and writes what it promises."""
import json
import os
import subprocess
import sys


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_script(name, *args, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled")
    return subprocess.run([sys.executable, os.path.join(ROOT, "experiments", name), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout, env=env)


def test_boolean_flags_reject_typos(tmp_path):
    proc = run_script("digits.py", "--preset", "smoke", "--second_order", "fals", "--out_dir", str(tmp_path / "x"))
    assert proc.returncode == 2
    assert "expected true or false, got 'fals'" in proc.stderr and "Traceback" not in proc.stderr


def test_digits_smoke_writes_the_protocol_keys_and_reuses_its_tuning_cache(tmp_path):
    out = tmp_path / "digits"
    proc = run_script("digits.py", "--preset", "smoke", "--final", "true", "--out_dir", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    proto = summary["protocol"]
    assert proto["meta_training_seeds"] == 2 and proto["validation_tasks"] == 2
    assert proto["ci"] == "hierarchical_bootstrap" and "seeds" in proto["ci_resampling"]
    assert proto["tuning_metric"] and proto["test_split"].startswith("test") and proto["heldout_images"] is True
    assert summary["heldout_images"] is True
    for key in ("learned_over_best_baseline_at_10", "test_loss_ratio_at_10", "test_loss_ratio_at_20",
                "never_above_initial_loss", "speedup_over_tuned_adam", "meta_train_seconds", "targets"):
        assert key in summary, key
    for name in ("train_at_10", "train_at_20", "heldout_at_10", "heldout_at_20"):
        p = summary["paired"][name]
        assert set(p) >= {"ratio", "ci_low", "ci_high", "wilcoxon_p", "wilcoxon_floor", "wilcoxon_claim", "win_rate",
                          "per_seed_t_ci"} and p["n_seeds"] == 2, name
        assert p["wilcoxon_claim"] is False  # 3 tasks: the exact test cannot go below 0.25
        assert p["ci_low"] <= p["ratio"] <= p["ci_high"]
    assert set(summary["unseen"]) == {"relu"} and set(summary["unseen"]["relu"]) == {"train", "heldout", "accuracy"}
    assert set(summary["speedup_over_tuned_adam"]) == {"5", "10", "20"}
    for h in ("10", "20"):  # held-out accuracy of the learned optimizer at every horizon
        assert 0.0 <= summary["learned"][h]["accuracy"] <= 1.0
    assert (out / "loss_curves.png").exists() and (out / "speedup.png").exists()
    # a second run reuses the tuning cache: nothing is tuned again, and the tuned settings are identical
    cache = {f: (out / "tuning_cache" / f).read_text() for f in os.listdir(out / "tuning_cache")}
    assert cache and all(name.startswith("tune-") for name in cache)
    proc = run_script("digits.py", "--preset", "smoke", "--final", "true", "--out_dir", str(out), "--seeds", "1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert {f: (out / "tuning_cache" / f).read_text() for f in os.listdir(out / "tuning_cache")} == cache
    again = json.loads((out / "summary.json").read_text())
    assert again["tuned"] == summary["tuned"]


def _spy_task_splits(monkeypatch):
    """Record the split of every task any evaluation builds, and which calls were tuning (from ``tune``)."""
    import learned_opt.evaluate as ev

    seen = []
    real = ev.evaluate

    def spy(*args, **kwargs):
        stack = [f.function for f in __import__("inspect").stack()[1:6]]
        seen.append((kwargs["split"], "tune" in stack or "scores_at" in stack, kwargs.get("stream", "")))
        return real(*args, **kwargs)

    monkeypatch.setattr(ev.tuning, "evaluate", spy)
    return seen


def test_digits_development_run_touches_no_test_task_and_tuning_only_validation_tasks(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(os.path.join(ROOT, "experiments"))
    monkeypatch.setenv("WANDB_MODE", "disabled")
    import digits
    import learned_opt.meta.trainer as meta

    seen = _spy_task_splits(monkeypatch)
    monkeypatch.setattr(digits, "evaluate", __import__("learned_opt.evaluate.tuning", fromlist=["x"]).evaluate)
    monkeypatch.setattr(meta, "evaluate", __import__("learned_opt.evaluate.tuning", fromlist=["x"]).evaluate)
    digits.main(["--preset", "smoke", "--seeds", "1", "--out_dir", str(tmp_path / "dev")])
    assert seen and {s for s, _, _ in seen} == {"val"}  # development: no test task at all
    assert {st for _, _, st in seen} == {"tune", "select", "dev"}  # each use of validation tasks has its stream
    seen.clear()
    digits.main(["--preset", "smoke", "--seeds", "1", "--final", "true", "--out_dir", str(tmp_path / "final")])
    assert {s for s, tuning, _ in seen if tuning} == {"val"}  # tuning never touches the test split
    assert {s for s, tuning, st in seen if st == "select"} == {"val"}  # nor does checkpoint selection
    assert "test" in {s for s, _, _ in seen}  # the final run does evaluate on it


def test_digits_ablation_smoke_touches_validation_tasks_only(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(os.path.join(ROOT, "experiments"))
    monkeypatch.setenv("WANDB_MODE", "disabled")
    import digits_ablation

    splits = []
    real = digits_ablation.evaluate

    def spy(*args, **kwargs):
        splits.append((kwargs["split"], kwargs.get("stream")))
        return real(*args, **kwargs)

    monkeypatch.setattr(digits_ablation, "evaluate", spy)
    out = tmp_path / "ablation"
    summary = digits_ablation.main(["--preset", "smoke", "--out_dir", str(out)])
    assert splits and set(splits) == {("val", "ablation")}  # only validation tasks of the ablation's own stream
    assert set(summary["ratios"]) == {"final", "head free to raise 10x, rates e^+-3", "no augmentation",
                                      "first-order meta-gradients"}
    assert all(len(rows) == 1 and set(rows[0]) == {"6 steps", "8 steps", "relu"}
               for rows in summary["ratios"].values())
    assert "| final |" in (out / "table.md").read_text()
