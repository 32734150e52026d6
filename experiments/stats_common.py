"""What the general experiment adds to :mod:`learned_opt.evaluate.stats` (the one statistics module): a target record
(a bound, or none for a reported-only row), divergence per task and the table's interval text (used by
``experiments/general.py``)."""
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


def ci(r: dict) -> str:
    """``ratio [ci_low, ci_high]`` to three significant digits."""
    return f"{r['ratio']:.3g} [{r['ci_low']:.3g}, {r['ci_high']:.3g}]"


def families_fixed_ci(r: dict) -> str:
    """:func:`ci` with the interval that holds the families fixed (``-`` for a record without one)."""
    return ci({"ratio": r["ratio"], **r["families_fixed"]}) if "families_fixed" in r else "-"
