"""L2L's MNIST experiments (Andrychowicz et al. 2016, section 3.2) on scikit-learn's bundled 8x8 digits, under the
project's evaluation protocol (learned_opt/evaluate/).

What a task is: an MLP learner's initialisation and minibatch order on one *pool* of digit images. The 1797 images
are split into two disjoint pools: meta-training, checkpoint selection, baseline tuning and development runs use
the ``meta`` pool; the final test tasks (``--final true``) train on the ``heldout`` pool, whose images no
meta-training or tuning run has seen, and their held-out loss and accuracy use that pool's test images.

1. Baselines (SGD, momentum, Adam, RMSprop) are tuned on 20 validation tasks for every evaluation horizon and every
   reported metric: the train loss on the task's whole training set at the horizon, and the held-out loss (tuned on
   the validation split of validation tasks); every axis (rate, momentum, betas, RMSprop's alpha) is widened until
   its best value is interior and the rate refined to 1/8 decade. Adam is also tuned for every horizon of the
   speedup envelope. Each unseen learner (40 hidden units, two layers, ReLU, tanh) gets its own tuning.
2. The learned optimizer (an Adam-based ``CoordLSTM`` with a lower-only LR head) is meta-trained on the 64-20-10
   sigmoid MLP for every seed; the meta-weights kept are the best on 8 checkpoint-selection validation tasks run
   10x the meta-training horizon.
3. Everything is evaluated on the same evaluation tasks; each comparison is paired per task (learned seeds x
   tasks against the baseline on the same tasks): ratio with a nested bootstrap interval (tasks, then seeds
   within each task), Wilcoxon p (no claim below 6 tasks: its floor), win rate.

Writes ``{out_dir}/{summary.json, table.md, loss_curves.png, speedup.png}``. Each seed meta-trains in
``{out_dir}/run_seed{N}``; a run that was interrupted continues from its checkpoint there (exactly), and a checkpoint
written with other settings is refused: delete ``run_seed*/checkpoint.pt*`` to meta-train afresh.

    python experiments/digits.py --final true --workers 2   # the reported run (make reproduce)
    python experiments/digits.py                            # development: validation tasks only
    python experiments/digits.py --preset smoke             # seconds; used by the tests
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from shipped import add_shipped_row, not_shipped, shipped_seed  # noqa: E402
from common import (ProtocolConfig, configure, eval_split, fmt_paired, markdown_table, open_run,  # noqa: E402
                    paired, parallel_map, run_main, test_split_name, verdict, save_report, final_test_read,
                    preregistered, record_test_read)

from figures import plot_curves, speedup_plot  # noqa: E402

from learned_opt.control import Cosine  # noqa: E402
from learned_opt.evaluate import (baseline_kwargs, default_lr_axis, envelope_speedup, evaluate,  # noqa: E402
                                  protocol_record, require_final_seeds, tune, tune_baseline)
from learned_opt.meta import MetaConfig, MetaTrainer, load_lopt, save_lopt  # noqa: E402
from learned_opt.optim import get_optimizer  # noqa: E402
from learned_opt.optim.learned import build_learned  # noqa: E402
from learned_opt.tasks import DigitsFamily  # noqa: E402
from learned_opt.tasks.augment import ReparamFamily  # noqa: E402

UNSEEN = {
    "hidden40": dict(hidden=(40,)),
    "two_layer": dict(hidden=(20, 20)),
    "relu": dict(activation="relu"),
    "tanh": dict(activation="tanh"),
}
# rows: (reported metric on evaluation tasks, metric the baselines are tuned on, on validation tasks)
ROWS = {"train": ("train_loss", "train_loss"), "heldout": ("test_loss", "val_loss")}
# What decides the verdicts (the summary's "preregistered" block): task counts, horizons, grids, learners.
PREREGISTERED = ("seeds", "val_tasks", "test_tasks", "eval_horizons", "speedup_steps", "unseen", "baselines",
                 "grid_low", "grid_high", "reference_schedule")
# The bounds of the targets (learned / best tuned ratio; met when the whole interval is at or below it).
BOUNDS = {"train_first_horizon": 0.8, "train_later_horizons": 1.0, "test": 1.0, "unseen": 1.0}


@dataclass
class Config(ProtocolConfig):
    """Digits experiment settings; every field is a command-line flag."""
    net: str = "lstm"
    base: str = "adam"  # CoordLSTM only: "none" is the paper's LSTM; "momentum" / "adam" learn corrections
    base_lr: float = 0.1
    output_scale: float = 0.1
    base_lr_range: float = 1.0  # per-coordinate rates within base rate x e^(+-range)
    control: str = "learned"  # "learned": the meta-network's LR head also drives a global learning rate
    lr_max: float = 1.0  # the LR head may only lower the rate
    second_order: bool = True  # first-order meta-gradients cannot see instability and push rates up
    augment: float = 3.0  # meta-train on per-tensor reparametrised tasks, scales in [1/augment, augment]
    horizon: int = 100
    truncation: int = 20
    iterations: int = 200
    tasks_per_step: int = 1
    meta_lr: float = 3e-3
    meta_loss: str = "mean_log"
    curriculum: tuple = ()
    meta_val_every: int = 40  # meta-iterations between checkpoint selections
    meta_val_tasks: int = 8  # checkpoint-selection tasks (validation stream "select")
    meta_val_horizon: int = 1000  # selection runs 10x the meta-training horizon, scored on every step
    seeds: int = 5  # meta-training seeds (a final run needs at least 5: meta-training is sensitive to its seed)
    test_tasks: int = 100
    eval_horizons: tuple = (100, 200, 1000)
    speedup_steps: tuple = (10, 25, 50, 100, 200, 500, 1000)  # Adam tuned for each: the speedup envelope
    unseen: tuple = ("hidden40", "two_layer", "relu", "tanh")
    baselines: tuple = ("sgd", "momentum", "adam", "rmsprop")
    grid_low: float = 1e-4
    grid_high: float = 1.0
    reference_schedule: bool = True  # also report Adam with tuned warm-up + cosine decay (a reference)
    device: str = "cpu"
    smoke: bool = False  # a smoke run (seconds, for the tests): may run final with fewer than 5 seeds; no result
    out_dir: str = "results/digits"
    cache_dir: str = ""  # tuning cache (default: out_dir/tuning_cache); tuning touches validation tasks only,
    # so a development run and the final run can share it
    threads: int = 1


PRESETS = {
    "smoke": dict(iterations=2, meta_val_every=1, meta_val_tasks=1, meta_val_horizon=12, seeds=2, test_tasks=3,
                  val_tasks=2, eval_horizons=(10, 20), speedup_steps=(5, 10, 20), horizon=10, truncation=5,
                  unseen=("relu",), baselines=("sgd", "adam"), grid_low=1e-2, grid_high=1.0,
                  out_dir="runs/digits_smoke", smoke=True),
}


def net_args(cfg: Config) -> dict:
    """The meta-network's constructor arguments."""
    if cfg.net == "lstm":
        return dict(base=cfg.base, base_lr=cfg.base_lr, output_scale=cfg.output_scale, lr_max=cfg.lr_max,
                    base_lr_range=cfg.base_lr_range)
    return dict(lr_max=cfg.lr_max)


