"""experiments/general.py: the smoke run writes every promised number, touches no test task unless final, and its
targets' ``met`` flags follow their intervals.

A 2-seed smoke meta-training (``general_train.py --preset smoke``, subprocess) feeds in-process smoke runs of the
script (2 families, horizon 5, 2 tasks) with spies on every task seed drawn and every ``evaluate`` call.
"""
import math
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET_KEYS = ("heldout_gmean_ratio_vs_tuned_adam_1x", "heldout_gmean_ratio_vs_tuned_adam_10x",
               "heldout_test_loss_gmean_ratio_vs_tuned_adam", "heldout_gmean_ratio_vs_adam_default")
META_KEYS = tuple(k.replace("heldout_", "meta_") for k in TARGET_KEYS)
FAMILIES = ("logistic_regression", "wine_mlp")  # one meta-training and one held-out family


@pytest.fixture(scope="module")
def train_dir(tmp_path_factory):
    """A 2-seed smoke meta-training."""
    out = tmp_path_factory.mktemp("general_train")
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "general_train.py"), "--preset",
                           "smoke", "--workers", "1", "--out_dir", str(out)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def _run(tmp_path_factory, train_dir, final):
    """One in-process smoke run with spies; returns (module, summary, out_dir, task splits, script evals,
    tuning evals)."""
    out = tmp_path_factory.mktemp("general_final" if final else "general")
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(os.path.join(ROOT, "experiments"))
        import general
        import learned_opt.evaluate as E

        splits, script_evals, tune_evals = [], [], []
        real_seed, real_eval = E.task_seed, E.evaluate

        def spy_seed(split, *a, **k):
            splits.append(split)
            return real_seed(split, *a, **k)

        def spy(record):
            def f(family, optimizer, controller_fn=None, **kwargs):
                record.append({"optimizer": type(optimizer).__name__, **kwargs})
                return real_eval(family, optimizer, controller_fn, **kwargs)
            return f

        mp.setattr(E.run, "task_seed", spy_seed)
        mp.setattr(E.tuning, "evaluate", spy(tune_evals))  # tune() calls its module's evaluate
        mp.setattr(general, "evaluate", spy(script_evals))
        summary = general.main(["--preset", "smoke", "--families", ",".join(FAMILIES), "--train_dir",
                                str(train_dir), "--out_dir", str(out), "--workers", "1", "--final", str(final)])
    return general, summary, out, splits, script_evals, tune_evals


@pytest.fixture(scope="module")
def dev(tmp_path_factory, train_dir):
    return _run(tmp_path_factory, train_dir, final=False)


def test_summary_has_every_promised_number(dev):
    general, s, out, *_ = dev
    for key in TARGET_KEYS + META_KEYS + ("step_time_over_adam_mlp200k",):
        assert {"ratio", "ci_low", "ci_high", "bound", "met", "verdict"} <= set(s[key]), key
    assert all(s[k]["bound"] is None and s[k]["met"] is None for k in META_KEYS)
    assert [s[k]["bound"] for k in TARGET_KEYS] == [1.0, 1.2, 1.0, 0.5]
    assert s["step_time_over_adam_mlp200k"]["bound"] == 3.0 and s["step_time_over_adam_mlp200k"]["params"] > 2e5
    assert {"count", "runs", "by_family", "bound", "met"} <= set(s["divergences"])
    assert s["divergences"]["runs"] == 2 * 2 * 2 * len(FAMILIES)  # seeds x tasks x horizons x families
    p = s["protocol"]
    for key in ("meta_training_seeds", "validation_tasks", "tuning_metric", "test_split", "test_tasks",
                "tuned_hyperparameters"):
        assert key in p, key
    assert p["meta_training_seeds"] == 2 and p["validation_tasks"] == 2 and p["test_split"].startswith("val/dev")
    assert p["ci"] == "hierarchical_bootstrap" and p["loss_floor"] == general.LOSS_FLOOR
    for key in TARGET_KEYS:  # the families-fixed interval beside the one that resamples families
        assert {"ci_low", "ci_high"} <= set(s[key]["families_fixed"]) and s[key]["n_families"] == 1, key
    assert set(p["tuning_metric"]) == {"train_loss", "test_loss", "accuracy"}
    assert "learning rate only" in p["tuned_hyperparameters"]
    assert set(s["targets_met"]) == set(TARGET_KEYS) | {"divergences", "step_time_over_adam_mlp200k"}
    assert [r["family"] for r in s["table"]] == list(FAMILIES)
    methods = {"learned", "adam", "adamw", "momentum", general.DEFAULT_NAME, "digits_lstm"}
    for f in FAMILIES:
        fam = s["families"][f]
        assert set(fam["ms_per_step"]) >= methods and set(fam["divergences"]) == methods
        for h in ("5", "50"):
            rows = fam["horizons"][h]
            assert set(rows) == {"train_loss", "test_loss", "accuracy"}  # both families classify
            for row in rows.values():
                assert set(row["mean"]) == methods and set(row["paired"]) == methods - {"learned"}
                assert all(q["n_seeds"] == 2 and q["n_tasks"] == 2 for q in row["paired"].values())
        for n in ("adam", "adamw", "momentum"):
            tuned = s["tuned"][f][n]
            assert set(tuned) == {"5/train_loss", "5/val_loss", "50/train_loss", "50/val_loss"}
            assert all(set(t["hparams"]) == {"lr"} and isinstance(t["at_grid_edge"], bool) for t in tuned.values())
    assert s["families"]["wine_mlp"]["role"] == "heldout"
    assert s["heldout_gmean_ratio_vs_tuned_adam_1x"]["families"].keys() == {"wine_mlp"}
    table = (out / "table.md").read_text()
    assert all(f"| {f} |" in table for f in FAMILIES)
    assert (out / "curves.png").stat().st_size > 1000 and (out / "summary.json").exists()


