"""The general experiment's pre-registration and robustness rows (issue 23).

- **Floors**: losses below the loss floor count as the floor in ratios, and a floor decides cells; the headline
  ratios are therefore also reported at several floors (``--floors``), next to the one the verdicts use.
- **The shipped seed on its own**: the seed ``learned_opt/pretrained`` ships (found by its weights' SHA-256 in the
  manifest among the seeds of ``train_dir``) gets its own row beside the seed average, per family and for every
  headline: an average over seeds can hide that the weights a user loads are the worst of them.
"""
from __future__ import annotations

import os
import re
from typing import Any, Dict, List, Optional, Sequence

from learned_opt.evaluate import family_ratio
from shipped import shipped_seed  # noqa: F401  (found by the weights' hash; re-exported)
from learned_opt.tasks.suite import SUITE

ROLES = ("heldout", "meta")
# What decides the verdicts (the summary's "preregistered" block): task counts, horizons, grids, bounds, floors.
PREREGISTERED = ("seeds", "tune_tasks", "test_tasks", "horizon", "families", "baselines", "grid_low", "grid_high",
                 "per_decade", "resolution", "default_lr", "bounds", "loss_floor", "floors", "n_boot")


def headlines(h1: int, h10: int, default_name: str) -> List[tuple]:
    """``(key suffix, baseline, horizon, metric)`` of each headline ratio (keys ``<role>_<suffix>``)."""
    return [("gmean_ratio_vs_tuned_adam_1x", "adam", h1, "train_loss"),
            ("gmean_ratio_vs_tuned_adam_10x", "adam", h10, "train_loss"),
            ("test_loss_gmean_ratio_vs_tuned_adam", "adam", h1, "test_loss"),
            ("gmean_ratio_vs_adam_default", default_name, h1, "train_loss")]


def seed_paths(train_dir: str) -> dict:
    """``{seed: path}`` of every ``seed{N}/lopt.pt`` in ``train_dir``."""
    found = {}
    if os.path.isdir(train_dir):
        for d in os.listdir(train_dir):
            m = re.fullmatch(r"seed(\d+)", d)
            if m and os.path.isfile(os.path.join(train_dir, d, "lopt.pt")):
                found[int(m.group(1))] = os.path.join(train_dir, d, "lopt.pt")
    return dict(sorted(found.items()))


def role_families(fams: Sequence[str], role: str) -> List[str]:
    """The evaluated families of ``role`` (``heldout`` or ``meta``)."""
    return [f for f in fams if SUITE[f].role == role]


def group_ratio(runs, group: Sequence[str], method: str, h: int, metric: str, *, floor: float, n_boot: int,
                seed: Optional[int] = None) -> Dict[str, Any]:
    """:func:`family_ratio` of the learned optimizer over ``method`` on ``group`` (every seed, or only ``seed``)."""
    def learned(f):
        v = runs.values(f, "learned", h, metric)
        return v if seed is None else v[[runs.seeds.index(seed)]]
    return family_ratio({f: (learned(f), runs.values(f, method, h, metric)) for f in group}, floor=floor,
                        n_boot=n_boot)


def _short(r: Dict[str, Any]) -> Dict[str, Any]:
    return {k: r[k] for k in ("ratio", "ci_low", "ci_high", "families") if k in r}


def floors_section(cfg, runs, fams, specs) -> Dict[str, Dict[str, Any]]:
    """Every headline ratio at every floor of ``cfg.floors`` (the verdicts use ``cfg.loss_floor`` only)."""
    out = {}
    for floor in cfg.floors:
        out[f"{floor:g}"] = {f"{role}_{suffix}": _short(group_ratio(runs, role_families(fams, role), m, h, metric,
                                                                   floor=floor, n_boot=cfg.n_boot))
                             for role in ROLES if role_families(fams, role) for suffix, m, h, metric in specs}
    return out


def shipped_section(cfg, runs, fams, specs, shipped: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """The shipped seed's headline ratios and per-family ratios, beside the seed average's."""
    if shipped is None:
        return {"seed": None, "note": "no seed in train_dir is byte-identical to the shipped weights"}
    out = {**shipped, "headlines": {}, "per_family": {}, "seed_average_per_family": {}}
    for role in ROLES:
        group = role_families(fams, role)
        if not group:
            continue
        for suffix, m, h, metric in specs:
            kw = dict(floor=cfg.loss_floor, n_boot=cfg.n_boot)
            one, avg = (group_ratio(runs, group, m, h, metric, seed=shipped["seed"], **kw),
                        group_ratio(runs, group, m, h, metric, **kw))
            out["headlines"][f"{role}_{suffix}"] = _short(one)
            for f in group:
                out["per_family"].setdefault(f, {})[suffix] = one["families"][f]
                out["seed_average_per_family"].setdefault(f, {})[suffix] = avg["families"][f]
    return out


def add_checks(cfg, summary: Dict[str, Any], runs, fams, paths: Dict[int, str], specs) -> str:
    """Put ``floors`` and ``shipped_seed`` into ``summary``; returns their part of ``table.md``."""
    summary["floors"] = floors_section(cfg, runs, fams, specs)
    summary["shipped_seed"] = shipped_section(cfg, runs, fams, specs, shipped_seed(paths))
    return checks_text(summary, specs)


def checks_text(summary: Dict[str, Any], specs) -> str:
    """``table.md``'s closing part: the shipped seed's row per family beside the seed average, and the floors."""
    sh, suffixes = summary["shipped_seed"], [s[0] for s in specs]
    lines = [""]
    if sh.get("seed") is not None:
        lines += [f"Shipped seed {sh['seed']} ({sh['name']}.pt, sha256 {sh['sha256'][:12]}) on its own vs the "
                  "seed average (per-family geometric-mean ratios):", "",
                  "| family | row | " + " | ".join(suffixes) + " |", "|---|---|" + "---|" * len(suffixes)]
        for f in sh["per_family"]:
            for row, rec in (("shipped seed", sh["per_family"][f]), ("seed average", sh["seed_average_per_family"][f])):
                lines.append(f"| {f} | {row} | " + " | ".join(f"{rec[s]:.3g}" for s in suffixes) + " |")
    else:
        lines.append(f"Shipped seed: {sh['note']}.")
    floors = list(summary["floors"])
    lines += ["", "Headline ratios at several loss floors (the verdicts use --loss_floor "
              f"{summary['config']['loss_floor']:g}):", "", "| ratio | " + " | ".join(f"floor {f}" for f in floors)
              + " |", "|---|" + "---|" * len(floors)]
    for k in next(iter(summary["floors"].values()), {}):
        cells = [summary["floors"][f][k] for f in floors]
        lines.append(f"| {k} | " + " | ".join(f"{r['ratio']:.3g} [{r['ci_low']:.3g}, {r['ci_high']:.3g}]"
                                              for r in cells) + " |")
    return "\n".join(lines)
