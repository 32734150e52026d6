"""Evaluation, baseline tuning on validation tasks (never test tasks), the fair-tuning harness, statistics."""
import math
import warnings

import numpy as np
import pytest

from learned_opt.control import Decision
from learned_opt.evaluate import (SPLIT_OFFSETS, evaluate, lr_grid, mean_ci, robust_mean, speedup, steps_to_reach,
                                  task_seed, tune_baseline, tune_lr)
from learned_opt.optim import SGD
from learned_opt.tasks import QuadraticFamily


class RecordingFamily:
    """A quadratic family that records the seed of every task it builds (to see which split was used)."""

    def __init__(self):
        self.inner = QuadraticFamily(dim=4, num_problems=8)
        self.states = []

    def __call__(self, g):
        self.states.append(g.initial_seed())
        return self.inner(g)


def test_task_seeds_of_splits_never_overlap():
    seeds = {s: {task_seed(s, i, seed) for i in range(1000) for seed in range(5)} for s in SPLIT_OFFSETS}
    assert not (seeds["train"] & seeds["val"]) and not (seeds["val"] & seeds["test"])
    assert not (seeds["train"] & seeds["test"])
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        task_seed("dev", 0)


def test_tune_lr_uses_validation_tasks_only_and_picks_the_minimum():
    fam = RecordingFamily()
    grid = lr_grid(1e-3, 0.1, 5)
    res = tune_lr(lambda lr: SGD(lr=lr), fam, grid=grid, steps=20, num_tasks=3)
    assert set(fam.states) == {task_seed("val", i) for i in range(3)}
    assert res.best_lr == min(res.scores, key=res.scores.get)
    assert not res.at_edge or res.best_lr in (grid[0], grid[-1])


def test_tune_lr_warns_when_the_best_rate_is_at_the_grid_edge():
    fam = QuadraticFamily(dim=4, num_problems=8)
    with pytest.warns(UserWarning, match="edge of the grid"):
        res = tune_lr(lambda lr: SGD(lr=lr), fam, grid=[1e-6, 1e-5], steps=10, num_tasks=1, name="sgd")
    assert res.at_edge and res.best_lr == 1e-5
    with pytest.raises(ValueError, match="at least two values"):
        tune_lr(lambda lr: SGD(lr=lr), fam, grid=[0.1], steps=10, num_tasks=1)


def test_tune_baseline_widens_the_grid_until_the_best_rate_is_interior_and_caches(tmp_path):
    fam = QuadraticFamily(dim=4, num_problems=8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no edge warning may remain
        res = tune_baseline("momentum", fam, horizon=30, grid=[1e-5, 1e-4], num_tasks=1, cache_dir=str(tmp_path))
    assert res.widened >= 1
    assert res.grid[0] < res.hparams["lr"] < res.grid[-1]
    assert res.hparams["momentum"] in (0.5, 0.9, 0.99)  # tuned jointly with the rate
    best = min(res.table, key=lambda r: r["score"])
    assert best["lr"] == res.hparams["lr"] and best["score"] == res.score
    cached = tune_baseline("momentum", fam, horizon=30, grid=[1e-5, 1e-4], num_tasks=1, cache_dir=str(tmp_path))
    assert cached.hparams == res.hparams and cached.score == res.score
    assert len(list(tmp_path.iterdir())) == 1


def test_evaluate_keeps_the_last_value_after_a_stop_and_inf_after_divergence():
    fam = QuadraticFamily(dim=4, num_problems=2)
    stopped = evaluate(fam, SGD(lr=0.01), StopAt7, num_tasks=1, steps=50)
    assert stopped.stop_steps[0] == 7
    c = stopped.curves[0]
    assert np.all(c[stopped.stop_steps[0]:] == c[stopped.stop_steps[0]])
    diverged = evaluate(fam, SGD(lr=1e6), num_tasks=1, steps=50)
    assert np.isinf(diverged.final()).all()
    assert robust_mean([1.0, float("nan")]) == math.inf


class StopAt7:
    """A controller that stops at inner step 7."""

    def init(self):
        return None

    def decide(self, obs, state):
        return Decision(stop_prob=float(obs.step == 7), stop=obs.step == 7), None


def test_mean_ci_and_speedup():
    m, lo, hi = mean_ci([1.0, 2.0, 3.0, 4.0])
    assert m == 2.5 and lo < m < hi and math.isclose(hi - m, 1.96 * np.std([1, 2, 3, 4], ddof=1) / 2)
    assert mean_ci([3.0]) == (3.0, 3.0, 3.0)
    ref = np.array([10.0, 8, 6, 4, 2, 1])
    learned = np.array([10.0, 4, 2, 2, 2, 2])
    assert steps_to_reach(ref, 4.0) == 3.0
    assert speedup(ref, learned, 1) == 3.0  # Adam needs 3 steps for what the learned one reaches in 1
    assert speedup(ref, np.array([10.0, 0.5]), 1) == math.inf
    with pytest.raises(ValueError, match="step must be >= 1"):
        speedup(ref, learned, 0)
