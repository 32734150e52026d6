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

from learned_opt.evaluate import evaluate, lr_grid, mean_ci, speedup, tune_baseline, tune_lr  # noqa: E402
from learned_opt.meta import MetaConfig, MetaTrainer, save_lopt  # noqa: E402
from learned_opt.optim import get_optimizer  # noqa: E402
from learned_opt.optim.learned import build_learned  # noqa: E402
from learned_opt.control import Cosine  # noqa: E402
from learned_opt.tasks import DigitsFamily  # noqa: E402
from learned_opt.tasks.augment import ReparamFamily  # noqa: E402

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
    base: str = "adam"  # CoordLSTM only: "none" is the paper's LSTM; "momentum" / "adam" learn corrections
    base_lr: float = 0.1
    output_scale: float = 0.1
    base_lr_range: float = 1.0  # per-coordinate rates within base rate x e^(+-range) (measured: e^3 lets
    # some seeds learn rates that blow up ReLU and two-layer learners)
    control: str = "learned"  # "learned": the meta-network's LR head also drives a global learning rate
    lr_max: float = 1.0  # the LR head may only lower the rate (measured: free to raise it 10x, it learns a
    # schedule that fits the sigmoid net only, and ReLU / tanh / two-layer learners then blow up)
    second_order: bool = True  # first-order meta-gradients cannot see instability and push rates up
    augment: float = 3.0  # meta-train on per-tensor reparametrised tasks, scales in [1/augment, augment]
    horizon: int = 100
    truncation: int = 20
    iterations: int = 200
    tasks_per_step: int = 1
    meta_lr: float = 3e-3
    meta_loss: str = "mean_log"
    curriculum: tuple = ()  # measured: (20, 50, 100) with 300 iterations was worse at every horizon
    meta_val_every: int = 40  # meta-iterations between validations; the best validated meta-weights are kept
    meta_val_tasks: int = 4
    meta_val_horizon: int = 1000  # validate on runs 10x the meta-training horizon, scored on every step
    seeds: int = 3
    test_tasks: int = 100
    val_tasks: int = 4
    eval_horizons: tuple = (100, 200, 1000)
    unseen: tuple = ("hidden40", "two_layer", "relu", "tanh")
    baselines: tuple = ("sgd", "momentum", "adam", "rmsprop")
    grid_low: float = 1e-3
    grid_high: float = 1.0
    grid_points: int = 13  # quarter-decade steps
    tune_extra: bool = True  # also tune momentum / betas jointly with the rate (EXTRA_GRIDS)
    reference_schedule: bool = True  # also report Adam with tuned warm-up + cosine decay (not a target baseline)
    device: str = "cpu"
    out_dir: str = "results/digits"
    threads: int = 1


PRESETS = {
    "smoke": dict(iterations=2, meta_val_every=1, meta_val_tasks=1, meta_val_horizon=12, seeds=1, curriculum=(),
                  test_tasks=2, val_tasks=1, eval_horizons=(10, 20), horizon=10, truncation=5, unseen=("relu",),
                  baselines=("sgd", "adam"), grid_points=3, tune_extra=False, out_dir="runs/digits_smoke"),
}