def meta_config(cfg: Config, seed: int) -> MetaConfig:
    """Meta-training settings of one seed."""
    return MetaConfig(horizon=cfg.horizon, truncation=cfg.truncation, iterations=cfg.iterations,
                      tasks_per_step=cfg.tasks_per_step, meta_lr=cfg.meta_lr, meta_loss=cfg.meta_loss,
                      curriculum=cfg.curriculum, val_every=cfg.meta_val_every, val_tasks=cfg.meta_val_tasks,
                      val_horizon=cfg.meta_val_horizon, val_metric="mean_log_curve", control=cfg.control,
                      second_order=cfg.second_order, seed=seed)


def families(cfg: Config):
    """(meta-training family, evaluation families by learner): the evaluation pool is held out when final."""
    pool = "heldout" if cfg.final else "meta"
    meta = DigitsFamily(device=cfg.device, pool="meta")
    evals = {"base": DigitsFamily(device=cfg.device, pool=pool)}
    evals.update({a: DigitsFamily(device=cfg.device, pool=pool, **UNSEEN[a]) for a in cfg.unseen})
    tune_fams = {"base": meta, **{a: DigitsFamily(device=cfg.device, pool="meta", **UNSEEN[a]) for a in cfg.unseen}}
    return meta, evals, tune_fams


