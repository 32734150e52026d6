"""The statistics, summary and table of ``experiments/control.py`` (learned against hand-designed meta-control).

Pure functions of the evaluation outputs: the per-task arrays come in, the paired comparisons (:func:`paired`,
nested bootstrap over tasks, then seeds within each task; t interval over seeds beside it), the targets' verdicts
(:func:`verdict`: the whole interval), ``summary.json``'s dict and ``table.md``'s text go out.
"""
from __future__ import annotations

import os
from dataclasses import asdict
from typing import Any, Dict

import numpy as np

from common import fmt_paired, markdown_table, paired, save_report, verdict
from figures import pareto_plot

from learned_opt.evaluate import protocol_record

BASES = ("sgd", "adam")
SCHEDULES = ("constant", "step", "exponential", "cosine")
REFERENCE = 10  # the patience of the reference stopping rule (and of C_hand)
SELECT_STREAM = "stopsel"  # validation stream of the lambda / threshold choice (no other use touches it)


def setting(lam: float, thr: float) -> str:
    """The name of one (lambda, threshold) setting of the learned stop controller."""
    return f"lambda={lam:g}, threshold={thr:g}"


def steps_saved(learned: np.ndarray, reference: np.ndarray) -> Dict[str, float]:
    """1 - ratio of mean steps (learned over reference), with the nested bootstrap interval (tasks, then seeds)."""
    p = paired(learned, reference)
    lo, hi = p["ratio_of_means_ci"]
    return {"value": 1 - p["ratio_of_means"], "ci_low": 1 - hi, "ci_high": 1 - lo,
            "per_seed": [1 - float(np.mean(r)) / float(np.mean(reference)) for r in np.atleast_2d(learned)]}


def choose_stop_setting(table: Dict[str, Dict[str, Any]], bound: float) -> str:
    """The selection rule of part 1 (fixed a priori): among settings whose validation-loss ratio interval ends at
    or below ``bound``, the highest lower end of steps saved; if none, the lowest upper end of the loss ratio."""
    ok = [k for k, v in table.items() if v["loss_ratio"]["ci_high"] <= bound]
    if ok:
        return max(ok, key=lambda k: (table[k]["steps_saved"]["ci_low"], -table[k]["loss_ratio"]["ci_high"]))
    return min(table, key=lambda k: table[k]["loss_ratio"]["ci_high"])


def short(p: Dict[str, Any]) -> Dict[str, Any]:
    """The paired record without its bulky per-seed lists (kept in full elsewhere)."""
    return {k: v for k, v in p.items() if k not in ("per_seed_ratio",)}


def stacked(outs, h: int) -> Dict[str, np.ndarray]:
    """``(seeds, tasks)`` test-split loss, validation loss (at ``h``) and steps of one evaluation per seed."""
    return {"test_loss": np.stack([o[h]["test_loss"] for o in outs]),
            "val_loss": np.stack([o[h]["val_loss"] for o in outs]), "steps": np.stack([o["steps"] for o in outs])}


