"""The project's reference set-up: the ``MetaNet`` learner (10 -> 10 -> 10 -> 10 MLP) on teacher-student regression.

Reference: Adam (lr 1e-3, betas 0.9 / 0.999) with early stopping (patience 10, best weights restored) over 100
epochs (full batch: one step per epoch, validation every epoch). Compared with the same learner trained by a
meta-network (meta-trained on other MetaNet tasks) and by the other hand-coded optimizers with their learning
rates tuned on validation tasks, all under the same early stopping. Writes ``results/metanet/{summary.json,
table.md}``.

    python experiments/metanet.py
    python experiments/metanet.py --preset smoke
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import markdown_table, parse_config, provenance, write_json  # noqa: E402

from learned_opt.control import EarlyStopping  # noqa: E402
from learned_opt.evaluate import evaluate, lr_grid, mean_ci, tune_lr  # noqa: E402
from learned_opt.meta import MetaConfig, MetaTrainer, save_lopt  # noqa: E402
from learned_opt.optim import Adam, get_optimizer  # noqa: E402
from learned_opt.optim.learned import build_learned  # noqa: E402
from learned_opt.tasks import MetaNetFamily  # noqa: E402


@dataclass
class Config:
    """MetaNet experiment settings; every field is a command-line flag."""
    epochs: int = 100
    patience: int = 10
    n_train: int = 64
    net: str = "lstm"
    base: str = "momentum"
    base_lr: float = 0.01
    iterations: int = 150
    truncation: int = 20
    meta_lr: float = 3e-3
    meta_loss: str = "val"
    test_tasks: int = 100
    val_tasks: int = 10
    baselines: tuple = ("sgd", "momentum", "nesterov", "adam", "rmsprop")
    grid_points: int = 9
    seed: int = 0
    out_dir: str = "results/metanet"
    threads: int = 1


PRESETS = {"smoke": dict(epochs=12, patience=2, iterations=2, truncation=4, test_tasks=2, val_tasks=1,
                         baselines=("sgd",), grid_points=3, out_dir="runs/metanet_smoke")}


def main(argv=None) -> dict:
    cfg = parse_config(Config, PRESETS, argv)
    torch.set_num_threads(cfg.threads)
    family = MetaNetFamily(n_train=cfg.n_train)
    stopper = lambda: EarlyStopping(patience=cfg.patience)  # noqa: E731 - a fresh controller per task
    try:
        net_args = dict(base=cfg.base, base_lr=cfg.base_lr) if cfg.net == "lstm" else {}
        torch.manual_seed(cfg.seed)  # the meta-network's initial weights
        net = build_learned(cfg.net, **net_args)
        mcfg = MetaConfig(horizon=cfg.epochs, truncation=cfg.truncation, iterations=cfg.iterations,
                          meta_lr=cfg.meta_lr, meta_loss=cfg.meta_loss, seed=cfg.seed,
                          val_every=max(1, cfg.iterations // 5), val_tasks=4, val_metric="val_at_stop")
        mcfg.validate()
    except ValueError as e:
        sys.exit(f"error: {e}")
    os.makedirs(cfg.out_dir, exist_ok=True)

    def run(opt):
        res = evaluate(family, opt, stopper, num_tasks=cfg.test_tasks, steps=cfg.epochs, val_every=1,
                       stop_metrics=True)
        return {"val_at_stop": res.val_at_stop, "test_at_stop": res.test_at_stop, "steps": res.stop_steps}

    results, hparams = {}, {}
    results["adam (reference, lr 1e-3)"] = run(Adam(lr=1e-3, betas=(0.9, 0.999)))
    hparams["adam (reference, lr 1e-3)"] = 1e-3
    grid = lr_grid(1e-3, 1.0, cfg.grid_points)
    for name in cfg.baselines:
        t = tune_lr(lambda lr, n=name: get_optimizer(n, lr=lr), family, grid=grid, steps=cfg.epochs,
                    num_tasks=cfg.val_tasks, seed=cfg.seed, name=name, controller_fn=stopper, val_every=1,
                    score="val_at_stop")
        results[f"{name} (tuned)"] = run(get_optimizer(name, lr=t.best_lr))
        hparams[f"{name} (tuned)"] = t.best_lr
    t0 = time.perf_counter()
    MetaTrainer(net, family, mcfg, run_dir=os.path.join(cfg.out_dir, "run")).run()
    meta_seconds = time.perf_counter() - t0
    save_lopt(os.path.join(cfg.out_dir, "run", "lopt.pt"), net)
    results[f"learned ({cfg.net})"] = run(net)
    hparams[f"learned ({cfg.net})"] = "-"

    rows, summary = [], {"config": asdict(cfg), "provenance": provenance(), "meta_train_seconds": meta_seconds,
                         "optimizers": {}}
    for name, r in results.items():
        m, lo, hi = mean_ci(r["test_at_stop"])
        summary["optimizers"][name] = {"lr": hparams[name], "val_at_stop": float(np.mean(r["val_at_stop"])),
                                       "test_at_stop": m, "test_ci95": [lo, hi],
                                       "mean_steps": float(np.mean(r["steps"]))}
        rows.append([name, hparams[name], float(np.mean(r["val_at_stop"])), f"{m:.4f} [{lo:.4f}, {hi:.4f}]",
                     float(np.mean(r["steps"]))])
    ref = summary["optimizers"]["adam (reference, lr 1e-3)"]["test_at_stop"]
    summary["learned_over_reference_test"] = summary["optimizers"][f"learned ({cfg.net})"]["test_at_stop"] / ref
    text = markdown_table(["optimizer", "lr", "val loss at stop", "test loss at stop (95% CI)", "steps used"],
                          rows)
    text += (f"\n\n- {cfg.test_tasks} test tasks, early stopping with patience {cfg.patience} on every "
             f"optimizer, {cfg.epochs} epochs (full batch); learned / reference test loss = "
             f"{summary['learned_over_reference_test']:.3f}")
    print(text)
    with open(os.path.join(cfg.out_dir, "table.md"), "w") as f:
        f.write(text + "\n")
    write_json(os.path.join(cfg.out_dir, "summary.json"), summary)
    return summary


if __name__ == "__main__":
    main()
