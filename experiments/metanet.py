"""The project's reference set-up: the ``MetaNet`` learner (10 -> 10 -> 10 -> 10 MLP) on teacher-student regression.

Every optimizer trains the learner for 100 epochs (full batch: one step per epoch, validation every epoch) under
the same early stopping (patience 10, best weights restored). Under the evaluation protocol
(:mod:`learned_opt.evaluate`): a ``CoordLSTM`` correcting heavy-ball momentum is meta-trained on train-split
MetaNet tasks for ``--seeds`` meta-training seeds; SGD, momentum, Nesterov, Adam and RMSprop are tuned *under that
early stopping* on validation tasks, on the validation-data loss at the stop (every axis widened until interior,
the rate refined to 1/8 decade); everything is evaluated on the same evaluation tasks, where each row reports the
loss on the task's held-out test data at the stop. The headline is learned against the best tuned baseline,
paired per task over meta-training seeds; Adam with lr 1e-3 (the old reference) is a secondary row. Without
``--final true`` the evaluation tasks are validation tasks of their own stream and no test task is touched.
Writes ``{out_dir}/{summary.json, table.md}``.

    python experiments/metanet.py --out_dir runs/metanet_dev   # development run (validation tasks only)
    python experiments/metanet.py --final true                 # the reported numbers (final-test split)
    python experiments/metanet.py --preset smoke               # seconds; used by the tests
"""
from __future__ import annotations

import os
import sys
from dataclasses import asdict, dataclass
from typing import Dict

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (ProtocolConfig, configure, eval_split, fmt_hp, fmt_paired, markdown_table,  # noqa: E402
                    meta_train_seed, open_run, parallel_map, run_kind, run_main, test_split_name, save_report,
                    final_test_read, preregistered, record_test_read, weights_files)

from learned_opt.control import EarlyStopping  # noqa: E402
from learned_opt.evaluate import (BASELINE_AXES, TEST_DRAW, default_lr_axis, evaluate,  # noqa: E402
                                  make_baseline, mean_ci, paired, protocol_record, require_final_seeds, tune)
from learned_opt.meta import MetaConfig  # noqa: E402
from learned_opt.optim.learned import build_learned  # noqa: E402
from learned_opt.tasks import MetaNetFamily  # noqa: E402

REFERENCE = "adam (lr 1e-3)"
REFERENCE_HP = {"lr": 1e-3, "beta1": 0.9, "beta2": 0.999}  # Adam at its usual defaults, untuned
# What decides the verdicts (the summary's "preregistered" block): task counts, the stopping rule, the baselines.
PREREGISTERED = ("seeds", "val_tasks", "eval_tasks", "epochs", "patience", "n_train", "baselines")


@dataclass
class Config(ProtocolConfig):
    """MetaNet experiment settings; every field is a command-line flag."""
    epochs: int = 100
    patience: int = 10  # early stopping of every optimizer (best weights restored)
    n_train: int = 64
    # The meta-training recipe, unchanged from the earlier sessions.
    net: str = "lstm"
    base: str = "momentum"
    base_lr: float = 0.01
    iterations: int = 150
    truncation: int = 20
    meta_lr: float = 3e-3
    meta_loss: str = "val"
    select_tasks: int = 4  # validation tasks (stream "select") that pick the meta-training checkpoint
    # Evaluation and tuning.
    eval_tasks: int = 100
    baselines: tuple = ("sgd", "momentum", "nesterov", "adam", "rmsprop")
    smoke: bool = False  # a smoke run (seconds, for the tests): may run final with fewer than 5 seeds; no result
    out_dir: str = "results/metanet"
    threads: int = 1


PRESETS = {"smoke": dict(seeds=2, val_tasks=2, epochs=12, patience=2, iterations=2, truncation=4, select_tasks=1,
                         eval_tasks=3, baselines=("sgd", "adam"), out_dir="runs/metanet_smoke",
                         smoke=True)}


