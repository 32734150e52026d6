"""L2L's MNIST experiments (Andrychowicz et al. 2016, section 3.2) on scikit-learn's bundled 8x8 digits.

Meta-train a learned optimizer on the 64 -> 20 -> 10 sigmoid MLP with 100-step horizons, for several
meta-training seeds; tune baselines per horizon on validation tasks (fair harness: grid widened until the best
learning rate is interior, results cached); evaluate on test tasks at 100, 200 and 1000 steps and on learners
never seen in meta-training (40 hidden units, two hidden layers, ReLU, tanh). Writes
``results/digits/{summary.json, table.md, loss_curves.png, speedup.png}``.

    python experiments/digits.py                  # the run reported in the README
    python experiments/digits.py --preset smoke   # seconds; used by the tests
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

from learned_opt.evaluate import evaluate, lr_grid, mean_ci, speedup, tune_baseline  # noqa: E402
from learned_opt.meta import MetaConfig, MetaTrainer, save_lopt  # noqa: E402
from learned_opt.optim import get_optimizer  # noqa: E402
from learned_opt.optim.learned import build_learned  # noqa: E402
from learned_opt.tasks import DigitsFamily  # noqa: E402

UNSEEN = {
    "hidden40": dict(hidden=(40,)),
    "two_layer": dict(hidden=(20, 20)),
    "relu": dict(activation="relu"),
    "tanh": dict(activation="tanh"),
}


@dataclass
class Config:
    """Digits experiment settings; every field is a command-line flag."""
    net: str = "lstm"
    base: str = "momentum"  # CoordLSTM only: "none" is the paper's LSTM
    base_lr: float = 0.1
    output_scale: float = 0.1
    horizon: int = 100
    truncation: int = 20
    iterations: int = 80
    tasks_per_step: int = 1
    meta_lr: float = 3e-3
    meta_loss: str = "sum"
    curriculum: tuple = ()  # measured: (20, 50, 100) with 300 iterations was worse at every horizon
    seeds: int = 3
    test_tasks: int = 100
    val_tasks: int = 4
    eval_horizons: tuple = (100, 200, 1000)
    unseen: tuple = ("hidden40", "two_layer", "relu", "tanh")
    baselines: tuple = ("sgd", "momentum", "adam", "rmsprop")
    grid_low: float = 1e-3
    grid_high: float = 1.0
    grid_points: int = 7
    tune_extra: bool = False  # also tune momentum / betas (EXTRA_GRIDS); costs 3x the tuning time
    device: str = "cpu"
    out_dir: str = "results/digits"
    threads: int = 1


PRESETS = {
    "smoke": dict(iterations=2, seeds=1, curriculum=(), test_tasks=2, val_tasks=1, eval_horizons=(10, 20), horizon=10,
                  truncation=5, unseen=("relu",), baselines=("sgd", "adam"), grid_points=3,
                  out_dir="runs/digits_smoke"),
}


def main(argv=None) -> dict:
    cfg = parse_config(Config, PRESETS, argv)
    torch.set_num_threads(cfg.threads)
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("error: --device cuda requested but CUDA is not available")
    net_args = dict(base=cfg.base, base_lr=cfg.base_lr, output_scale=cfg.output_scale) if cfg.net == "lstm" \
        else {}
    try:
        build_learned(cfg.net, **net_args)
        mcfg = MetaConfig(horizon=cfg.horizon, truncation=cfg.truncation, iterations=cfg.iterations,
                          tasks_per_step=cfg.tasks_per_step, meta_lr=cfg.meta_lr, meta_loss=cfg.meta_loss,
                          curriculum=cfg.curriculum, val_every=max(1, cfg.iterations // 5), val_tasks=2)
        mcfg.validate()
    except ValueError as e:
        sys.exit(f"error: {e}")
    os.makedirs(cfg.out_dir, exist_ok=True)
    cache = os.path.join(cfg.out_dir, "tuning_cache")
    family = DigitsFamily(device=cfg.device)
    grid = lr_grid(cfg.grid_low, cfg.grid_high, cfg.grid_points)
    horizons = sorted(cfg.eval_horizons)
    max_h = horizons[-1]
    t_start = time.perf_counter()

    # 1. Baselines tuned per horizon (and per unseen learner at the training horizon) on validation tasks.
    def tune(name, fam, h):
        return tune_baseline(name, fam, horizon=h, grid=grid, num_tasks=cfg.val_tasks,
                             extra=None if cfg.tune_extra else {}, cache_dir=cache)

    tuned = {(n, h): tune(n, family, h) for n in cfg.baselines for h in horizons}
    unseen_fams = {a: DigitsFamily(device=cfg.device, **UNSEEN[a]) for a in cfg.unseen}
    tuned_unseen = {(n, a): tune(n, unseen_fams[a], cfg.horizon) for n in cfg.baselines for a in cfg.unseen}
    for (n, h), t in tuned.items():
        print(f"tuned {n:9s} @ {h:5d}: {t.hparams} (grid widened {t.widened}x)")

    # 2. Baselines on the test tasks: each horizon with its own tuned hyper-parameters.
    base_curves, base_acc = {}, {}
    for (n, h), t in tuned.items():
        res = evaluate(family, get_optimizer(n, **t.hparams), num_tasks=cfg.test_tasks, steps=h)
        base_curves[(n, h)], base_acc[(n, h)] = res.curves, res.accuracy
    unseen_base = {(n, a): evaluate(unseen_fams[a], get_optimizer(n, **t.hparams), num_tasks=cfg.test_tasks,
                                    steps=cfg.horizon).curves for (n, a), t in tuned_unseen.items()}

    # 3. Meta-train one learned optimizer per seed; evaluate it on the same test tasks.
    per_seed, meta_seconds = [], []
    for seed in range(cfg.seeds):
        torch.manual_seed(seed)  # meta-network initialisation
        net = build_learned(cfg.net, **net_args).to(cfg.device)
        mcfg.seed = seed
        trainer = MetaTrainer(net, family, mcfg, run_dir=os.path.join(cfg.out_dir, f"run_seed{seed}"),
                              progress=sys.stderr.isatty())
        t0 = time.perf_counter()
        trainer.run()
        meta_seconds.append(time.perf_counter() - t0)
        save_lopt(os.path.join(cfg.out_dir, f"run_seed{seed}", "lopt.pt"), net)
        res = evaluate(family, net, num_tasks=cfg.test_tasks, steps=max_h)
        unseen_curves = {a: evaluate(unseen_fams[a], net, num_tasks=cfg.test_tasks, steps=cfg.horizon).curves
                         for a in cfg.unseen}
        per_seed.append({"curves": res.curves, "accuracy": res.accuracy, "unseen": unseen_curves})
        print(f"seed {seed}: meta-trained in {meta_seconds[-1]:.0f} s; loss@{horizons[0]} "
              f"{res.curves[:, horizons[0]].mean():.4f}")

    # 4. Statistics: ratios per seed (CI over seeds), per-task CI of the loss, accuracy, the initial-loss check.
    summary = {"config": asdict(cfg), "provenance": provenance(), "meta_train_seconds": meta_seconds,
               "total_seconds": None, "baselines": {}, "learned": {}, "unseen": {}}
    rows = []
    for h in horizons:
        means = {n: float(base_curves[(n, h)][:, h].mean()) for n in cfg.baselines}
        best = min(means, key=means.get)
        ratios = [float(s["curves"][:, h].mean()) / means[best] for s in per_seed]
        learned_losses = np.concatenate([s["curves"][:, h] for s in per_seed])
        m, lo, hi = mean_ci(ratios)
        summary[f"learned_over_best_baseline_at_{h}"] = m
        summary["learned"][str(h)] = {"ratio_ci95_over_seeds": [lo, hi], "ratios_per_seed": ratios,
                                      "best_baseline": best, "mean_loss": float(learned_losses.mean()),
                                      "loss_ci95_over_tasks": list(mean_ci(learned_losses)[1:])}
        for n in cfg.baselines:
            c = base_curves[(n, h)][:, h]
            summary["baselines"].setdefault(n, {})[str(h)] = {
                "hparams": tuned[(n, h)].hparams, "mean_loss": float(c.mean()),
                "loss_ci95_over_tasks": list(mean_ci(c)[1:]),
                "test_accuracy": float(np.mean(base_acc[(n, h)])) if base_acc[(n, h)] else None}
            rows.append([f"{n} (tuned @{h})", h, float(c.mean()), float(np.median(c)),
                         float(np.mean(base_acc[(n, h)])) if base_acc[(n, h)] else float("nan"), "-"])
        rows.append([f"learned ({cfg.net})", h, float(learned_losses.mean()), float(np.median(learned_losses)),
                     float("nan") if h != max_h else float(np.mean([a for s in per_seed for a in s["accuracy"]])),
                     f"{m:.3f} [{lo:.3f}, {hi:.3f}]"])
    for a in cfg.unseen:
        means = {n: float(unseen_base[(n, a)][:, cfg.horizon].mean()) for n in cfg.baselines}
        best = min(means, key=means.get)
        ratios = [float(s["unseen"][a][:, cfg.horizon].mean()) / means[best] for s in per_seed]
        summary["unseen"][a] = float(np.mean(ratios))
        summary.setdefault("unseen_detail", {})[a] = {"best_baseline": best, "ratios_per_seed": ratios,
                                                       "baseline_means": means}
        rows.append([f"learned on {a}", cfg.horizon, float(np.mean([s["unseen"][a][:, cfg.horizon].mean()
                                                                      for s in per_seed])),
                     float("nan"), float("nan"), f"{np.mean(ratios):.3f} (vs {best})"])
    # Never above the initial loss: the mean curve over tasks at every step, per seed.
    worst = max(float((s["curves"].mean(0) / s["curves"].mean(0)[0]).max()) for s in per_seed)
    summary["max_mean_loss_over_initial"] = worst
    summary["never_above_initial_loss"] = bool(worst <= 1.0)
    adam_key = ("adam", max_h) if ("adam", max_h) in base_curves else None
    if adam_key:
        adam_mean = base_curves[adam_key].mean(0)
        learned_mean = np.mean([s["curves"].mean(0) for s in per_seed], 0)
        checkpoints = [h for h in (10, 25, 50, 100, 200, 500, max_h) if h <= max_h]
        summary["speedup_over_tuned_adam"] = {str(h): speedup(adam_mean, learned_mean, h) for h in checkpoints}
    summary["total_seconds"] = time.perf_counter() - t_start
    table = markdown_table(["optimizer", "steps", "mean train loss", "median", "test acc", "learned / best"],
                           rows)
    lines = [table, ""]
    for h in horizons:
        lines.append(f"- {h} steps: learned / best tuned baseline = "
                     f"{summary[f'learned_over_best_baseline_at_{h}']:.3f} over {cfg.seeds} meta-training seeds "
                     f"x {cfg.test_tasks} test tasks")
    lines.append(f"- unseen learners (ratio at {cfg.horizon} steps): "
                 + ", ".join(f"{a} {v:.3f}" for a, v in summary["unseen"].items()))
    lines.append(f"- mean loss never above the initial loss: {summary['never_above_initial_loss']} "
                 f"(max ratio {worst:.3f}); meta-training {np.mean(meta_seconds):.0f} s per seed")
    text = "\n".join(lines)
    print(text)
    with open(os.path.join(cfg.out_dir, "table.md"), "w") as f:
        f.write(text + "\n")
    write_json(os.path.join(cfg.out_dir, "summary.json"), summary)
    curves = {f"learned ({cfg.net}, seed 0)": per_seed[0]["curves"]}
    for n in cfg.baselines:
        curves[f"{n} (tuned @{max_h})"] = base_curves[(n, max_h)]
    plot_curves(os.path.join(cfg.out_dir, "loss_curves.png"), curves,
                f"digits MLP 64-20-10, {cfg.test_tasks} test tasks", "minibatch train loss")
    if adam_key:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.5))
        sp = summary["speedup_over_tuned_adam"]
        ax.plot([int(k) for k in sp], [min(v, 1e3) for v in sp.values()], "o-")
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_xscale("log")
        ax.set_xlabel("learned optimizer's steps")
        ax.set_ylabel("speedup over tuned Adam")
        fig.tight_layout()
        fig.savefig(os.path.join(cfg.out_dir, "speedup.png"), dpi=110)
        plt.close(fig)
    return summary


if __name__ == "__main__":
    main()
