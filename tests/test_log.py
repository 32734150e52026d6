"""JSONL logging always; W&B offline mode writes a local run folder with no account; W&B failures never stop."""
import glob
import json
import os
import subprocess
import sys
import textwrap
import time
import warnings

import pytest

from learned_opt import repro
from learned_opt.log import Logger, provenance, read_records

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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


def _git(repo, *args):
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false", *args],
                   cwd=repo, check=True, capture_output=True)


@pytest.fixture
def code_repo(tmp_path):
    """A git repository with one committed code file and one committed result file."""
    for rel in ("learned_opt/mod.py", "results/summary.json"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("original = 1\n")
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "add", ".")
    _git(tmp_path, "commit", "-q", "-m", "init")
    return tmp_path


def test_provenance_ignores_changes_to_results(code_repo):
    (code_repo / "results" / "summary.json").write_text("rewritten by a script\n")
    (code_repo / "results" / "new.json").write_text("{}\n")
    p = provenance(root=str(code_repo))
    assert p["git_commit"] and len(p["git_commit"]) == 40
    assert p["git_dirty"] is False and p["git_diff"] is None


def test_provenance_records_the_diff_of_changed_code(code_repo):
    (code_repo / "learned_opt" / "mod.py").write_text("changed_line = 2\n")
    p = provenance(root=str(code_repo / "learned_opt"))  # any directory inside the repository finds its top
    assert p["git_dirty"] is True
    assert "+changed_line = 2" in p["git_diff"] and "-original = 1" in p["git_diff"]


def test_provenance_counts_an_untracked_module_as_dirty(code_repo):
    (code_repo / "learned_opt" / "new_module.py").write_text("x = 1\n")
    p = provenance(root=str(code_repo))
    assert p["git_dirty"] is True and p["git_untracked"] == ["learned_opt/new_module.py"]


def test_provenance_outside_a_repository_has_no_commit(tmp_path):
    p = provenance(root=str(tmp_path))
    assert p["git_commit"] is None and p["git_dirty"] is None and p["git_diff"] is None


def test_provenance_package_versions_and_machine_facts():
    p = provenance()
    assert isinstance(p["packages"]["higher"], str) and p["packages"]["higher"]  # higher has no __version__
    assert set(p["packages"]) >= {"torch", "numpy", "higher", "einops", "wandb", "scikit-learn", "scipy",
                                  "matplotlib"}
    assert p["cpu_model"] and isinstance(p["cpu_model"], str)
    assert isinstance(p["torch_cpu_capability"], str) and p["torch_cpu_capability"]
    assert set(p["numerics_env"]) == {"ATEN_CPU_CAPABILITY", "MKL_CBWR", "ONEDNN_MAX_CPU_ISA", "OMP_NUM_THREADS"}
    json.dumps(p)  # goes into summary.json files as is


def test_a_missing_package_has_version_none():
    from learned_opt.log import package_versions

    assert package_versions(("torch", "no-such-distribution-xyz")) == {
        "torch": provenance()["packages"]["torch"], "no-such-distribution-xyz": None}


# --------------------------------------------------------------------------- portable numerics (repro.py)
_PIN_SCRIPT = textwrap.dedent("""
    import os, torch
    torch.backends.cpu.get_cpu_capability()  # ATen fixes its dispatch now: only a re-exec can change it
    from learned_opt.repro import ensure_portable_numerics
    ensure_portable_numerics()
    print(torch.backends.cpu.get_cpu_capability(),
          *(os.environ.get(k) for k in ("ATEN_CPU_CAPABILITY", "MKL_CBWR", "ONEDNN_MAX_CPU_ISA")))
""")


def _run_pin_script(tmp_path, **env):
    script = tmp_path / "pin.py"
    script.write_text(_PIN_SCRIPT)
    clean = {k: v for k, v in os.environ.items() if k not in repro.PORTABLE_ENV and k != repro.NATIVE_SWITCH}
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                          env={**clean, "PYTHONPATH": ROOT, **env})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.split()


