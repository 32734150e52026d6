"""Paired statistics: a learned-vs-baseline claim is the per-task ratio, with a bootstrap interval over tasks and
meta-training seeds, a Wilcoxon signed-rank p-value and the win rate (:func:`paired`); intervals over seeds use the t
quantile (:func:`mean_ci`); speedups are measured against the envelope of baselines tuned per horizon
(:func:`envelope_speedup`)."""
from __future__ import annotations

import math
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np

from .splits import TEST_DRAW


def robust_mean(x) -> float:
    """Mean with non-finite values counted as ``inf`` (a diverged run ranks last)."""
    x = np.asarray(x, dtype=float)
    with np.errstate(over="ignore", invalid="ignore"):
        return float(np.mean(np.where(np.isfinite(x), x, np.inf)))


def t_quantile(level: float, dof: int) -> float:
    """Two-sided Student-t quantile for a ``level`` interval with ``dof`` degrees of freedom."""
    from scipy import stats

    return float(stats.t.ppf(0.5 + level / 2, dof))


def mean_ci(values: Sequence[float], level: float = 0.95) -> tuple:
    """Mean and a Student-t ``level`` confidence interval ``(mean, low, high)`` (t quantile, not z: with 3
    values the half-width is 4.30 standard errors, not 1.96)."""
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        raise ValueError("mean_ci needs at least one value")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level!r}")
    m = float(x.mean())
    if x.size == 1 or not np.all(np.isfinite(x)):
        return (m, m, m) if x.size == 1 else (m, -math.inf if not np.isfinite(m) else m, math.inf)
    half = t_quantile(level, x.size - 1) * float(x.std(ddof=1)) / math.sqrt(x.size)
    return m, m - half, m + half


def _as_seeds_tasks(x) -> np.ndarray:
    a = np.asarray(x, dtype=float)
    return a[None, :] if a.ndim == 1 else a


def paired(learned, baseline, *, level: float = 0.95, n_boot: int = 4000, seed: int = 0) -> Dict[str, Any]:
    """Paired comparison of ``learned`` against ``baseline`` on the same tasks (lower is better).

    ``learned``: per-task values ``(tasks,)`` or ``(seeds, tasks)`` (one row per meta-training seed);
    ``baseline``: ``(tasks,)`` or the same shape. Returns ``ratio`` (the mean over seeds and tasks of the per-task
    ratio learned / baseline) with a ``level`` bootstrap interval ``ci_low .. ci_high`` (resampling seeds, then
    tasks), ``ratio_of_means`` with its own bootstrap interval, ``gmean_ratio``, the two-sided Wilcoxon signed-rank
    p-value on the per-task log ratios (averaged over seeds) and ``favours`` (the side of their median),
    ``win_rate`` (fraction of seed-task pairs where learned is lower), the per-seed mean ratios and their t
    interval.
    """
    from scipy import stats

    L = _as_seeds_tasks(learned)
    B = _as_seeds_tasks(baseline)
    if B.shape[1] != L.shape[1]:
        raise ValueError(f"learned {L.shape} and baseline {B.shape} must cover the same tasks")
    if B.shape[0] == 1:
        B = np.broadcast_to(B, L.shape)
    if L.shape != B.shape:
        raise ValueError(f"learned {L.shape} and baseline {B.shape} must cover the same tasks")
    S, T = L.shape
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        R = np.where(np.isfinite(L), L, np.inf) / np.where(B > 0, B, np.nan)
        R = np.where(np.isnan(R), np.where(L <= B, 1.0, np.inf), R)  # baseline at exactly 0: tie or loss
        logr = np.log(R)
    rng = np.random.default_rng(seed)
    si = rng.integers(0, S, size=(n_boot, S)) if S > 1 else np.zeros((n_boot, 1), dtype=int)
    ti = rng.integers(0, T, size=(n_boot, T))
    Rb = R[si[:, :, None], ti[:, None, :]]
    Lb, Bb = L[si[:, :, None], ti[:, None, :]], B[si[:, :, None], ti[:, None, :]]
    with np.errstate(invalid="ignore", over="ignore"):
        boot = Rb.mean(axis=(1, 2))
        boot_rom = Lb.mean(axis=(1, 2)) / Bb.mean(axis=(1, 2))
    q = [(1 - level) / 2 * 100, (1 + level) / 2 * 100]
    lo, hi = (float(v) for v in np.percentile(boot, q))
    rlo, rhi = (float(v) for v in np.percentile(boot_rom, q))
    per_task_log = logr.mean(0)
    finite = per_task_log[np.isfinite(per_task_log)]
    if np.all(per_task_log == 0) or per_task_log.size < 2:
        p = 1.0
    else:
        d = np.where(np.isfinite(per_task_log), per_task_log, np.sign(per_task_log) * 1e9)
        try:
            p = float(stats.wilcoxon(d, zero_method="wilcox").pvalue) if np.any(d != 0) else 1.0
        except ValueError:
            p = 1.0
    per_seed = [float(v) for v in R.mean(1)]
    _, slo, shi = mean_ci(per_seed, level)
    with np.errstate(over="ignore", invalid="ignore"):
        out = {"ratio": float(R.mean()), "ci_low": lo, "ci_high": hi, "ci": "bootstrap",
               "ratio_of_means": float(L.mean() / B.mean()), "ratio_of_means_ci": [rlo, rhi],
               "gmean_ratio": float(np.exp(logr.mean())) if np.all(np.isfinite(logr)) else math.inf,
               "wilcoxon_p": p, "favours": ("learned" if np.median(per_task_log) < 0 else
                                            "baseline" if np.median(per_task_log) > 0 else "neither"),
               "win_rate": float(np.mean(L < B)), "n_seeds": S, "n_tasks": T,
               "per_seed_ratio": per_seed, "per_seed_t_ci": [slo, shi],
               "finite_tasks": int(finite.size)}
    return out


