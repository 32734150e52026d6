"""The shipped seed on its own (issue 23): an experiment whose weights ship in ``learned_opt/pretrained`` reports
the shipped seed's row beside the seed average, because an average over meta-training seeds can hide that the
weights a user loads are the worst of them. The shipped seed is found by its weights' SHA-256 (the manifest's) among
the seeds of the run, so a re-run whose seeds no longer match the shipped file says so instead of guessing."""
from __future__ import annotations

import hashlib
from typing import Any, Dict, Optional

import numpy as np

from learned_opt.evaluate import paired


def shipped_seed(paths: Dict[int, str], name: str = "general", directory: Optional[str] = None
                 ) -> Optional[Dict[str, Any]]:
    """``{"seed", "sha256", "name"}`` of the seed whose ``lopt.pt`` is byte-identical to the shipped ``name``
    (the manifest's SHA-256), or None when no seed of ``paths`` is the shipped one."""
    from learned_opt import pretrained

    try:
        want = pretrained.info(name, directory)["sha256"]
    except (KeyError, ValueError, FileNotFoundError):
        return None
    for seed, path in paths.items():
        with open(path, "rb") as f:
            if hashlib.sha256(f.read()).hexdigest() == want:
                return {"seed": seed, "sha256": want, "name": name}
    return None


def not_shipped(name: str) -> Dict[str, Any]:
    """The record when no seed of the run is the shipped one."""
    return {"seed": None, "name": name, "note": f"no meta-training seed of this run is byte-identical to the shipped "
            f"{name}.pt (the table's seed average is not the shipped optimizer)"}


def shipped_paired(shipped: Optional[Dict[str, Any]], seeds: list, learned, baseline) -> Optional[Dict[str, Any]]:
    """:func:`paired` of the shipped seed's row of ``learned`` (``(seeds, tasks)``, rows in the order of ``seeds``)
    against ``baseline``; None when no seed is the shipped one."""
    if shipped is None or shipped.get("seed") not in seeds:
        return None
    i = list(seeds).index(shipped["seed"])
    return paired(np.asarray(learned)[i:i + 1], baseline)


def shipped_label(shipped: Dict[str, Any]) -> str:
    """The table row's name of the shipped seed."""
    return f"shipped seed {shipped['seed']} ({shipped['name']}.pt)"


def add_shipped_row(summary: Dict[str, Any], rows: list, key: str, learned, baseline, cells: list,
                    against: str, fmt) -> None:
    """The shipped seed's paired comparison under ``summary["shipped_seed"]["paired"][key]`` and its table row
    ``[label, *cells, mean, median, fmt(paired) vs against]`` (nothing when no seed is the shipped one)."""
    sh = summary["shipped_seed"]
    p = shipped_paired(sh, summary["seeds_run"], learned, baseline)
    if p is None:
        return
    one = np.asarray(learned)[summary["seeds_run"].index(sh["seed"])]
    sh.setdefault("paired", {})[key] = {**p, "baseline": against}
    rows.append([shipped_label(sh), *cells, float(one.mean()), float(np.median(one)), fmt(p) + f" vs {against}"])
