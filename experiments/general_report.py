"""The general evaluation's statistics and report (issues #23 and #24): per-family records, the headline ratios with
their hierarchical-bootstrap intervals and verdicts, divergences and late spikes over every run, ``summary.json``'s
dict and ``table.md``'s text."""
from __future__ import annotations

from dataclasses import asdict
from typing import Any, Dict, List, Sequence

import numpy as np

from common import markdown_table, test_split_name
from general_checks import group_ratio, role_families
from general_jobs import DEFAULT_NAME, ROWS, SINGLE_NAME, horizons
from stats_common import ci, families_fixed_ci, target

from learned_opt.evaluate import protocol_record
from learned_opt.tasks.suite import SUITE

# key -> (method, horizon index into horizons(): 0 = 1x, 1 = 10x, 2 = 30x, metric); bounds from cfg.bounds
HEADLINES = {
    "train_vs_tuned_adam_1x": ("adam", 0, "train_loss"),
    "train_vs_tuned_adam_10x": ("adam", 1, "train_loss"),
    "test_vs_tuned_adam": ("adam", 0, "test_loss"),
    "train_vs_best_single_adam_lr_1x": (SINGLE_NAME, 0, "train_loss"),
    "train_vs_tuned_adamw_1x": ("adamw", 0, "train_loss"),
    "train_vs_tuned_muon_1x": ("muon", 0, "train_loss"),
    "train_vs_tuned_momentum_1x": ("momentum", 0, "train_loss"),
    "train_vs_adam_default_1x": (DEFAULT_NAME, 0, "train_loss"),
    "train_vs_best_single_adam_lr_10x": (SINGLE_NAME, 1, "train_loss"),
    "test_vs_tuned_adam_10x": ("adam", 1, "test_loss"),
    "train_vs_tuned_adam_30x": ("adam", 2, "train_loss"),
}
BOUNDED = ("train_vs_tuned_adam_1x", "train_vs_tuned_adam_10x", "test_vs_tuned_adam",
           "train_vs_best_single_adam_lr_1x")  # in the order of cfg.bounds


def headline_specs(cfg) -> List[tuple]:
    """``(key, method, horizon, metric)`` of every headline whose method was run (for floors and the shipped seed)."""
    hs = horizons(cfg)
    methods = {"learned", *cfg.baselines, DEFAULT_NAME, SINGLE_NAME}
    return [(k, m, hs[i], metric) for k, (m, i, metric) in HEADLINES.items()
            if m in methods and (i < 2 or cfg.stress_tasks)]


def run_flags(at: Dict[int, Dict[str, np.ndarray]], h: int, spike_factor: float) -> Dict[str, np.ndarray]:
    """Per task of one run to ``h``: ``diverged`` (final whole-split train loss non-finite or above the initial)
    and ``late_spike`` (final above ``spike_factor`` times the smallest whole-split train loss at any checkpoint up
    to ``h``; a diverged run is not also a spike)."""
    final, first = np.asarray(at[h]["train_loss"], float), np.asarray(at[0]["train_loss"], float)
    diverged = ~np.isfinite(final) | (final > first)
    seen = np.stack([np.asarray(at[m]["train_loss"], float) for m in sorted(at) if m <= h])
    with np.errstate(invalid="ignore"):
        low = np.nanmin(np.where(np.isfinite(seen), seen, np.nan), 0)
        spike = ~diverged & (final > spike_factor * low)
    return {"diverged": diverged, "late_spike": spike}


def stability(cfg, runs, fams: Sequence[str], method: str) -> Dict[str, Any]:
    """Divergences and late spikes of ``method`` over every run (seeds, tasks, families and horizons; the 30x
    stress runs for the learned optimizer and tuned Adam, the methods that have them)."""
    hs = horizons(cfg)[:3 if cfg.stress_tasks and method in ("learned", "adam") else 2]
    by_family, n_div, n_spike, n = {}, 0, 0, 0
    for f in fams:
        rec = {}
        for h in hs:
            flags = [run_flags(r["at"], h, cfg.spike_factor) for r in runs.runs_of(f, method, h)]
            d = int(sum(x["diverged"].sum() for x in flags))
            s = int(sum(x["late_spike"].sum() for x in flags))
            k = int(sum(x["diverged"].size for x in flags))
            rec[str(h)] = {"divergences": d, "late_spikes": s, "runs": k}
            n_div, n_spike, n = n_div + d, n_spike + s, n + k
        by_family[f] = rec
    return {"divergences": n_div, "late_spikes": n_spike, "runs": n, "by_family": by_family}


