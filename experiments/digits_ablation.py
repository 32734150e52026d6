"""The digits design choices re-checked on validation tasks only (no test task is touched).

The final configuration of ``experiments/digits.py`` against three alternatives, each changing one thing: the LR
head free to raise the rate 10x with per-coordinate rates within e^+-3, no task augmentation, first-order
meta-gradients. Each is meta-trained per seed exactly as in the digits experiment and evaluated on validation
tasks of a stream of their own ("ablation": never the tasks that select checkpoints, tune baselines or serve
development runs); the numbers are per-task ratios (whole training set loss) to Adam with lr 0.1 on the same
tasks, averaged over tasks. Writes ``results/digits_ablation/{summary.json, table.md}``.

    python experiments/digits_ablation.py --workers 2      # the table in the README (make reproduce)
    python experiments/digits_ablation.py --preset smoke   # seconds; used by the tests
"""
from __future__ import annotations

import os
import sys
from dataclasses import asdict, dataclass

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import markdown_table, parallel_map, parse_config, provenance, run_main, save_report  # noqa: E402
from digits import UNSEEN  # noqa: E402

from learned_opt.evaluate import evaluate  # noqa: E402
from learned_opt.meta import MetaConfig, MetaTrainer  # noqa: E402
from learned_opt.optim import get_optimizer  # noqa: E402
from learned_opt.optim.learned import CoordLSTM  # noqa: E402
from learned_opt.tasks import DigitsFamily  # noqa: E402
from learned_opt.tasks.augment import ReparamFamily  # noqa: E402

FINAL = dict(net=dict(base="adam", base_lr=0.1, lr_max=1.0, base_lr_range=1.0), augment=3.0, second_order=True)
VARIANTS = {
    "final": FINAL,
    "head free to raise 10x, rates e^+-3": {**FINAL, "net": {**FINAL["net"], "lr_max": 10.0, "base_lr_range": 3.0}},
    "no augmentation": {**FINAL, "augment": 1.0},
    "first-order meta-gradients": {**FINAL, "second_order": False},
}


@dataclass
class Config:
    """Ablation settings; every field is a command-line flag."""
    seeds: int = 5  # meta-training seeds per variant (the protocol's minimum)
    workers: int = 1  # independent meta-trainings run in this many processes (results do not depend on it)
    tasks: int = 20  # validation tasks for the comparison
    horizon: int = 100
    truncation: int = 20
    iterations: int = 200
    meta_lr: float = 3e-3
    meta_val_every: int = 40
    meta_val_tasks: int = 8
    meta_val_horizon: int = 1000
    long: int = 1000
    unseen: tuple = ("relu", "tanh", "two_layer")
    out_dir: str = "results/digits_ablation"


PRESETS = {"smoke": dict(seeds=1, tasks=1, horizon=6, truncation=3, iterations=1, meta_val_every=1,
                         meta_val_tasks=1, meta_val_horizon=8, long=8, unseen=("relu",),
                         out_dir="runs/digits_ablation_smoke")}


WHERE = dict(split="val", stream="ablation")  # validation tasks of their own stream: no other use touches them


def reference(cfg: Config):
    """Adam with lr 0.1 (what every variant is, fresh) on the ablation tasks: per-task train losses."""
    torch.set_num_threads(1)
    family = DigitsFamily(pool="meta")
    adam = get_optimizer("adam", lr=0.1)
    points = sorted({cfg.horizon, cfg.long})
    ref = evaluate(family, adam, num_tasks=cfg.tasks, steps=cfg.long, checkpoints=points, **WHERE)
    ref_unseen = {a: evaluate(DigitsFamily(pool="meta", **UNSEEN[a]), adam, num_tasks=cfg.tasks,
                              steps=cfg.horizon, **WHERE).metric("train_loss") for a in cfg.unseen}
    return {h: ref.metric("train_loss", h) for h in points}, ref_unseen


def variant_job(cfg: Config, name: str, seed: int, ref, ref_unseen) -> dict:
    """Meta-train variant ``name`` with ``seed`` and return its mean per-task loss ratios to the reference."""
    torch.set_num_threads(1)
    v = VARIANTS[name]
    family = DigitsFamily(pool="meta")
    points = sorted({cfg.horizon, cfg.long})
    torch.manual_seed(seed)
    net = CoordLSTM(**v["net"])
    mcfg = MetaConfig(horizon=cfg.horizon, truncation=cfg.truncation, iterations=cfg.iterations,
                      meta_lr=cfg.meta_lr, meta_loss="mean_log", control="learned",
                      second_order=v["second_order"], val_every=cfg.meta_val_every,
                      val_tasks=cfg.meta_val_tasks, val_horizon=cfg.meta_val_horizon,
                      val_metric="mean_log_curve", seed=seed)
    fam = ReparamFamily(family, v["augment"]) if v["augment"] > 1 else family
    MetaTrainer(net, fam, mcfg).run()
    c = evaluate(family, net, net.as_controller, num_tasks=cfg.tasks, steps=cfg.long, checkpoints=points, **WHERE)
    row = {f"{h} steps": float(np.mean(c.metric("train_loss", h) / ref[h])) for h in points}
    for a in cfg.unseen:
        cu = evaluate(DigitsFamily(pool="meta", **UNSEEN[a]), net, net.as_controller, num_tasks=cfg.tasks,
                      steps=cfg.horizon, **WHERE).metric("train_loss")
        row[a] = float(np.mean(cu / ref_unseen[a]))
    print(f"{name}, seed {seed}: " + ", ".join(f"{k} {x:.3f}" for k, x in row.items()), flush=True)
    return row


def main(argv=None) -> dict:
    """Run the experiment; write summary.json and table.md."""
    cfg = parse_config(Config, PRESETS, argv)
    torch.set_num_threads(1)
    prov = provenance()
    ref, ref_unseen = reference(cfg)
    jobs = [(cfg, name, seed, ref, ref_unseen) for name in VARIANTS for seed in range(cfg.seeds)]
    rows = parallel_map(variant_job, jobs, cfg.workers)
    results = {}
    for (_, name, _, _, _), row in zip(jobs, rows):
        results.setdefault(name, []).append(row)
    cols = list(next(iter(results.values()))[0])
    rows = [[name, *(" / ".join(f"{r[k]:.2f}" for r in rs) for k in cols)] for name, rs in results.items()]
    table = markdown_table(["configuration (seeds separated by /)", *cols], rows)
    summary = {"config": asdict(cfg), "provenance": prov,
               "reference": "adam lr 0.1, same validation tasks (stream 'ablation'); mean per-task ratio of the "
                            "whole-training-set loss", "ratios": results}
    save_report(cfg.out_dir, table, summary)
    return summary


if __name__ == "__main__":
    run_main(main)
