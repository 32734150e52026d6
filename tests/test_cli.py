"""The ``learned-opt`` command line: end-to-end runs, run directories, and one-line errors for bad input."""
import json
import os
import subprocess
import sys

import pytest

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
