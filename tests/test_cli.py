"""The ``learned-opt`` command line: end-to-end runs, run directories, and one-line errors for bad input."""
import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch

from learned_opt.cli import main

SMALL = ["--iterations", "2", "--horizon", "10", "--truncation", "5", "--task-arg", "num_problems=8"]


def run(capsys, *argv):
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_meta_train_writes_a_complete_run_directory(tmp_path, capsys):
    d = tmp_path / "run"
    rc, out, err = run(capsys, "meta-train", "--run-dir", str(d), *SMALL)
    assert rc == 0, err
    for name in ("config.json", "metrics.jsonl", "checkpoint.pt", "lopt.pt"):
        assert (d / name).exists(), name
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["config"]["iterations"] == 2 and cfg["config"]["truncation"] == 5
    assert cfg["provenance"]["packages"]["torch"]
    lines = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
    assert len([r for r in lines if "meta_loss" in r]) == 4  # 2 iterations x (10 / 5) truncations


def test_meta_train_with_task_augmentation(tmp_path, capsys):
    d = tmp_path / "run"
    rc, out, err = run(capsys, "meta-train", "--run-dir", str(d), "--task", "digits", "--task-arg", "hidden=8",
                       "--augment", "3", "--iterations", "1", "--horizon", "4", "--truncation", "2")
    assert rc == 0, err
    assert json.loads((d / "config.json").read_text())["config"]["augment"] == 3.0
    assert (d / "lopt.pt").exists()


def test_config_file_is_read_and_flags_override_it(tmp_path, capsys):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"iterations": 1, "horizon": 12, "truncation": 4, "task_args": {"num_problems": 4}}))
    d = tmp_path / "run"
    rc, out, err = run(capsys, "meta-train", "--config", str(cfg), "--truncation", "6", "--run-dir", str(d))
    assert rc == 0, err
    resolved = json.loads((d / "config.json").read_text())["config"]
    assert resolved["horizon"] == 12 and resolved["truncation"] == 6 and resolved["iterations"] == 1


def test_resume_continues_and_existing_run_is_never_overwritten(tmp_path, capsys):
    d = tmp_path / "run"
    assert run(capsys, "meta-train", "--run-dir", str(d), *SMALL)[0] == 0
    before = (d / "checkpoint.pt").read_bytes()
    rc, out, err = run(capsys, "meta-train", "--run-dir", str(d), *SMALL)
    assert rc == 2 and "already holds a run" in err
    assert (d / "checkpoint.pt").read_bytes() == before
    rc, out, err = run(capsys, "meta-train", "--run-dir", str(d), "--resume", *SMALL[:-2], "--iterations", "3",
                       "--task-arg", "num_problems=8")
    assert rc == 0, err
    lines = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
    assert [r["meta_step"] for r in lines if "meta_loss" in r] == list(range(6))


def test_evaluate_compare_and_plot(tmp_path, capsys):
    d = tmp_path / "run"
    assert run(capsys, "meta-train", "--run-dir", str(d), *SMALL)[0] == 0
    rc, out, err = run(capsys, "evaluate", "--run-dir", str(d), "--steps", "10", "--num-tasks", "2")
    assert rc == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    assert result["steps"] == 10 and result["mean"] > 0
    rc, out, err = run(capsys, "compare", "--run-dir", str(d), "--steps", "10", "--num-tasks", "1",
                       "--optimizers", "sgd,adam", "--grid-points", "5", "--grid-high", "10",
                       "--out", str(tmp_path / "cmp"))
    assert rc == 0, err
    saved = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert set(saved["results"]) == {"sgd", "adam", "learned"}
    assert "| sgd |" in out
    rc, out, err = run(capsys, "plot", "--run-dir", str(d))
    assert rc == 0 and (d / "meta_loss.png").stat().st_size > 1000