def meta_config(cfg: Config, seed: int) -> MetaConfig:
    """The meta-training settings of meta-training seed ``seed``."""
    return MetaConfig(horizon=cfg.epochs, truncation=cfg.truncation, iterations=cfg.iterations,
                      meta_lr=cfg.meta_lr, meta_loss=cfg.meta_loss, seed=seed,
                      val_every=max(1, cfg.iterations // 5), val_tasks=cfg.select_tasks, val_metric="val_at_stop")


def new_net(cfg: Config, seed: int):
    """The meta-network of meta-training seed ``seed`` (its initial weights drawn from ``seed``)."""
    torch.manual_seed(seed)
    return build_learned(cfg.net, **(dict(base=cfg.base, base_lr=cfg.base_lr) if cfg.net == "lstm" else {}))


def check(cfg: Config) -> None:
    """Raise ``ValueError`` naming the first bad setting, before any work starts."""
    for name in ("seeds", "val_tasks", "workers", "eval_tasks", "threads"):
        v = getattr(cfg, name)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
    require_final_seeds(cfg.seeds, cfg.final, smoke=cfg.smoke or cfg.check_run)
    if not cfg.baselines:
        raise ValueError("baselines must name at least one hand-coded optimizer")
    for name in cfg.baselines:
        if name not in BASELINE_AXES:
            raise ValueError(f"unknown baseline {name!r}; known: {', '.join(BASELINE_AXES)}")
    EarlyStopping(patience=cfg.patience)
    meta_config(cfg, 0).validate()
    new_net(cfg, 0)


def family(cfg: Config) -> MetaNetFamily:
    """The MetaNet regression tasks (a new teacher, data and noise per task)."""
    return MetaNetFamily(n_train=cfg.n_train)


def tune_one(cfg: Config, name: str):
    """``name`` tuned under early stopping on ``cfg.val_tasks`` validation tasks, on the validation-data loss at
    the stop (the held-out loss that the reported rows measure on test data)."""
    stopper = lambda: EarlyStopping(patience=cfg.patience)  # noqa: E731 - a fresh controller per task
    axes = (default_lr_axis(),) + BASELINE_AXES[name]
    res = tune(f"{name}+early_stopping_p{cfg.patience}", lambda hp: (make_baseline(name, hp), stopper), family(cfg),
               axes, horizons=[cfg.epochs], metrics=["val_loss"], num_tasks=cfg.val_tasks, seed=0, val_every=1,
               horizon_independent=False, cache_dir=os.path.join(cfg.out_dir, "tuning_cache"))
    return res[(cfg.epochs, "val_loss")]


def meta_train(cfg: Config, seed: int):
    """Meta-train seed ``seed`` on train-split tasks; returns the net (best checkpoint) and its record."""
    return meta_train_seed(new_net(cfg, seed), family(cfg), meta_config(cfg, seed), cfg.out_dir, seed)


# ------------------------------------------------------------------------------------------------------ stages
def run_all(cfg: Config, opt) -> Dict[str, np.ndarray]:
    """Per-task validation and test-data losses at the stop, and the stop steps, on the evaluation tasks."""
    stopper = lambda: EarlyStopping(patience=cfg.patience)  # noqa: E731 - a fresh controller per task
    res = evaluate(family(cfg), opt, stopper, num_tasks=cfg.eval_tasks, steps=cfg.epochs, val_every=1,
                   **eval_split(cfg))
    return {"val": res.metric("val_loss"), "test": res.metric("test_loss"),
            "steps": np.asarray(res.stop_steps, dtype=float)}


def tune_stage(cfg: Config) -> dict:
    """Baselines, tuned under the same early stopping on validation tasks only (stream "tune")."""
    tuned = dict(zip(cfg.baselines, parallel_map(tune_one, [(cfg, n) for n in cfg.baselines], cfg.workers)))
    for name, t in tuned.items():
        print(f"tuned {name:9s}: {fmt_hp(t.hparams)} (edges {t.edges})", flush=True)
    return tuned


def evaluate_stage(cfg: Config, nets: list, tuned: dict) -> tuple:
    """Everything on the same evaluation tasks: ``(learned per seed, rows by baseline name)``."""
    learned = [run_all(cfg, net) for net in nets]
    rows = {name: run_all(cfg, make_baseline(name, t.hparams)) for name, t in tuned.items()}
    rows[REFERENCE] = run_all(cfg, make_baseline("adam", REFERENCE_HP))
    return learned, rows


def statistics(cfg: Config, prov: dict, learned: list, rows: dict, tuned: dict, meta_records: list) -> dict:
    """The best tuned baseline by mean test loss on these tasks (the choice that favours the baselines); learned
    against it and against the reference, paired per task over seeds. Returns the summary."""
    L = np.stack([r["test"] for r in learned])  # (seeds, tasks)
    best = min(cfg.baselines, key=lambda n: (float(np.mean(rows[n]["test"])), cfg.baselines.index(n)))
    vs_best, vs_ref = paired(L, rows[best]["test"]), paired(L, rows[REFERENCE]["test"])
    summary = {
        "config": asdict(cfg),
        "protocol": protocol_record(
            meta_training_seeds=cfg.seeds, validation_tasks=cfg.val_tasks,
            tuning_metric="val_loss (validation-data loss at the early stop, best weights restored)",
            test_split=test_split_name(cfg), test_tasks=cfg.eval_tasks,
            evaluation=eval_split(cfg), reported_metric="test_loss (the task's held-out test data) at the early stop",
            paired_units="tasks", early_stopping={"patience": cfg.patience, "restore_best": True},
            best_baseline_chosen_by="mean test loss at the stop on the evaluation tasks"),
        "provenance": prov,
        "notes": ["The meta-training recipe is unchanged from the earlier sessions; the final-test split has "
                  f"since been re-drawn (draw {TEST_DRAW})."],
        "best_tuned": best,
        "learned_over_best_tuned_test": vs_best["ratio_of_means"],
        "learned_over_best_tuned_test_ci": vs_best["ratio_of_means_ci"],
        "learned_over_reference_test": vs_ref["ratio_of_means"],
        "paired": {"vs_best_tuned": dict(vs_best, baseline=best), "vs_adam_1e-3": dict(vs_ref, baseline=REFERENCE)},
        "paired_vs_each_tuned": {n: paired(L, rows[n]["test"]) for n in cfg.baselines},
        "meta_train_seconds": float(sum(r["seconds"] for r in meta_records)),
        "meta_training": meta_records,
        "optimizers": {},
    }
    per_seed = [float(v) for v in L.mean(1)]
    m, lo, hi = mean_ci(per_seed)
    summary["optimizers"]["learned"] = {
        "net": cfg.net, "test_at_stop": m, "test_ci95": [lo, hi], "ci_over": "meta-training seeds (t)",
        "per_seed_test_at_stop": per_seed, "val_at_stop": float(np.mean([r["val"] for r in learned])),
        "mean_steps": float(np.mean([r["steps"] for r in learned]))}
    for name, r in rows.items():
        m, lo, hi = mean_ci(r["test"])
        hp = tuned[name].hparams if name in tuned else REFERENCE_HP
        summary["optimizers"][name] = {
            "hparams": hp, "lr": hp["lr"], "test_at_stop": m, "test_ci95": [lo, hi], "ci_over": "tasks (t)",
            "val_at_stop": float(np.mean(r["val"])), "mean_steps": float(np.mean(r["steps"]))}
        if name in tuned:
            summary["optimizers"][name].update(validation_score=tuned[name].score, edges=tuned[name].edges,
                                               grid_widened=tuned[name].widened)
    return summary


def report_text(cfg: Config, summary: dict) -> str:
    """``table.md``: learned and the best tuned baseline first, the reference last."""
    best, vs_best, vs_ref = summary["best_tuned"], summary["paired"]["vs_best_tuned"], summary["paired"]["vs_adam_1e-3"]

    def row(name, label, p=None):
        o = summary["optimizers"][name]
        return [label, fmt_hp(o["hparams"]) if "hparams" in o else "-", o["val_at_stop"],
                f"{o['test_at_stop']:.4f} [{o['test_ci95'][0]:.4f}, {o['test_ci95'][1]:.4f}]", o["mean_steps"],
                fmt_paired(p) if p is not None else "-"]

    order = [best] + [n for n in cfg.baselines if n != best]
    table = [row("learned", f"learned ({cfg.net}, {cfg.seeds} seeds)")]
    table += [row(n, f"{n} (tuned{', best' if n == best else ''})", summary["paired_vs_each_tuned"][n])
              for n in order]
    table += [row(REFERENCE, f"{REFERENCE} (reference)", vs_ref)]
    return "\n".join([
        f"{run_kind(cfg)}: {cfg.eval_tasks} tasks, early stopping with patience {cfg.patience} on every optimizer, "
        f"{cfg.epochs} epochs (full batch); baselines tuned under it on {cfg.val_tasks} validation tasks.",
        "",
        f"- learned / best tuned baseline ({best}), test loss at stop: mean ratio "
        f"{vs_best['ratio_of_means']:.3f} [{vs_best['ratio_of_means_ci'][0]:.3f}, "
        f"{vs_best['ratio_of_means_ci'][1]:.3f}]; per-task ratio {fmt_paired(vs_best)}; per seed "
        f"{', '.join('%.3f' % v for v in vs_best['per_seed_ratio'])}",
        f"- learned / {REFERENCE} (secondary reference): mean ratio {vs_ref['ratio_of_means']:.3f}; per-task "
        f"ratio {fmt_paired(vs_ref)}",
        "",
        markdown_table(["optimizer", "hyper-parameters", "val loss at stop", "test loss at stop (95% CI)",
                        "steps used", "learned / this, per task (95% CI), Wilcoxon p, learned wins"], table),
        "",
        "- intervals: the learned row's over meta-training seeds (t), the baselines' over tasks (t); the last "
        "column is paired per task, nested bootstrap over tasks, then seeds within each task",
        f"- meta-training: {summary['meta_train_seconds']:.0f} s in all "
        f"({', '.join('%.0f' % r['seconds'] for r in summary['meta_training'])} s per seed)"])


# -------------------------------------------------------------------------------------------------------- main
def main(argv=None) -> dict:
    """Tune, meta-train, evaluate, compare; write summary.json and table.md."""
    cfg = configure(Config, PRESETS, argv, check)
    prov = open_run(cfg.out_dir)
    tuned = tune_stage(cfg)
    # one learned optimizer per seed (checkpoints selected on validation stream "select")
    trained = parallel_map(meta_train, [(cfg, s) for s in range(cfg.seeds)], cfg.workers)
    read = final_test_read(cfg, preregistered(cfg, PREREGISTERED, {"reference": REFERENCE_HP}),
                           weights=weights_files(cfg.out_dir, range(cfg.seeds)))
    learned, rows = evaluate_stage(cfg, [net for net, _ in trained], tuned)
    summary = statistics(cfg, prov, learned, rows, tuned, [rec for _, rec in trained])
    save_report(cfg.out_dir, report_text(cfg, summary), record_test_read(summary, read))
    return summary


if __name__ == "__main__":
    run_main(main)
