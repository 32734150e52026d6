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
        curves.append(np.nan_to_num(np.concatenate([m, pad], 0), nan=np.inf, posinf=np.inf).T)
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
    with np.errstate(over="ignore", invalid="ignore"):
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


# ---------------------------------------------------------------------------------------------- fair tuning
EXTRA_GRIDS = {  # hyper-parameters tuned jointly with the learning rate, where relevant
    "momentum": {"momentum": (0.5, 0.9, 0.99)},
    "nesterov": {"momentum": (0.5, 0.9, 0.99)},
    "adam": {"betas": ((0.9, 0.999), (0.5, 0.999), (0.9, 0.99))},
}


@dataclass
class TunedBaseline:
    """A baseline's best hyper-parameters for one horizon, with the validation score of every candidate."""
    name: str
    horizon: int
    hparams: Dict[str, object]
    score: float
    grid: List[float]
    widened: int
    table: List[Dict[str, object]]


def _cache_key(*parts) -> str:
    import hashlib

    return hashlib.sha1(repr(parts).encode()).hexdigest()[:16]


def tune_baseline(name: str, family, *, horizon: int, grid: Sequence[float], num_tasks: int, seed: int = 0,
                  extra: Optional[Dict[str, Sequence]] = None, max_widen: int = 3,
                  cache_dir: Optional[str] = None) -> TunedBaseline:
    """Tune ``name`` for ``horizon`` on validation tasks over ``grid`` (x the extra grids of
    :data:`EXTRA_GRIDS`); if the best learning rate sits at an edge, extend the grid by one decade on that side
    (up to ``max_widen`` times) so that the chosen value is interior. Results are cached in ``cache_dir``.
    """
    import itertools
    import json
    import os

    from .optim import get_optimizer

    extra = EXTRA_GRIDS.get(name, {}) if extra is None else extra
    key = _cache_key(name, repr(family), horizon, list(grid), num_tasks, seed, sorted(extra.items()), max_widen)
    path = os.path.join(cache_dir, f"tune-{name}-{horizon}-{key}.json") if cache_dir else None
    if path and os.path.exists(path):
        with open(path) as f:
            d = json.load(f)
        d["hparams"] = {k: tuple(v) if isinstance(v, list) else v for k, v in d["hparams"].items()}
        return TunedBaseline(**d)
    grid = sorted(float(x) for x in grid)
    ratio = grid[1] / grid[0] if len(grid) > 1 else 10.0
    combos = [dict(zip(extra, vals)) for vals in itertools.product(*extra.values())] or [{}]
    scores: Dict[tuple, float] = {}
    widened = 0
    while True:
        for lr in grid:
            for combo in combos:
                k = (lr, tuple(sorted(combo.items())))
                if k not in scores:
                    res = evaluate(family, get_optimizer(name, lr=lr, **combo), num_tasks=num_tasks,
                                   steps=horizon, split="val", seed=seed)
                    scores[k] = robust_mean(res.final())
        best = min(scores, key=scores.get)
        lr_best = best[0]
        if widened >= max_widen or not math.isfinite(scores[best]):
            break
        if lr_best == grid[0]:
            grid = [grid[0] / ratio ** i for i in range(3, 0, -1)] + grid
        elif lr_best == grid[-1]:
            grid = grid + [grid[-1] * ratio ** i for i in range(1, 4)]
        else:
            break
        widened += 1
    if lr_best in (grid[0], grid[-1]):
        warnings.warn(f"{name}@{horizon}: best learning rate {lr_best:g} is still at the grid edge after "
                      f"{widened} widenings")
    table = [{"lr": k[0], **dict(k[1]), "score": v} for k, v in sorted(scores.items())]
    out = TunedBaseline(name, horizon, {"lr": lr_best, **dict(best[1])}, scores[best], grid, widened, table)
    if path:
        os.makedirs(cache_dir, exist_ok=True)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump({**out.__dict__, "table": table}, f, indent=1, default=float)
        os.replace(tmp, path)
    return out


def steps_to_reach(curve: np.ndarray, target: float) -> float:
    """First step at which a mean loss curve is <= ``target`` (``inf`` if never)."""
    hit = np.nonzero(np.asarray(curve) <= target)[0]
    return float(hit[0]) if hit.size else math.inf


def speedup(reference_curve: np.ndarray, learned_curve: np.ndarray, step: int) -> float:
    """Steps the reference (e.g. tuned Adam) needs to reach the learned optimizer's loss at ``step``,
    divided by ``step``; > 1 means the learned optimizer is faster, ``inf`` if the reference never gets there."""
    if step < 1:
        raise ValueError(f"step must be >= 1, got {step!r}")
    return steps_to_reach(reference_curve, float(learned_curve[step])) / step
