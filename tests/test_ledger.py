"""The test-read ledger (learned_opt/evaluate/ledger.py) and its use by the experiment scripts: a second read of
the same weights' final-test split is refused unless forced, every read is counted, the key follows the weights
and the split (not the output folder), and a corrupt ledger is an error, never a fresh ledger."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from learned_opt.evaluate import ledger

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CODE = {"git_commit": "abc123", "git_dirty": False, "sources_sha256": "0" * 64}


def _weights(folder, name, data: bytes):
    path = os.path.join(folder, name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
    return path


def _read(path, key, force=False, date="2026-12-01T00:00:00+00:00"):
    return ledger.open_test_read(path, key, code=CODE, config_hash="c" * 64, preregistered_hash="p" * 64,
                                 force=force, experiment="x.py", now=date)


def test_second_read_refused_and_writes_nothing_force_counts(tmp_path):
    w = _weights(tmp_path, "run/seed0/lopt.pt", b"weights")
    key = ledger.read_key(split="test", draw=2, weights=[w])
    path = str(tmp_path / ledger.LEDGER_FILE)
    first = _read(path, key)
    assert first["test_reads"] == 1 and first["ledger_key"] == key
    before = open(path).read()
    with pytest.raises(ledger.TestReadRefused) as e:
        _read(path, key, date="2026-12-02T00:00:00+00:00")
    msg = str(e.value)
    assert "already read on 2026-12-01T00:00:00+00:00 (commit abc123)" in msg
    assert "--force_test_read true" in msg and "count 2 reads" in msg and "\n" not in msg
    assert open(path).read() == before  # nothing written
    forced = _read(path, key, force=True)
    assert forced["test_reads"] == 2 and forced["forced_reads"] == 1
    entries = json.load(open(path))["reads"][key]
    assert [e["forced"] for e in entries] == [False, True]
    assert entries[0]["code"] == CODE and entries[0]["preregistered_hash"] == "p" * 64
    # another key in the same ledger is a first read
    other = ledger.read_key(split="test", draw=3, weights=[w])
    assert _read(path, other)["test_reads"] == 1


def test_key_follows_weights_and_split_not_folder(tmp_path):
    a = _weights(tmp_path, "out1/run/seed0/lopt.pt", b"weights")
    b = _weights(tmp_path, "out2/elsewhere/lopt.pt", b"weights")  # same bytes, another out_dir
    c = _weights(tmp_path, "out1/run/seed1/lopt.pt", b"weightz")
    key = ledger.read_key(split="test", draw=2, weights=[a])
    assert ledger.read_key(split="test", draw=2, weights=[b]) == key
    assert ledger.read_key(split="test", draw=2, weights=[c]) != key
    assert ledger.read_key(split="test", draw=3, weights=[a]) != key  # another draw of the split
    assert ledger.read_key(split="val", draw=None, weights=[a]) != key
    assert ledger.read_key(split="test", draw=2, weights=[a, c]) != ledger.read_key(split="test", draw=2,
                                                                                     weights=[c, a])
    import torch
    st = {"w": torch.ones(3)}
    skey = ledger.read_key(split="test", draw=2, states=[st])
    assert ledger.read_key(split="test", draw=2, states=[{"w": torch.ones(3)}]) == skey
    assert ledger.read_key(split="test", draw=2, states=[{"w": torch.tensor([1.0, 1.0, 1.0 + 1e-6])}]) != skey
    assert ledger.read_key(split="test", draw=3, states=[st]) != skey
    conf = ledger.read_key(split="test", draw=2, configs={"adam": {"lr": 0.01}})
    assert conf != ledger.read_key(split="test", draw=2, configs={"adam": {"lr": 0.02}})
    with pytest.raises(ValueError, match="weights files or"):
        ledger.read_key(split="test", draw=2)


def test_config_hash_ignores_paths_and_workers():
    base = {"seeds": 3, "out_dir": "a", "workers": 1, "train_dir": "x", "loss_floor": 1e-6}
    h = ledger.config_digest(base)
    assert ledger.config_digest(dict(base, out_dir="b", workers=4, train_dir="y")) == h
    assert ledger.config_digest(dict(base, loss_floor=1e-8)) != h


@pytest.mark.parametrize("text", ["{not json", json.dumps({"reads": []}), json.dumps([1, 2])])
def test_corrupt_ledger_is_an_error_not_a_fresh_ledger(tmp_path, text):
    path = tmp_path / ledger.LEDGER_FILE
    path.write_text(text)
    with pytest.raises(ledger.LedgerError) as e:
        _read(str(path), "k" * 64)
    assert str(path) in str(e.value) and "\n" not in str(e.value)
    assert path.read_text() == text  # the damaged file stays for a human to look at


def _quadratic(out_dir, *extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled")
    cmd = [sys.executable, os.path.join(ROOT, "experiments", "quadratic.py"), "--preset", "smoke", "--seeds", "1",
           "--out_dir", str(out_dir), *extra]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def test_experiment_final_twice_refuses_then_force_counts(tmp_path):
    out = tmp_path / "quad"
    dev = _quadratic(out)  # a development run never touches the ledger
    assert dev.returncode == 0, dev.stderr[-2000:]
    assert not (out / ledger.LEDGER_FILE).exists()
    assert json.load(open(out / "summary.json"))["protocol"]["test_reads"] == 0
    first = _quadratic(out, "--final", "true")
    assert first.returncode == 0, first.stderr[-2000:]
    summary = json.load(open(out / "summary.json"))
    assert summary["protocol"]["test_reads"] == 1
    key = summary["protocol"]["ledger_key"]
    assert list(json.load(open(out / ledger.LEDGER_FILE))["reads"]) == [key]
    assert summary["preregistered"]["sha256"] == json.load(open(out / ledger.LEDGER_FILE))["reads"][key][0][
        "preregistered_hash"]
    before = (out / "summary.json").read_bytes()
    second = _quadratic(out, "--final", "true")
    assert second.returncode == 2
    assert "already read on" in second.stderr and "--force_test_read true" in second.stderr
    assert (out / "summary.json").read_bytes() == before  # summary untouched
    third = _quadratic(out, "--final", "true", "--force_test_read", "true")
    assert third.returncode == 0, third.stderr[-2000:]
    summary = json.load(open(out / "summary.json"))
    assert summary["protocol"]["test_reads"] == 2 and summary["protocol"]["ledger_key"] == key


# ------------------------------------------------------------------ general.py's floors and shipped-seed rows
def _checks():
    sys.path.insert(0, os.path.join(ROOT, "experiments"))
    import general_checks
    return general_checks


def test_shipped_seed_is_found_by_the_weights_hash(tmp_path):
    checks = _checks()
    shipped = os.path.join(ROOT, "learned_opt", "pretrained", "general.pt")
    other = _weights(tmp_path, "seed0/lopt.pt", b"not the shipped weights")
    copy = _weights(tmp_path, "seed7/lopt.pt", open(shipped, "rb").read())
    found = checks.shipped_seed({0: other, 7: copy})
    assert found is not None and found["seed"] == 7
    assert checks.shipped_seed({0: other}) is None


class _Runs:
    """Two families' per-task losses: learned (2 seeds x 3 tasks) and adam (3 tasks), some below 1e-6."""
    seeds = [3, 5]

    def values(self, f, method, h, metric):
        import numpy as np
        if method == "learned":
            return np.array([[1e-9, 0.5, 0.2], [4e-9, 1.0, 0.4]]) * (2 if f == "b" else 1)
        return np.array([1e-8, 0.5, 0.2])[None]


