"""Is the general optimizer's learned scheduler used? (issue #24, item 2)

For every meta-trained seed of ``train_dir`` and every evaluated family (default: the held-out ones), on
``tasks`` validation tasks (stream ``usage``; no test task is touched), the learned optimizer runs ``horizon``
steps twice: told the true horizon (``total_steps = horizon``) and told ``long_factor`` times more. Reported:

- the distribution of the LR multiplier (the scheduler's output, in ``[1/lr_bound, lr_max]``) over every step
  of the true-horizon runs: quantiles, and the fraction of steps within 10% of the upper bound (a multiplier
  pinned at its bound is not a schedule: the update is a fixed-size step);
- the effect of ``total_steps``: the multiplier's mean absolute log difference between the two runs, step by step,
  and the ratio of their final whole-split train losses (a scheduler that reads the horizon changes both).

Writes ``{out_dir}/usage.json``.

    python experiments/general_usage.py                       # results/general/usage.json
    python experiments/general_usage.py --preset smoke        # seconds
"""
from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import parse_config, provenance, run_main, write_json  # noqa: E402
from general_checks import seed_paths  # noqa: E402
from shipped import shipped_seed  # noqa: E402

from learned_opt.evaluate import task_seed  # noqa: E402
from learned_opt.evaluate.run import checkpoint_metrics  # noqa: E402
from learned_opt.meta import load_lopt  # noqa: E402
from learned_opt.tasks.base import generator  # noqa: E402
from learned_opt.tasks.suite import SUITE, suite_family  # noqa: E402
from learned_opt.unroll import unroll  # noqa: E402

QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


@dataclass
class Config:
    """LR-multiplier usage of the general optimizer; every field is a command-line flag."""
    train_dir: str = "results/general/train"
    seeds: tuple = ()  # default: every seed{N}/lopt.pt of train_dir (e.g. --seeds 3: the shipped one alone)
    families: tuple = ()  # default: every held-out family
    tasks: int = 2  # validation tasks per family (stream "usage")
    horizon: int = 2000
    long_factor: int = 10  # the second run is told total_steps = long_factor x horizon
    near_bound: float = 0.9  # a multiplier at or above near_bound x its upper bound counts as pinned
    out_dir: str = "results/general"


PRESETS = {"smoke": dict(train_dir="runs/general_train_smoke", families=("wine_mlp",), tasks=1, horizon=6,
                         out_dir="runs/general_usage_smoke")}


def one_run(net, family, i: int, steps: int, told: int):
    """Per-step LR multipliers and the final whole-split train loss of validation task ``i`` (the same task and
    minibatches whatever ``told``), the optimizer told ``total_steps = told``."""
    g = generator(task_seed("val", i, stream="usage"))
    task = family(g)
    res = unroll(task, net, net.as_controller(), steps=steps, generator=g, horizon=told)
    final = float(np.mean(checkpoint_metrics(task, res.params)["train_loss"]))
    return np.asarray(res.records["lr_scale"], float), final


def usage(cfg: Config, net, fams) -> dict:
    """The record of one seed: per family and over all of them."""
    heads = getattr(net, "heads", None)
    upper = float(getattr(heads, "lr_max", getattr(heads, "lr_bound", math.nan)))
    lower = 1.0 / float(getattr(heads, "lr_bound", math.nan))
    out, pooled = {}, []
    for f in fams:
        family = suite_family(f)
        scales, shifts, ratios = [], [], []
        for i in range(cfg.tasks):
            a, fa = one_run(net, family, i, cfg.horizon, cfg.horizon)
            b, fb = one_run(net, family, i, cfg.horizon, cfg.long_factor * cfg.horizon)
            scales.append(a)
            n = min(len(a), len(b))
            shifts.append(float(np.mean(np.abs(np.log(a[:n]) - np.log(b[:n])))))
            ratios.append(fa / fb if fb > 0 else math.nan)
        s = np.concatenate(scales)
        pooled.append(s)
        out[f] = {"quantiles": dict(zip(map(str, QUANTILES), np.quantile(s, QUANTILES).tolist())),
                  "pinned_fraction": float(np.mean(s >= cfg.near_bound * upper)),
                  "total_steps_mean_abs_log_shift": float(np.mean(shifts)),
                  "total_steps_final_loss_ratio": float(np.exp(np.nanmean(np.log(ratios))))}
    s = np.concatenate(pooled)
    return {"bounds": [lower, upper], "quantiles": dict(zip(map(str, QUANTILES), np.quantile(s, QUANTILES).tolist())),
            "pinned_fraction": float(np.mean(s >= cfg.near_bound * upper)), "steps": int(s.size),
            "total_steps_mean_abs_log_shift": float(np.mean([r["total_steps_mean_abs_log_shift"]
                                                             for r in out.values()])),
            "families": out}


def main(argv=None) -> dict:
    """Every seed's record; ``usage.json``."""
    cfg = parse_config(Config, PRESETS, argv)
    bad = [f for f in cfg.families if f not in SUITE]
    if bad:
        sys.exit(f"error: --families: unknown suite family {bad[0]!r}")
    paths = seed_paths(cfg.train_dir)
    if not paths:
        sys.exit(f"error: --train_dir {cfg.train_dir} holds no seed{{N}}/lopt.pt")
    if cfg.seeds:
        wanted, held = [str(x) for x in cfg.seeds], {str(k): k for k in paths}
        missing = [s for s in wanted if s not in held]
        if missing:
            sys.exit(f"error: --seeds: {cfg.train_dir} holds no seed{missing[0]}/lopt.pt")
        paths = {held[s]: paths[held[s]] for s in wanted}
    fams = [n for n in SUITE if (n in cfg.families if cfg.families else SUITE[n].role == "heldout")]
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    seeds = {str(s): usage(cfg, load_lopt(p), fams) for s, p in paths.items()}
    shipped = shipped_seed(paths)
    record = {"config": asdict(cfg), "provenance": provenance(), "split": "val (stream 'usage')",
              "seeds": seeds, "shipped_seed": None if shipped is None else shipped["seed"],
              "pinned_fraction_all_seeds": float(np.mean([r["pinned_fraction"] for r in seeds.values()])),
              "seconds": time.perf_counter() - t0}
    write_json(os.path.join(cfg.out_dir, "usage.json"), record)
    for s, r in seeds.items():
        q = r["quantiles"]
        print(f"seed {s}: LR multiplier in [{r['bounds'][0]:.3g}, {r['bounds'][1]:.3g}]: median {q['0.5']:.3g} "
              f"(5-95%: {q['0.05']:.3g} - {q['0.95']:.3g}), pinned {100 * r['pinned_fraction']:.0f}% of "
              f"{r['steps']} steps; total_steps x{cfg.long_factor}: mean |log shift| "
              f"{r['total_steps_mean_abs_log_shift']:.3g}")
    return record


if __name__ == "__main__":
    run_main(main)