def stop_statistics(cfg, H: int, seeds, sel, ev, stop_ctrls, adam_tuned) -> Dict[str, Any]:
    """Part 1: every stopping rule on the evaluation tasks against patience ``REFERENCE``, and the chosen setting's
    steps saved and loss ratio with their intervals (``sel``: the selection stage's output; ``ev``: the evaluations)."""
    chosen, ref = sel["chosen"], ev["hand"][f"patience {REFERENCE}"]
    L = stacked(ev["learned_stop"], H)
    L_steps = L["steps"]
    stop_paired = {"test_loss": paired(L["test_loss"], ref[H]["test_loss"]),
                   "val_loss": paired(L["val_loss"], ref[H]["val_loss"])}
    saved = steps_saved(L_steps, ref["steps"])
    loss_p = stop_paired["test_loss"]
    stop_met = bool(saved["ci_low"] >= cfg.steps_saved_target and loss_p["ci_high"] <= cfg.loss_bound)
    rules = {}
    for name, o in ev["hand"].items():
        rules[name] = {"test_loss": float(o[H]["test_loss"].mean()), "val_loss": float(o[H]["val_loss"].mean()),
                       "steps": float(o["steps"].mean()),
                       "vs_patience10_test_loss": short(paired(o[H]["test_loss"], ref[H]["test_loss"])),
                       "steps_saved": steps_saved(o["steps"], ref["steps"])}
    rules[f"learned ({chosen})"] = {"test_loss": float(L["test_loss"].mean()),
                                    "val_loss": float(L["val_loss"].mean()), "steps": float(L_steps.mean()),
                                    "per_seed_test_loss": L["test_loss"].mean(1).tolist(),
                                    "per_seed_steps": L_steps.mean(1).tolist(),
                                    "vs_patience10_test_loss": stop_paired["test_loss"], "steps_saved": saved}
    return {
        "adam_lr": adam_tuned["hparams"]["lr"],
        "adam_tuning": {**adam_tuned, "metric": f"val_loss at the patience-{REFERENCE} stop", "tasks": cfg.val_tasks},
        "lambdas": list(cfg.lambdas), "thresholds": list(cfg.thresholds), "chosen": chosen,
        "chosen_lambda": sel["lambda"], "chosen_threshold": sel["threshold"],
        "selection_rule": f"on {cfg.select_tasks} validation tasks (stream {SELECT_STREAM!r}), validation loss at "
                          f"the stop: among settings whose paired loss ratio to patience {REFERENCE} has "
                          f"ci_high <= {cfg.loss_bound}, the highest ci_low of steps saved",
        "selection": sel["selection"],
        "selection_hand_rules": {n: {"val_loss": float(o[H]["val_loss"].mean()), "steps": float(o["steps"].mean())}
                                 for n, o in sel["hand"].items()},
        "steps_saved": saved, "loss_ratio": stop_paired["test_loss"], "val_loss_ratio": stop_paired["val_loss"],
        "rules": rules, "target_met": stop_met,
        "meta_train_seconds": {f"lambda={lam:g}": [stop_ctrls[(lam, s)]["seconds"] for s in seeds]
                               for lam in cfg.lambdas}}


def lr_statistics(H: int, seeds, ev, tuned, const_lr, lr_ctrls) -> tuple:
    """Part 2: per base and horizon, the learned LR controller against every tuned schedule and against the one
    with the lowest mean test-split loss; returns ``(summary, targets)``."""
    lr_summary, lr_targets = {}, {}
    for b in BASES:
        for h in (H, 2 * H):
            learned = {m: np.stack([o[h][m] for o in ev["lr"][b]]) for m in ("test_loss", "val_loss")}
            sched = {n: ev["sched"][(b, n, h)][h] for n in SCHEDULES}
            best = min(SCHEDULES, key=lambda n: float(np.mean(sched[n]["test_loss"])))
            best_val = min(SCHEDULES, key=lambda n: tuned[(b, n)][h]["score"])
            p = paired(learned["test_loss"], sched[best]["test_loss"])
            key = f"{b}@{h}"
            lr_summary[key] = {
                "best_schedule": best, "best_schedule_on_validation": best_val,
                "paired": p, "paired_val_loss": paired(learned["val_loss"], sched[best]["val_loss"]),
                "paired_vs": {n: short(paired(learned["test_loss"], sched[n]["test_loss"])) for n in SCHEDULES},
                "verdict": verdict(p, 1.0), "base_lr": const_lr[b],
                "learned": {"test_loss": float(learned["test_loss"].mean()),
                            "val_loss": float(learned["val_loss"].mean()),
                            "per_seed_test_loss": learned["test_loss"].mean(1).tolist()},
                "schedules": {n: {"hparams": tuned[(b, n)][h]["hparams"], "edges": tuned[(b, n)][h]["edges"],
                                  "tuning_val_loss": tuned[(b, n)][h]["score"],
                                  "test_loss": float(np.mean(sched[n]["test_loss"])),
                                  "val_loss": float(np.mean(sched[n]["val_loss"]))} for n in SCHEDULES},
                "meta_train_seconds": [lr_ctrls[(b, s)]["seconds"] for s in seeds]}
            lr_targets[key] = {"ratio": p["ratio"], "ci": [p["ci_low"], p["ci_high"]], "verdict": verdict(p, 1.0)}
    return lr_summary, lr_targets


