"""Learned meta-control against hand-designed control: learned stopping, learned learning rates, 2x2 ablation.

1. Learned stopping: a :class:`LearnedController` (stop head only) on top of tuned Adam, meta-trained with the
   halting objective ``sum_t q_t L_val(t) + lambda sum_t q_t t`` on MetaNet regressions with small training
   sets (they overfit), swept over lambda; against early stopping with patience 5 / 10 / 20 and fixed budgets.
2. Learned learning rate: a :class:`LearnedController` (LR head only) driving SGD and Adam, against constant,
   step, exponential and cosine schedules, each tuned on validation tasks; also at twice the horizon.
3. The 2x2 ablation {hand-coded, learned} update x {hand-coded, learned} control on the MetaNet family.

Writes ``results/control/{summary.json, table.md, pareto.png, lr_schedules.png}``.

    python experiments/control.py
    python experiments/control.py --preset smoke
"""
from __future__ import annotations

import itertools
import os
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import markdown_table, parse_config, provenance, write_json  # noqa: E402

from learned_opt.control import Cosine, EarlyStopping, ExponentialDecay, StepDecay  # noqa: E402
from learned_opt.evaluate import evaluate, lr_grid, mean_ci, tune_lr  # noqa: E402
from learned_opt.meta import MetaConfig, MetaTrainer  # noqa: E402
from learned_opt.optim import get_optimizer  # noqa: E402
from learned_opt.optim.learned import CoordLSTM, LearnedController  # noqa: E402
from learned_opt.tasks import MetaNetFamily  # noqa: E402
from learned_opt.unroll import unroll  # noqa: E402
from learned_opt.tasks.base import generator  # noqa: E402


@dataclass
class Config:
    """Control experiment settings; every field is a command-line flag."""
    horizon: int = 100
    truncation: int = 25
    n_train_stop: int = 32  # small training sets: stopping matters
    n_train_lr: int = 256  # larger training sets: the schedule matters
    lambdas: tuple = (0.0, 3e-4, 1e-3, 2e-3, 3e-3, 3.5e-3, 4e-3, 5e-3, 1e-2)
    stop_adam_lr: float = 0.03  # the same Adam under every stopping rule; fast enough to overfit within T
    iterations: int = 60
    tasks_per_step: int = 4
    meta_lr: float = 3e-2
    stop_bias: float = -4.0
    thresholds: tuple = (0.3, 0.5, 0.7)  # evaluation stop thresholds on p_t, chosen with lambda on validation
    test_tasks: int = 100
    val_tasks: int = 10
    select_tasks: int = 50  # validation tasks on which lambda is chosen (never the test tasks)
    budgets: tuple = (10, 20, 30, 50, 75, 100)
    lr_grid_points: int = 7
    seed: int = 0
    out_dir: str = "results/control"
    threads: int = 1


PRESETS = {"smoke": dict(horizon=12, truncation=4, lambdas=(0.0, 1e-2), thresholds=(0.5,), iterations=2,
                         tasks_per_step=1,
                         test_tasks=3, val_tasks=1, select_tasks=2, budgets=(4, 12), lr_grid_points=3,
                         out_dir="runs/control_smoke")}


def stop_eval(family, opt, ctrl_fn, cfg, split="test", steps=None):
    """Validation loss at the returned parameters, and steps used, per task."""
    r = evaluate(family, opt, ctrl_fn, num_tasks=cfg.test_tasks if split == "test" else cfg.select_tasks,
                 steps=steps or cfg.horizon, split=split, seed=cfg.seed, val_every=1, stop_metrics=True)
    return np.asarray(r.val_at_stop), np.asarray(r.stop_steps, dtype=float)


