"""experiments/estimators_horizon.py (issue 13, part 3): the smoke run meta-trains the same network with TBPTT and
PES from the same initial weights, writes every promised number into its summary and the issue's summary, touches
test tasks only when final (and only to evaluate), and its verdicts follow the intervals."""
import json
import math
import os

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(tmp_path_factory, final, train_dir=None, extra=()):
    out = tmp_path_factory.mktemp("horizon_final" if final else "horizon")
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(os.path.join(ROOT, "experiments"))
        mp.setenv("WANDB_MODE", "disabled")
        import estimators_horizon as H
        import learned_opt.evaluate as E

        splits, evals = [], []
        real_seed, real_eval = E.task_seed, E.evaluate

        def spy_seed(split, *a, **k):
            splits.append(split)
            return real_seed(split, *a, **k)

        def spy_eval(family, optimizer, controller_fn=None, **kwargs):
            evals.append({**kwargs, "pool": family.pool})
            return real_eval(family, optimizer, controller_fn, **kwargs)

        mp.setattr(E.run, "task_seed", spy_seed)
        mp.setattr(E.batched, "task_seed", spy_seed)  # the tuning runs (evaluate_batched)
        mp.setattr(H, "evaluate", spy_eval)
        argv = ["--preset", "smoke", "--out_dir", str(out), "--estimators_summary", str(out / "est.json"),
                "--final", str(final), "--workers", "1", *extra]
        if train_dir:
            argv += ["--train_dir", str(train_dir)]
        summary = H.main(argv)
    return H, summary, out, splits, evals


@pytest.fixture(scope="module")
def dev(tmp_path_factory):
    return _run(tmp_path_factory, final=False)


def test_summary_has_every_promised_number(dev):
    H, s, out, *_ = dev
    cfg = H.Config(**{**H.Config().__dict__, **H.PRESETS["smoke"]})
    assert set(s["per_multiple"]) == set(cfg.multiples)
    for m, rec in s["per_multiple"].items():
        for key in ("tbptt_vs_tuned_adam", "pes_vs_tuned_adam", "pes_over_tbptt"):
            assert {"ratio", "ci_low", "ci_high", "wilcoxon_p", "win_rate"} <= set(rec[key])
        assert rec["tuned_adam"]["lr"] > 0 and rec["tuned_adam"]["edge"] != "grid"  # widened until interior
    key = "pes_over_tbptt_loss_at_2x"  # smoke multiples (1, 2, 3): the middle one stands for 10x
    assert math.isfinite(s[key]) and s["targets"][key]["bound"] == 1.0
    assert s["targets"]["pes_divergences_at_3x"]["value"] == s["pes_divergences_at_3x"]
    # meta-training cost side by side: PES runs every inner step once per particle and once unperturbed
    cost = s["meta_training"]
    assert cost["pes"]["inner_steps_per_seed"] == (cfg.particles + 1) * cost["tbptt"]["inner_steps_per_seed"]
    assert cost["pes"]["meta_steps_per_seed"] == cost["tbptt"]["meta_steps_per_seed"] == \
        cfg.iterations * cfg.horizon // cfg.truncation
    assert len(s["break_multiple"]["pes"]) == cfg.seeds
    # the raw per-task losses are kept, and the ratios are recomputable from them
    raw = s["losses"]
    assert np.asarray(raw["pes"][cfg.horizon * 2]).shape == (cfg.seeds, cfg.test_tasks)
    from learned_opt.evaluate import paired
    again = paired(H.floored(raw["pes"][cfg.horizon * 2]), H.floored(raw["tbptt"][cfg.horizon * 2]))
    assert again["ratio"] == pytest.approx(s["per_multiple"][2]["pes_over_tbptt"]["ratio"])
    for name in ("summary.json", "table.md", "curves.png"):
        assert os.path.exists(out / name)
    assert not os.path.exists(out / "est.json")  # a development run leaves the issue's summary alone


def test_both_estimators_start_from_the_same_weights_and_end_apart(dev):
    H, s, out, *_ = dev
    cfg = H.Config(**{**H.Config().__dict__, **H.PRESETS["smoke"], "out_dir": str(out)})
    from learned_opt.meta import load_lopt
    for seed in range(cfg.seeds):
        a, b = H.new_net(cfg, seed), H.new_net(cfg, seed)
        assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
        tb, pes = (load_lopt(H.lopt_path(cfg, e, seed)) for e in ("tbptt", "pes"))
        assert tb.config["horizon_dropout"] == 1.0  # the network never knows the horizon
        assert any(not torch.equal(x, y) for x, y in zip(tb.parameters(), pes.parameters()))


def test_development_run_touches_no_test_task(dev):
    *_, splits, evals = dev
    assert splits and "test" not in splits
    assert all(e["split"] == "val" and e["stream"] == "dev" and e["pool"] == "meta" for e in evals)