def ablation_statistics(H: int, seeds, ev, chosen: str, adam_lr: float, updates, lstm_stop) -> Dict[str, Any]:
    """Part 3: the 2x2 {hand, learned} update x {hand, learned} control cells, each paired against (U_hand,
    C_hand), and each one-factor change against its neighbour."""
    ref = ev["hand"][f"patience {REFERENCE}"]
    cells = {("hand", "hand"): {"test_loss": ref[H]["test_loss"][None], "val_loss": ref[H]["val_loss"][None],
                                "steps": ref["steps"][None]},
             ("hand", "learned"): stacked(ev["learned_stop"], H)}
    for u_c, outs in ((("learned", "hand"), ev["lstm_p10"]), (("learned", "learned"), ev["lstm_learned"])):
        cells[u_c] = stacked(outs, H)
    names = {("hand", "hand"): f"U_hand (Adam {adam_lr:.3g}) + C_hand (patience {REFERENCE})",
             ("hand", "learned"): f"U_hand (Adam {adam_lr:.3g}) + C_learned ({chosen})",
             ("learned", "hand"): f"U_learned (CoordLSTM on Adam) + C_hand (patience {REFERENCE})",
             ("learned", "learned"): f"U_learned (CoordLSTM on Adam) + C_learned ({chosen})"}
    ablation = {"cells": {}, "paired": {}, "one_factor": {},
                "meta_train_seconds": {"update": [updates[s]["seconds"] for s in seeds],
                                       "stop_on_update": [lstm_stop[s]["seconds"] for s in seeds]}}
    hh = cells[("hand", "hand")]
    for key, c in cells.items():
        ablation["cells"][names[key]] = {"update": key[0], "control": key[1],
                                         "test_loss": float(c["test_loss"].mean()),
                                         "val_loss": float(c["val_loss"].mean()), "steps": float(c["steps"].mean()),
                                         "per_seed_test_loss": c["test_loss"].mean(1).tolist()}
        if key != ("hand", "hand"):
            ablation["paired"][names[key]] = {"test_loss": paired(c["test_loss"], hh["test_loss"][0]),
                                              "steps_saved": steps_saved(c["steps"], hh["steps"][0])}
    for a, b_, what in ((("learned", "learned"), ("learned", "hand"), "control, given U_learned"),
                        (("learned", "learned"), ("hand", "learned"), "update, given C_learned")):
        ablation["one_factor"][what] = {"test_loss": short(paired(cells[a]["test_loss"], cells[b_]["test_loss"])),
                                        "steps_saved": steps_saved(cells[a]["steps"], cells[b_]["steps"])}
    return ablation


