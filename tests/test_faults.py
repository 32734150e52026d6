"""Survival under faults: a CLI meta-training killed with SIGKILL at a random moment and resumed with ``--resume``
ends with the same meta-weights (``torch.equal``) and the same log as a run that was never interrupted.

(Truncated or corrupt latest checkpoints and failing saves are tested in ``test_meta.py``.)
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
import warnings

import pytest
import torch

from learned_opt.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ITERATIONS = 60
ARGS = ["meta-train", "--iterations", str(ITERATIONS), "--horizon", "10", "--truncation", "4",
        "--random-offset", "true", "--task-arg", "num_problems=8", "--net-arg", "hidden=8",
        "--checkpoint-every", "1", "--seed", "2"]


def _lines(path) -> int:
    try:
        with open(path, "rb") as f:
            return f.read().count(b"\n")
    except FileNotFoundError:
        return 0


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
@pytest.mark.parametrize("net", ["lstm", "mlp"])
def test_sigkill_at_random_moment_then_resume_equals_uninterrupted(tmp_path, capsys, net):
    seed = int.from_bytes(os.urandom(4), "little")
    rng = random.Random(seed)
    killed, straight = tmp_path / "killed", tmp_path / "straight"
    args = ARGS + ["--net", net]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    proc = subprocess.Popen([sys.executable, "-m", "learned_opt.cli", *args, "--run-dir", str(killed)], cwd=ROOT,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    # A random moment after the first checkpoint: once a random number of meta-steps is logged, plus a random
    # fraction of a meta-step (so it may land inside a step, a log write or a checkpoint write).
    target = rng.randint(3, ITERATIONS)  # the run logs about 3 meta-steps per iteration
    deadline = time.monotonic() + 90
    try:
        while not ((killed / "checkpoint.pt").exists() or (killed / "checkpoint.pt.prev").exists()) \
                or _lines(killed / "metrics.jsonl") < target:
            assert proc.poll() is None, f"the run ended before it was killed (seed {seed}): {proc.stderr.read()}"
            assert time.monotonic() < deadline, f"no progress (seed {seed})"
            time.sleep(0.002)
        time.sleep(rng.uniform(0, 0.02))
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL, f"the run was not killed mid-way (seed {seed})"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a kill inside a checkpoint write makes resume fall back, with a warning
        assert main([*args, "--run-dir", str(killed), "--resume"]) == 0, capsys.readouterr().err
        assert main([*args, "--run-dir", str(straight)]) == 0, capsys.readouterr().err

    a = torch.load(straight / "lopt.pt", weights_only=True)["state_dict"]
    b = torch.load(killed / "lopt.pt", weights_only=True)["state_dict"]
    assert list(a) == list(b)
    for name in a:
        assert torch.equal(a[name], b[name]), (name, seed, target)
    ca = torch.load(straight / "checkpoint.pt", weights_only=True)
    cb = torch.load(killed / "checkpoint.pt", weights_only=True)
    assert ca["iteration"] == cb["iteration"] == ITERATIONS and ca["meta_step"] == cb["meta_step"]
    assert all(torch.equal(x, y) for x, y in zip(ca["meta_opt"]["mu"], cb["meta_opt"]["mu"]))
    log_a = [json.loads(x) for x in (straight / "metrics.jsonl").read_text().splitlines()]
    log_b = [json.loads(x) for x in (killed / "metrics.jsonl").read_text().splitlines()]
    assert log_a == log_b, f"seed {seed}"  # nothing lost, nothing logged twice


@pytest.mark.skipif(not hasattr(signal, "SIGTERM"), reason="needs POSIX signals")
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_sigint_or_sigterm_writes_a_checkpoint_exits_nonzero_and_resume_is_exact(tmp_path, capsys, sig):
    """Periodic checkpoints off: the only checkpoint is the one the signal writes."""
    stopped, straight = tmp_path / "stopped", tmp_path / "straight"
    args = [a for a in ARGS if a not in ("--checkpoint-every", "1")] + [
        "--checkpoint-every", "0", "--checkpoint-seconds", "0", "--net", "lstm"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    proc = subprocess.Popen([sys.executable, "-m", "learned_opt.cli", *args, "--run-dir", str(stopped)], cwd=ROOT,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 90
    try:
        while _lines(stopped / "metrics.jsonl") < 20:  # inside the training loop, several iterations in
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, "no progress"
            time.sleep(0.002)
        assert not (stopped / "checkpoint.pt").exists()
        proc.send_signal(sig)
        assert proc.wait(timeout=60) == 128 + sig
        err = proc.stderr.read().strip().splitlines()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
    assert len(err) == 1 and err[0].startswith(f"error: interrupted by {signal.Signals(sig).name}; checkpoint "
                                               f"of iteration "), err
    assert "continue with --resume" in err[0]
    ck = torch.load(stopped / "checkpoint.pt", weights_only=True)
    assert 0 < ck["iteration"] < ITERATIONS and not (stopped / "lopt.pt").exists()
    assert not (stopped / "run.lock").exists()
    assert main(["meta-train", "--run-dir", str(stopped), "--resume"]) == 0, capsys.readouterr().err
    assert main([*args, "--run-dir", str(straight)]) == 0, capsys.readouterr().err
    a = torch.load(straight / "lopt.pt", weights_only=True)["state_dict"]
    b = torch.load(stopped / "lopt.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    log_a = [json.loads(x) for x in (straight / "metrics.jsonl").read_text().splitlines()]
    log_b = [json.loads(x) for x in (stopped / "metrics.jsonl").read_text().splitlines()]
    assert log_a == log_b
