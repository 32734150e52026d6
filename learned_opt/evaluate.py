"""Evaluation on held-out tasks, learning-rate tuning of baselines, and statistics.

Task seeds come from disjoint ranges per split (:func:`task_seed`), so baselines are tuned on validation
tasks and every optimizer is compared on the same, never-seen test tasks.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch

from .tasks.base import check_positive_int, generator
from .unroll import unroll

SPLIT_OFFSETS = {"train": 0, "val": 10_000_000, "test": 20_000_000}


def task_seed(split: str, index: int, seed: int = 0) -> int:
    """The seed of task ``index`` of ``split``; ranges of different splits never overlap."""
    if split not in SPLIT_OFFSETS:
        raise ValueError(f"unknown split {split!r}; known: {', '.join(SPLIT_OFFSETS)}")
    return SPLIT_OFFSETS[split] + 100_003 * seed + index


@dataclass
class EvalResult:
    """Per-problem loss curves ``(problems, steps + 1)`` (inf after divergence) and per-task stop data."""
    curves: np.ndarray
    stop_steps: List[int] = field(default_factory=list)
    val_at_stop: List[float] = field(default_factory=list)
    test_at_stop: List[float] = field(default_factory=list)
    accuracy: List[float] = field(default_factory=list)

    def final(self, step: Optional[int] = None) -> np.ndarray:
        """Per-problem loss at ``step`` (default: the last)."""
        return self.curves[:, -1 if step is None else step]


def evaluate(family, optimizer, controller_fn: Optional[Callable[[], object]] = None, *, num_tasks: int,
             steps: int, split: str = "test", seed: int = 0, val_every: int = 0,
             stop_metrics: bool = False) -> EvalResult:
    """Run ``optimizer`` (and a fresh controller per task) on ``num_tasks`` tasks of ``split``, no graph kept.

    After a stop, a curve stays at its last value (training has ended); after divergence it is ``inf``.
    """
    check_positive_int("num_tasks", num_tasks)
    curves, stops, vals, tests, accs = [], [], [], [], []
    for i in range(num_tasks):
        g = generator(task_seed(split, i, seed))
        task = family(g)
        ctrl = controller_fn() if controller_fn is not None else None
        res = unroll(task, optimizer, ctrl, steps=steps, generator=g, val_every=val_every)
        m = res.problem_loss_matrix().double().numpy()
        fill = np.inf if res.diverged else m[-1]
        pad = np.broadcast_to(fill, (steps + 1 - m.shape[0], m.shape[1]))
        curves.append(np.nan_to_num(np.concatenate([m, pad], 0), nan=np.inf).T)
        stops.append(res.stop_step if res.stopped else steps)
        if stop_metrics:
            with torch.no_grad():
                vals.append(float(task.loss(res.params, task.sample_batch(g, "val"))))
                tests.append(float(task.loss(res.params, task.sample_batch(g, "test"))))
        if hasattr(task, "accuracy") and getattr(task, "loss_name", "") == "cross_entropy":
            accs.append(task.accuracy(res.params, "test"))
    return EvalResult(np.concatenate(curves, 0), stops, vals, tests, accs)


def lr_grid(low: float, high: float, num: int) -> List[float]:
    """``num`` log-spaced learning rates from ``low`` to ``high``."""
    if not (0 < low < high):
        raise ValueError(f"need 0 < low < high, got low={low!r}, high={high!r}")
    check_positive_int("num", num)
    return [float(x) for x in np.logspace(math.log10(low), math.log10(high), num)]


def robust_mean(x: np.ndarray) -> float:
    """Mean with non-finite values counted as ``inf`` (a diverged run ranks last)."""
    x = np.asarray(x, dtype=float)
    return float(np.mean(np.where(np.isfinite(x), x, np.inf)))


@dataclass
class TuneResult:
    """The chosen learning rate, every grid point's validation score, and whether the choice is at an edge."""
    best_lr: float
    scores: Dict[float, float]
    at_edge: bool


def tune_lr(make_optimizer: Callable[[float], object], family, *, grid: Sequence[float], steps: int,
            num_tasks: int, seed: int = 0, name: str = "optimizer",
            controller_fn: Optional[Callable[[], object]] = None, val_every: int = 0,
            score: str = "final_train") -> TuneResult:
    """Pick the learning rate with the lowest mean score on *validation* tasks; warn if it is at the grid edge.

    ``score``: ``final_train`` (mean per-problem train loss after ``steps``) or ``val_at_stop``.
    """
    if len(grid) < 2:
        raise ValueError(f"the learning-rate grid needs at least two values, got {list(grid)!r}")
    scores = {}
    for lr in grid:
        res = evaluate(family, make_optimizer(lr), controller_fn, num_tasks=num_tasks, steps=steps,
                       split="val", seed=seed, val_every=val_every, stop_metrics=score == "val_at_stop")
        scores[lr] = robust_mean(res.val_at_stop if score == "val_at_stop" else res.final())
    best = min(grid, key=lambda lr: scores[lr])
    at_edge = best in (min(grid), max(grid))
    if at_edge:
        warnings.warn(f"{name}: best learning rate {best:g} is at the edge of the grid "
                      f"[{min(grid):g}, {max(grid):g}]; widen the grid")
    return TuneResult(best, scores, at_edge)


def mean_ci(values: Sequence[float], level: float = 0.95) -> tuple:
    """Mean and a normal-approximation ``level`` confidence interval ``(mean, low, high)``."""
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        raise ValueError("mean_ci needs at least one value")
    m = float(x.mean())
    if x.size == 1:
        return m, m, m
    z = {0.9: 1.6449, 0.95: 1.96, 0.99: 2.5758}.get(level)
    if z is None:
        raise ValueError(f"unsupported confidence level {level!r}; use 0.9, 0.95 or 0.99")
    half = z * float(x.std(ddof=1)) / math.sqrt(x.size)
    return m, m - half, m + half