def family_record(cfg, runs, f: str, methods: Sequence[str]) -> Dict[str, Any]:
    """Means, one-family ratios with their intervals and time per step of one family."""
    e = SUITE[f]
    h1, h10, _ = horizons(cfg)
    rec = {"role": e.role, "kind": e.kind, "data": e.data, "loss": e.loss, "description": e.description,
           "horizons": {}, "ratios": {}, "ms_per_step": {}}
    for h in (h1, h10):
        metrics = [m for m in ROWS if m in runs.results[runs.spec(f, "learned", h, "train_loss",
                                                                  seed=runs.seeds[0])]["at"][h]]
        rec["horizons"][str(h)] = {metric: {"tuned_on": ROWS[metric], "mean": {
            m: float(np.mean(runs.values(f, m, h, metric))) for m in methods}} for metric in metrics}
    for key, m, h, metric in headline_specs(cfg):
        r = group_ratio(runs, [f], m, h, metric, floor=cfg.loss_floor, n_boot=cfg.n_boot)
        rec["ratios"][key] = {k: r[k] for k in ("ratio", "ci_low", "ci_high", "per_seed_ratio") if k in r}
    for m in methods:
        rec["ms_per_step"][m] = float(np.mean([r["ms_per_step"] for r in runs.runs_of(f, m, h10)]))
    return rec


def tuned_record(runs, fams: Sequence[str], baselines: Sequence[str]) -> Dict[str, Any]:
    """Every tuned setting with its score, search edges (interior or not) and size."""
    return {f: {n: {f"{h}/{m}": {"hparams": tb.hparams, "score": tb.score, "edges": tb.edges,
                                  "at_grid_edge": any(v == "grid" for v in tb.edges.values()),
                                  "points_searched": len(tb.table)}
                    for (h, m), tb in sorted(runs.tuned[(f, n)].items())} for n in baselines} for f in fams}


def summarize(cfg, prov: Dict[str, Any], fams: Sequence[str], runs, bench: Dict[str, Any],
              timing: Dict[str, Any], methods: Sequence[str]) -> Dict[str, Any]:
    """``summary.json``'s dict: headline targets per role (held-out ones bounded), stability, step time, the
    protocol record, the tuned settings, the single rate and the per-family records."""
    h1, h10, h30 = horizons(cfg)
    heldout = role_families(fams, "heldout")
    summary: Dict[str, Any] = {"config": asdict(cfg), "provenance": prov, "seeds": runs.seeds,
                               "families_evaluated": list(fams), "horizons": {"1x": h1, "10x": h10, "30x": h30}}
    bounds = dict(zip(BOUNDED, cfg.bounds))
    for role, prefix in (("heldout", ""), ("meta", "meta_")):
        group = role_families(fams, role)
        for key, m, h, metric in (headline_specs(cfg) if group else []):
            rec = group_ratio(runs, group, m, h, metric, floor=cfg.loss_floor, n_boot=cfg.n_boot)
            summary[prefix + key] = target(rec, bounds.get(key) if role == "heldout" else None)
    learned = stability(cfg, runs, fams, "learned")
    summary["divergences"] = {"count": learned["divergences"], "runs": learned["runs"], "bound": 0,
                              "met": learned["divergences"] == 0, "by_family": learned["by_family"],
                              "definition": "learned optimizer's evaluation runs (every seed, task, family and "
                                            "horizon, 30x included) whose final whole-split train loss is "
                                            "non-finite or above the initial one"}
    frac = learned["late_spikes"] / max(learned["runs"], 1)
    summary["late_spikes"] = {"count": learned["late_spikes"], "runs": learned["runs"], "fraction": frac,
                              "bound": cfg.spike_bound, "met": frac <= cfg.spike_bound,
                              "definition": f"final whole-split train loss above {cfg.spike_factor:g}x the run's "
                                            f"smallest at its {cfg.checkpoints} evenly spaced checkpoints (not "
                                            "counting diverged runs)"}
    summary["baseline_stability"] = {m: {k: v for k, v in stability(cfg, runs, fams, m).items() if k != "by_family"}
                                     for m in methods if m != "learned"}
    for size, rec in bench.items():
        summary[f"step_time_over_adamw_{size}"] = target(rec, dict(zip(cfg.bench_sizes, cfg.step_bounds))[size])
    summary["targets_met"] = {k: summary[k]["met"] for k in (*[b for b in BOUNDED if b in summary], "divergences",
                                                              "late_spikes", *[f"step_time_over_adamw_{s}"
                                                                               for s in bench])}
    summary["protocol"] = protocol_record(
        meta_training_seeds=len(runs.seeds), validation_tasks=cfg.tune_tasks, baseline_tuning_tasks=cfg.tune_tasks,
        heldout_families=len(heldout), tasks_per_heldout_family=cfg.test_tasks, stress_tasks=cfg.stress_tasks,
        tuning_metric={"train_loss": "whole-split train loss at the horizon",
                       "test_loss": "validation-split loss at the horizon",
                       "accuracy": "validation-split loss at the horizon"},
        test_split=test_split_name(cfg), test_tasks=cfg.test_tasks, lr_resolution_decades=cfg.resolution,
        tuned_hyperparameters=f"at h1 the learning rate and every axis of learned_opt.evaluate.baselines."
                              f"PROTOCOL_AXES (coordinate search, each axis widened until interior), per family and "
                              f"tuning metric; at h10 " + ("every axis again" if cfg.long_axes == "all" else
                                                          "the learning rate again, the other axes as tuned for h1 "
                                                          "on the same metric (long_axes='lr')"),
        lr_axis=f"{cfg.grid_low:g} .. {cfg.grid_high:g}, {cfg.per_decade} per decade, widened until interior",
        tuning_stream="tune", single_rate="Adam (default betas, eps) at the one rate of a shared grid "
                                          f"({cfg.single_low:g} .. {cfg.single_high:g}, {cfg.single_per_decade} per "
                                          "decade) with the smallest mean over families of log(score / the "
                                          "family's best), on the same validation tasks, per horizon",
        untuned=["learned (every seed)", f"adam lr {cfg.default_lr:g}"],
        horizons=[h1, h10] + ([h30] if cfg.stress_tasks else []),
        stress_run=f"{h30} steps on {cfg.stress_tasks} tasks per family; Adam at its rate tuned for {h10}",
        learned_runs="separately at each horizon (its scheduler reads the fraction done)",
        ratio="geometric mean over families of the family's geometric mean over seeds x tasks of per-task ratios; "
              "nested bootstrap over families, tasks within each family and seeds within each task (families_fixed: "
              "the same with the families held fixed)", loss_floor=cfg.loss_floor)
    summary["single_adam_rate"] = {str(h): runs.single[h] for h in (h1, h10)}
    summary["tuned"] = tuned_record(runs, fams, cfg.baselines)
    summary["families"] = {f: family_record(cfg, runs, f, methods) for f in fams}
    summary["seconds"] = {**{k: v for k, v in timing.items() if k != "start"}}
    return summary


