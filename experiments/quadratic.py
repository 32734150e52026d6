"""L2L Fig. 2 (Andrychowicz et al. 2016): a coordinatewise LSTM meta-trained on 10-d Gaussian quadratics.

Meta-train ``CoordLSTM`` (horizon 100, truncation 20), tune SGD, momentum, Nesterov, Adam and RMSprop over a
learning-rate grid on validation problems (per evaluation horizon), evaluate everything on fresh test problems
at 100 and 200 steps, write ``results/quadratic/{summary.json, table.md, loss_curves.png}``.

    python experiments/quadratic.py                 # the full run reported in the README
    python experiments/quadratic.py --preset demo   # `make demo`: a reduced budget, a few minutes
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import markdown_table, parse_config, plot_curves, provenance, write_json  # noqa: E402

from learned_opt.evaluate import evaluate, lr_grid, tune_baseline  # noqa: E402
from learned_opt.meta import MetaConfig, MetaTrainer, save_lopt  # noqa: E402
from learned_opt.optim import get_optimizer  # noqa: E402
from learned_opt.optim.learned import CoordLSTM  # noqa: E402
from learned_opt.tasks import QuadraticFamily  # noqa: E402

BASELINES = ("sgd", "momentum", "nesterov", "adam", "rmsprop")


@dataclass
class Config:
    """Quadratic experiment settings; every field is a command-line flag."""
    dim: int = 10
    train_problems: int = 128
    horizon: int = 100
    truncation: int = 20
    iterations: int = 1000
    meta_lr: float = 3e-3
    meta_loss: str = "sum"
    clip_norm: float = 1.0
    curriculum: tuple = (20, 50, 100)  # horizons, an equal share of the iterations each (Chen et al. 2020)
    random_offset: bool = True
    val_every: int = 50
    val_problems: int = 256
    test_problems: int = 256
    eval_steps: int = 200
    grid_low: float = 1e-4
    grid_high: float = 1.0
    grid_points: int = 17
    tune_extra: bool = True  # also tune momentum (momentum, Nesterov) and betas (Adam)
    hidden: int = 20
    output_scale: float = 0.1
    extra_inputs: tuple = ()
    split: bool = False  # each problem its own tensor: per-tensor statistics and LRs become per problem
    control: str = "none"  # "learned": the LR head scales the updates
    lr_mode: str = "global"
    base: str = "none"  # "momentum": the LSTM learns per-coordinate corrections of heavy-ball momentum
    base_lr: float = 0.01
    seed: int = 0
    device: str = "cpu"
    out_dir: str = "results/quadratic"
    threads: int = 1


PRESETS = {
    "demo": dict(iterations=300, val_every=50, test_problems=256, out_dir="results/quadratic_demo"),
    "smoke": dict(iterations=3, val_every=0, curriculum=(), val_problems=16, test_problems=16, eval_steps=20, horizon=10,
                  truncation=5, grid_points=3, out_dir="runs/quadratic_smoke"),
}


def main(argv=None) -> dict:
    cfg = parse_config(Config, PRESETS, argv)
    torch.set_num_threads(cfg.threads)
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("error: --device cuda requested but CUDA is not available")
    try:  # every setting is checked before any work starts
        torch.manual_seed(cfg.seed)  # the meta-network's initial weights
        net = CoordLSTM(hidden=cfg.hidden, output_scale=cfg.output_scale, extra_inputs=cfg.extra_inputs,
                        lr_mode=cfg.lr_mode, base=cfg.base, base_lr=cfg.base_lr)
        net = net.to(cfg.device)
        mcfg = MetaConfig(horizon=cfg.horizon, truncation=cfg.truncation, iterations=cfg.iterations,
                          meta_lr=cfg.meta_lr, meta_loss=cfg.meta_loss, clip_norm=cfg.clip_norm,
                          curriculum=cfg.curriculum, random_offset=cfg.random_offset, val_every=cfg.val_every,
                          val_tasks=1, val_metric="mean_final", control=cfg.control, seed=cfg.seed)
        mcfg.validate()
    except ValueError as e:
        sys.exit(f"error: {e}")
    os.makedirs(cfg.out_dir, exist_ok=True)
    train_family = QuadraticFamily(cfg.dim, cfg.train_problems, device=cfg.device, split=cfg.split)
    val_family = QuadraticFamily(cfg.dim, cfg.val_problems, device=cfg.device, split=cfg.split)
    test_family = QuadraticFamily(cfg.dim, cfg.test_problems, device=cfg.device, split=cfg.split)
    horizons = sorted({cfg.horizon, cfg.eval_steps})

    # 1. Baselines tuned per horizon on validation problems only: the learning rate (grid widened until the best
    # value is interior) jointly with momentum / betas where the optimizer has them.
    grid = lr_grid(cfg.grid_low, cfg.grid_high, cfg.grid_points)
    tuned = {}
    for name in BASELINES:
        for h in horizons:
            res = tune_baseline(name, val_family, horizon=h, grid=grid, num_tasks=1, seed=cfg.seed,
                                extra=None if cfg.tune_extra else {})
            tuned[(name, h)] = res
            print(f"tuned {name:9s} @ {h:4d} steps: {res.hparams} (grid widened {res.widened}x)")

    # 2. Meta-train the LSTM optimizer.
    trainer = MetaTrainer(net, train_family, mcfg, run_dir=os.path.join(cfg.out_dir, "run"),
                          progress=sys.stderr.isatty())
    t0 = time.perf_counter()
    trainer.run()
    meta_seconds = time.perf_counter() - t0
    save_lopt(os.path.join(cfg.out_dir, "run", "lopt.pt"), net)
    print(f"meta-training: {meta_seconds:.1f} s, {trainer.meta_step} meta-steps, {trainer.skipped} skipped")

    # 3. Evaluate on the same fresh test problems.
    ctrl_fn = net.as_controller if cfg.control == "learned" else None
    learned = evaluate(test_family, net, ctrl_fn, num_tasks=1, steps=cfg.eval_steps, seed=cfg.seed).curves
    curves = {"learned (CoordLSTM)": learned}
    per_h = {}
    for name in BASELINES:
        for h in horizons:
            c = evaluate(test_family, get_optimizer(name, **tuned[(name, h)].hparams), num_tasks=1,
                         steps=cfg.eval_steps, seed=cfg.seed).curves
            per_h[(name, h)] = c
        curves[f"{name} (lr {tuned[(name, cfg.eval_steps)].hparams['lr']:.2g})"] = per_h[(name, cfg.eval_steps)]

    def stats(c, h):
        x = c[:, h]
        return {"mean": float(np.mean(x)), "median": float(np.median(x))}

    summary = {"config": asdict(cfg), "seeds": {"train": cfg.seed, "val_tasks": "split=val", "test": "split=test"},
               "provenance": provenance(), "meta_train_seconds": meta_seconds,
               "meta_steps": trainer.meta_step, "skipped_meta_steps": trainer.skipped, "optimizers": {}}
    summary["optimizers"]["learned"] = {str(h): stats(learned, h) for h in horizons}
    for name in BASELINES:
        summary["optimizers"][name] = {str(h): dict(stats(per_h[(name, h)], h), hparams=tuned[(name, h)].hparams,
                                                    lr=tuned[(name, h)].hparams["lr"],
                                                    grid_widened=tuned[(name, h)].widened)
                                       for h in horizons}
    rows = []
    for h in horizons:
        best = min(BASELINES, key=lambda n: summary["optimizers"][n][str(h)]["mean"])
        ratio = summary["optimizers"]["learned"][str(h)]["mean"] / summary["optimizers"][best][str(h)]["mean"]
        med_ratio = (summary["optimizers"]["learned"][str(h)]["median"]
                     / summary["optimizers"][best][str(h)]["median"])
        win = float(np.mean(learned[:, h] < per_h[(best, h)][:, h]))
        summary[f"best_baseline_at_{h}"] = best
        summary[f"learned_over_best_baseline_at_{h}"] = ratio
        summary[f"learned_over_best_baseline_median_at_{h}"] = med_ratio
        summary[f"win_rate_vs_best_baseline_at_{h}"] = win
    for name in ("learned", *BASELINES):
        rows.append([name] + [summary["optimizers"][name][str(h)][k] for h in horizons for k in ("mean", "median")]
                    + [summary["optimizers"][name][str(horizons[-1])].get("lr", "-")])
    header = ["optimizer"] + [f"{k} loss @{h}" for h in horizons for k in ("mean", "median")] + ["lr"]
    table = markdown_table(header, rows)
    lines = [table, ""]
    for h in horizons:
        lines.append(f"- step {h}: learned / best tuned baseline ({summary[f'best_baseline_at_{h}']}) = "
                     f"{summary[f'learned_over_best_baseline_at_{h}']:.3f} (mean), "
                     f"{summary[f'learned_over_best_baseline_median_at_{h}']:.3f} (median); learned wins on "
                     f"{100 * summary[f'win_rate_vs_best_baseline_at_{h}']:.1f}% of {cfg.test_problems} problems")
    lines.append(f"- meta-training: {meta_seconds:.0f} s on {summary['provenance']['cpus']} CPUs, "
                 f"{trainer.meta_step} meta-steps")
    text = "\n".join(lines)
    print(text)
    with open(os.path.join(cfg.out_dir, "table.md"), "w") as f:
        f.write(text + "\n")
    write_json(os.path.join(cfg.out_dir, "summary.json"), summary)
    plot_curves(os.path.join(cfg.out_dir, "loss_curves.png"), curves,
                f"10-d quadratics, {cfg.test_problems} test problems (baselines tuned for {cfg.eval_steps} steps)")
    return summary


if __name__ == "__main__":
    main()
