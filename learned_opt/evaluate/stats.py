"""Paired statistics, the one statistics module of every experiment: a learned-vs-baseline claim is the per-task
ratio with a nested bootstrap interval (tasks, then meta-training seeds within each task; :mod:`.bootstrap`), a
Wilcoxon signed-rank p-value with its floor, and the win rate (:func:`paired`); a ratio over several task families
resamples the families too (:func:`family_ratio`); intervals over seeds use the t quantile (:func:`mean_ci`); a
target is met only when its whole interval clears the bound (:func:`verdict`); speedups are measured against the
envelope of baselines tuned per horizon (:func:`envelope_speedup`)."""
from __future__ import annotations

import math
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np

from .bootstrap import hierarchical_bootstrap, seeds_tasks
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


MIN_FINAL_SEEDS = 5  # meta-training seeds a final (reported) run needs: 3 seeds gave intervals that missed a re-run
WILCOXON_LEVEL = 0.05  # a Wilcoxon p-value supports a claim only when the exact test can go below it


def require_final_seeds(seeds: int, final: bool, *, smoke: bool = False, flag: str = "--seeds") -> None:
    """Raise ``ValueError`` (one line naming ``flag``) when a final run would meta-train fewer than
    :data:`MIN_FINAL_SEEDS` seeds; development runs and smoke runs (``smoke``: seconds, for the tests; their numbers
    are no result) may use fewer."""
    if final and not smoke and seeds < MIN_FINAL_SEEDS:
        raise ValueError(f"{flag} {seeds}: a final run needs at least {MIN_FINAL_SEEDS} meta-training seeds "
                         f"(fewer only in development runs)")


def wilcoxon_floor(n: int) -> float:
    """The smallest two-sided p-value the exact Wilcoxon signed-rank test can give with ``n`` non-zero
    differences: every sign agreeing, ``2 / 2**n`` (0.0625 with 5 tasks)."""
    return min(1.0, 2.0 / 2 ** n)


def _wilcoxon(per_task_log: np.ndarray) -> Dict[str, Any]:
    """Two-sided signed-rank p on per-task log ratios (infinite ones ranked largest), its floor and whether a
    claim may rest on it."""
    from scipy import stats

    d = np.where(np.isfinite(per_task_log), per_task_log, np.sign(per_task_log) * 1e9)
    n = int(np.count_nonzero(d))
    p = 1.0
    if n >= 1 and per_task_log.size >= 2:
        try:
            p = float(stats.wilcoxon(d, zero_method="wilcox").pvalue)
        except ValueError:
            p = 1.0
    floor = wilcoxon_floor(n)
    return {"wilcoxon_p": p, "wilcoxon_floor": floor, "wilcoxon_claim": floor <= WILCOXON_LEVEL}