def test_floors_and_shipped_rows(monkeypatch):
    import numpy as np
    checks = _checks()
    monkeypatch.setattr(checks, "role_families", lambda fams, role: list(fams) if role == "heldout" else [])

    class Cfg:
        floors, loss_floor, n_boot = (0.0, 1e-6), 1e-6, 200
    specs = [("gmean_ratio_vs_tuned_adam_1x", "adam", 5, "train_loss")]
    floors = checks.floors_section(Cfg, _Runs(), ["a", "b"], specs)
    key = "heldout_gmean_ratio_vs_tuned_adam_1x"
    assert set(floors) == {"0", "1e-06"}
    # at floor 0 the sub-floor tasks count with their own ratios (0.1x .. 0.8x), at 1e-6 as 1x
    assert floors["0"][key]["ratio"] < floors["1e-06"][key]["ratio"]
    sec = checks.shipped_section(Cfg, _Runs(), ["a", "b"], specs, {"seed": 5, "sha256": "x", "name": "general"})
    # seed 5 is the second row: per family its geometric-mean ratio over the three tasks, at the 1e-6 floor
    want_a = float(np.exp(np.mean(np.log([1e-6 / 1e-6, 1.0 / 0.5, 0.4 / 0.2]))))
    assert abs(sec["per_family"]["a"]["gmean_ratio_vs_tuned_adam_1x"] - want_a) < 1e-9
    avg_a = float(np.exp(np.mean(np.log([1, 1, 1, 2, 1, 2]))))
    assert abs(sec["seed_average_per_family"]["a"]["gmean_ratio_vs_tuned_adam_1x"] - avg_a) < 1e-9
    assert checks.shipped_section(Cfg, _Runs(), ["a"], specs, None)["seed"] is None


