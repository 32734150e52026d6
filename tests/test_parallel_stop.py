"""``common.parallel_map`` stops as a whole: once a job fails, or the run is signalled, no queued job starts
(a pool worker used to pick up the next meta-training seed after saving the one SIGTERM stopped), and the
stopped meta-training runs keep their checkpoints."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "experiments"))


def _marked_job(directory: str, i: int, fail: bool, sleep: float) -> int:
    open(os.path.join(directory, f"started{i}"), "w").close()
    if fail:
        deadline = time.monotonic() + 60
        while not os.path.exists(os.path.join(directory, "started1")) and time.monotonic() < deadline:
            time.sleep(0.01)  # fail only once the other worker is busy: the third job is then queued
        raise ValueError(f"job {i} failed")
    time.sleep(sleep)
    return i


def test_results_come_back_in_order():
    import common

    assert common.parallel_map(divmod, [(7, 2), (9, 4), (1, 1)], workers=2) == [(3, 1), (2, 1), (1, 0)]


def test_a_failed_job_stops_the_queue(tmp_path):
    """Two workers, three jobs: the first fails while the second runs, so the third (already handed to the pool)
    must not start; the error that comes back is the failure, not the refusal."""
    import common

    jobs = [(str(tmp_path), 0, True, 0.0), (str(tmp_path), 1, False, 1.0), (str(tmp_path), 2, False, 0.0)]
    with pytest.raises(ValueError, match="job 0 failed"):
        common.parallel_map(_marked_job, jobs, workers=2)
    assert sorted(os.listdir(tmp_path)) == ["started0", "started1"]


def test_a_worker_whose_job_failed_refuses_the_next(monkeypatch):
    """In the worker itself (the parent may be gone): a failed job sets the pool's stop, and nothing starts after."""
    import threading

    import common

    monkeypatch.setattr(common, "_STOP", threading.Event())
    with pytest.raises(ZeroDivisionError):
        common._call((divmod, (1, 0)))
    with pytest.raises(common.PoolStopped):
        common._call((divmod, (1, 1)))


def _lines(path) -> int:
    try:
        with open(path) as f:
            return sum(1 for _ in f)
    except OSError:
        return 0


@pytest.mark.skipif(not hasattr(os, "killpg"), reason="needs POSIX process groups")
def test_sigterm_saves_the_running_seeds_and_starts_no_other(tmp_path):
    """SIGTERM to the process group of a 2-worker meta-training run of 3 seeds: seeds 0 and 1 write their
    checkpoints, seed 2 never starts, the exit status is 128 + SIGTERM, and the message says how to go on."""
    out = tmp_path / "train"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "experiments", "general_train.py"), "--preset",
                             "smoke", "--seeds", "3", "--workers", "2", "--iterations", "500", "--out_dir",
                             str(out)], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    deadline = time.monotonic() + 180
    try:
        while min(_lines(out / f"seed{s}" / "metrics.jsonl") for s in (0, 1)) < 3:  # both inside their loops
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, "no progress"
            time.sleep(0.01)
        os.killpg(proc.pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert not (out / "seed2").exists(), err
    assert all((out / f"seed{s}" / "checkpoint.pt").exists() for s in (0, 1)), err
    assert "interrupted by SIGTERM" in err and "rerun the same command" in err, err
    assert "Traceback" not in err, err