def test_development_run_touches_validation_tasks_only(dev):
    general, s, _, splits, script_evals, tune_evals = dev
    assert splits and set(splits) == {"val"}
    assert script_evals and all((e["split"], e["stream"]) == ("val", "dev") for e in script_evals)
    assert tune_evals and all((e["split"], e["stream"]) == ("val", "tune") for e in tune_evals)
    # the learned optimizer runs at each horizon on its own (2 seeds x 2 families); the flagship once to the long
    # horizon; every run measures the initial train loss (divergence) and the short horizon on the way
    learned = [e for e in script_evals if e["optimizer"] == "NormMLP"]
    assert sorted(e["steps"] for e in learned) == [5] * 4 + [50] * 4
    assert [e["steps"] for e in script_evals if e["optimizer"] == "CoordLSTM"] == [50, 50]
    assert all(0 in e["checkpoints"] and (e["steps"] == 5 or 5 in e["checkpoints"]) for e in script_evals)


def test_final_run_evaluates_on_test_tasks_and_tunes_on_validation_tasks(tmp_path_factory, train_dir):
    _, s, _, splits, script_evals, tune_evals = _run(tmp_path_factory, train_dir, final=True)
    assert script_evals and all(e["split"] == "test" for e in script_evals)
    assert tune_evals and all((e["split"], e["stream"]) == ("val", "tune") for e in tune_evals)
    assert set(splits) == {"val", "test"} and s["protocol"]["test_split"].startswith("test")


def test_met_flags_follow_the_intervals(dev):
    _, s, *_ = dev
    for key in TARGET_KEYS + ("step_time_over_adam_mlp200k",):
        t = s[key]
        assert t["met"] == (t["ci_high"] <= t["bound"]), key
    for key in TARGET_KEYS:  # deterministic: the evaluations are
        t = s[key]
        assert t["ci_low"] <= t["ratio"] <= t["ci_high"] or not math.isfinite(t["ratio"]), key
    assert s["divergences"]["met"] == (s["divergences"]["count"] == 0)
    assert s["divergences"]["count"] == sum(sum(v.values()) for v in s["divergences"]["by_family"].values())


def test_family_ratio_and_target_rules(dev):
    from learned_opt.evaluate import family_ratio

    general = dev[0]
    rng = np.random.default_rng(0)
    base = rng.uniform(1, 2, 5)
    # learned at exactly half (family a) and a quarter (family b) of the baseline: no spread within a family, so
    # with the families fixed the interval is the point; resampling the families spreads it over [1/4, 1/2]
    r = family_ratio({"a": (np.stack([0.5 * base] * 3), base), "b": (np.stack([0.25 * base] * 3), base)},
                     floor=general.LOSS_FLOOR, n_boot=200)
    assert r["ratio"] == pytest.approx(math.sqrt(0.125)) and r["ci"] == "hierarchical_bootstrap"
    assert r["families_fixed"]["ci_low"] == pytest.approx(r["families_fixed"]["ci_high"])
    assert r["ci_low"] == pytest.approx(0.25) and r["ci_high"] == pytest.approx(0.5)
    assert r["families"] == {"a": pytest.approx(0.5), "b": pytest.approx(0.25)}
    assert general.target(r, 0.5)["met"] and not general.target(r, 0.3)["met"]
    # an interval that crosses the bound is not met; a reported-only record has no verdict
    spread = family_ratio({"a": (base[None] * rng.uniform(0.5, 2.0, (3, 5)), base)}, floor=general.LOSS_FLOOR,
                          n_boot=500)
    assert spread["ci_low"] < spread["ratio"] < spread["ci_high"]
    assert not general.target(spread, spread["ratio"])["met"]
    assert general.target(spread, None)["met"] is None
    # a diverged learned run makes the ratio infinite and the target unmet
    bad = np.stack([0.5 * base] * 3)
    bad[1, 2] = np.inf
    r = family_ratio({"a": (bad, base)}, floor=general.LOSS_FLOOR, n_boot=200)
    assert r["ratio"] == math.inf and r["nonfinite_tasks"] == 1 and not general.target(r, 1.0)["met"]
    # divergence: non-finite or above the initial whole-split train loss
    at = {0: {"train_loss": np.array([1.0, 1.0, 1.0])}, 5: {"train_loss": np.array([0.5, 1.5, np.nan])}}
    assert general.diverged(at, 5).tolist() == [False, True, True]


def test_missing_train_dir_is_refused(tmp_path, dev):
    general = dev[0]
    with pytest.raises(SystemExit, match="meta-trained seeds"):
        general.main(["--preset", "smoke", "--train_dir", str(tmp_path / "none"), "--out_dir", str(tmp_path)])
