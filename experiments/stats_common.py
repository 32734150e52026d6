"""What the general experiment adds to :mod:`learned_opt.evaluate.stats` (the one statistics module): a target record
(a bound, or none for a reported-only row) and divergence per task (used by ``experiments/general.py``)."""
from __future__ import annotations

import numpy as np

from learned_opt.evaluate import verdict


def target(record: dict, bound) -> dict:
    """``record`` with its bound, ``verdict`` and ``met`` (whole interval at or below ``bound``); ``bound=None``:
    reported, no target."""
    if bound is None:
        return {**record, "bound": None, "met": None, "verdict": "reported (no target)"}
    v = verdict(record, bound)
    return {**record, "bound": bound, "met": v == "met", "verdict": v}


def diverged(at: dict, h: int) -> np.ndarray:
    """Per task: the final whole-split train loss at ``h`` is non-finite or above the initial one."""
    final, first = np.asarray(at[h]["train_loss"], float), np.asarray(at[0]["train_loss"], float)
    return ~np.isfinite(final) | (final > first)