def paired(learned, baseline, *, level: float = 0.95, n_boot: int = 4000, seed: int = 0) -> Dict[str, Any]:
    """Paired comparison of ``learned`` against ``baseline`` on the same tasks (lower is better).

    ``learned``: per-task values ``(tasks,)`` or ``(seeds, tasks)`` (one row per meta-training seed);
    ``baseline``: ``(tasks,)`` or the same shape. Returns ``ratio`` (the mean over tasks of the mean over seeds of the
    per-task ratio learned / baseline) with a ``level`` interval ``ci_low .. ci_high`` from the nested bootstrap of
    :func:`~learned_opt.evaluate.bootstrap.hierarchical_bootstrap` (``ci == "hierarchical_bootstrap"``: tasks drawn
    with replacement, then for each drawn task the seeds drawn with replacement independently of the other drawn
    tasks); ``ratio_of_means`` with its interval from the same draws; ``gmean_ratio``; the two-sided Wilcoxon
    signed-rank p-value on the per-task log ratios (averaged over seeds) with ``wilcoxon_floor`` (the smallest p the
    exact test can give with this many tasks) and ``wilcoxon_claim`` (False when that floor is above 0.05: the p is
    reported, no claim may rest on it); ``favours`` (the side of their median); ``win_rate`` (fraction of seed-task
    pairs where learned is lower); the per-seed mean ratios and their t interval (``per_seed_t_ci``).
    """
    L = seeds_tasks(learned)
    B = seeds_tasks(baseline)
    if B.shape[1] != L.shape[1]:
        raise ValueError(f"learned {L.shape} and baseline {B.shape} must cover the same tasks")
    if B.shape[0] == 1:
        B = np.broadcast_to(B, L.shape)
    if L.shape != B.shape:
        raise ValueError(f"learned {L.shape} and baseline {B.shape} must cover the same tasks")
    S, T = L.shape
    R = ratios(L, B)
    with np.errstate(divide="ignore"):
        logr = np.log(R)
    # the same seed gives the same draws: both intervals come from one set of nested resamples
    ratio_ci = hierarchical_bootstrap({"": R}, n_boot=n_boot, seed=seed, level=level)
    rom_ci = hierarchical_bootstrap({"": np.stack([L, B], axis=-1)}, lambda m: m[..., 0] / m[..., 1],
                                    n_boot=n_boot, seed=seed, level=level)
    per_task_log = logr.mean(0)
    finite = per_task_log[np.isfinite(per_task_log)]
    per_seed = [float(v) for v in R.mean(1)]
    _, slo, shi = mean_ci(per_seed, level)
    with np.errstate(over="ignore", invalid="ignore"):
        out = {"ratio": float(R.mean()), "ci_low": ratio_ci["ci_low"], "ci_high": ratio_ci["ci_high"],
               "ci": "hierarchical_bootstrap", "resampled": ratio_ci["resampled"],
               "ratio_of_means": float(L.mean() / B.mean()),
               "ratio_of_means_ci": [rom_ci["ci_low"], rom_ci["ci_high"]],
               "gmean_ratio": float(np.exp(logr.mean())) if np.all(np.isfinite(logr)) else math.inf,
               **_wilcoxon(per_task_log),
               "favours": ("learned" if np.median(per_task_log) < 0 else
                           "baseline" if np.median(per_task_log) > 0 else "neither"),
               "win_rate": float(np.mean(L < B)), "n_seeds": S, "n_tasks": T,
               "per_seed_ratio": per_seed, "per_seed_t_ci": [slo, shi],
               "finite_tasks": int(finite.size)}
    return out


def ratios(L: np.ndarray, B: np.ndarray) -> np.ndarray:
    """Per-task ratios learned / baseline (lower is better): a non-finite learned value is an infinite ratio, and a
    baseline at exactly 0 is a tie when learned is at 0 too, else an infinite ratio."""
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        R = np.where(np.isfinite(L), L, np.inf) / np.where(B > 0, B, np.nan)
        return np.where(np.isnan(R), np.where(L <= B, 1.0, np.inf), R)


def log_ratios(learned, baseline, *, floor: float) -> np.ndarray:
    """Per-task log(learned / baseline), ``(seeds, tasks)``: a non-finite learned value is an infinite ratio, 0 / 0
    a tie (the convention of :func:`paired`). Finite values below ``floor`` count as ``floor`` (the experiment
    pre-registers it: below it a ratio measures float32 rounding, not optimisation); ``floor=0`` leaves them."""
    L = np.atleast_2d(np.asarray(learned, float))
    B = np.broadcast_to(np.asarray(baseline, float), L.shape)
    if floor > 0:
        L = np.where(np.isfinite(L), np.maximum(L, floor), L)
        B = np.where(np.isfinite(B), np.maximum(B, floor), B)
    with np.errstate(divide="ignore"):
        return np.log(ratios(L, B))


def _nan_inf(v: float) -> float:
    return math.inf if math.isnan(v) else v  # +inf and -inf together: unresolved, counted against the learned side