def tuning_cache(cfg: Config) -> str:
    """Where tuning results are cached."""
    return cfg.cache_dir or os.path.join(cfg.out_dir, "tuning_cache")


def tune_job(cfg: Config, name: str, learner: str):
    """Tune baseline ``name`` on validation tasks of ``learner`` for every horizon and tuned metric."""
    torch.set_num_threads(cfg.threads)
    _, _, tune_fams = families(cfg)
    if learner == "base":
        horizons = sorted(set(cfg.eval_horizons) | (set(cfg.speedup_steps) if name == "adam" else set()))
    else:
        horizons = [cfg.horizon]
    lr_axis = default_lr_axis(cfg.grid_low, cfg.grid_high)
    out = tune_baseline(name, tune_fams[learner], horizons=horizons,
                        metrics=sorted({m for _, m in ROWS.values()}), num_tasks=cfg.val_tasks, lr_axis=lr_axis,
                        cache_dir=tuning_cache(cfg))
    if name == "adam" and learner == "base":  # the envelope uses the train-loss tuning only
        out = {k: v for k, v in out.items() if k[0] in cfg.eval_horizons or k[1] == "train_loss"}
    return out


def reference_job(cfg: Config, h: int):
    """Adam with a linear warm-up over the first 10% of the steps and cosine decay to 0, its rate tuned for
    horizon ``h`` on the train metric (a reference, not a target baseline)."""
    torch.set_num_threads(cfg.threads)
    _, _, tune_fams = families(cfg)
    make = lambda hp, h=h: (get_optimizer("adam", lr=hp["lr"]),  # noqa: E731
                            lambda: Cosine(total_steps=h, warmup_steps=max(1, h // 10)))
    return tune(f"adam+warmup-cosine@{h}", make, tune_fams["base"], [default_lr_axis(cfg.grid_low, cfg.grid_high)],
                horizons=[h], metrics=["train_loss"], num_tasks=cfg.val_tasks, horizon_independent=False,
                cache_dir=tuning_cache(cfg))[(h, "train_loss")]


def eval_job(cfg: Config, learner: str, name: str, kwargs: dict, steps: int, checkpoints: tuple, sched_h: int = 0):
    """A hand-coded optimizer on the evaluation tasks of ``learner``: per-task metrics at ``checkpoints``."""
    torch.set_num_threads(cfg.threads)
    _, evals, _ = families(cfg)
    ctrl = (lambda: Cosine(total_steps=sched_h, warmup_steps=max(1, sched_h // 10))) if sched_h else None
    res = evaluate(evals[learner], get_optimizer(name, **kwargs), ctrl, num_tasks=cfg.test_tasks, steps=steps,
                   checkpoints=checkpoints, **eval_split(cfg))
    return res.at, res.curves.mean(0)


def lopt_file(cfg: Config, seed: int) -> str:
    """The meta-trained weights of ``seed`` (best checkpoint)."""
    return os.path.join(cfg.out_dir, f"run_seed{seed}", "lopt.pt")


def seed_job(cfg: Config, seed: int):
    """Meta-train the learned optimizer of ``seed``; its weights go to :func:`lopt_file`."""
    torch.set_num_threads(cfg.threads)
    meta, _, _ = families(cfg)
    torch.manual_seed(seed)  # the meta-network's initialisation
    net = build_learned(cfg.net, **net_args(cfg)).to(cfg.device)
    run_dir = os.path.dirname(lopt_file(cfg, seed))
    train_family = ReparamFamily(meta, cfg.augment) if cfg.augment > 1 else meta
    trainer = MetaTrainer(net, train_family, meta_config(cfg, seed), run_dir=run_dir, progress=False)
    # an interrupted final run continues from its checkpoint: resume is bit-identical to never stopping (a test
    # in test_meta checks it), and refuses a checkpoint written with other settings
    resumed = trainer.resume()
    trainer.run()
    seconds = trainer.train_seconds  # meta-training time, summed over interrupted parts
    save_lopt(lopt_file(cfg, seed), net)
    return {"seed": seed, "meta_seconds": seconds, "resumed": resumed, "skipped": trainer.skipped,
            "meta_steps": trainer.meta_step}


def seed_eval_job(cfg: Config, rec: dict):
    """The meta-trained network of ``rec["seed"]`` (read back from its weights file) on every evaluation family."""
    torch.set_num_threads(cfg.threads)
    _, evals, _ = families(cfg)
    net = load_lopt(lopt_file(cfg, rec["seed"])).to(cfg.device)
    ctrl = net.as_controller if cfg.control == "learned" else None
    max_h = max(cfg.eval_horizons)
    marks = tuple(sorted({h for h in (*cfg.eval_horizons, *cfg.speedup_steps) if h <= max_h}))
    # The meta-network's features do not depend on the horizon (time enters as the step count only), so one
    # run to the longest horizon gives every shorter horizon's result (a test checks this equality).
    res = evaluate(evals["base"], net, ctrl, num_tasks=cfg.test_tasks, steps=max_h, checkpoints=marks,
                   **eval_split(cfg))
    unseen = {a: evaluate(evals[a], net, ctrl, num_tasks=cfg.test_tasks, steps=cfg.horizon,
                          **eval_split(cfg)) for a in cfg.unseen}
    return {**rec, "at": res.at, "curves": res.curves, "unseen_at": {a: r.at for a, r in unseen.items()},
            "unseen_curves": {a: r.curves for a, r in unseen.items()}}


# ------------------------------------------------------------------------------------------------------ stages
def check(cfg: Config) -> None:
    """Raise ``ValueError`` naming the first bad setting, before any work starts."""
    if cfg.seeds < 1 or cfg.test_tasks < 1 or cfg.val_tasks < 1:
        raise ValueError("--seeds, --test_tasks and --val_tasks must be >= 1")
    require_final_seeds(cfg.seeds, cfg.final, smoke=cfg.smoke or cfg.check_run)
    build_learned(cfg.net, **net_args(cfg))
    meta_config(cfg, 0).validate()
    bad = [a for a in cfg.unseen if a not in UNSEEN]
    if bad:
        raise ValueError(f"unknown unseen learner {bad[0]!r}; known: {', '.join(UNSEEN)}")
    ReparamFamily(DigitsFamily(), max(cfg.augment, 1.0))


def tune_stage(cfg: Config, horizons: list) -> tuple:
    """Tuning on validation tasks only (every baseline x learner is an independent job), and the warm-up + cosine
    reference per horizon. Returns ``(tuned, refs)``."""
    jobs = [(cfg, n, "base") for n in cfg.baselines] + [(cfg, n, a) for a in cfg.unseen for n in cfg.baselines]
    tuned_list = parallel_map(tune_job, jobs, cfg.workers)
    tuned = {(n, learner): t for (_, n, learner), t in zip(jobs, tuned_list)}
    refs = {}
    if cfg.reference_schedule:
        refs = dict(zip(horizons, parallel_map(reference_job, [(cfg, h) for h in horizons], cfg.workers)))
    for (n, learner), t in tuned.items():
        for (h, m), tb in sorted(t.items()):
            print(f"tuned {n:9s} {learner:9s} @ {h:5d} on {m:10s}: "
                  + ", ".join(f"{k}={v:.6g}" for k, v in tb.hparams.items())
                  + ("" if all(e != "grid" for e in tb.edges.values()) else "  (AT GRID EDGE)"))
    return tuned, refs


def hp_key(tb) -> tuple:
    """A tuned setting as a hashable key."""
    return tuple(sorted(tb.hparams.items()))


def baseline_stage(cfg: Config, tuned: dict, refs: dict, horizons: list) -> tuple:
    """Baselines on the evaluation tasks: one run per distinct tuned setting, to the longest horizon it serves; the
    reference per horizon. Returns ``(base_at, base_curve, ref_at)``."""
    runs = {}  # (learner, name, hparams key) -> (steps, checkpoints)
    for (n, learner), t in tuned.items():
        for (h, m), tb in t.items():
            key = (learner, n, hp_key(tb))
            steps, marks = runs.get(key, (0, set()))
            runs[key] = (max(steps, h), marks | {h})
    run_keys = list(runs)
    outs = parallel_map(eval_job, [(cfg, k[0], k[1], baseline_kwargs(dict(k[2])), runs[k][0],
                                    tuple(sorted(runs[k][1]))) for k in run_keys], cfg.workers)
    base_at = dict(zip(run_keys, [o[0] for o in outs]))
    base_curve = dict(zip(run_keys, [o[1] for o in outs]))
    ref_at = {}
    if refs:
        ref_outs = parallel_map(eval_job, [(cfg, "base", "adam", {"lr": refs[h].hparams["lr"]}, h, (h,), h)
                                           for h in horizons], cfg.workers)
        ref_at = {h: o[0][h] for h, o in zip(horizons, ref_outs)}
    return base_at, base_curve, ref_at


def baseline_values(tuned: dict, base_at: dict, learner: str, n: str, h: int, row: str) -> tuple:
    """Per-task values of baseline ``n`` tuned for (h, row's tuning metric), on the row's reported metric."""
    report, tuned_on = ROWS[row]
    tb = tuned[(n, learner)][(h, tuned_on)]
    return base_at[(learner, n, hp_key(tb))][h][report], tb


def meta_train_stage(cfg: Config, horizons: list) -> list:
    """The learned optimizer, one meta-training per seed (no evaluation task touched). Returns the records."""
    return parallel_map(seed_job, [(cfg, s) for s in range(cfg.seeds)], cfg.workers)


def learned_stage(cfg: Config, records: list, horizons: list) -> list:
    """Each seed's meta-trained network on the evaluation tasks."""
    per_seed = parallel_map(seed_eval_job, [(cfg, r) for r in records], cfg.workers)
    for s in per_seed:
        print(f"seed {s['seed']}: meta-trained in {s['meta_seconds']:.0f} s ({s['skipped']} skipped meta-steps); "
              f"train loss @{horizons[0]} {s['at'][horizons[0]]['train_loss'].mean():.4f}")
    return per_seed


def new_summary(cfg: Config, prov: dict, tuned: dict, per_seed: list) -> dict:
    """The summary's fixed part: config, provenance, protocol, meta-training record and the tuned settings."""
    summary = {"config": asdict(cfg), "provenance": prov,
               "protocol": protocol_record(meta_training_seeds=cfg.seeds, validation_tasks=cfg.val_tasks,
                                           tuning_metric={"train": "whole-split train loss at the horizon",
                                                          "heldout": "validation-split loss at the horizon"},
                                           test_split=test_split_name(cfg), test_tasks=cfg.test_tasks,
                                           heldout_images=bool(cfg.final),
                                           best_baseline="lowest mean on the evaluation tasks, per row and "
                                                         "horizon (the least favourable choice for the learned "
                                                         "optimizer)"),
               "heldout_images": bool(cfg.final),
               "meta_train_seconds": [s["meta_seconds"] for s in per_seed],
               "skipped_meta_steps": [s["skipped"] for s in per_seed], "seeds_run": [s["seed"] for s in per_seed],
               "shipped_seed": shipped_seed({s["seed"]: lopt_file(cfg, s["seed"]) for s in per_seed}, "digits_lstm")
               or not_shipped("digits_lstm"),
               "tuned": {}, "baselines": {}, "learned": {}, "paired": {}, "unseen": {}, "targets": {}}
    for (n, learner), t in tuned.items():
        summary["tuned"].setdefault(learner, {})[n] = {f"{h}/{m}": {"hparams": tb.hparams, "score": tb.score,
                                                                     "edges": tb.edges}
                                                        for (h, m), tb in t.items()}
    return summary


def compare_stage(cfg: Config, summary: dict, tuned, base_at, refs, ref_at, per_seed, horizons) -> list:
    """Paired statistics per horizon, row and baseline into ``summary``; the target compares with the baseline
    that is best on the evaluation tasks (the choice least favourable to the learned optimizer). Returns the
    table's rows."""
    rows = []
    for h in horizons:
        for row, (report, _) in ROWS.items():
            learned = np.stack([s["at"][h][report] for s in per_seed])
            means = {n: float(baseline_values(tuned, base_at, "base", n, h, row)[0].mean()) for n in cfg.baselines}
            best = min(means, key=means.get)
            comp = {n: paired(learned, baseline_values(tuned, base_at, "base", n, h, row)[0]) for n in cfg.baselines}
            summary["paired"][f"{row}_at_{h}"] = {**comp[best], "baseline": best}
            summary["paired"][f"{row}_at_{h}_all"] = comp
            summary["learned"].setdefault(str(h), {})[report] = {
                "mean": float(learned.mean()), "per_seed_mean": learned.mean(1).tolist()}
            for n in cfg.baselines:
                vals, tb = baseline_values(tuned, base_at, "base", n, h, row)
                summary["baselines"].setdefault(n, {}).setdefault(str(h), {})[report] = {
                    "mean": float(vals.mean()), "median": float(np.median(vals)), "hparams": tb.hparams,
                    "tuned_on": tb.metric}
                rows.append([f"{n} (tuned @{h} on {tb.metric})", h, report, float(vals.mean()),
                             float(np.median(vals)), "-"])
            rows.append([f"learned ({cfg.net}, {cfg.seeds} seeds)", h, report, float(learned.mean()),
                         float(np.median(learned)), fmt_paired(comp[best]) + f" vs {best}"])
            add_shipped_row(summary, rows, f"{row}_at_{h}", learned, baseline_values(
                tuned, base_at, "base", best, h, row)[0], [h, report], best, fmt_paired)
        acc = np.stack([s["at"][h]["accuracy"] for s in per_seed])
        summary["learned"][str(h)]["accuracy"] = float(acc.mean())
        for n in cfg.baselines:
            a = base_at[("base", n, hp_key(tuned[(n, "base")][(h, "val_loss")]))][h]["accuracy"]
            summary["baselines"][n][str(h)]["accuracy (tuned on held-out loss)"] = float(a.mean())
        summary[f"learned_over_best_baseline_at_{h}"] = summary["paired"][f"train_at_{h}"]["ratio"]
        summary[f"test_loss_ratio_at_{h}"] = summary["paired"][f"heldout_at_{h}"]["ratio"]
        if h in ref_at:
            c = ref_at[h]["train_loss"]
            summary.setdefault("reference_adam_warmup_cosine", {})[str(h)] = {
                "lr": refs[h].hparams["lr"], "mean_train_loss": float(c.mean()),
                "paired": paired(np.stack([s["at"][h]["train_loss"] for s in per_seed]), c)}
            rows.append([f"adam + warm-up/cosine (reference, tuned @{h})", h, "train_loss", float(c.mean()),
                         float(np.median(c)), "-"])
    return rows


def unseen_stage(cfg: Config, summary: dict, tuned, base_at, per_seed, rows: list) -> None:
    """Each unseen learner: learned against its best tuned baseline per row, and accuracies, into ``summary``."""
    for a in cfg.unseen:
        summary["unseen"][a] = {}
        for row, (report, _) in ROWS.items():
            learned = np.stack([s["unseen_at"][a][cfg.horizon][report] for s in per_seed])
            means = {n: float(baseline_values(tuned, base_at, a, n, cfg.horizon, row)[0].mean())
                     for n in cfg.baselines}
            best = min(means, key=means.get)
            p = paired(learned, baseline_values(tuned, base_at, a, best, cfg.horizon, row)[0])
            summary["unseen"][a][row] = {**p, "baseline": best}
            rows.append([f"learned on {a}", cfg.horizon, report, float(learned.mean()), float(np.median(learned)),
                         fmt_paired(p) + f" vs {best}"])
        acc = {"learned": float(np.mean([s["unseen_at"][a][cfg.horizon]["accuracy"] for s in per_seed]))}
        for n in cfg.baselines:
            tb = tuned[(n, a)][(cfg.horizon, "val_loss")]
            acc[f"{n} (tuned on held-out loss)"] = float(base_at[(a, n, hp_key(tb))][cfg.horizon]["accuracy"].mean())
        summary["unseen"][a]["accuracy"] = acc


def stability_and_speedup(cfg: Config, summary: dict, tuned, per_seed, max_h: int) -> None:
    """Never above the initial loss (the mean minibatch curve over tasks, per seed), divergences, and the speedup
    over Adam tuned for each horizon (the envelope, on the whole-split train loss), into ``summary``."""
    worst = max(float((s["curves"].mean(0) / s["curves"].mean(0)[0]).max()) for s in per_seed)
    summary["max_mean_loss_over_initial"] = worst
    summary["never_above_initial_loss"] = bool(worst <= 1.0)
    summary["max_mean_loss_over_initial_unseen"] = {
        a: max(float((s["unseen_curves"][a].mean(0) / s["unseen_curves"][a].mean(0)[0]).max()) for s in per_seed)
        for a in cfg.unseen}
    summary["diverged_runs"] = int(sum(np.sum(~np.isfinite(s["at"][max_h]["train_loss"])) for s in per_seed))
    env_h = sorted(h for h in cfg.speedup_steps if h <= max_h)
    env_runs = parallel_map(eval_job, [(cfg, "base", "adam", tuned[("adam", "base")][(h, "train_loss")].kwargs, h,
                                        (h,)) for h in env_h], cfg.workers)
    envelope = {h: float(o[0][h]["train_loss"].mean()) for h, o in zip(env_h, env_runs)}
    summary["adam_envelope"] = envelope
    summary["speedup_over_tuned_adam"] = {}
    for k in env_h:
        lk = float(np.mean([s["at"][k]["train_loss"].mean() for s in per_seed]))
        sp, bound = envelope_speedup(envelope, lk, k)
        summary["speedup_over_tuned_adam"][str(k)] = {"speedup": sp, "bound": bound, "learned_loss": lk}


def bound_record(p: dict, bound: float) -> dict:
    """A target: its bound, the paired ratio and interval, and the verdict (met only when the whole interval is at
    or below the bound)."""
    return {"bound": bound, "ratio": p["ratio"], "ci": [p["ci_low"], p["ci_high"]], "verdict": verdict(p, bound)}


def set_targets(cfg: Config, summary: dict, horizons: list) -> None:
    """The targets: train loss at every horizon, held-out loss at the first two, every unseen learner."""
    t = summary["targets"]
    b = BOUNDS
    for h, bound in ((horizons[0], b["train_first_horizon"]), *((h, b["train_later_horizons"]) for h in horizons[1:])):
        t[f"train_loss_at_{h}"] = bound_record(summary["paired"][f"train_at_{h}"], bound)
    for h in horizons[:2]:
        t[f"test_loss_at_{h}"] = bound_record(summary["paired"][f"heldout_at_{h}"], b["test"])
    for a in cfg.unseen:
        t[f"unseen_{a}"] = bound_record(summary["unseen"][a]["train"], b["unseen"])


def report_text(cfg: Config, summary: dict, rows: list, horizons: list) -> str:
    """``table.md``: every optimizer's row, the targets, per-seed ratios, speedups and stability."""
    lines = [f"Evaluation tasks: {test_split_name(cfg)}, {cfg.test_tasks} tasks"
             + (" on held-out images" if cfg.final else " (meta pool)") + f"; {cfg.seeds} meta-training seeds; "
             f"baselines tuned on {cfg.val_tasks} validation tasks per horizon and metric.", "",
             markdown_table(["optimizer", "steps", "metric", "mean", "median",
                             "learned / best (per-task ratio [95% nested bootstrap CI], Wilcoxon p, win rate)"],
                            rows), "",
             "| target | bound | ratio [95% CI] | verdict |", "|---|---|---|---|"]
    for k, v in summary["targets"].items():
        lines.append(f"| {k} | {v['bound']} | {v['ratio']:.3f} [{v['ci'][0]:.3f}, {v['ci'][1]:.3f}] | "
                     f"{v['verdict']} |")
    lines += ["", "- per-seed ratios of the train loss: " + "; ".join(
        f"{h} steps " + ", ".join(f"{r:.3g}" for r in summary["paired"][f"train_at_{h}"]["per_seed_ratio"])
        for h in horizons),
        "- speedup over Adam tuned for each horizon: " + ", ".join(
        f"{k}: {dict(lower='>', upper='<').get(v['bound'], '')}{v['speedup']:.2f}"
        for k, v in summary["speedup_over_tuned_adam"].items()),
        f"- mean loss never above the initial loss: {summary['never_above_initial_loss']} (max ratio "
        f"{summary['max_mean_loss_over_initial']:.3f}); diverged runs at {horizons[-1]} steps: "
        f"{summary['diverged_runs']}; meta-training {np.mean(summary['meta_train_seconds']):.0f} s per seed; whole "
        f"script {summary['total_seconds']:.0f} s", "- " + summary["shipped_seed"].get("note", "shipped seed: above")]
    return "\n".join(lines)


def draw_figures(cfg: Config, summary: dict, tuned, base_curve, per_seed, max_h: int) -> None:
    """``loss_curves.png`` (up to three seeds and every tuned baseline) and ``speedup.png``."""
    curves = {f"learned ({cfg.net}, seed {s['seed']})": s["curves"] for s in per_seed[:3]}
    for n in cfg.baselines:
        tb = tuned[(n, "base")][(max_h, "train_loss")]
        curves[f"{n} (tuned @{max_h})"] = np.broadcast_to(base_curve[("base", n, hp_key(tb))], (1, max_h + 1))
    plot_curves(os.path.join(cfg.out_dir, "loss_curves.png"), curves,
                f"digits MLP 64-20-10, {cfg.test_tasks} tasks ({test_split_name(cfg)})",
                "minibatch train loss (baselines: mean only)")
    speedup_plot(os.path.join(cfg.out_dir, "speedup.png"), summary["speedup_over_tuned_adam"], max_h)


# -------------------------------------------------------------------------------------------------------- main
def main(argv=None) -> dict:
    """Tune, meta-train, evaluate, compare; write summary.json, table.md and the figures."""
    cfg = configure(Config, PRESETS, argv, check)
    prov = open_run(cfg.out_dir)
    t_start = time.perf_counter()
    horizons = sorted(cfg.eval_horizons)
    max_h = horizons[-1]
    tuned, refs = tune_stage(cfg, horizons)
    records = meta_train_stage(cfg, horizons)
    read = final_test_read(cfg, preregistered(cfg, PREREGISTERED, {"unseen_learners": UNSEEN, "bounds": BOUNDS}),
                           weights=[lopt_file(cfg, r["seed"]) for r in records])
    base_at, base_curve, ref_at = baseline_stage(cfg, tuned, refs, horizons)
    per_seed = learned_stage(cfg, records, horizons)
    summary = new_summary(cfg, prov, tuned, per_seed)
    rows = compare_stage(cfg, summary, tuned, base_at, refs, ref_at, per_seed, horizons)
    unseen_stage(cfg, summary, tuned, base_at, per_seed, rows)
    stability_and_speedup(cfg, summary, tuned, per_seed, max_h)
    set_targets(cfg, summary, horizons)
    summary["total_seconds"] = time.perf_counter() - t_start
    save_report(cfg.out_dir, report_text(cfg, summary, rows, horizons), record_test_read(summary, read))
    draw_figures(cfg, summary, tuned, base_curve, per_seed, max_h)
    return summary


if __name__ == "__main__":
    run_main(main)