def test_a_script_can_take_a_new_test_draw_and_the_ledger_keys_on_it(tmp_path):
    """estimators_horizon read draw 2 three times before the ledger existed: its final run takes draw 3, which
    reaches the evaluation's task seeds, the summary's name of the split, the pre-registration and the ledger key."""
    sys.path.insert(0, os.path.join(ROOT, "experiments"))
    import common
    import estimators_horizon
    from learned_opt.evaluate import TEST_DRAW, task_seed

    cfg = estimators_horizon.Config(final=True, out_dir=str(tmp_path))
    assert cfg.test_draw == 3 != TEST_DRAW
    split = common.eval_split(cfg)
    assert split == {"split": "test", "draw": 3}
    assert task_seed("test", 0, draw=split["draw"]) != task_seed("test", 0)  # other tasks than draw 2's
    assert common.test_split_name(cfg) == "test (draw 3)"
    prereg = common.preregistered(cfg, ("seeds",))
    assert prereg["test_draw"] == 3
    assert prereg["sha256"] != common.preregistered(estimators_horizon.Config(test_draw=2), ("seeds",))["sha256"]
    weights = tmp_path / "w.pt"
    weights.write_bytes(b"weights")
    read = common.final_test_read(cfg, prereg, weights=[str(weights)])
    summary = common.record_test_read({}, read)
    assert summary["protocol"]["test_draw"] == 3 and summary["protocol"]["test_reads"] == 1
    assert read["ledger_key"] != ledger.read_key(split="test", draw=2, weights=[str(weights)])


def test_shipped_row_is_the_shipped_seeds_own_comparison():
    _checks()
    import shipped
    rng = np.random.default_rng(0)
    learned, base = rng.uniform(0.5, 2.0, (3, 6)), rng.uniform(0.5, 2.0, 6)
    summary = {"seeds_run": [4, 9, 2], "shipped_seed": {"seed": 9, "name": "digits_lstm", "sha256": "x"}}
    rows = []
    shipped.add_shipped_row(summary, rows, "train_at_10", learned, base, [10, "train_loss"], "adam", str)
    one = shipped.paired(learned[1:2], base)
    rec = summary["shipped_seed"]["paired"]["train_at_10"]
    assert rec["ratio"] == one["ratio"] and rec["baseline"] == "adam"
    assert rec["ratio"] != shipped.paired(learned, base)["ratio"]
    assert rows[0][0].startswith("shipped seed 9") and rows[0][3] == learned[1].mean()
    rows.clear()
    summary["shipped_seed"] = shipped.not_shipped("digits_lstm")
    shipped.add_shipped_row(summary, rows, "train_at_10", learned, base, [10, "train_loss"], "adam", str)
    assert rows == [] and "paired" not in summary["shipped_seed"]


def test_shipped_rows_find_every_shipped_seed_of_the_committed_results(tmp_path):
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import shipped_rows

    out = shipped_rows.rows()
    for name in ("quadratic_lstm", "metanet_lstm"):
        assert out[name]["seed"] is not None, out[name]
        summary = json.load(open(os.path.join(ROOT, "results", out[name]["results"], "summary.json")))
        i = 0 if out[name]["seed"] == 0 else None  # the committed runs ship their seed 0
        rec = out[name]["records"]
        assert rec and all(v["best_seed"] <= v["shipped_seed"] <= v["worst_seed"] for v in rec.values())
        first = next(iter(rec))
        node = summary
        for k in first.split("/"):
            node = node[k]
        assert rec[first]["shipped_seed"] == node["per_seed_ratio"][i]
    # weights that match no seed are said to be unmatched, never guessed
    (tmp_path / "quadratic" / "run" / "seed0").mkdir(parents=True)
    (tmp_path / "quadratic" / "run" / "seed0" / "lopt.pt").write_bytes(b"other weights")
    assert shipped_rows.rows(str(tmp_path))["quadratic_lstm"]["seed"] is None