def steps_to_reach(curve: np.ndarray, target: float) -> float:
    """First step at which a mean loss curve is <= ``target`` (``inf`` if never)."""
    hit = np.nonzero(np.asarray(curve) <= target)[0]
    return float(hit[0]) if hit.size else math.inf


def envelope_speedup(envelope: Dict[int, float], learned_loss: float, step: int) -> Tuple[float, Optional[str]]:
    """Speedup of reaching ``learned_loss`` in ``step`` steps over a baseline *tuned for each horizon*.

    ``envelope[h]`` is the baseline's mean loss at step ``h`` when tuned for horizon ``h``. Returns
    ``(h* / step, bound)`` where ``h*`` is the smallest horizon whose tuned baseline reaches ``learned_loss``,
    interpolated log-linearly between the envelope's horizons (made non-increasing by a running minimum), and
    ``bound`` is None. When no horizon reaches it, ``h*`` is only bounded below by the largest horizon
    (``bound='lower'``); when even the smallest horizon already reaches it, only bounded above by the smallest
    (``bound='upper'``).
    """
    if step < 1:
        raise ValueError(f"step must be >= 1, got {step!r}")
    hs = sorted(envelope)
    vals = np.minimum.accumulate([envelope[h] for h in hs])
    if not any(v <= learned_loss for v in vals):
        return hs[-1] / step, "lower"
    i = next(k for k, v in enumerate(vals) if v <= learned_loss)
    if vals[i] == learned_loss:
        return hs[i] / step, None
    if i == 0:
        return hs[0] / step, "upper"
    h0, h1, v0, v1 = hs[i - 1], hs[i], vals[i - 1], vals[i]
    if not (v0 > v1 > 0 and learned_loss > 0):
        return h1 / step, None
    frac = (math.log(v0) - math.log(learned_loss)) / (math.log(v0) - math.log(v1))
    h = math.exp(math.log(h0) + frac * (math.log(h1) - math.log(h0)))
    return h / step, None


def protocol_record(*, meta_training_seeds: int, validation_tasks: int, tuning_metric: Any, test_split: str,
                    test_tasks: int, **extra) -> Dict[str, Any]:
    """The ``protocol`` object every comparing summary carries."""
    return {"meta_training_seeds": meta_training_seeds, "validation_tasks": validation_tasks, "ci": "bootstrap",
            "ci_over_seeds": "t", "tuning_metric": tuning_metric, "test_split": test_split,
            "test_tasks": test_tasks, "test_draw": TEST_DRAW if test_split.startswith("test") else None,
            "lr_resolution_decades": 0.125, **extra}
