"""Ratios of a learned optimizer's losses to a baseline's over several task families: per-task log ratios with a
loss floor, their geometric mean over families with a bootstrap over seeds and tasks within every family, and the
verdict of a bound on such a record, and divergence per task (used by ``experiments/general.py``)."""
from __future__ import annotations

import math

import numpy as np

from common import LOSS_FLOOR, verdict


def interval(boot: np.ndarray, level: float = 0.95) -> tuple:
    """Percentile interval by order statistics (safe with infinite values)."""
    s = np.sort(np.where(np.isnan(boot), np.inf, boot))
    n = len(s)
    return float(s[int(math.floor((1 - level) / 2 * (n - 1)))]), float(s[int(math.ceil((1 + level) / 2 * (n - 1)))])


def log_ratios(learned: np.ndarray, baseline: np.ndarray, floor: float = LOSS_FLOOR) -> np.ndarray:
    """Per-task log(learned / baseline), ``(seeds, tasks)``: a non-finite learned value is an infinite ratio, 0 / 0
    a tie (the convention of :func:`paired`). Finite values below ``floor`` count as ``floor``: tuned Adam drives the
    train loss of the small tabular sets to exactly 0.0 in float32, where a ratio would measure rounding (and be
    infinite), not optimisation."""
    L = np.atleast_2d(np.asarray(learned, float))
    B = np.broadcast_to(np.asarray(baseline, float), L.shape)
    if floor > 0:
        L = np.where(np.isfinite(L), np.maximum(L, floor), L)
        B = np.where(np.isfinite(B), np.maximum(B, floor), B)
    with np.errstate(all="ignore"):
        R = np.where(np.isfinite(L), L, np.inf) / B
        R = np.where(np.isnan(R), np.where(L <= B, 1.0, np.inf), R)
        return np.log(R)


def gmean_ratio(per_family: dict, *, n_boot: int = 4000, seed: int = 0, level: float = 0.95) -> dict:
    """Geometric mean over families of each family's ratio (the geometric mean over seeds x tasks of the per-task
    ratios), with a bootstrap interval resampling seeds and tasks within every family (families fixed).

    ``per_family``: ``{family: (learned (seeds, tasks), baseline (tasks,) or (seeds, tasks))}``."""
    if not per_family:
        return {"ratio": math.nan, "ci_low": math.nan, "ci_high": math.nan, "families": {}, "nonfinite_tasks": 0}
    rng = np.random.default_rng(seed)
    fam_log, boot, nonfinite = {}, np.zeros(n_boot), 0
    for name, (learned, baseline) in per_family.items():
        lr = log_ratios(learned, baseline)
        S, T = lr.shape
        nonfinite += int((~np.isfinite(lr)).sum())
        with np.errstate(invalid="ignore"):
            fam_log[name] = float(lr.mean())
            si, ti = rng.integers(0, S, size=(n_boot, S)), rng.integers(0, T, size=(n_boot, T))
            boot = boot + lr[si[:, :, None], ti[:, None, :]].mean(axis=(1, 2))
    k = len(per_family)
    with np.errstate(invalid="ignore", over="ignore"):
        point = float(np.exp(sum(fam_log.values()) / k))
        lo, hi = interval(np.exp(boot / k), level)
    nan_inf = lambda v: math.inf if math.isnan(v) else v  # noqa: E731  (+inf and -inf together: unresolved)
    return {"ratio": nan_inf(point), "ci_low": lo, "ci_high": hi,
            "families": {n: nan_inf(float(np.exp(v))) for n, v in fam_log.items()}, "nonfinite_tasks": nonfinite}


def target(record: dict, bound) -> dict:
    """``record`` with its bound, ``verdict`` and ``met`` (whole interval at or below ``bound``); ``bound=None``:
    reported, no target."""
    if bound is None:
        return {**record, "bound": None, "met": None, "verdict": "reported (no target)"}
    ok = not any(math.isnan(record[k]) for k in ("ci_low", "ci_high"))
    v = verdict(record, bound) if ok else "not met (undefined interval)"
    return {**record, "bound": bound, "met": v == "met", "verdict": v}


def diverged(at: dict, h: int) -> np.ndarray:
    """Per task: the final whole-split train loss at ``h`` is non-finite or above the initial one."""
    final, first = np.asarray(at[h]["train_loss"], float), np.asarray(at[0]["train_loss"], float)
    return ~np.isfinite(final) | (final > first)