BAD = [
    (["meta-train", "--run-dir", "{tmp}/a", "--task", "mnist"], "unknown task 'mnist'"),
    (["meta-train", "--run-dir", "{tmp}/a", "--net", "gru"], "unknown meta-network 'gru'"),
    (["meta-train", "--run-dir", "{tmp}/a", "--truncation", "50", "--horizon", "10"],
     "truncation 50 is longer than the horizon 10"),
    (["meta-train", "--run-dir", "{tmp}/a", "--meta-lr", "-1"], "meta_lr must be a finite number > 0"),
    (["meta-train", "--run-dir", "{tmp}/a", "--meta-lr", "nan"], "meta_lr must be a finite number > 0"),
    (["meta-train", "--run-dir", "{tmp}/a", "--horizon", "0"], "horizon must be an integer >= 1"),
    (["meta-train", "--run-dir", "{tmp}/a", "--meta-loss", "hinge"], "unknown meta-loss 'hinge'"),
    (["meta-train", "--run-dir", "{tmp}/a", "--wandb", "cloud"], "unknown --wandb mode 'cloud'"),
    (["meta-train", "--run-dir", "{tmp}/a", "--device", "tpu"], "unknown device 'tpu'"),
    (["meta-train", "--run-dir", "{tmp}/a", "--config", "{tmp}/missing.json"], "does not exist"),
    (["meta-train", "--run-dir", "{tmp}/a", "--config", "{tmp}/broken.json"], "is not valid JSON"),
    (["meta-train", "--run-dir", "{tmp}/a", "--config", "{tmp}/unknown.json"], "unknown key(s) in config file"),
    (["meta-train", "--run-dir", "{tmp}/a", "--task-arg", "dim"], "--task-arg expects key=value"),
    (["meta-train", "--run-dir", "{tmp}/a", "--task-arg", "dim=-3"], "dim must be an integer >= 1"),
    (["meta-train", "--run-dir", "{tmp}/a", "--task-arg", "colour=3"], "--task-arg: unknown key 'colour'"),
    (["meta-train", "--run-dir", "{tmp}/a", "--net-arg", "extra_inputs=[\"hessian\"]"], "unknown extra input"),
    (["meta-train"], "--run-dir is required"),
    (["evaluate", "--lopt", "{tmp}/nothing.pt"], "no saved meta-network"),
    (["evaluate", "--lopt", "{tmp}/corrupt.pt"], "no usable checkpoint"),
    (["compare", "--optimizers", "sgd,lion"], "unknown optimizer 'lion'"),
    (["compare", "--grid-low", "-1"], "need 0 < low < high"),
    (["plot", "--run-dir", "{tmp}"], "no metrics.jsonl"),
]


@pytest.mark.parametrize("argv,message", BAD, ids=[" ".join(a[:1] + a[-2:]) for a, _ in BAD])
def test_bad_input_gives_one_line_and_exit_2(tmp_path, capsys, argv, message):
    (tmp_path / "broken.json").write_text("{not json")
    (tmp_path / "unknown.json").write_text(json.dumps({"learning_rate": 3}))
    (tmp_path / "corrupt.pt").write_bytes(b"\x00garbage")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    rc, out, err = run(capsys, *argv)
    assert rc == 2
    lines = [line for line in err.splitlines() if line.strip() and "Warning" not in line
             and not line.startswith("  ")]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert message in lines[0]
    assert "Traceback" not in err
    assert not (tmp_path / "a" / "checkpoint.pt").exists()


