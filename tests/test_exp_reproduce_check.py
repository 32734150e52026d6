"""experiments/reproduce_check.py: a one-seed re-run under another kernel path, checked against the committed seeds'
prediction interval; the statistics on known numbers, then a smoke run end to end."""
import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "experiments"))
import reproduce_check as rc  # noqa: E402


def test_prediction_interval_for_one_new_seed():
    lo, hi = rc.prediction_interval([1.0, 2.0, 3.0], 0.95)
    half = 4.302652729911275 * 1.0 * math.sqrt(1 + 1 / 3)  # t(0.975, 2) * sd * sqrt(1 + 1/n)
    assert lo == pytest.approx(2.0 - half) and hi == pytest.approx(2.0 + half)
    assert rc.prediction_interval([1.0], 0.95) == (-math.inf, math.inf)  # one seed says nothing about the spread


def test_check_pairs_records_by_path_and_judges_the_one_seed_value():
    committed = {"paired": {"a": {"ratio": 1.0, "ci_low": 0.99, "ci_high": 1.01, "per_seed_ratio": [0.98, 1.0, 1.02]},
                            "b": {"ratio": 0.5, "per_seed_ratio": [0.5, 0.5, 0.51]}},
                 "other": {"ratio": 3.0}}  # no per-seed values: not a headline
    again = {"paired": {"a": {"ratio": 1.05, "per_seed_ratio": [1.05]}, "b": {"ratio": 0.9, "per_seed_ratio": [0.9]}}}
    out = rc.check(committed, again, 0.95)
    assert set(out) == {"paired/a", "paired/b"}
    assert out["paired/a"]["within"] and not out["paired/b"]["within"]
    assert out["paired/a"]["committed_interval"] == [0.99, 1.01]  # reported beside, not used
    # positive ratios are judged on the log scale: a heavy-tailed record's interval stays above 0 and is
    # multiplicative around the seeds' geometric mean
    # a one-seed re-run's ratio is its seed's value, also where its summary kept no per-seed list; with more
    # seeds a bare ratio is not one seed's value and is not checked
    bare = {"config": {"seeds": 1}, "paired": {"a": {"ratio": 1.05}, "b": {"ratio": 0.9}}}
    assert rc.check(committed, bare, 0.95)["paired/a"]["rerun_value"] == 1.05
    assert rc.check(committed, {**bare, "config": {"seeds": 3}}, 0.95) == {}
    heavy = rc.check({"r": {"ratio": 1.0, "per_seed_ratio": [0.01, 1.0, 100.0]}},
                     {"r": {"ratio": 0.0, "per_seed_ratio": [1e-12]}}, 0.95)["r"]
    assert heavy["scale"] == "log" and heavy["prediction_interval"][0] > 0 and not heavy["within"]
    lo, hi = heavy["prediction_interval"]
    assert math.sqrt(lo * hi) == pytest.approx(1.0)


def test_unknown_kernel_path_and_experiment_are_refused():
    with pytest.raises(ValueError, match="--kernel_path 'avx9'"):
        rc.Config(kernel_path="avx9")
    with pytest.raises(ValueError, match="--experiments: unknown nope"):
        rc.Config(experiments=("nope",))


def test_merge_keeps_the_other_experiments_headlines_of_the_same_kernel_path(tmp_path):
    path = tmp_path / "summary.json"
    old = {"rerun_kernel_path": {"native": {}}, "headlines": {"quadratic:paired/a": {"within": True},
                                                             "general:heldout/x": {"within": False}}}
    path.write_text(json.dumps(old))
    cfg = rc.Config(experiments=("general",), summary=str(path), merge=True)
    assert rc.kept_headlines(cfg) == {"quadratic:paired/a": {"within": True}}  # general's are re-checked now
    assert rc.kept_headlines(rc.Config(experiments=("general",), summary=str(path))) == {}  # no --merge: none
    with pytest.raises(SystemExit, match="kernel path"):
        rc.kept_headlines(rc.Config(kernel_path="aten_default", experiments=("general",), summary=str(path),
                                    merge=True))