def main(argv=None) -> dict:
    cfg = parse_config(Config, PRESETS, argv)
    torch.set_num_threads(cfg.threads)
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("error: --device cuda requested but CUDA is not available")
    net_args = dict(base=cfg.base, base_lr=cfg.base_lr, output_scale=cfg.output_scale, lr_max=cfg.lr_max,
                    base_lr_range=cfg.base_lr_range) \
        if cfg.net == "lstm" else dict(lr_max=cfg.lr_max)
    try:
        build_learned(cfg.net, **net_args)
        mcfg = MetaConfig(horizon=cfg.horizon, truncation=cfg.truncation, iterations=cfg.iterations,
                          tasks_per_step=cfg.tasks_per_step, meta_lr=cfg.meta_lr, meta_loss=cfg.meta_loss,
                          curriculum=cfg.curriculum, val_every=cfg.meta_val_every, val_tasks=cfg.meta_val_tasks,
                          val_horizon=cfg.meta_val_horizon, val_metric="mean_log_curve", control=cfg.control,
                          second_order=cfg.second_order)
        mcfg.validate()
        meta_family = ReparamFamily(DigitsFamily(device=cfg.device), cfg.augment)
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
    # Reference (reported, not a target baseline): Adam with a linear warm-up over the first 10% of the steps
    # and cosine decay to zero at the horizon, its rate tuned per horizon on the same validation tasks.
    sched = {}
    if cfg.reference_schedule:
        for h in horizons:
            make = lambda h=h: Cosine(total_steps=h, warmup_steps=max(1, h // 10))  # noqa: E731
            t = tune_lr(lambda lr: get_optimizer("adam", lr=lr), family, grid=grid, steps=h,
                        num_tasks=cfg.val_tasks, name=f"adam+warmup-cosine@{h}", controller_fn=make)
            sched[h] = (t.best_lr, evaluate(family, get_optimizer("adam", lr=t.best_lr), make,
                                            num_tasks=cfg.test_tasks, steps=h).curves)

    # 3. Meta-train one learned optimizer per seed; evaluate it on the same test tasks.
    per_seed, meta_seconds = [], []
    for seed in range(cfg.seeds):
        torch.manual_seed(seed)  # meta-network initialisation
        net = build_learned(cfg.net, **net_args).to(cfg.device)
        mcfg.seed = seed
        trainer = MetaTrainer(net, meta_family if cfg.augment > 1 else family, mcfg,
                              run_dir=os.path.join(cfg.out_dir, f"run_seed{seed}"), progress=sys.stderr.isatty())
        t0 = time.perf_counter()
        trainer.run()
        meta_seconds.append(time.perf_counter() - t0)
        save_lopt(os.path.join(cfg.out_dir, f"run_seed{seed}", "lopt.pt"), net)
        ctrl = net.as_controller if cfg.control == "learned" else None
        res = evaluate(family, net, ctrl, num_tasks=cfg.test_tasks, steps=max_h)
        unseen_curves = {a: evaluate(unseen_fams[a], net, ctrl, num_tasks=cfg.test_tasks,
                                     steps=cfg.horizon).curves for a in cfg.unseen}
        # test accuracy at every horizon (the shorter runs repeat the same tasks and batches)
        accuracy = {h: (res.accuracy if h == max_h else
                        evaluate(family, net, ctrl, num_tasks=cfg.test_tasks, steps=h).accuracy) for h in horizons}
        per_seed.append({"curves": res.curves, "accuracy": accuracy, "unseen": unseen_curves})
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
                                      "loss_ci95_over_tasks": list(mean_ci(learned_losses)[1:]),
                                      "test_accuracy": float(np.mean([a for s in per_seed
                                                                      for a in s["accuracy"][h]]))}
        for n in cfg.baselines:
            c = base_curves[(n, h)][:, h]
            summary["baselines"].setdefault(n, {})[str(h)] = {
                "hparams": tuned[(n, h)].hparams, "mean_loss": float(c.mean()),
                "loss_ci95_over_tasks": list(mean_ci(c)[1:]),
                "test_accuracy": float(np.mean(base_acc[(n, h)])) if base_acc[(n, h)] else None}
            rows.append([f"{n} (tuned @{h})", h, float(c.mean()), float(np.median(c)),
                         float(np.mean(base_acc[(n, h)])) if base_acc[(n, h)] else float("nan"), "-"])
        if h in sched:
            c = sched[h][1][:, h]
            summary.setdefault("reference_adam_warmup_cosine", {})[str(h)] = {
                "lr": sched[h][0], "mean_loss": float(c.mean()), "loss_ci95_over_tasks": list(mean_ci(c)[1:]),
                "learned_over_it": float(learned_losses.mean()) / float(c.mean())}
            rows.append([f"adam + warm-up/cosine (reference, tuned @{h})", h, float(c.mean()), float(np.median(c)),
                         float("nan"), "-"])
        rows.append([f"learned ({cfg.net})", h, float(learned_losses.mean()), float(np.median(learned_losses)),
                     float(np.mean([a for s in per_seed for a in s["accuracy"][h]])),
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
    summary["max_mean_loss_over_initial_unseen"] = {
        a: max(float((s["unseen"][a].mean(0) / s["unseen"][a].mean(0)[0]).max()) for s in per_seed)
        for a in cfg.unseen}
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
    if sched:
        lines.append("- learned / Adam with tuned warm-up + cosine decay (a reference, not a target baseline): "
                     + ", ".join(f"{h} steps {v['learned_over_it']:.3f}"
                                 for h, v in summary["reference_adam_warmup_cosine"].items()))
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
        speedup_plot(os.path.join(cfg.out_dir, "speedup.png"), summary["speedup_over_tuned_adam"], max_h)
    return summary


def speedup_plot(path, sp, max_h):
    """Speedup over tuned Adam against the learned optimizer's steps. Where Adam never reaches the learned
    optimizer's loss within the ``max_h`` evaluated steps the speedup is only bounded below, by ``max_h / step``:
    drawn as an open upward triangle at that bound, not as a number."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [int(k) for k in sp]
    finite = [(t, v) for t, v in zip(steps, sp.values()) if np.isfinite(v)]
    bounds = [(t, max_h / t) for t, v in zip(steps, sp.values()) if not np.isfinite(v)]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    if finite:
        ax.plot(*zip(*finite), "o-", label="measured")
    if bounds:
        ax.plot(*zip(*bounds), "^", mfc="none", ms=9, label=f"lower bound (Adam never got there in {max_h} steps)")
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("learned optimizer's steps")
    ax.set_ylabel("speedup over tuned Adam")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