def test_console_script_is_installed_and_reports_errors_without_traceback(tmp_path):
    exe = os.path.join(os.path.dirname(sys.executable), "learned-opt")
    assert os.path.exists(exe), "the learned-opt console script is not installed"
    proc = subprocess.run([exe, "meta-train", "--run-dir", str(tmp_path / "x"), "--task", "nope"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: unknown task 'nope'")
    assert "Traceback" not in proc.stderr


# ------------------------------------------------------------------------------------------- issue 11
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
TINY = ["--task-arg", "num_problems=4", "--net-arg", "hidden=6", "--horizon", "6", "--truncation", "3"]


def _weights(path):
    return torch.load(path, weights_only=True)["state_dict"]


def _records(d):
    return [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]


def test_resume_restores_the_runs_settings_and_continues_exactly(tmp_path, capsys):
    """``--resume --iterations N`` alone: the run's own task, network and settings, not the defaults."""
    settings = [*TINY, "--random-offset", "true", "--seed", "4", "--meta-lr", "0.01"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert run(capsys, "meta-train", "--run-dir", str(straight), *settings, "--iterations", "4")[0] == 0
    assert run(capsys, "meta-train", "--run-dir", str(resumed), *settings, "--iterations", "2")[0] == 0
    before = json.loads((resumed / "config.json").read_text())
    rc, out, err = run(capsys, "meta-train", "--run-dir", str(resumed), "--resume", "--iterations", "4")
    assert rc == 0, err
    after = json.loads((resumed / "config.json").read_text())
    assert after["config"] == {**before["config"], "iterations": 4}  # not overwritten with other settings
    assert after["provenance"] == before["provenance"]
    assert [(r["at_iteration"], r["changed"]) for r in after["resumed"]] == [(2, {"iterations": 4})]
    a, b = _weights(straight / "lopt.pt"), _weights(resumed / "lopt.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert _records(straight) == _records(resumed)


def test_resume_keeps_the_curriculum_and_refuses_fewer_iterations_than_done(tmp_path, capsys):
    d = tmp_path / "run"
    assert run(capsys, "meta-train", "--run-dir", str(d), *TINY, "--curriculum", "3,6", "--iterations", "2")[0] == 0
    ck = torch.load(d / "checkpoint.pt", weights_only=True)
    before = (d / "checkpoint.pt").read_bytes()
    rc, out, err = run(capsys, "meta-train", "--run-dir", str(d), "--resume", "--iterations", "1")
    assert rc == 2 and "is at iteration 2, past iterations=1" in err and len(err.splitlines()) == 1
    assert (d / "checkpoint.pt").read_bytes() == before and not (d / "run.lock").exists()
    assert run(capsys, "meta-train", "--run-dir", str(d), "--resume", "--iterations", "3")[0] == 0
    ck = torch.load(d / "checkpoint.pt", weights_only=True)
    assert tuple(ck["config"]["curriculum"]) == (3, 6) and ck["iteration"] == 3
    assert ck["run_config"]["task_args"] == {"num_problems": 4}


HOLD = ("import sys, time\nfrom learned_opt.meta import RunLock\nRunLock(sys.argv[1]).acquire()\n"
        "print('locked', flush=True)\ntime.sleep(120)\n")


def test_a_locked_run_directory_refuses_a_second_run_and_a_stale_lock_is_taken_over(tmp_path, capsys):
    d = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(d)], cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        for extra in ([], ["--resume"]):
            rc, out, err = run(capsys, "meta-train", "--run-dir", str(d), *SMALL, *extra)
            if extra:  # nothing to resume yet: said before the lock is even tried
                assert rc == 2 and "holds no checkpoint.pt" in err
                continue
            assert rc == 2, err
            assert err.strip().splitlines() == [err.strip()] and f"is in use by pid {holder.pid}" in err
            assert sorted(os.listdir(d)) == ["run.lock"]  # nothing written next to the other run
    finally:
        holder.kill()  # SIGKILL: the lock file stays behind with a dead pid in it
        holder.wait()
        holder.stdout.close()
    assert str(holder.pid) in (d / "run.lock").read_text()
    rc, out, err = run(capsys, "meta-train", "--run-dir", str(d), *SMALL)
    assert rc == 0, err
    assert f"took over the stale lock of {d} left by pid {holder.pid}" in err
    assert not (d / "run.lock").exists() and (d / "lopt.pt").exists()


def test_two_cli_runs_in_one_directory_the_second_exits_2_and_a_killed_run_resumes(tmp_path, capsys):
    d = tmp_path / "run"
    args = ["meta-train", "--run-dir", str(d), *TINY, "--iterations", "100000", "--checkpoint-every", "1"]
    first = subprocess.Popen([sys.executable, "-m", "learned_opt.cli", *args], cwd=ROOT, env=ENV,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300  # generous: a loaded machine once took longer than 60 s to get here
        while not (d / "checkpoint.pt").exists():
            assert first.poll() is None and time.monotonic() < deadline
            time.sleep(0.01)
        rc, out, err = run(capsys, *args)
        assert rc == 2 and f"in use by pid {first.pid}" in err
        rc, out, err = run(capsys, *args, "--resume")
        assert rc == 2 and f"in use by pid {first.pid}" in err
    finally:
        first.kill()
        first.wait()
    rc, out, err = run(capsys, "meta-train", "--run-dir", str(d), "--resume", "--iterations", "3")
    if rc == 2 and "past iterations=3" in err:  # the killed run had got further: continue it a little more
        done = torch.load(d / "checkpoint.pt", weights_only=True)["iteration"]
        rc, out, err = run(capsys, "meta-train", "--run-dir", str(d), "--resume", "--iterations", str(done + 1))
    assert rc == 0, err
    assert "took over the stale lock" in err


def test_resume_needs_a_checkpoint_and_a_real_directory(tmp_path, capsys):
    rc, out, err = run(capsys, "meta-train", "--run-dir", str(tmp_path / "typo"), "--resume")
    assert rc == 2 and "no run directory" in err and not (tmp_path / "typo").exists()
    (tmp_path / "killed_early").mkdir()
    (tmp_path / "killed_early" / "config.json").write_text("{}")
    rc, out, err = run(capsys, "meta-train", "--run-dir", str(tmp_path / "killed_early"), "--resume")
    assert rc == 2 and "holds no checkpoint.pt" in err


def test_evaluate_run_dir_uses_the_runs_task_and_control_and_keeps_other_evaluations(tmp_path, capsys):
    d = tmp_path / "digits"
    rc, out, err = run(capsys, "meta-train", "--run-dir", str(d), "--task", "digits", "--task-arg", "hidden=4",
                       "--task-arg", "batch_size=16", "--control", "learned", "--net-arg", "hidden=4",
                       "--iterations", "1", "--horizon", "4", "--truncation", "2")
    assert rc == 0, err
    rc, out, err = run(capsys, "evaluate", "--run-dir", str(d), "--steps", "4", "--num-tasks", "1")
    assert rc == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    assert result["task"] == "digits" and result["settings"]["task_args"] == {"hidden": 4, "batch_size": 16}
    assert result["settings"]["learned_control"] is True
    assert json.loads((d / "eval.json").read_text()) == result
    saved = (d / "eval.json").read_bytes()
    rc, out, err = run(capsys, "evaluate", "--run-dir", str(d), "--steps", "4", "--num-tasks", "1")
    assert rc == 0 and (d / "eval.json").read_bytes() == saved  # the same evaluation again: same file
    rc, out, err = run(capsys, "evaluate", "--run-dir", str(d), "--steps", "5", "--num-tasks", "1")
    assert rc == 2 and "holds another evaluation" in err and (d / "eval.json").read_bytes() == saved
    rc, out, err = run(capsys, "evaluate", "--run-dir", str(d), "--steps", "5", "--num-tasks", "1",
                       "--no-learned-control", "--out", str(tmp_path / "e5.json"))
    assert rc == 0 and json.loads((tmp_path / "e5.json").read_text())["settings"]["learned_control"] is False
    rc, out, err = run(capsys, "evaluate", "--run-dir", str(d), "--steps", "5", "--num-tasks", "1", "--force")
    assert rc == 0 and json.loads((d / "eval.json").read_text())["steps"] == 5
    # a meta-network outside a run directory (e.g. under results/): printed, nothing written next to it
    lone = tmp_path / "results" / "digits"
    lone.mkdir(parents=True)
    shutil.copy(d / "lopt.pt", lone / "lopt.pt")
    rc, out, err = run(capsys, "evaluate", "--lopt", str(lone / "lopt.pt"), "--task", "digits", "--task-arg",
                       "hidden=4", "--steps", "4", "--num-tasks", "1")
    assert rc == 0, err
    assert json.loads(out.strip().splitlines()[-1])["task"] == "digits" and os.listdir(lone) == ["lopt.pt"]
    assert "pass --out FILE to save it" in err


def test_net_controller_meta_trains_on_a_named_optimizer_from_the_cli(tmp_path, capsys):
    d = tmp_path / "ctrl"
    rc, out, err = run(capsys, "meta-train", "--run-dir", str(d), "--net", "controller", "--optimizer", "adam",
                       "--optimizer-arg", "lr=0.03", "--net-arg", "hidden=4", "--task-arg", "num_problems=4",
                       "--iterations", "2", "--horizon", "6", "--truncation", "3")
    assert rc == 0, err
    saved = torch.load(d / "lopt.pt", weights_only=True)
    assert saved["kind"] == "controller" and saved["config"]["hidden"] == 4
    config = json.loads((d / "config.json").read_text())["config"]
    assert config["control"] == "learned" and config["optimizer_args"] == {"lr": 0.03}
    rc, out, err = run(capsys, "evaluate", "--run-dir", str(d), "--steps", "6", "--num-tasks", "1")
    assert rc == 0, err
    settings = json.loads(out.strip().splitlines()[-1])["settings"]
    assert settings["optimizer"] == "adam" and settings["optimizer_args"] == {"lr": 0.03}
    rc, out, err = run(capsys, "compare", "--run-dir", str(d), "--steps", "6", "--num-tasks", "1", "--optimizers",
                       "adam", "--grid-points", "2", "--out", str(tmp_path / "cmp"))
    assert rc == 0, err
    assert set(json.loads((tmp_path / "cmp" / "compare.json").read_text())["results"]) == {"adam", "learned"}


def test_a_run_whose_every_meta_step_is_skipped_fails_and_warns_a_few_times(tmp_path, capsys):
    d = tmp_path / "run"
    # initial points of scale 1e30: every inner loss overflows, every meta-step is skipped
    rc, out, err = run(capsys, "meta-train", "--run-dir", str(d), "--task-arg", "init_std=1e30", "--iterations",
                       "4", "--horizon", "4", "--truncation", "1", "--net-arg", "hidden=4")
    assert rc == 1
    lines = err.strip().splitlines()
    assert lines[-1].startswith("error: all 16 meta-steps were skipped") and "no lopt.pt was written" in lines[-1]
    warned = [x for x in lines if x.startswith("warning: ")]
    assert len(warned) == 5 and len(lines) == 6  # at 1, 2, 4, 8 and 16 skipped steps, one line each
    assert not (d / "lopt.pt").exists()


def test_compare_checks_out_before_tuning_and_has_learned_control(tmp_path, capsys, monkeypatch):
    import learned_opt.cli as cli

    def no_tuning(*args, **kwargs):
        raise AssertionError("tuning started before --out was checked")

    monkeypatch.setattr(cli.compare, "tune_lr", no_tuning)
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "table.md").write_text("old")
    rc, out, err = run(capsys, "compare", "--out", str(taken), "--optimizers", "sgd")
    assert rc == 2 and "already holds table.md" in err and (taken / "table.md").read_text() == "old"
    (tmp_path / "file").write_text("x")
    rc, out, err = run(capsys, "compare", "--out", str(tmp_path / "file" / "sub"), "--optimizers", "sgd")
    assert rc == 2 and "cannot write in" in err
    monkeypatch.undo()
    d = tmp_path / "run"
    assert run(capsys, "meta-train", "--run-dir", str(d), *SMALL)[0] == 0
    rc, out, err = run(capsys, "compare", "--run-dir", str(d), "--learned-control", "--out", str(taken), "--force",
                       "--optimizers", "sgd", "--steps", "5", "--num-tasks", "1", "--grid-points", "2")
    assert rc == 0, err
    assert json.loads((taken / "compare.json").read_text())["results"]["learned"]["learned_control"] is True
    assert (taken / "table.md").read_text() != "old"


def test_plot_tolerates_a_half_written_last_line(tmp_path, capsys):
    d = tmp_path / "run"
    assert run(capsys, "meta-train", "--run-dir", str(d), *SMALL)[0] == 0
    with open(d / "metrics.jsonl", "a") as f:
        f.write('{"meta_step": 4, "meta_lo')  # what a kill in the middle of a write leaves
    rc, out, err = run(capsys, "plot", "--run-dir", str(d))
    assert rc == 0, err
    assert "ignored a half-written last line" in err and (d / "meta_loss.png").exists()


@pytest.mark.parametrize("command, shown", [
    ("meta-train", ["(default: 100)", "{sum,mean_log,val,halting,mean_log_val}", "{lstm,mlp,controller,norm_mlp}", "--dist-timeout",
                    "LEARNED_OPT_DIST_TIMEOUT", "(default: 10)"]),
    ("evaluate", ["{digits,metanet,quadratic}", "(default: 100)", "(default: 8)"]),
    ("compare", ["(default: sgd,momentum,nesterov,adam,rmsprop)", "--learned-control", "(default: 0.0001)"]),
    ("plot", ["DIR/meta_loss.png"]),
])
def test_help_shows_defaults_and_choices(capsys, command, shown):
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert info.value.code == 0
    assert "--threads N torch intra-op threads (default: 1" in out
    for text in shown:
        assert text in out, text


def test_threads_flag_sets_torch_threads_and_defaults_to_one(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "2")  # not read: the flag decides
    before = torch.get_num_threads()
    try:
        run(capsys, "plot", "--run-dir", str(tmp_path))
        assert torch.get_num_threads() == 1
        run(capsys, "plot", "--threads", "2", "--run-dir", str(tmp_path))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_config_file_with_a_wrong_type_writes_nothing(tmp_path, capsys):
    cfg = tmp_path / "run.json"
    cfg.write_text(json.dumps({"second_order": "false", "iterations": 1}))
    rc, out, err = run(capsys, "meta-train", "--config", str(cfg), "--run-dir", str(tmp_path / "run"))
    assert rc == 2 and f"config file {cfg}: second_order must be true or false, got 'false'" in err
    assert not (tmp_path / "run").exists()
    cfg.write_text(json.dumps({"second_order": False, "random_offset": True, "iterations": 1, "horizon": 4,
                               "truncation": 2, "task_args": {"num_problems": 2}, "curriculum": [2, 4]}))
    assert run(capsys, "meta-train", "--config", str(cfg), "--run-dir", str(tmp_path / "run"))[0] == 0
    ck = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert ck["config"]["random_offset"] is True and tuple(ck["config"]["curriculum"]) == (2, 4)


def test_sample_horizons_flag_reaches_the_run_and_bad_values_are_refused(tmp_path, capsys):
    d = tmp_path / "run"
    assert run(capsys, "meta-train", "--run-dir", str(d), *TINY, "--net", "norm_mlp", "--sample-horizons", "3,6",
               "--iterations", "2")[0] == 0
    ck = torch.load(d / "checkpoint.pt", weights_only=True)
    assert tuple(ck["config"]["sample_horizons"]) == (3, 6)
    rc, out, err = run(capsys, "meta-train", "--run-dir", str(tmp_path / "bad"), *TINY, "--sample-horizons", "3,x")
    assert rc == 2 and "--sample-horizons expects comma-separated integers" in err