needs_avx2 = pytest.mark.skipif(not repro.portable_numerics_supported(), reason="not x86-64 Linux with AVX2")


@needs_avx2
def test_ensure_portable_numerics_reexecs_with_avx2_kernels(tmp_path):
    assert _run_pin_script(tmp_path) == ["AVX2", "avx2", "AVX2", "AVX2"]


@needs_avx2
def test_native_numerics_switch_leaves_the_environment_alone(tmp_path):
    capability, *pinned = _run_pin_script(tmp_path, LEARNED_OPT_NATIVE_NUMERICS="1")
    assert pinned == ["None", "None", "None"] and capability


def test_ensure_portable_numerics_sets_the_variables_then_execs(monkeypatch):
    calls = []
    monkeypatch.setattr(repro, "portable_numerics_supported", lambda: True)
    monkeypatch.setattr(repro.os, "execv", lambda exe, args: calls.append((exe, args)))
    monkeypatch.delenv(repro.NATIVE_SWITCH, raising=False)
    for k in repro.PORTABLE_ENV:
        monkeypatch.delenv(k, raising=False)
    assert not repro.numerics_pinned()
    repro.ensure_portable_numerics(["-m", "learned_opt.cli", "meta-train"])
    assert calls == [(sys.executable, [sys.executable, "-m", "learned_opt.cli", "meta-train"])]
    assert repro.numerics_pinned()
    repro.ensure_portable_numerics()  # already pinned: no second exec
    assert len(calls) == 1


def test_ensure_portable_numerics_does_nothing_without_avx2(monkeypatch):
    monkeypatch.setattr(repro, "cpu_flags", lambda: frozenset({"sse2", "avx"}))
    monkeypatch.setattr(repro.os, "execv", lambda *a: pytest.fail("exec on a CPU without AVX2"))
    monkeypatch.delenv(repro.NATIVE_SWITCH, raising=False)
    for k in repro.PORTABLE_ENV:
        monkeypatch.delenv(k, raising=False)
    repro.ensure_portable_numerics()
    assert not repro.numerics_pinned()


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


def test_a_resumed_run_continues_the_same_wandb_run(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    from learned_opt.cli import main

    for k in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_DISABLED"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    d = tmp_path / "run"
    assert main(["meta-train", "--run-dir", str(d), "--iterations", "1", "--horizon", "4", "--truncation", "2",
                 "--task-arg", "num_problems=2", "--wandb", "offline"]) == 0
    run_id = (d / "wandb_run_id").read_text().strip()
    time.sleep(1.1)  # W&B names offline run folders by the second
    assert main(["meta-train", "--run-dir", str(d), "--resume", "--iterations", "2"]) == 0  # W&B mode restored
    runs = sorted(glob.glob(str(d / "wandb" / "offline-run-*")))
    assert len(runs) == 2 and all(r.endswith("-" + run_id) for r in runs)  # one W&B run, resumed
    assert (d / "wandb_run_id").read_text().strip() == run_id


def test_read_records_skips_a_half_written_last_line_only(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"a": 1}\n{"a": 2}\n{"a"')
    with pytest.warns(UserWarning, match="half-written last line"):
        assert read_records(str(path)) == [{"a": 1}, {"a": 2}]
    path.write_text('{"a": 1}\n{"a"\n{"a": 3}\n')
    with pytest.raises(ValueError, match="m.jsonl:2 is not valid JSON"):
        read_records(str(path))


def test_logger_counts_lines_without_rereading_the_file(tmp_path):
    log = Logger(str(tmp_path / "m.jsonl"))
    for i in range(3):
        log.log({"i": i})
    assert log.lines() == 3
    (tmp_path / "m.jsonl").write_text("")  # the count is kept in memory (checkpoints ask for it every time)
    assert log.lines() == 3
    log.truncate(1)
    assert log.lines() == 0 and Logger(str(tmp_path / "m.jsonl")).lines() == 0