def main(argv=None) -> dict:
    cfg = parse_config(Config, PRESETS, argv)
    torch.set_num_threads(cfg.threads)
    try:
        MetaConfig(horizon=cfg.horizon, truncation=cfg.truncation, meta_lr=cfg.meta_lr).validate()
    except ValueError as e:
        sys.exit(f"error: {e}")
    os.makedirs(cfg.out_dir, exist_ok=True)
    t_start = time.perf_counter()
    summary = {"config": asdict(cfg), "provenance": provenance()}
    lines = []

    # ---------------------------------------------------------------- 1. learned stopping
    fam = MetaNetFamily(n_train=cfg.n_train_stop)
    p10 = lambda: EarlyStopping(patience=10)  # noqa: E731
    grid = lr_grid(1e-3, 3.0, cfg.lr_grid_points)
    # Every stopping rule drives the same Adam. Its rate is fixed rather than tuned: tuned for the validation
    # loss at a patience-10 stop, it comes out so small that nothing overfits within the horizon and no rule
    # has anything to decide (measured: patience 10 then ran 98 of 100 steps).
    adam_lr = cfg.stop_adam_lr
    adam = get_optimizer("adam", lr=adam_lr)
    points = {}
    for pat in (5, 10, 20):
        points[f"patience {pat}"] = stop_eval(fam, adam, lambda p=pat: EarlyStopping(patience=p), cfg)
    for b in cfg.budgets:
        points[f"budget {b}"] = stop_eval(fam, adam, None, cfg, steps=b)
    selection, settings = {}, {}
    sel_ref_val, sel_ref_steps = stop_eval(fam, adam, p10, cfg, split="val")
    for lam in cfg.lambdas:
        torch.manual_seed(cfg.seed)
        # restore_best: like patience-based early stopping, return the best parameters seen
        ctrl = LearnedController(learn_lr=False, stop_bias=cfg.stop_bias, restore_best=True)
        mcfg = MetaConfig(horizon=cfg.horizon, truncation=cfg.truncation, iterations=cfg.iterations,
                          tasks_per_step=cfg.tasks_per_step, meta_lr=cfg.meta_lr, meta_loss="halting",
                          halting_lambda=lam, control="learned", seed=cfg.seed)
        MetaTrainer(ctrl, fam, mcfg, optimizer=adam).run()
        for thr in cfg.thresholds:
            ctrl.heads.stop_threshold = ctrl.config["stop_threshold"] = thr
            name = f"learned stop, lambda={lam:g}, threshold={thr:g}"
            sel_val, sel_steps = stop_eval(fam, adam, lambda c=ctrl: c, cfg, split="val")
            selection[name] = (float(sel_val.mean() / sel_ref_val.mean()),
                               float(1 - sel_steps.mean() / sel_ref_steps.mean()))
            points[name] = stop_eval(fam, adam, lambda c=ctrl: c, cfg)
            settings[name] = (lam, thr)
    ref_val, ref_steps = points["patience 10"]
    stop_rows, candidates = [], []
    for name, (val, steps) in points.items():
        m, lo, hi = mean_ci(val)
        ratio = float(val.mean() / ref_val.mean())
        saved = float(1 - steps.mean() / ref_steps.mean())
        stop_rows.append([name, f"{m:.4f} [{lo:.4f}, {hi:.4f}]", ratio, float(steps.mean()), saved])
        if name.startswith("learned"):
            # paired per-task ratio CI: same test tasks for both
            r_m, r_lo, r_hi = mean_ci(val / ref_val)
            candidates.append((name, ratio, saved, [r_lo, r_hi]))
    # lambda and the threshold are chosen on validation tasks: the most steps saved at <= 1.01x patience 10's
    # validation loss there; the test tasks only report the chosen setting
    ok = [c for c in candidates if selection[c[0]][0] <= 1.01]
    best = (max(ok, key=lambda c: selection[c[0]][1]) if ok
            else min(candidates, key=lambda c: selection[c[0]][0]))
    summary["stop"] = {"adam_lr": adam_lr, "chosen": best[0], "chosen_lambda": settings[best[0]][0],
                       "chosen_threshold": settings[best[0]][1], "paired_ratio_ci95": best[3],
                       "selection_on_validation_tasks": {k: {"val_ratio": v[0], "steps_saved": v[1]}
                                                         for k, v in selection.items()},
                       "points": {k: {"val_at_stop": float(v.mean()), "steps": float(s.mean())}
                                  for k, (v, s) in points.items()}}
    summary["stop_steps_saved_vs_patience10"] = best[2]
    summary["stop_val_loss_ratio_vs_patience10"] = best[1]
    lines += ["### Learned stopping (MetaNet regression, n_train="
              f"{cfg.n_train_stop}, Adam lr {adam_lr:.3g} under every rule, {cfg.test_tasks} test tasks)", "",
              markdown_table(["controller", "val loss at stop (95% CI)", "/ patience 10", "steps used",
                              "steps saved vs patience 10"], stop_rows), "",
              f"- chosen on {cfg.select_tasks} validation tasks: {best[0]}; on the test tasks "
              f"{100 * best[2]:.1f}% fewer steps than patience 10 at {best[1]:.4f}x its validation loss "
              f"(paired 95% CI of the per-task ratio {best[3][0]:.4f} .. {best[3][1]:.4f})", ""]
    _pareto(os.path.join(cfg.out_dir, "pareto.png"),
            {k: (float(s.mean()), float(v.mean())) for k, (v, s) in points.items()}, best[0])

    # ---------------------------------------------------------------- 2. learned learning rate
    fam_lr = MetaNetFamily(n_train=cfg.n_train_lr)
    lr_rows, lr_summary, schedule_traces = [], {}, {}
    for base in ("sgd", "adam"):
        def tune_schedules(h):
            """Each schedule's best (score, lr, factory) for horizon ``h``, on validation tasks."""
            schedules = {
                "constant": [lambda: None],
                "step": [lambda s=s, g=g: StepDecay(step_size=s, gamma=g)
                         for s, g in itertools.product((h // 4, h // 2), (0.1, 0.5))],
                "exponential": [lambda g=g: ExponentialDecay(gamma=g ** (100 / h)) for g in (0.98, 0.99, 0.995)],
                "cosine": [lambda: Cosine(total_steps=h)],
            }
            tuned = {}
            for sname, variants in schedules.items():
                best_s = None
                for make in variants:
                    t = tune_lr(lambda lr: get_optimizer(base, lr=lr), fam_lr, grid=grid, steps=h,
                                num_tasks=cfg.val_tasks, seed=cfg.seed, name=f"{base}+{sname}@{h}",
                                controller_fn=make)
                    if best_s is None or t.scores[t.best_lr] < best_s[0]:
                        best_s = (t.scores[t.best_lr], t.best_lr, make)
                tuned[sname] = best_s
            return tuned

        tuned_at = {h: tune_schedules(h) for h in (cfg.horizon, 2 * cfg.horizon)}
        tuned = tuned_at[cfg.horizon]
        const_lr = tuned["constant"][1]
        torch.manual_seed(cfg.seed)
        ctrl = LearnedController(learn_stop=False)
        mcfg = MetaConfig(horizon=cfg.horizon, truncation=cfg.truncation, iterations=cfg.iterations,
                          tasks_per_step=cfg.tasks_per_step, meta_lr=cfg.meta_lr, meta_loss="val",
                          control="learned", seed=cfg.seed)
        MetaTrainer(ctrl, fam_lr, mcfg, optimizer=get_optimizer(base, lr=const_lr)).run()
        results = {}
        for steps in (cfg.horizon, 2 * cfg.horizon):
            for sname, (_, lr, make) in tuned_at[steps].items():
                res = evaluate(fam_lr, get_optimizer(base, lr=lr), make, num_tasks=cfg.test_tasks, steps=steps,
                               seed=cfg.seed, stop_metrics=True)
                results[(sname, steps)] = np.asarray(res.val_at_stop)
            res = evaluate(fam_lr, get_optimizer(base, lr=const_lr), lambda c=ctrl: c,
                           num_tasks=cfg.test_tasks, steps=steps, seed=cfg.seed, stop_metrics=True)
            results[("learned", steps)] = np.asarray(res.val_at_stop)
        for steps in (cfg.horizon, 2 * cfg.horizon):
            best_name = min(tuned, key=lambda n: results[(n, steps)].mean())
            ratio = float(results[("learned", steps)].mean() / results[(best_name, steps)].mean())
            lr_summary[f"{base}@{steps}"] = {"best_schedule": best_name, "learned_over_best": ratio,
                                             **{n: float(results[(n, steps)].mean()) for n in
                                                (*tuned, "learned")}}
            for n in (*tuned, "learned"):
                m, lo, hi = mean_ci(results[(n, steps)])
                lr_rows.append([base, steps, n, f"{m:.4f} [{lo:.4f}, {hi:.4f}]",
                                f"{tuned_at[steps][n][1]:.3g}" if n in tuned else f"{const_lr:.3g} x learned"])
        g = generator(10**9)
        task = fam_lr(g)
        tr = unroll(task, get_optimizer(base, lr=const_lr), ctrl, steps=2 * cfg.horizon, generator=g)
        schedule_traces[base] = {"learned": tr.records["lr_scale"][:-1]}
        for sname, (_, lr, make) in tuned.items():
            c = make()
            scale = [c.scale(t) if c is not None else 1.0 for t in range(2 * cfg.horizon)]
            schedule_traces[base][sname] = [lr / const_lr * s for s in scale]
    summary["lr"] = lr_summary
    summary["lr_over_best_schedule"] = max(v["learned_over_best"] for k, v in lr_summary.items()
                                           if k.endswith(f"@{cfg.horizon}"))
    lines += [f"### Learned learning rate (MetaNet regression, n_train={cfg.n_train_lr}, final validation loss, "
              f"{cfg.test_tasks} test tasks)", "",
              markdown_table(["base", "steps", "schedule", "val loss (95% CI)", "lr"], lr_rows), "",
              "- learned / best tuned schedule: " + ", ".join(f"{k} {v['learned_over_best']:.3f} "
                                                             f"(vs {v['best_schedule']})"
                                                             for k, v in lr_summary.items()), ""]
    _lr_plot(os.path.join(cfg.out_dir, "lr_schedules.png"), schedule_traces, cfg.horizon)

    # ---------------------------------------------------------------- 3. 2x2 ablation (MetaNet, overfitting)
    torch.manual_seed(cfg.seed)
    lopt = CoordLSTM(base="momentum", base_lr=0.01, stop_bias=cfg.stop_bias)
    lam = settings[best[0]][0]
    mcfg = MetaConfig(horizon=cfg.horizon, truncation=cfg.truncation, iterations=cfg.iterations,
                      tasks_per_step=cfg.tasks_per_step, meta_lr=cfg.meta_lr / 3, meta_loss="halting",
                      halting_lambda=lam, control="learned", seed=cfg.seed)
    MetaTrainer(lopt, fam, mcfg).run()
    stop_ctrl = LearnedController(learn_lr=False, stop_bias=cfg.stop_bias, restore_best=True,
                                  stop_threshold=settings[best[0]][1])
    MetaTrainer(stop_ctrl, fam, MetaConfig(**{**asdict(mcfg), "meta_lr": cfg.meta_lr}), optimizer=adam).run()
    cells = {
        ("hand-coded (Adam)", "hand-coded (patience 10)"): (adam, p10),
        ("hand-coded (Adam)", "learned"): (adam, lambda: stop_ctrl),
        ("learned (CoordLSTM)", "hand-coded (patience 10)"): (lopt, p10),
        ("learned (CoordLSTM)", "learned"): (lopt, lopt.as_controller),
    }
    ab_rows, ab = [], {}
    for (u, c), (opt, ctrl_fn) in cells.items():
        val, steps = stop_eval(fam, opt, ctrl_fn, cfg)
        m, lo, hi = mean_ci(val)
        ab[f"{u} | {c}"] = {"val_at_stop": m, "steps": float(steps.mean())}
        ab_rows.append([u, c, f"{m:.4f} [{lo:.4f}, {hi:.4f}]", float(steps.mean())])
    summary["ablation"] = ab
    lines += ["### 2x2 ablation (MetaNet regression, small training sets)", "",
              markdown_table(["update", "control", "val loss at stop (95% CI)", "steps used"], ab_rows)]
    summary["total_seconds"] = time.perf_counter() - t_start
    text = "\n".join(lines)
    print(text)
    with open(os.path.join(cfg.out_dir, "table.md"), "w") as f:
        f.write(text + "\n")
    write_json(os.path.join(cfg.out_dir, "summary.json"), summary)
    return summary


def _pareto(path, means, chosen=None):
    """Steps against validation loss at the stop; ``means`` maps a rule to ``(mean steps, mean val loss)``.

    Left: every rule. Right: a zoom on the region where patience-based stopping and the learned rules sit.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    ref = means.get("patience 10")
    for zoom, ax in enumerate(axes):
        for name, (steps, val) in means.items():
            learned = name.startswith("learned")
            if zoom and ref is not None and not (steps <= 2 * ref[0] and val <= 1.04 * ref[1]):
                continue
            marker = "*" if learned else ("s" if name.startswith("patience") else "o")
            color = "tab:red" if name == chosen else ("tab:blue" if learned else "tab:gray")
            ax.scatter(steps, val, marker=marker, s=140 if name == chosen else (60 if learned else 40), color=color,
                       zorder=3 if name == chosen else 2)
            label_it = not learned or name == chosen or (zoom and name.endswith("threshold=0.5"))
            if label_it:
                label = name.replace("learned stop, lambda=", "λ=").replace(", threshold=", ", p>")
                ax.annotate(label + (" (chosen)" if name == chosen else ""), (steps, val), fontsize=7,
                            xytext=(3, 3), textcoords="offset points")
        if zoom and ref is not None:
            ax.axhline(1.01 * ref[1], color="tab:green", lw=0.8, ls="--", label="1.01x patience 10")
            ax.axvline(0.7 * ref[0], color="tab:orange", lw=0.8, ls="--", label="30% fewer steps")
            ax.legend(fontsize=7, loc="upper right")
        ax.set_xlabel("inner steps used (mean over test tasks)")
        ax.set_ylabel("validation loss at the stop")
    axes[0].set_title("learned stopping (stars) vs early stopping and budgets")
    axes[1].set_title("zoom (target: left of orange, below green)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _lr_plot(path, traces, horizon):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(traces), figsize=(5 * len(traces), 3.8), squeeze=False)
    for ax, (base, tr) in zip(axes[0], traces.items()):
        for name, values in tr.items():
            ax.plot(values, label=name, lw=2 if name == "learned" else 1)
        ax.axvline(horizon, color="gray", lw=0.8, ls="--")
        ax.set_yscale("log")
        ax.set_title(f"{base}: learning rate / tuned constant rate")
        ax.set_xlabel("inner step")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