def report(cfg, summary: Dict[str, Any], fams: Sequence[str]) -> str:
    """``table.md``'s main text: per-family ratios, the targets and the stability counts."""
    keys = [k for k, *_ in headline_specs(cfg)]
    cols = [k for k in ("train_vs_tuned_adam_1x", "train_vs_tuned_adam_10x", "test_vs_tuned_adam",
                        "train_vs_best_single_adam_lr_1x", "train_vs_tuned_muon_1x") if k in keys]
    rows = [[f, summary["families"][f]["role"], summary["families"][f]["kind"]]
            + [ci(summary["families"][f]["ratios"][k]) for k in cols] for f in fams]
    h = summary["horizons"]
    lines = [f"General learned optimizer ({len(summary['seeds'])} seeds, untuned) vs baselines tuned per family, "
             f"horizon and metric (every hyper-parameter) on {cfg.tune_tasks} validation tasks each; evaluation: "
             f"{test_split_name(cfg)}, {cfg.test_tasks} tasks per family; horizons 1x = {h['1x']}, 10x = {h['10x']}"
             + (f", 30x = {h['30x']} ({cfg.stress_tasks} tasks)" if cfg.stress_tasks else "")
             + ". Ratios: learned / baseline (final whole-split loss), geometric mean over seeds x tasks [95% CI: "
             "nested bootstrap]; targets resample the families too.", "",
             markdown_table(["family", "role", "kind"] + cols, rows), "",
             "| target | bound | ratio [95% CI] | families fixed | per-seed t interval | verdict |",
             "|---|---|---|---|---|---|"]
    for k in [k for k in summary if k in keys or (k.startswith("meta_") and k[5:] in keys)]:
        v = summary[k]
        seed_ci = v.get("per_seed_t_ci")
        seed_txt = f"[{seed_ci[0]:.3g}, {seed_ci[1]:.3g}]" if seed_ci else "-"
        lines.append(f"| {k} | {v['bound']} | {ci(v)} | {families_fixed_ci(v)} | {seed_txt} | {v['verdict']} |")
    d, s = summary["divergences"], summary["late_spikes"]
    lines.append(f"| divergences (learned) | 0 | {d['count']} of {d['runs']} runs | - | - | "
                 f"{'met' if d['met'] else 'not met'} |")
    lines.append(f"| late spikes (learned) | <= {s['bound']} | {s['count']} of {s['runs']} ({s['fraction']:.3f}) | - "
                 f"| - | {'met' if s['met'] else 'not met'} |")
    for size in cfg.bench_sizes:
        v = summary[f"step_time_over_adamw_{size}"]
        lines.append(f"| step time / AdamW, {size} params | {v['bound']} | {ci(v)} | - | - | {v['verdict']} |")
    lines += ["", "Stability of the baselines (every run): " + "; ".join(
        f"{m} {r['divergences']} divergences, {r['late_spikes']} late spikes of {r['runs']}"
        for m, r in summary["baseline_stability"].items()),
        "", "Single Adam rate for the whole suite: " + ", ".join(
            f"{hh} steps: {r['lr']:g}{' (grid edge)' if r['at_grid_edge'] else ''}"
            for hh, r in summary["single_adam_rate"].items())]
    return "\n".join(lines)