def summarize(cfg, prov, split_name: str, stop: Dict[str, Any], lr: tuple, ablation: Dict[str, Any],
              seconds: Dict[str, float]) -> Dict[str, Any]:
    """``summary.json``'s dict (without ``total_seconds``): the three parts, their paired comparisons in one flat
    dict, the protocol record and the targets (``lr``: :func:`lr_statistics`'s pair)."""
    lr_summary, lr_targets = lr
    chosen, saved, loss_p = stop["chosen"], stop["steps_saved"], stop["loss_ratio"]
    flat_paired = {f"stop: learned ({chosen}) vs patience {REFERENCE}, test loss": stop["loss_ratio"]}
    flat_paired.update({f"lr: {k} learned vs best schedule ({v['best_schedule']}), test loss": v["paired"]
                        for k, v in lr_summary.items()})
    flat_paired.update({f"ablation: {k} vs (U_hand, C_hand), test loss": v["test_loss"]
                        for k, v in ablation["paired"].items()})
    return {
        "config": asdict(cfg), "provenance": prov,
        "protocol": protocol_record(
            meta_training_seeds=cfg.seeds, validation_tasks=cfg.val_tasks,
            tuning_metric={"stop_adam_lr": f"val_loss at the patience-{REFERENCE} stop (validation tasks)",
                           "stop_lambda_threshold": f"val_loss at the stop and steps, {cfg.select_tasks} "
                                                    f"validation tasks of stream {SELECT_STREAM!r}",
                           "lr_schedules": "val_loss at each horizon (validation tasks)"},
            test_split=split_name, test_tasks=cfg.eval_tasks, selection_tasks=cfg.select_tasks,
            reported_metric="test_loss (the task's held-out test split) at the stop / at the horizon; val_loss too",
            lambdas_fixed_a_priori=list(cfg.lambdas), thresholds_fixed_a_priori=list(cfg.thresholds),
            lr_controller_val_every=1, fixed_budgets_restore_best=True,
            best_schedule="lowest mean test-split loss on the evaluation tasks, per base and horizon (the least "
                          "favourable choice for the learned controller)"),
        "stop": stop, "lr": lr_summary, "ablation": ablation, "paired": flat_paired,
        "targets": {
            "learned_stopping": {"steps_saved_bound": cfg.steps_saved_target, "loss_ratio_bound": cfg.loss_bound,
                                 "steps_saved": [saved["value"], saved["ci_low"], saved["ci_high"]],
                                 "loss_ratio": [loss_p["ratio"], loss_p["ci_low"], loss_p["ci_high"]],
                                 "met": stop["target_met"]},
            "learned_lr": {"bound": 1.0, "per": lr_targets,
                           "met": all(v["verdict"] == "met" for v in lr_targets.values())}},
        "seconds": seconds,
    }


