"""Held-out score against meta-training compute (issue #24, ``compute_scaling``): does more compute help?

``general_train.py --budgets N1,N2,...`` saves, for every seed, the weights it would ship had it stopped after
``N`` meta-iterations (its best on its selection stream so far) as ``seed{s}/lopt_it{N}.pt``, and the seconds of
meta-training spent until then in ``seed{s}/budgets.json``. The evaluation runs those weights exactly as the final
ones at 1x on the held-out families' evaluation tasks, and reports each budget's ``train_vs_tuned_adam_1x`` (same
tuned Adam runs, same statistics) beside the final weights' headline.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Dict, List, Sequence

import numpy as np

from general_checks import group_ratio, role_families
from general_jobs import horizons


def snapshot_key(seed: int, iterations: int) -> str:
    """The weights' key in the evaluation's ``paths`` (a seed's final weights are keyed by the seed itself)."""
    return f"{seed}@it{iterations}"


def _read_json(path: str) -> Dict[str, Any]:
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def spent_seconds(rec: Dict[str, Any]) -> float:
    """A meta-training record's compute in seconds: its CPU seconds where recorded (``train_cpu_seconds``: what
    the meta-steps cost whatever else loaded the machine), else its wall seconds (``train_seconds``; runs made
    before CPU time was recorded, an overestimate on a loaded machine)."""
    cpu = rec.get("train_cpu_seconds")
    if cpu is not None and np.isfinite(cpu):
        return float(cpu)
    return float(rec["train_seconds"])


def snapshot_budgets(train_dir: str, seeds: Sequence[int]) -> Dict[int, Dict[int, float]]:
    """``{iterations: {seed: meta-training seconds}}`` (:func:`spent_seconds`) for every budget that every seed
    saved."""
    per_seed = []
    for s in seeds:
        run = os.path.join(train_dir, f"seed{s}")
        rec = _read_json(os.path.join(run, "budgets.json"))
        per_seed.append({int(n): spent_seconds(r) for n, r in rec.items()
                         if os.path.isfile(os.path.join(run, f"lopt_it{int(n)}.pt"))})
    common = set.intersection(*(set(p) for p in per_seed)) if per_seed else set()
    return {n: {s: p[n] for s, p in zip(seeds, per_seed)} for n in sorted(common)}


def snapshot_paths(train_dir: str, seeds: Sequence[int]) -> Dict[str, str]:
    """``{snapshot_key: path}`` of the budgets every seed saved."""
    return {snapshot_key(s, n): os.path.join(train_dir, f"seed{s}", f"lopt_it{n}.pt")
            for n, per in snapshot_budgets(train_dir, seeds).items() for s in per}


def snapshot_specs(cfg, fams: Sequence[str], snapshots: Dict[str, str]) -> List[tuple]:
    """The evaluation jobs of the snapshots: 1x, the held-out families' evaluation tasks."""
    h1 = horizons(cfg)[0]
    return [("learned", f, k, h1, cfg.test_tasks) for f in role_families(fams, "heldout") for k in snapshots]


def final_seconds(train_dir: str, seeds: Sequence[int]) -> Dict[int, float]:
    """Each seed's meta-training seconds (:func:`spent_seconds`) to its final weights (its ``done.json``), where
    recorded."""
    out = {}
    for s in seeds:
        rec = _read_json(os.path.join(train_dir, f"seed{s}", "done.json")).get("record", {})
        if "train_seconds" in rec:
            out[s] = spent_seconds(rec)
    return out


def scaling_section(cfg, runs, fams: Sequence[str], train_dir: str) -> List[Dict[str, Any]]:
    """``compute_scaling``: per budget (the final weights last) the mean CPU-hours of meta-training per seed and
    ``train_vs_tuned_adam_1x`` over the held-out families (every seed at that budget)."""
    heldout = role_families(fams, "heldout")
    if not heldout:
        return []
    h1 = horizons(cfg)[0]
    kw = dict(floor=cfg.loss_floor, n_boot=cfg.n_boot)
    points = []
    for n, per in snapshot_budgets(train_dir, runs.seeds).items():
        view = dataclasses.replace(runs, seeds=[snapshot_key(s, n) for s in runs.seeds])
        r = group_ratio(view, heldout, "adam", h1, "train_loss", **kw)
        points.append({"iterations": n, "cpu_hours": float(np.mean(list(per.values()))) / 3600,
                       "train_vs_tuned_adam_1x": {k: r[k] for k in ("ratio", "ci_low", "ci_high")}})
    final = final_seconds(train_dir, runs.seeds)
    r = group_ratio(runs, heldout, "adam", h1, "train_loss", **kw)
    points.append({"iterations": "final", "cpu_hours": float(np.mean(list(final.values()))) / 3600 if final
                   else None, "train_vs_tuned_adam_1x": {k: r[k] for k in ("ratio", "ci_low", "ci_high")}})
    return points


def scaling_text(points: List[Dict[str, Any]]) -> str:
    """``table.md``'s compute-scaling lines."""
    if not points:
        return ""
    lines = ["", "Held-out train loss vs tuned Adam at 1x against meta-training compute (CPU-hours per seed; "
             "`--budgets` of general_train.py" + ("" if len(points) >= 3 else "; fewer than 3 points: not met")
             + "):", "", "| meta-iterations | CPU-hours per seed | train_vs_tuned_adam_1x [95% CI] |", "|---|---|---|"]
    for p in points:
        r, hours = p["train_vs_tuned_adam_1x"], p["cpu_hours"]
        lines.append(f"| {p['iterations']} | {'-' if hours is None else f'{hours:.2f}'} | {r['ratio']:.3g} "
                     f"[{r['ci_low']:.3g}, {r['ci_high']:.3g}] |")
    return "\n".join(lines)
