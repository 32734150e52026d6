"""JSONL logging always; W&B offline mode writes a local run folder with no account; W&B failures never stop."""
import glob
import json
import os
import warnings

import pytest

from learned_opt.log import Logger, provenance


def test_jsonl_records_and_truncate(tmp_path):
    log = Logger(str(tmp_path / "m.jsonl"))
    for i in range(5):
        log.log({"meta_step": i, "meta_loss": 1.0 / (i + 1), "bad": float("nan")})
    assert log.lines() == 5
    rows = [json.loads(x) for x in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert [r["meta_step"] for r in rows] == list(range(5)) and rows[0]["bad"] == "nan"
    log.truncate(2)
    assert log.lines() == 2


def test_unknown_wandb_mode_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="unknown wandb mode 'cloud'"):
        Logger(str(tmp_path / "m.jsonl"), wandb_mode="cloud")


def test_wandb_offline_writes_a_local_run_folder(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    for k in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_DISABLED"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    log = Logger(str(tmp_path / "m.jsonl"), wandb_mode="offline", config={"lr": 0.1}, run_dir=str(tmp_path))
    assert log.wandb is not None, "offline W&B did not start"
    log.log({"meta_step": 0, "meta_loss": 1.5})
    log.log({"meta_step": 1, "meta_loss": 1.2})
    log.close()
    runs = glob.glob(str(tmp_path / "wandb" / "offline-run-*"))
    assert runs, os.listdir(tmp_path)
    assert glob.glob(os.path.join(runs[0], "*.wandb"))


def test_a_wandb_failure_never_stops_the_run(tmp_path):
    log = Logger(str(tmp_path / "m.jsonl"))

    class Broken:
        def log(self, *a, **k):
            raise ConnectionError("no network")

    log.wandb = Broken()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        log.log({"meta_step": 0, "meta_loss": 1.0})
        log.log({"meta_step": 1, "meta_loss": 0.5})
    assert log.wandb is None and log.lines() == 2
    assert any("W&B logging failed" in str(w.message) for w in caught)


def test_provenance_names_commit_and_versions():
    p = provenance()
    assert p["packages"]["torch"] and p["python"]
    assert "git_commit" in p


def test_cli_meta_train_with_wandb_offline_logs_figure_table_and_artifacts(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    from learned_opt.cli import main

    for k in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_DISABLED"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    d = tmp_path / "run"
    rc = main(["meta-train", "--run-dir", str(d), "--iterations", "2", "--horizon", "10", "--truncation", "5",
               "--task-arg", "num_problems=4", "--wandb", "offline"])
    assert rc == 0
    runs = glob.glob(str(d / "wandb" / "offline-run-*"))
    assert len(runs) == 1
    files = [os.path.relpath(p, runs[0]) for p in glob.glob(os.path.join(runs[0], "**", "*"), recursive=True)]
    assert any(f.endswith(".png") and "media" in f for f in files), files  # the meta-loss figure
    assert any(f.endswith(".table.json") for f in files), files  # the result table
    assert (d / "meta_loss.png").exists()