def report_text(cfg, summary: Dict[str, Any], split_name: str) -> str:
    """``table.md``: the stopping rules, the learning-rate schedules against the learned controller, the 2x2
    ablation, each with its paired comparisons and per-seed ratios."""
    stop, lr_summary, ablation, seconds = summary["stop"], summary["lr"], summary["ablation"], summary["seconds"]
    chosen, saved, loss_p, stop_met = stop["chosen"], stop["steps_saved"], stop["loss_ratio"], stop["target_met"]
    lines = [f"Evaluation tasks: {split_name}, {cfg.eval_tasks} tasks; {cfg.seeds} meta-training seeds; tuning on "
             f"{cfg.val_tasks} validation tasks; lambda and threshold chosen on {cfg.select_tasks} validation tasks "
             f"of their own stream.", "",
             f"### Learned stopping (MetaNet regression, n_train={cfg.n_train_stop}, Adam lr {stop['adam_lr']:.3g} "
             "under every rule)", ""]
    rows = []
    for name, r in stop["rules"].items():
        s = r["steps_saved"]
        rows.append([name, r["test_loss"], r["val_loss"], r["steps"],
                     f"{100 * s['value']:.1f}% [{100 * s['ci_low']:.1f}, {100 * s['ci_high']:.1f}]",
                     fmt_paired(r["vs_patience10_test_loss"])])
    lines += [markdown_table(["rule", "test loss at stop", "val loss at stop", "steps", f"steps saved vs "
                              f"patience {REFERENCE} [95% CI]", f"test loss / patience {REFERENCE} (paired)"], rows),
              "", f"- chosen on validation tasks: {chosen}; steps saved {100 * saved['value']:.1f}% "
              f"[{100 * saved['ci_low']:.1f}, {100 * saved['ci_high']:.1f}], test-loss ratio {fmt_paired(loss_p)}; "
              f"target (>= {100 * cfg.steps_saved_target:.0f}% and <= {cfg.loss_bound}x, whole intervals): "
              f"{'met' if stop_met else 'not met'}",
              "- per seed: steps saved " + ", ".join(f"{100 * x:.1f}%" for x in saved["per_seed"])
              + "; test-loss ratio " + ", ".join(f"{x:.4f}" for x in loss_p["per_seed_ratio"]), "",
              "### Learned learning rate (MetaNet regression, n_train="
              f"{cfg.n_train_lr}; test-split loss at the horizon)", ""]
    rows = []
    for key, v in lr_summary.items():
        for n in SCHEDULES:
            sv = v["schedules"][n]
            rows.append([key, n + (" (best)" if n == v["best_schedule"] else ""),
                         ", ".join(f"{a}={x:.3g}" for a, x in sv["hparams"].items()), sv["tuning_val_loss"],
                         sv["test_loss"], sv["val_loss"], "-"])
        rows.append([key, f"learned ({cfg.seeds} seeds)", f"lr={v['base_lr']:.3g} x learned", "-",
                     v["learned"]["test_loss"], v["learned"]["val_loss"],
                     fmt_paired(v["paired"]) + f"; {v['verdict']}"])
    lines += [markdown_table(["base@steps", "schedule", "tuned", "val loss (tuning tasks)", "test loss",
                              "val loss", "learned / best (paired)"], rows), "",
              "- per seed, learned / best schedule: " + "; ".join(
                  f"{k} " + ", ".join(f"{x:.4f}" for x in v["paired"]["per_seed_ratio"])
                  for k, v in lr_summary.items()), "",
              "### 2x2 ablation (MetaNet regression, n_train=" f"{cfg.n_train_stop})", ""]
    rows = []
    for name, c in ablation["cells"].items():
        p = ablation["paired"].get(name)
        rows.append([name, c["test_loss"], c["val_loss"], c["steps"],
                     "-" if p is None else fmt_paired(p["test_loss"]),
                     "-" if p is None else f"{100 * p['steps_saved']['value']:.1f}%"])
    lines += [markdown_table(["cell", "test loss at stop", "val loss at stop", "steps",
                              "/ (U_hand, C_hand) (paired)", "steps saved"], rows), "",
              "- per seed, test loss / (U_hand, C_hand): " + "; ".join(
                  f"({c['update']}, {c['control']}) " + ", ".join(
                      f"{x:.4f}" for x in ablation["paired"][name]["test_loss"]["per_seed_ratio"])
                  for name, c in ablation["cells"].items() if name in ablation["paired"]),
              "- one factor at a time: " + "; ".join(f"{w}: {fmt_paired(v['test_loss'])}, steps saved "
                                                     f"{100 * v['steps_saved']['value']:.1f}%"
                                                     for w, v in ablation["one_factor"].items()),
              f"- whole script {summary['total_seconds']:.0f} s (" + ", ".join(f"{k} {v:.0f} s"
                                                                            for k, v in seconds.items()) + ")"]
    return "\n".join(lines)


def report(cfg, summary: dict, sel: dict, split_name: str) -> None:
    """Write ``table.md``, ``summary.json`` and ``pareto.png``."""
    H = cfg.horizon
    save_report(cfg.out_dir, report_text(cfg, summary, split_name), summary)
    chosen = sel["chosen"]
    sel_points = {n: (float(o["steps"].mean()), float(o[H]["val_loss"].mean())) for n, o in sel["hand"].items()}
    sel_points.update({f"learned {k}": (v["mean_steps"], v["mean_val_loss"]) for k, v in sel["selection"].items()})
    eval_points = {n: (r["steps"], r["test_loss"]) for n, r in summary["stop"]["rules"].items()}
    pareto_plot(os.path.join(cfg.out_dir, "pareto.png"), sel_points, eval_points, f"learned {chosen}",
                f"learned ({chosen})", split_name, REFERENCE)
