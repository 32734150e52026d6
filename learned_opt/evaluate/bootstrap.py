"""The one bootstrap of the project: a nested (hierarchical) resampling of families, tasks and meta-training seeds.

A claim about a learned optimizer is a claim about unseen task families, unseen tasks and unseen meta-training seeds,
so every level is resampled the way the data were produced (the nested bootstrap of Davison & Hinkley 1997, sec. 3.8;
Ren et al. 2010, "Nonparametric bootstrapping for hierarchical data"). One replicate:

1. draw the families with replacement (as many as there are);
2. for *each drawn family*, draw its tasks with replacement, independently of every other drawn family;
3. for *each drawn task*, draw the meta-training seeds with replacement, independently of every other drawn task
   (nested: a task's seeds are not the seeds drawn for another task, as a crossed design would have them).

The replicate's value is the mean over drawn families of the mean over drawn tasks of the mean over drawn seeds; the
interval is the percentile interval of the replicates (order statistics, so infinite values are safe). A level with a
single unit (one family, one task, one seed) is the identity and draws nothing from the generator.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import numpy as np

LEVELS = ("families", "tasks", "seeds")


def percentile_interval(boot, level: float = 0.95) -> Tuple[float, float]:
    """Percentile interval of bootstrap replicates by order statistics (NaN, i.e. +inf and -inf together, as inf)."""
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level!r}")
    s = np.sort(np.where(np.isnan(boot), np.inf, np.asarray(boot, float)))
    n = len(s)
    return float(s[int(math.floor((1 - level) / 2 * (n - 1)))]), float(s[int(math.ceil((1 + level) / 2 * (n - 1)))])


def draw(rng: np.random.Generator, n: int, shape: tuple) -> np.ndarray:
    """Indices ``shape + (n,)`` drawn with replacement from ``range(n)``; a single unit is the identity (no draw)."""
    if n == 1:
        return np.zeros((*shape, 1), dtype=int)
    return rng.integers(0, n, size=(*shape, n))


def seeds_tasks(x) -> np.ndarray:
    """Values as ``(seeds, tasks, ...)``: a ``(tasks,)`` array is one seed."""
    a = np.asarray(x, dtype=float)
    if a.ndim == 1:
        a = a[None, :]  # one seed
    if a.ndim < 2 or a.shape[0] < 1 or a.shape[1] < 1:
        raise ValueError(f"need values shaped (seeds, tasks, ...), got shape {a.shape}")
    return a


def nested_means(rng: np.random.Generator, x: np.ndarray, m: int) -> np.ndarray:
    """``m`` replicates of one family ``x`` (seeds, tasks, ...): tasks drawn with replacement, then for every drawn
    task its seeds drawn independently; returns the means over drawn tasks of the means over drawn seeds,
    ``(m, ...)``."""
    S, T = x.shape[:2]
    ti = draw(rng, T, (m,))  # (m, T): the drawn tasks of each replicate
    si = draw(rng, S, (m, T))  # (m, T, S): each drawn task's own seeds
    return x[si, ti[:, :, None]].mean(axis=(1, 2))


def hierarchical_bootstrap(per_family: Mapping[Any, Any], statistic: Optional[Callable] = None, *,
                           n_boot: int = 4000, seed: int = 0, level: float = 0.95,
                           resample_families: bool = True) -> Dict[str, Any]:
    """Nested bootstrap of the mean over families of the mean over tasks of the mean over seeds.

    ``per_family``: family -> values ``(seeds, tasks)`` (a ``(tasks,)`` array is one seed), optionally with trailing
    axes that are averaged alongside (e.g. ``(seeds, tasks, 2)`` for learned and baseline values). ``statistic``
    maps the nested means ``(n, ...)`` to ``(n,)`` (default: the means themselves; ``np.exp`` turns a mean log ratio
    into a geometric-mean ratio). ``resample_families=False`` keeps the families fixed (a claim about these
    families only). Returns ``estimate`` (the statistic of the nested mean of the data), ``ci_low``, ``ci_high``
    (percentile interval), ``level``, ``n_boot`` and ``resampled`` (the levels that varied)."""
    if not per_family:
        raise ValueError("hierarchical_bootstrap needs at least one family")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot!r}")
    xs = [seeds_tasks(v) for v in per_family.values()]
    trail = xs[0].shape[2:]
    if any(x.shape[2:] != trail for x in xs):
        raise ValueError("every family's values need the same trailing shape")
    stat = statistic if statistic is not None else (lambda means: means)
    F = len(xs)
    rng = np.random.default_rng(seed)
    fi = draw(rng, F, (n_boot,)) if resample_families else np.broadcast_to(np.arange(F), (n_boot, F))
    slots = np.zeros((n_boot, F, *trail))
    with np.errstate(invalid="ignore", over="ignore"):
        for j, x in enumerate(xs):
            picked = fi == j
            if picked.any():
                slots[picked] = nested_means(rng, x, int(picked.sum()))
        boot = np.asarray(stat(slots.mean(axis=1)), float)
        point = float(np.asarray(stat(np.mean([x.mean(axis=(0, 1)) for x in xs], axis=0)[None]), float)[0])
    lo, hi = percentile_interval(boot, level)
    varied = (F > 1 and resample_families, any(x.shape[1] > 1 for x in xs), any(x.shape[0] > 1 for x in xs))
    return {"estimate": point, "ci_low": lo, "ci_high": hi, "level": level, "n_boot": n_boot,
            "resampled": [name for name, v in zip(LEVELS, varied) if v]}


def bootstrap_interval(values, statistic: Callable, *, n_boot: int = 4000, seed: int = 0,
                       level: float = 0.95) -> Tuple[float, float]:
    """Percentile interval of ``statistic`` over units drawn with replacement along axis 0 of ``values`` (one level:
    independent repetitions, e.g. interleaved timing runs). ``statistic`` maps ``(n_boot, units, ...)`` to
    ``(n_boot,)``."""
    x = np.asarray(values, float)
    idx = draw(np.random.default_rng(seed), len(x), (n_boot,))
    return percentile_interval(np.asarray(statistic(x[idx]), float), level)
