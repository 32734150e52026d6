"""experiments/general.py: the smoke run writes every number issue #24 asks for, touches no test task unless final,
resumes an interrupted final read without counting a second one, and its verdicts and counts follow their data.

A 2-seed smoke meta-training (``general_train.py --preset smoke``, subprocess) feeds in-process smoke runs of the
script (one meta-training and one held-out family, horizon 5, 2 tasks) with spies on every task seed drawn and
every ``evaluate`` call.
"""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BOUNDED = {"train_vs_tuned_adam_1x": 1.0, "train_vs_tuned_adam_10x": 1.2, "test_vs_tuned_adam": 1.1,
           "train_vs_best_single_adam_lr_1x": 0.7}
REPORTED = ("train_vs_tuned_muon_1x", "train_vs_tuned_adamw_1x", "train_vs_tuned_momentum_1x",
            "train_vs_adam_default_1x", "train_vs_tuned_adam_30x")
FAMILIES = ("logistic_regression", "wine_mlp")  # one meta-training and one held-out family
SMOKE = ["--preset", "smoke", "--families", ",".join(FAMILIES), "--workers", "1",
         "--baselines", "adam,adamw,momentum,muon"]


@pytest.fixture(scope="module")
def train_dir(tmp_path_factory):
    """A 2-seed smoke meta-training (2 meta-iterations, the weights after the first kept: compute scaling)."""
    out = tmp_path_factory.mktemp("general_train")
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "general_train.py"), "--preset",
                           "smoke", "--workers", "1", "--out_dir", str(out), "--budgets", "1"], cwd=ROOT,
                          capture_output=True,
                          text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def _spied(out, train_dir, final, extra=()):
    """One in-process smoke run with spies; returns (module, summary, task splits, script evals, tuning evals)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(os.path.join(ROOT, "experiments"))
        import general
        import general_jobs
        import general_runs
        import learned_opt.evaluate as E

        splits, script_evals, tune_evals = [], [], []
        real_seed, real_eval, real_batched = E.task_seed, E.evaluate, general_jobs.evaluate_batched

        def spy_seed(split, *a, **k):
            splits.append(split)
            return real_seed(split, *a, **k)

        def spy(record, real):
            def f(family, optimizer, *args, **kwargs):
                record.append({"optimizer": type(optimizer).__name__, **kwargs})
                return real(family, optimizer, *args, **kwargs)
            return f

        mp.setattr(E.run, "task_seed", spy_seed)
        mp.setattr(E.batched, "task_seed", spy_seed)
        mp.setattr(E.tuning, "evaluate", spy(tune_evals, real_eval))  # tune() calls its module's evaluate
        mp.setattr(E.tuning, "evaluate_batched", spy(tune_evals, E.tuning.evaluate_batched))
        mp.setattr(general_jobs, "evaluate_batched", spy(tune_evals, real_batched))  # the single-rate sweep
        mp.setattr(general_runs, "evaluate", spy(script_evals, real_eval))  # every evaluation run
        summary = general.main(SMOKE + ["--train_dir", str(train_dir), "--out_dir", str(out), "--final", str(final),
                                        *extra])
    return general, summary, splits, script_evals, tune_evals


@pytest.fixture(scope="module")
def dev(tmp_path_factory, train_dir):
    out = tmp_path_factory.mktemp("general")
    return (*_spied(out, train_dir, False), out)


def test_summary_has_every_promised_number(dev):
    general, s, *_, out = dev
    for key in (*BOUNDED, *REPORTED, "step_time_over_adamw_200k"):
        assert {"ratio", "ci_low", "ci_high", "bound", "met", "verdict"} <= set(s[key]), key
    assert {k: s[k]["bound"] for k in BOUNDED} == BOUNDED
    assert all(s[k]["bound"] is None and s[k]["met"] is None for k in REPORTED)
    assert all(s["meta_" + k]["bound"] is None for k in BOUNDED)  # meta-training families: reported apart
    for key in (*BOUNDED, *REPORTED):  # held-out families only; the t interval over seeds beside the bootstrap
        assert s[key]["families"].keys() == {"wine_mlp"} and len(s[key]["per_seed_ratio"]) == 2, key
    assert s["step_time_over_adamw_200k"]["bound"] == 2.0 and s["step_time_over_adamw_200k"]["params"] > 2e5
    p = s["protocol"]
    assert (p["heldout_families"], p["tasks_per_heldout_family"], p["meta_training_seeds"],
            p["baseline_tuning_tasks"]) == (1, 2, 2, 2)
    assert p["test_split"].startswith("val/dev") and p["ci"] == "hierarchical_bootstrap" and p["loss_floor"] == 1e-6
    assert s["horizons"] == {"1x": 5, "10x": 50, "30x": 150}
    # divergences and late spikes over every learned run: seeds x tasks x (1x, 10x) + seeds x stress tasks (30x)
    assert s["divergences"]["runs"] == s["late_spikes"]["runs"] == len(FAMILIES) * (2 * 2 * 2 + 2 * 1)
    assert s["late_spikes"]["fraction"] == s["late_spikes"]["count"] / s["late_spikes"]["runs"]
    for f in FAMILIES:  # every baseline tuned on every axis of the protocol, per horizon and tuning metric
        for n in ("adam", "adamw", "momentum", "muon"):
            tuned = s["tuned"][f][n]
            assert set(tuned) == {"5/train_loss", "5/val_loss", "50/train_loss", "50/val_loss"}
            axes = {a.name for a in general.PROTOCOL_AXES[n]} | {"lr"}
            assert all(set(t["hparams"]) == axes for t in tuned.values()), (f, n)
    assert set(s["single_adam_rate"]) == {"5", "50"}
    assert set(s["floors"]) == {"1e-08", "1e-06", "0.0001"}
    # compute scaling: the weights after 1 meta-iteration, then the final ones (their point is the headline)
    cs = s["compute_scaling"]
    assert [p["iterations"] for p in cs] == [1, "final"] and all(p["cpu_hours"] > 0 for p in cs)
    assert cs[0]["cpu_hours"] < cs[1]["cpu_hours"]
    assert cs[1]["train_vs_tuned_adam_1x"]["ratio"] == s["train_vs_tuned_adam_1x"]["ratio"]
    assert s["targets_met"]["compute_scaling"] is False  # 2 points of the 3 the issue asks for
    assert (out / "table.md").exists() and (out / "curves.png").stat().st_size > 1000


def test_development_run_touches_validation_tasks_only(dev):
    general, s, splits, script_evals, tune_evals, _ = dev
    assert splits and set(splits) == {"val"}
    assert script_evals and all((e["split"], e["stream"]) == ("val", "dev") for e in script_evals)
    assert tune_evals and all((e["split"], e["stream"]) == ("val", "tune") for e in tune_evals)
    # the learned optimizer runs at each horizon on its own: 2 seeds x 2 families x (5, 50, 150), and the weights
    # after 1 meta-iteration at 5 steps on the held-out family (2 seeds)
    learned = sorted(e["steps"] for e in script_evals if e["optimizer"] == "NormMLP")
    assert learned == [5] * 6 + [50] * 4 + [150] * 4
    assert all(0 in e["checkpoints"] and (e["steps"] == 5 or 5 in e["checkpoints"]) for e in script_evals)


def test_cached_jobs_are_reused_and_a_changed_setting_recomputes(dev, train_dir):
    *_, out = dev
    again = _spied(out, train_dir, False)
    assert again[3] == [] and again[4] == []  # every job came from out_dir/jobs and the tuning cache
    assert again[1]["train_vs_tuned_adam_1x"]["ratio"] == dev[1]["train_vs_tuned_adam_1x"]["ratio"]
    changed = _spied(out, train_dir, False, ["--checkpoints", "3"])
    assert changed[3]  # a computing setting changed: the evaluation runs ran again


def test_final_read_resumes_once_then_refuses(tmp_path, train_dir):
    out = tmp_path / "final"
    _, s, splits, script_evals, tune_evals = _spied(out, train_dir, True)
    assert script_evals and all(e["split"] == "test" for e in script_evals)
    assert tune_evals and all((e["split"], e["stream"]) == ("val", "tune") for e in tune_evals)
    assert s["protocol"]["test_reads"] == 1 and s["protocol"]["test_split"].startswith("test")
    marker = out / "jobs" / "read.json"
    assert json.loads(marker.read_text())["complete"] is True
    with pytest.raises(SystemExit) as e:  # a finished read is not re-opened: the ledger refuses
        _spied(out, train_dir, True)
    assert e.value.code == 2
    # an interrupted read (its marker still open) resumes: no second read, the cached jobs are reused
    rec = json.loads(marker.read_text())
    marker.write_text(json.dumps({**rec, "complete": False}))
    _, s2, _, evals2, _ = _spied(out, train_dir, True)
    assert s2["protocol"]["test_reads"] == 1 and evals2 == []
    assert s2["train_vs_tuned_adam_1x"]["ratio"] == s["train_vs_tuned_adam_1x"]["ratio"]


def test_met_flags_and_counts_follow_their_data(dev):
    s = dev[1]
    for key in (*BOUNDED, "step_time_over_adamw_200k"):
        t = s[key]
        assert t["met"] == (t["ci_high"] <= t["bound"]), key
        assert t["ci_low"] <= t["ratio"] <= t["ci_high"] or not math.isfinite(t["ratio"]), key
    for key in ("divergences", "late_spikes"):
        assert s[key]["count"] == sum(r["divergences" if key == "divergences" else "late_spikes"]
                                      for fam in s["divergences"]["by_family"].values() for r in fam.values())
    assert s["divergences"]["met"] == (s["divergences"]["count"] == 0)
    assert s["late_spikes"]["met"] == (s["late_spikes"]["fraction"] <= 0.05)


def test_run_flags_and_single_rate_rules(dev):
    import general_jobs
    import general_report

    at = {0: {"train_loss": np.array([1.0, 1.0, 1.0, 1.0])}, 5: {"train_loss": np.array([0.1, 0.1, 0.5, 0.2])},
          10: {"train_loss": np.array([0.5, 1.5, np.nan, 0.3])}}
    flags = general_report.run_flags(at, 10, 2.0)
    assert flags["diverged"].tolist() == [False, True, True, False]  # above the initial loss, non-finite
    assert flags["late_spike"].tolist() == [True, False, False, False]  # 0.5 > 2 x 0.1; 0.3 < 2 x 0.2
    # the single rate minimises the mean over families of log(score / the family's best)
    scores = {"a": {1e-3: {5: 1.0}, 1e-2: {5: 2.0}, 1e-1: {5: 8.0}},
              "b": {1e-3: {5: 10.0}, 1e-2: {5: 1.0}, 1e-1: {5: float("inf")}}}
    r = general_jobs.single_rate(scores, 5, 1e-6)
    assert r["lr"] == 1e-2 and r["mean_log_gap"] == pytest.approx(math.log(2) / 2) and not r["at_grid_edge"]
    assert general_jobs.single_rate({"a": scores["a"]}, 5, 1e-6)["at_grid_edge"]


def test_bad_settings_are_refused(tmp_path, train_dir, dev):
    general = dev[0]
    for argv, msg in ((["--train_dir", str(tmp_path / "none")], "meta-trained seeds"),
                      (["--families", "nope"], "--families"), (["--baselines", "momentum"], "include adam"),
                      (["--baselines", "adam,lion"], "--baselines"), (["--long_factor", "40"], "--long_factor")):
        with pytest.raises(SystemExit, match=msg):
            general.main(["--preset", "smoke", "--train_dir", str(train_dir), "--out_dir", str(tmp_path), *argv])
    assert not (tmp_path / "summary.json").exists()
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "summary.json").write_text(json.dumps({"config": {"sample_horizons": [10, 300]}}))
    assert general.meta_training_horizon(str(tmp_path / "t")) == 300
    with pytest.raises(SystemExit, match="--horizon"):
        general.meta_training_horizon(str(tmp_path / "none"))


def test_stage1_jobs_are_found_again_by_the_final_run(monkeypatch, tmp_path):
    """The validation-only jobs (tuning, the single-rate sweep) keep their cache key between a --tune_only run and
    the --final run (the sweep is CPU-hours; a key that named the split re-ran it); the evaluation jobs do not."""
    monkeypatch.syspath_prepend(os.path.join(ROOT, "experiments"))
    import general
    from common import parse_config
    from general_jobs import JobCache

    common = ["--horizon", "200", "--out_dir", str(tmp_path)]
    tune = JobCache(parse_config(general.Config, general.PRESETS, ["--tune_only", "true", *common]), {})
    final = JobCache(parse_config(general.Config, general.PRESETS, ["--final", "true", *common]), {})
    other = JobCache(parse_config(general.Config, general.PRESETS, ["--tune_tasks", "21", *common]), {})
    for spec in (("tune", "wine_mlp", "adam"), ("sweep", "wine_mlp")):
        assert tune.key(spec) == final.key(spec)
        assert other.key(spec) != tune.key(spec)  # what the tuning depends on still keys it
    spec = ("baseline", "wine_mlp", "adam", (("lr", 0.01),), 200, 10)
    assert tune.key(spec) != final.key(spec)  # validation tasks against the final-test split


def test_sweep_scores_are_cached_by_setting_and_reused_after_a_source_change(monkeypatch, tmp_path):
    """The single-rate sweep keeps its scores per rate with the tuning scores (keyed on the family, tasks and
    horizons, not on the sources): a second run, as after a source change, evaluates nothing and gets the same
    scores; another number of tuning tasks is another cache."""
    monkeypatch.syspath_prepend(os.path.join(ROOT, "experiments"))
    import general
    import general_jobs
    from common import parse_config

    flags = ["--preset", "smoke", "--out_dir", str(tmp_path), "--cache_dir", str(tmp_path / "cache")]
    cfg = parse_config(general.Config, general.PRESETS, flags)
    first = general_jobs.run_job(cfg, ("sweep", "wine_mlp"), {})
    assert len(first["scores"]) == len(general_jobs.single_lr_axis(cfg)) >= 2

    def refuse(*a, **k):
        raise AssertionError("the sweep ran again")

    monkeypatch.setattr(general_jobs, "evaluate_batched", refuse)
    again = general_jobs.run_job(cfg, ("sweep", "wine_mlp"), {})
    assert again["scores"] == first["scores"]
    other = parse_config(general.Config, general.PRESETS, flags + ["--tune_tasks", str(cfg.tune_tasks + 1)])
    with pytest.raises(AssertionError, match="ran again"):
        general_jobs.run_job(other, ("sweep", "wine_mlp"), {})


def test_two_evaluations_sharing_a_jobs_dir_share_the_baseline_runs(monkeypatch, tmp_path):
    """--jobs_dir: the v1 and the candidate's evaluations (other out_dirs) find the same baseline runs; the
    learned runs stay apart (keyed on the weights)."""
    monkeypatch.syspath_prepend(os.path.join(ROOT, "experiments"))
    import general
    from common import parse_config
    from general_jobs import JobCache

    def cache(out):
        return JobCache(parse_config(general.Config, general.PRESETS, ["--out_dir", str(tmp_path / out),
                                                                       "--jobs_dir", str(tmp_path / "jobs")]), {})

    spec = ("baseline", "wine_mlp", "adam", (("lr", 0.01),), 200, 10)
    assert cache("v1").path(spec) == cache("v2").path(spec) == str(tmp_path / "jobs" / f"{cache('v1').key(spec)}.pkl")
    alone = JobCache(parse_config(general.Config, general.PRESETS, ["--out_dir", str(tmp_path / "v3")]), {})
    assert alone.path(spec) == str(tmp_path / "v3" / "jobs" / f"{alone.key(spec)}.pkl")


def _traced_functions(fn) -> set:
    """``(file, function)`` of every package and experiment function that ``fn()`` calls (module bodies left out)."""
    import sys as _sys

    seen = set()

    def profile(frame, event, arg):
        if event == "call" and frame.f_code.co_name != "<module>":
            seen.add((frame.f_code.co_filename, frame.f_code.co_name))

    _sys.setprofile(profile)
    try:
        fn()
    finally:
        _sys.setprofile(None)
    rel = {(os.path.relpath(f, ROOT).replace(os.sep, "/"), name) for f, name in seen if f.startswith(ROOT + os.sep)}
    return {(f, name) for f, name in rel if f.startswith(("learned_opt/", "experiments/"))}


# per kind of evaluation run: the specs to trace (every suite family), files it must reach, the list keying it
HPARAMS = {"adam": {"lr": 1e-3}, "adamw": {"lr": 1e-3, "weight_decay": 1e-2},
           "momentum": {"lr": 1e-2, "momentum": 0.9}, "muon": {"lr": 1e-2}}
WEIGHTS = {0: os.path.join(ROOT, "results/general/train/seed0/lopt.pt"),  # v1: per-tensor normalised output
           1: os.path.join(ROOT, "results/general/train_v2b/seed0/lopt.pt")}  # v2b: tanh(mlp) - adam
GUARDS = {
    "baseline": (lambda fam: [("baseline", fam, n, tuple(hp.items()), 2, 1) for n, hp in HPARAMS.items()],
                 {"learned_opt/optim/baselines.py", "learned_opt/optim/muon.py", "learned_opt/evaluate/run.py"},
                 "BASELINE_SOURCES"),
    "learned": (lambda fam: [("learned", fam, seed, 2, 1) for seed in WEIGHTS],
                {"learned_opt/optim/normmlp.py", "learned_opt/meta/checkpoint.py", "learned_opt/evaluate/run.py"},
                "LEARNED_SOURCES"),
}


@pytest.mark.parametrize("kind", list(GUARDS))
def test_evaluation_runs_execute_only_the_sources_their_key_hashes(kind, monkeypatch, tmp_path):
    """Guard of the evaluation runs' narrower cache keys: jobs through the job runner (as an evaluation runs them)
    of every suite family, for every protocol baseline and for the committed weights of both recipes, call
    functions defined only in :data:`general_runs.BASELINE_SOURCES` / :data:`general_runs.LEARNED_SOURCES`,
    besides the runner's dispatch (a run that started to use a module outside its list would keep stale cached
    runs after that module changed)."""
    monkeypatch.syspath_prepend(os.path.join(ROOT, "experiments"))
    import general
    import general_jobs
    import general_runs
    from common import parse_config

    from learned_opt.tasks.suite import SUITE

    assert set(HPARAMS) >= set(general.Config.baselines)
    cfg = parse_config(general.Config, general.PRESETS, ["--preset", "smoke", "--out_dir", str(tmp_path)])
    specs, reached, listed = GUARDS[kind]

    def runs():
        for fam in SUITE:
            for spec in specs(fam):
                general_jobs.run_job(cfg, spec, WEIGHTS)

    called = _traced_functions(runs) - {("experiments/general_jobs.py", "run_job")}
    files = {f for f, _ in called}
    assert reached <= files
    covered = getattr(general_runs, listed)
    outside = sorted(f for f in files if not any(f == s or f.startswith(s + "/") for s in covered))
    assert not outside, f"{kind} runs execute {outside}: add them to general_runs.{listed}"


def test_a_learned_optimizer_change_keeps_the_baseline_runs(monkeypatch, tmp_path):
    """A source change outside BASELINE_SOURCES (a learned optimizer's module) re-keys the learned runs and keeps
    the baseline runs; one outside both (the statistics, the job runner) keeps both and re-keys the other jobs; a
    change to a task re-keys both."""
    import shutil

    monkeypatch.syspath_prepend(os.path.join(ROOT, "experiments"))
    import general
    import general_jobs
    from common import parse_config

    root = tmp_path / "repo"
    for folder in ("learned_opt", "experiments"):
        shutil.copytree(os.path.join(ROOT, folder), root / folder, ignore=shutil.ignore_patterns("__pycache__", "*.pt"))
    monkeypatch.setattr(general_jobs, "ROOT", str(root))
    weights = tmp_path / "w.pt"
    weights.write_bytes(b"weights")
    cfg = parse_config(general.Config, general.PRESETS, ["--out_dir", str(tmp_path / "out")])
    base = ("baseline", "wine_mlp", "adam", (("lr", 0.01),), 200, 10)
    learned = ("learned", "wine_mlp", 0, 200, 10)

    tune = ("tune", "wine_mlp", "adam")

    def keys():
        cache = general_jobs.JobCache(cfg, {0: str(weights)})
        return cache.key(base), cache.key(learned), cache.key(tune)

    def edit(path):
        with open(root / path, "a") as f:
            f.write("\n# an edit\n")

    before = keys()
    for path in ("learned_opt/evaluate/stats.py", "experiments/general_jobs.py", "experiments/general_report.py"):
        edit(path)
    after_stats = keys()
    assert after_stats[:2] == before[:2] and after_stats[2] != before[2]
    edit("learned_opt/optim/lstm.py")
    after_lstm = keys()
    assert after_lstm[0] == before[0] and after_lstm[1] != before[1]
    with open(root / "learned_opt" / "tasks" / "tabular.py", "a") as f:
        f.write("\n# an edit\n")
    after_task = keys()
    assert after_task[0] != after_lstm[0] and after_task[1] != after_lstm[1]


def test_sources_digest_takes_files_and_refuses_a_missing_entry(tmp_path):
    """A file entry enters by its bytes; a missing entry (a renamed module) is an error, not a silently smaller key."""
    from learned_opt.evaluate import ledger

    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "a.py").write_text("x = 1\n")
    (tmp_path / "b.py").write_text("y = 1\n")
    one = ledger.sources_digest(str(tmp_path), ("pkg", "b.py"))
    assert one != ledger.sources_digest(str(tmp_path), ("pkg",))
    (tmp_path / "b.py").write_text("y = 2\n")
    assert ledger.sources_digest(str(tmp_path), ("pkg", "b.py")) != one
    with pytest.raises(FileNotFoundError, match="c.py"):
        ledger.sources_digest(str(tmp_path), ("pkg", "c.py"))