def test_final_run_evaluates_on_test_tasks_only_and_tunes_on_validation(tmp_path_factory, dev):
    H, s_dev, out_dev, *_ = dev
    H2, s, out, splits, evals = _run(tmp_path_factory, final=True, train_dir=out_dev / "train")
    assert evals and all(e["split"] == "test" and e["pool"] == "heldout" for e in evals)  # images never seen
    assert "test" in splits and "val" in splits  # tuning (val, stream tune) and meta-training never see test
    assert s["config"]["final"] is True and "held-out image pool" in s["task"]
    # the issue's summary (here a copy, never results/) got the target keys, and keeps what was there
    with open(out / "est.json") as f:
        merged = json.load(f)
    assert merged["pes_over_tbptt_loss_at_2x"] == s["pes_over_tbptt_loss_at_2x"]
    assert "pes_divergences_at_3x" in merged["targets"] and merged["horizon_generalisation"].endswith("summary.json")
    with open(out / "est.json", "w") as f:
        json.dump({"influence_balancing_pes_rel_error": 0.01, "targets": {"x": 1},
                   "not_implemented": ["horizon generalisation on digits", "other"]}, f)
    H2.merge_estimators_summary(str(out / "est.json"), {"k": 1}, {"k": {"bound": 1}}, "p")
    with open(out / "est.json") as f:
        merged = json.load(f)
    assert merged["influence_balancing_pes_rel_error"] == 0.01 and set(merged["targets"]) == {"x", "k"}
    assert merged["not_implemented"] == ["other"]
    # the meta-training was reused, not redone
    assert s["meta_training"]["pes"]["train_seconds_per_seed"] == s_dev["meta_training"]["pes"][
        "train_seconds_per_seed"]


def test_a_reproducibility_check_run_leaves_the_issue_summary_alone(tmp_path_factory, dev):
    """reproduce_check.py re-runs one seed with --final true --check_run true into its own folder: the issue's
    summary (results/estimators/summary.json in a real run) must keep the committed run's numbers (a check run
    once overwrote them with its one seed's)."""
    _, _, out_dev, *_ = dev
    H, s, out, *_ = _run(tmp_path_factory, final=True, train_dir=out_dev / "train",
                         extra=("--check_run", "true", "--seeds", "1"))
    assert s["config"]["check_run"] is True and s["config"]["final"] is True
    assert not (out / "est.json").exists()


def test_break_multiple_and_verdicts():
    import sys
    sys.path.insert(0, os.path.join(ROOT, "experiments"))
    import estimators_horizon as H
    cfg = H.Config(horizon=10, multiples=(1, 2, 5))
    at = {10: np.array([1.0, 1.0, 1.0]), 20: np.array([1.5, 2.5, np.nan]), 50: np.array([1.9, 0.5, 1.0])}
    assert [H.break_multiple(cfg, at, t) for t in range(3)] == [math.inf, 2.0, 2.0]


def test_ratios_floor_tiny_losses_and_keep_infinite_ones():
    import sys
    sys.path.insert(0, os.path.join(ROOT, "experiments"))
    import estimators_horizon as H
    x = H.floored([1e-9, 0.5, np.inf, np.nan])
    assert x[0] == H.LOSS_FLOOR and x[1] == 0.5 and np.isinf(x[2]) and np.isnan(x[3])


def test_train_only_meta_trains_each_seed_once_and_reads_no_task(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(os.path.join(ROOT, "experiments"))
    import estimators_horizon as H

    tuned = []
    monkeypatch.setattr(H, "tune", lambda *a, **k: tuned.append(a) or {})
    args = ["--preset", "smoke", "--workers", "1", "--out_dir", str(tmp_path), "--train_only", "true"]
    first = H.main(args)["train_runs"]
    assert sorted((r["estimator"], r["seed"]) for r in first) == [(e, s) for e in ("pes", "tbptt") for s in (0, 1)]
    assert not any(r.get("reused") for r in first)
    again = H.main(args)["train_runs"]
    assert all(r["reused"] for r in again) and [r["train_seconds"] for r in again] == \
        [r["train_seconds"] for r in first]
    assert tuned == [] and sorted(os.listdir(tmp_path)) == ["train"]  # no summary, no test read, no tuning


def test_tune_only_tunes_on_validation_tasks_and_trains_nothing(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(os.path.join(ROOT, "experiments"))
    import estimators_horizon as H
    import learned_opt.evaluate as E

    splits = []
    real = E.task_seed
    monkeypatch.setattr(E.batched, "task_seed", lambda split, *a, **k: splits.append(split) or real(split, *a, **k))
    monkeypatch.setattr(E.run, "task_seed", lambda split, *a, **k: splits.append(split) or real(split, *a, **k))
    out = H.main(["--preset", "smoke", "--workers", "1", "--out_dir", str(tmp_path), "--tune_only", "true",
                  "--final", "true"])
    assert set(out["tuned_adam"]) == {20, 40, 60} and all(r["lr"] > 0 for r in out["tuned_adam"].values())
    assert set(splits) == {"val"}
    assert sorted(os.listdir(tmp_path)) == ["tuning_cache"]  # no meta-training, no summary, no test read