def family_ratio(per_family: Dict[str, tuple], *, floor: float, n_boot: int = 4000, seed: int = 0,
                 level: float = 0.95) -> Dict[str, Any]:
    """Geometric mean over families of each family's geometric-mean ratio learned / baseline (over seeds x tasks),
    with the interval of :func:`~learned_opt.evaluate.bootstrap.hierarchical_bootstrap` on the log ratios: families
    drawn with replacement (the claim is about unseen families), then tasks within each drawn family, then seeds
    within each drawn task. Beside it: ``families_fixed`` (the same nested bootstrap with the families held fixed,
    a claim about these families only), the per-family ratios and, when every family has the same seeds, the
    per-seed ratios (one seed too: a reproducibility check re-runs one) with a t interval over seeds (on the log
    scale, exponentiated; two seeds or more).

    ``per_family``: ``{family: (learned (seeds, tasks), baseline (tasks,) or (seeds, tasks))}``; ``floor``: the loss
    floor of :func:`log_ratios`."""
    if not per_family:
        return {"ratio": math.nan, "ci_low": math.nan, "ci_high": math.nan, "families": {}, "nonfinite_tasks": 0}
    lr = {f: log_ratios(learned, baseline, floor=floor) for f, (learned, baseline) in per_family.items()}
    kw = dict(n_boot=n_boot, seed=seed, level=level)
    hb = hierarchical_bootstrap(lr, np.exp, **kw)
    fixed = hierarchical_bootstrap(lr, np.exp, resample_families=False, **kw)
    with np.errstate(invalid="ignore", over="ignore"):
        fam = {f: _nan_inf(float(np.exp(v.mean()))) for f, v in lr.items()}
        out = {"ratio": _nan_inf(hb["estimate"]), "ci_low": hb["ci_low"], "ci_high": hb["ci_high"],
               "ci": "hierarchical_bootstrap", "resampled": hb["resampled"], "n_families": len(lr),
               "families_fixed": {"ci_low": fixed["ci_low"], "ci_high": fixed["ci_high"],
                                  "resampled": fixed["resampled"]},
               "families": fam, "floor": floor, "nonfinite_tasks": int(sum((~np.isfinite(v)).sum()
                                                                           for v in lr.values()))}
        seeds = {v.shape[0] for v in lr.values()}
        if len(seeds) == 1:
            per_seed = np.mean([v.mean(1) for v in lr.values()], axis=0)
            out["per_seed_ratio"] = [_nan_inf(float(np.exp(v))) for v in per_seed]
            if per_seed.size > 1:
                _, slo, shi = mean_ci(per_seed, level)
                out["per_seed_t_ci"] = [float(np.exp(slo)), float(np.exp(shi))]
    return out


def verdict(record: Dict[str, Any], bound: float) -> str:
    """``met`` only when the whole interval ``ci_low .. ci_high`` lies at or below ``bound``."""
    lo, hi = record["ci_low"], record["ci_high"]
    if math.isnan(lo) or math.isnan(hi):
        return "not met (undefined interval)"
    return "met" if hi <= bound else ("not met" if lo > bound else "not met (interval crosses the bound)")


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


CI_RESAMPLING = ("nested bootstrap, percentile interval: task families drawn with replacement (where a ratio spans "
                 "several), then tasks with replacement within each drawn family, then meta-training seeds with "
                 "replacement independently within each drawn task")


def protocol_record(*, meta_training_seeds: int, validation_tasks: int, tuning_metric: Any, test_split: str,
                    test_tasks: int, **extra) -> Dict[str, Any]:
    """The ``protocol`` object every comparing summary carries (``ci``: how intervals are made, in
    ``ci_resampling`` in words; ``ci_over_seeds``: the t interval beside it)."""
    return {"meta_training_seeds": meta_training_seeds, "validation_tasks": validation_tasks,
            "ci": "hierarchical_bootstrap", "ci_resampling": CI_RESAMPLING, "ci_over_seeds": "t",
            "wilcoxon": f"p reported; a claim rests on it only when the exact test can go below {WILCOXON_LEVEL} "
                        f"(at least 6 tasks)",
            "tuning_metric": tuning_metric, "test_split": test_split,
            "test_tasks": test_tasks, "test_draw": TEST_DRAW if test_split.startswith("test") else None,
            "lr_resolution_decades": 0.125, **extra}
