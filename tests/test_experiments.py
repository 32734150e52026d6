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


def test_digits_smoke_writes_summary_with_required_keys(tmp_path):
    out = tmp_path / "digits"
    proc = run_script("digits.py", "--preset", "smoke", "--out_dir", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    for key in ("learned_over_best_baseline_at_10", "learned_over_best_baseline_at_20", "unseen",
                "never_above_initial_loss", "speedup_over_tuned_adam", "meta_train_seconds"):
        assert key in summary, key
    assert set(summary["unseen"]) == {"relu"}
    assert set(summary["max_mean_loss_over_initial_unseen"]) == {"relu"}
    assert set(summary["reference_adam_warmup_cosine"]) == {"10", "20"}  # the schedule reference, per horizon
    for h in ("10", "20"):  # test accuracy of the learned optimizer at every horizon, not only the longest
        assert 0.0 <= summary["learned"][h]["test_accuracy"] <= 1.0
    assert (out / "loss_curves.png").exists() and (out / "speedup.png").exists()
    # the tuning cache is reused: a second run re-tunes nothing
    cached = sorted(os.listdir(out / "tuning_cache"))
    assert cached and all(name.startswith("tune-") for name in cached)


def test_digits_ablation_smoke_touches_validation_tasks_only(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(os.path.join(ROOT, "experiments"))
    monkeypatch.setenv("WANDB_MODE", "disabled")
    import digits_ablation

    splits = []
    real = digits_ablation.evaluate

    def spy(*args, **kwargs):
        splits.append(kwargs.get("split", "test"))
        return real(*args, **kwargs)

    monkeypatch.setattr(digits_ablation, "evaluate", spy)
    out = tmp_path / "ablation"
    summary = digits_ablation.main(["--preset", "smoke", "--out_dir", str(out)])
    assert splits and set(splits) == {"val"}  # no test task is ever evaluated
    assert set(summary["ratios"]) == {"final", "head free to raise 10x, rates e^+-3", "no augmentation",
                                      "first-order meta-gradients"}
    assert all(len(rows) == 1 and set(rows[0]) == {"6 steps", "8 steps", "relu"}
               for rows in summary["ratios"].values())
    assert "| final |" in (out / "table.md").read_text()