def test_collect_checks_finished_reruns_without_running_anything(tmp_path, monkeypatch):
    committed = {"paired": {"a": {"ratio": 1.0, "per_seed_ratio": [0.98, 1.0, 1.02]}}}
    for name in ("quadratic", "metanet"):
        (tmp_path / "results" / name).mkdir(parents=True)
        (tmp_path / "results" / name / "summary.json").write_text(json.dumps(committed))
    done = tmp_path / "runs" / "native" / "quadratic"
    done.mkdir(parents=True)
    (done / "summary.json").write_text(json.dumps({"paired": {"a": {"ratio": 1.01, "per_seed_ratio": [1.01]}}}))
    monkeypatch.setattr(rc, "rerun", lambda *a: (_ for _ in ()).throw(AssertionError("ran a re-run")))
    argv = ["--experiments", "quadratic", "--results_dir", str(tmp_path / "results"), "--out_dir",
            str(tmp_path / "runs"), "--summary", str(tmp_path / "s.json"), "--collect", "true"]
    out = rc.main(argv)
    assert out["headlines"]["quadratic:paired/a"]["within"] and out["headlines_within_interval"]
    with pytest.raises(SystemExit, match="no finished re-run of metanet"):
        rc.main(argv[:1] + ["metanet"] + argv[2:])
    # a re-run without per-seed values (a one-seed summary that dropped them) checks nothing: refused, not passed
    (done / "summary.json").write_text(json.dumps({"paired": {"a": {"ratio": 1.01}}}))
    with pytest.raises(SystemExit, match="quadratic: no headline"):
        rc.main(argv)
    assert not (tmp_path / "s.json").exists() or json.loads((tmp_path / "s.json").read_text())["headlines"]


def test_smoke_check_reruns_one_seed_under_another_kernel_path(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled")
    committed = tmp_path / "results" / "quadratic"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "quadratic.py"), "--preset", "smoke",
                           "--final", "true", "--seeds", "2", "--out_dir", str(committed)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    kp = tmp_path / "kernel_paths.json"
    kp.write_text(json.dumps({"reference_path": "pinned_avx2",
                              "pairs": {"native": {"bitwise": False}, "mkl_avx512": {"bitwise": True}}}))
    summary = rc.main(["--preset", "smoke", "--experiments", "quadratic", "--kernel_path", "aten_avx512",
                       "--results_dir", str(tmp_path / "results"), "--out_dir", str(tmp_path / "rerun"),
                       "--summary", str(tmp_path / "summary.json"), "--kernel_paths_file", str(kp)])
    assert summary["kernel_paths"] == ["pinned_avx2", "native", "mkl_avx512"]
    assert summary["bitwise_across_kernel_paths"] is False
    assert summary["headlines"] and all(k.startswith("quadratic:paired/at_") for k in summary["headlines"])
    for h in summary["headlines"].values():
        assert len(h["committed_per_seed"]) == 2 and isinstance(h["within"], bool)
    assert summary["headlines_within_interval"] == all(h["within"] for h in summary["headlines"].values())
    rerun_dir = tmp_path / "rerun" / "aten_avx512" / "quadratic"
    rerun = json.loads((rerun_dir / "summary.json").read_text())
    assert rerun["config"]["seeds"] == 1 and rerun["config"]["check_run"] is True
    assert rerun["protocol"]["test_reads"] == 1  # its own ledger, beside the re-run
    assert json.loads((tmp_path / "summary.json").read_text()) == json.loads(json.dumps(summary))
    (rerun_dir / "stale").write_text("left by an earlier check")
    rc.rerun(rc.Config(script_preset="smoke", kernel_path="aten_avx512", out_dir=str(tmp_path / "rerun")),
             "quadratic")
    assert not (rerun_dir / "stale").exists()  # a check never reuses an earlier check's runs


def test_counts_split_top_level_and_nested_records_per_experiment():
    h = {"a:x": {"within": True}, "a:f/x": {"within": False}, "a:f/y": {"within": True}, "b:paired/z": {"within": True}}
    c = rc.outside_counts(h, 0.95)
    assert c["all"] == {"checked": 4, "outside": 1, "expected_outside_if_independent": 0.2}
    assert c["a"]["top_level"]["checked"] == 1 and c["a"]["top_level"]["outside"] == 0
    assert c["a"]["nested"] == {"checked": 2, "outside": 1, "expected_outside_if_independent": 0.1}
    assert c["b"]["nested"]["checked"] == 1 and c["b"]["top_level"]["checked"] == 0
