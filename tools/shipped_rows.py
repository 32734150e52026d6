"""The shipped seed's row beside the seed average, for every experiment whose weights ship in learned_opt/pretrained
(issue 23): the seed is found by its weights' SHA-256 among the experiment's seeds, and every paired record of its
summary that carries per-seed ratios gives the shipped seed's own ratio next to the average over seeds.

    python tools/shipped_rows.py            # a markdown table on stdout; results/shipped_seeds.json
"""
from __future__ import annotations

import glob
import json
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "experiments"))

from shipped import shipped_seed  # noqa: E402

# shipped name -> (results folder, glob of its seeds' weights, the seed number in the path)
SOURCES = {"quadratic_lstm": ("quadratic", "run/seed*/lopt.pt", r"seed(\d+)"),
           "metanet_lstm": ("metanet", "run/seed*/lopt.pt", r"seed(\d+)"),
           "digits_lstm": ("digits", "run_seed*/lopt.pt", r"run_seed(\d+)"),
           "general": ("general", "train/seed*/lopt.pt", r"seed(\d+)")}


def records(obj, path=""):
    """Every (path, record) of ``obj`` with a ``ratio`` and a ``per_seed_ratio``."""
    if isinstance(obj, dict):
        if "ratio" in obj and isinstance(obj.get("per_seed_ratio"), list):
            yield path, obj
        for k, v in obj.items():
            yield from records(v, f"{path}/{k}" if path else k)


def rows(results: str = os.path.join(ROOT, "results")) -> dict:
    out = {}
    for name, (folder, pattern, rx) in SOURCES.items():
        paths = {int(re.search(rx, p).group(1)): p for p in glob.glob(os.path.join(results, folder, pattern))}
        found = shipped_seed(paths, name)
        summary_file = os.path.join(results, folder, "summary.json")
        if found is None or not os.path.exists(summary_file):
            out[name] = {"seed": None, "note": "no seed of the committed run is byte-identical to the shipped file"}
            continue
        with open(summary_file) as f:
            summary = json.load(f)
        seeds = sorted(paths)
        i = seeds.index(found["seed"])
        out[name] = {"seed": found["seed"], "results": folder, "records": {}}
        for path, rec in records(summary):
            per = rec["per_seed_ratio"]
            if len(per) != len(seeds):
                continue
            out[name]["records"][path] = {"shipped_seed": per[i], "seed_average": sum(per) / len(per),
                                          "worst_seed": max(per), "best_seed": min(per), "seeds": len(per)}
    return out


def main() -> None:
    out = rows()
    with open(os.path.join(ROOT, "results", "shipped_seeds.json"), "w") as f:
        json.dump(out, f, indent=2)
    print("| shipped | seed | record (per-task mean ratio, learned / baseline) | shipped seed | seed average | "
          "best .. worst seed |\n|---|---|---|---|---|---|")
    for name, r in out.items():
        if r["seed"] is None:
            print(f"| {name} | - | {r['note']} | | | |")
            continue
        for path, v in r["records"].items():
            print(f"| {name} | {r['seed']} | {r['results']}: {path} | {v['shipped_seed']:.3g} | "
                  f"{v['seed_average']:.3g} | {v['best_seed']:.3g} .. {v['worst_seed']:.3g} |")


if __name__ == "__main__":
    main()
