"""Does the general learned optimizer, untuned, beat baselines tuned per task family? (issue #12, item 5)

After the evaluations of VeLO (Metz et al. 2022) and Celo (Moudgil et al. 2025): one pretrained learned optimizer
(a :class:`~learned_opt.optim.normmlp.NormMLP` meta-trained by ``experiments/general_train.py`` on the suite's
meta-training mixture) runs with no tuning at all on every family of :mod:`learned_opt.tasks.suite`, meta-training
and held-out alike, against hand-coded baselines whose learning rate is tuned for each family and horizon.

For every suite family and two horizons, ``h1 = horizon`` and ``h10 = 10 * horizon``:

1. Adam, AdamW and SGD with momentum (``momentum``) are tuned per family and per horizon on ``tune_tasks``
   validation tasks of that family (stream ``tune``), separately for the metric each row reports: the train-loss
   row uses the rate tuned on the whole-split train loss, the held-out rows (test loss, test accuracy) the rate
   tuned on the validation loss. The learning rate only (log axis ``grid_low .. grid_high``, widened until the best
   rate is interior, refined to ``resolution`` decades); betas, momentum and weight decay stay at their defaults
   (Adam/AdamW betas (0.9, 0.999), AdamW weight decay 1e-2, momentum 0.9).
2. On ``test_tasks`` evaluation tasks (``--final true``: the final-test split; otherwise validation tasks of stream
   ``dev``) run: the learned optimizer of every seed in ``train_dir`` (untuned, its own learned scheduler; run
   separately at h1 and at h10 because its scheduler reads the fraction of the run done), the tuned baselines,
   Adam at lr 1e-3 (untuned) and the digits flagship (``digits_lstm``, untuned). Hand-coded baselines and the
   flagship do not read the horizon: one run to the longest horizon a setting serves gives every shorter one.
3. Per family, horizon and metric: means, :func:`paired` comparisons of the learned optimizer against every other
   method, time per step and divergences (final whole-split train loss non-finite or above the initial one).
   Targets (``met`` only when the whole bootstrap interval clears the bound): the geometric mean over held-out
   families of learned / tuned Adam (train loss at h1 <= 1.0, at h10 <= 1.2; test loss at h1 <= 1.0), against Adam
   at lr 1e-3 (<= 0.5); no divergence of the learned optimizer; its full training step on a 784-256-10 MLP at most
   3x Adam's.

Writes ``{out_dir}/{summary.json, table.md, curves.png}``; tuning scores are cached in ``out_dir/tuning_cache``
(validation tasks only, so a development run and the final run share it).

    python experiments/general.py --final true --workers 2   # the reported numbers
    python experiments/general.py                            # development: validation tasks of stream 'dev'
    python experiments/general.py --preset smoke             # seconds; used by the tests
"""
from __future__ import annotations

import math
import os
import re
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (ProtocolConfig, eval_split, fmt_paired, markdown_table, paired, parallel_map,  # noqa: E402
                    parse_config, provenance, run_main, test_split_name, verdict, save_report, LOSS_FLOOR,
                    floored)

from learned_opt.evaluate import default_lr_axis, evaluate, protocol_record, tune_baseline  # noqa: E402
from learned_opt.optim import get_optimizer  # noqa: E402
from learned_opt.tasks.suite import SUITE, suite_family  # noqa: E402

LONG = 10  # the long horizon is LONG x the short one
# reported metric -> the metric its baselines are tuned on (validation tasks): each row's own
ROWS = {"train_loss": "train_loss", "test_loss": "val_loss", "accuracy": "val_loss"}
DEFAULT_NAME = "adam_lr1e-3"  # Adam at its default rate, untuned
HEAVY_KINDS = ("cnn", "rnn", "transformer")  # scheduled first, so that the workers finish together


@dataclass
class Config(ProtocolConfig):
    """General learned optimizer vs per-family tuned baselines; every field is a command-line flag."""
    seeds: int = 3  # the least number of seeds train_dir must hold (every seed found there is evaluated)
    val_tasks: int = 0  # unused here: the baselines are tuned on --tune_tasks validation tasks per family
    tune_tasks: int = 4  # validation tasks per family the baselines are tuned on (below the protocol's 20: cost)
    test_tasks: int = 5
    horizon: int = 200  # h1; h10 = 10 x horizon
    families: tuple = ()  # suite family names (default: every family of the suite)
    baselines: tuple = ("adam", "adamw", "momentum")
    grid_low: float = 1e-4  # the starting grid; the search widens it until the best rate is interior
    grid_high: float = 1.0
    per_decade: int = 2
    resolution: float = 0.25  # decades the learning rate is refined to
    default_lr: float = 1e-3  # the untuned Adam
    flagship: str = "digits_lstm"  # pretrained name of the previous flagship ("" to leave it out)
    train_dir: str = "results/general/train"  # general_train.py's out_dir: seed{N}/lopt.pt
    bench_reps: int = 15  # interleaved repetitions of the step-time benchmark
    bench_steps: int = 20  # training steps per repetition
    n_boot: int = 4000
    out_dir: str = "results/general"
    cache_dir: str = ""  # default: out_dir/tuning_cache


PRESETS = {
    "smoke": dict(seeds=2, tune_tasks=2, test_tasks=2, horizon=5, families=("logistic_regression", "wine_mlp"),
                  grid_low=1e-3, grid_high=1.0, per_decade=1, resolution=0.5, bench_reps=3, bench_steps=2,
                  n_boot=500, train_dir="runs/general_train_smoke", out_dir="runs/general_smoke"),
}


def family_names(cfg: Config) -> tuple:
    """The evaluated families, in suite order."""
    return tuple(n for n in SUITE if n in cfg.families) if cfg.families else tuple(SUITE)


def horizons(cfg: Config) -> tuple:
    """(h1, h10)."""
    return cfg.horizon, LONG * cfg.horizon


def seed_paths(train_dir: str) -> dict:
    """``{seed: path}`` of every ``seed{N}/lopt.pt`` in ``train_dir``."""
    found = {}
    if os.path.isdir(train_dir):
        for d in os.listdir(train_dir):
            m = re.fullmatch(r"seed(\d+)", d)
            if m and os.path.isfile(os.path.join(train_dir, d, "lopt.pt")):
                found[int(m.group(1))] = os.path.join(train_dir, d, "lopt.pt")
    return dict(sorted(found.items()))


def lr_axis(cfg: Config):
    """The learning-rate axis every baseline is tuned on."""
    return default_lr_axis(cfg.grid_low, cfg.grid_high, cfg.per_decade)


# ------------------------------------------------------------------------------------------------------ jobs
def run_job(cfg: Config, spec: tuple):
    """One independent job, on one thread: ``('tune', family, baseline)`` tunes a baseline's rate for both
    horizons and both tuning metrics; ``('learned', family, seed, steps)``, ``('baseline', family, name, lr,
    steps)`` and ``('flagship', family, steps)`` evaluate one method (per-task metrics at step 0, at h1 when the
    run passes it, and at the end; mean minibatch curve; wall time)."""
    torch.set_num_threads(1)
    kind, fam = spec[0], spec[1]
    family = suite_family(fam)
    start = time.perf_counter()
    if kind == "tune":
        out = tune_baseline(spec[2], family, horizons=horizons(cfg), metrics=sorted(set(ROWS.values())),
                            num_tasks=cfg.tune_tasks, lr_axis=lr_axis(cfg), extra=(),
                            cache_dir=cfg.cache_dir or os.path.join(cfg.out_dir, "tuning_cache"),
                            resolution=cfg.resolution)
        return {"tuned": out, "seconds": time.perf_counter() - start}
    if kind == "learned":
        from learned_opt.meta import load_lopt

        net = load_lopt(seed_paths(cfg.train_dir)[spec[2]])
        opt, ctrl, steps = net, net.as_controller, spec[3]
    elif kind == "baseline":
        opt, ctrl, steps = get_optimizer(spec[2], lr=spec[3]), None, spec[4]
    elif kind == "flagship":
        from learned_opt import pretrained

        net = pretrained.load(cfg.flagship)
        opt, ctrl, steps = net, net.as_controller, spec[2]
    else:
        raise ValueError(f"unknown job {kind!r}")
    marks = tuple(m for m in (0, cfg.horizon) if m < steps)
    res = evaluate(family, opt, ctrl, num_tasks=cfg.test_tasks, steps=steps, checkpoints=marks, **eval_split(cfg))
    seconds = time.perf_counter() - start
    c = np.where(np.isfinite(res.curves), res.curves, np.nan)
    with np.errstate(all="ignore"):
        curve = np.nanmean(c, 0) if np.isfinite(c).any() else np.full(c.shape[1], np.nan)
    return {"at": res.at, "curve": curve, "seconds": seconds, "ms_per_step": 1e3 * seconds / (steps * cfg.test_tasks)}


def step_time_bench(cfg: Config, lopt_path: str) -> dict:
    """Full training step (forward, backward, optimizer step) of the learned optimizer over ``torch.optim.Adam``'s on
    a 784-256-10 ReLU MLP (about 200k parameters), batch 128, random data, one thread; repetitions of
    ``bench_steps`` steps alternate which optimizer goes first; the ratio of the medians, with a bootstrap interval
    over repetitions."""
    import torch.nn as nn
    import torch.nn.functional as F

    from learned_opt.meta import load_lopt
    from learned_opt.optim.adapter import ProtocolOptimizer

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(128, 784, generator=g), torch.randint(0, 10, (128,), generator=g)

    def model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 10))

    m_l, m_a = model(), model()
    total = (cfg.bench_reps + 1) * cfg.bench_steps
    runs = {"learned": (m_l, ProtocolOptimizer(m_l.parameters(), load_lopt(lopt_path), total_steps=total)),
            "adam": (m_a, torch.optim.Adam(m_a.parameters(), lr=1e-3))}

    def per_step(name):
        net, opt = runs[name]
        t = time.perf_counter()
        for _ in range(cfg.bench_steps):
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(net(x), y)
            loss.backward()
            opt.step(loss=loss) if name == "learned" else opt.step()
        return (time.perf_counter() - t) / cfg.bench_steps

    per_step("learned"), per_step("adam")  # warm-up (allocations, first-call costs)
    times = {"learned": [], "adam": []}
    for r in range(cfg.bench_reps):
        for name in (("learned", "adam") if r % 2 == 0 else ("adam", "learned")):
            times[name].append(per_step(name))
    L, A = np.array(times["learned"]), np.array(times["adam"])
    idx = np.random.default_rng(0).integers(0, len(L), size=(cfg.n_boot, len(L)))
    boot = np.median(L[idx], 1) / np.median(A[idx], 1)
    lo, hi = _interval(boot)
    return {"ratio": float(np.median(L) / np.median(A)), "ci_low": lo, "ci_high": hi,
            "learned_ms": 1e3 * float(np.median(L)), "adam_ms": 1e3 * float(np.median(A)),
            "params": sum(p.numel() for p in m_a.parameters()), "reps": cfg.bench_reps, "steps": cfg.bench_steps,
            "lopt": lopt_path}


# ---------------------------------------------------------------------------------------------- statistics
def _interval(boot: np.ndarray, level: float = 0.95) -> tuple:
    """Percentile interval by order statistics (safe with infinite values)."""
    s = np.sort(np.where(np.isnan(boot), np.inf, boot))
    n = len(s)
    return float(s[int(math.floor((1 - level) / 2 * (n - 1)))]), float(s[int(math.ceil((1 + level) / 2 * (n - 1)))])


def log_ratios(learned: np.ndarray, baseline: np.ndarray, floor: float = LOSS_FLOOR) -> np.ndarray:
    """Per-task log(learned / baseline), ``(seeds, tasks)``: a non-finite learned value is an infinite ratio, 0 / 0
    a tie (the convention of :func:`paired`). Finite values below ``floor`` count as ``floor``: tuned Adam drives the
    train loss of the small tabular sets to exactly 0.0 in float32, where a ratio would measure rounding (and be
    infinite), not optimisation."""
    L = np.atleast_2d(np.asarray(learned, float))
    B = np.broadcast_to(np.asarray(baseline, float), L.shape)
    if floor > 0:
        L = np.where(np.isfinite(L), np.maximum(L, floor), L)
        B = np.where(np.isfinite(B), np.maximum(B, floor), B)
    with np.errstate(all="ignore"):
        R = np.where(np.isfinite(L), L, np.inf) / B
        R = np.where(np.isnan(R), np.where(L <= B, 1.0, np.inf), R)
        return np.log(R)


def gmean_ratio(per_family: dict, *, n_boot: int = 4000, seed: int = 0, level: float = 0.95) -> dict:
    """Geometric mean over families of each family's ratio (the geometric mean over seeds x tasks of the per-task
    ratios), with a bootstrap interval resampling seeds and tasks within every family (families fixed).

    ``per_family``: ``{family: (learned (seeds, tasks), baseline (tasks,) or (seeds, tasks))}``."""
    if not per_family:
        return {"ratio": math.nan, "ci_low": math.nan, "ci_high": math.nan, "families": {}, "nonfinite_tasks": 0}
    rng = np.random.default_rng(seed)
    fam_log, boot, nonfinite = {}, np.zeros(n_boot), 0
    for name, (learned, baseline) in per_family.items():
        lr = log_ratios(learned, baseline)
        S, T = lr.shape
        nonfinite += int((~np.isfinite(lr)).sum())
        with np.errstate(invalid="ignore"):
            fam_log[name] = float(lr.mean())
            si, ti = rng.integers(0, S, size=(n_boot, S)), rng.integers(0, T, size=(n_boot, T))
            boot = boot + lr[si[:, :, None], ti[:, None, :]].mean(axis=(1, 2))
    k = len(per_family)
    with np.errstate(invalid="ignore", over="ignore"):
        point = float(np.exp(sum(fam_log.values()) / k))
        lo, hi = _interval(np.exp(boot / k), level)
    nan_inf = lambda v: math.inf if math.isnan(v) else v  # noqa: E731  (+inf and -inf together: unresolved)
    return {"ratio": nan_inf(point), "ci_low": lo, "ci_high": hi,
            "families": {n: nan_inf(float(np.exp(v))) for n, v in fam_log.items()}, "nonfinite_tasks": nonfinite}


def target(record: dict, bound) -> dict:
    """``record`` with its bound, ``verdict`` and ``met`` (whole interval at or below ``bound``); ``bound=None``:
    reported, no target."""
    if bound is None:
        return {**record, "bound": None, "met": None, "verdict": "reported (no target)"}
    ok = not any(math.isnan(record[k]) for k in ("ci_low", "ci_high"))
    v = verdict(record, bound) if ok else "not met (undefined interval)"
    return {**record, "bound": bound, "met": v == "met", "verdict": v}


def diverged(at: dict, h: int) -> np.ndarray:
    """Per task: the final whole-split train loss at ``h`` is non-finite or above the initial one."""
    final, first = np.asarray(at[h]["train_loss"], float), np.asarray(at[0]["train_loss"], float)
    return ~np.isfinite(final) | (final > first)


# ---------------------------------------------------------------------------------------------------- main
def main(argv=None) -> dict:
    """Tune, evaluate, compare; write summary.json, table.md and curves.png."""
    cfg = parse_config(Config, PRESETS, argv)
    torch.set_num_threads(1)
    fams = family_names(cfg)
    bad = [f for f in cfg.families if f not in SUITE]
    if bad:
        sys.exit(f"error: unknown suite family {bad[0]!r}; known: {', '.join(SUITE)}")
    if cfg.val_tasks:
        sys.exit("error: this script tunes on --tune_tasks validation tasks per family; --val_tasks is not used")
    if min(cfg.tune_tasks, cfg.test_tasks, cfg.horizon, cfg.seeds, cfg.per_decade, cfg.bench_reps,
           cfg.bench_steps) < 1:
        sys.exit("error: --tune_tasks, --test_tasks, --horizon, --seeds, --per_decade, --bench_reps and "
                 "--bench_steps must be >= 1")
    if "adam" not in cfg.baselines:
        sys.exit("error: the targets compare with tuned Adam: --baselines must include adam")
    paths = seed_paths(cfg.train_dir)
    if len(paths) < cfg.seeds:
        sys.exit(f"error: {cfg.train_dir} holds {len(paths)} meta-trained seeds (seed{{N}}/lopt.pt), fewer than "
                 f"--seeds {cfg.seeds}: run experiments/general_train.py first")
    seeds = list(paths)
    prov = provenance()  # before any output is written
    os.makedirs(cfg.out_dir, exist_ok=True)
    h1, h10 = horizons(cfg)
    t_start = time.perf_counter()

    # 0. The step-time benchmark first, alone on its thread (no worker competes with it).
    bench = step_time_bench(cfg, paths[seeds[0]])
    t_bench = time.perf_counter() - t_start

    # 1. Tuning (validation tasks only) and every evaluation that needs no tuned rate, as one pool of jobs; the
    # expensive families first so the workers finish together.
    light = lambda f: SUITE[f].kind not in HEAVY_KINDS  # noqa: E731  (False sorts first: heavy families)
    tune_specs = [("tune", f, n) for f in sorted(fams, key=light) for n in cfg.baselines]
    free_specs = [("learned", f, s, h) for f in sorted(fams, key=light) for h in (h10, h1) for s in seeds]
    free_specs += [("baseline", f, "adam", cfg.default_lr, h10) for f in fams]
    free_specs += [("flagship", f, h10) for f in fams] if cfg.flagship else []
    t0 = time.perf_counter()
    out_a = parallel_map(run_job, [(cfg, s) for s in tune_specs + free_specs], cfg.workers)
    t_phase_a = time.perf_counter() - t0
    tuned = {(s[1], s[2]): o["tuned"] for s, o in zip(tune_specs, out_a)}
    tune_seconds = {f"{s[1]}/{s[2]}": o["seconds"] for s, o in zip(tune_specs, out_a)}
    free = dict(zip(free_specs, out_a[len(tune_specs):]))

    # 2. The tuned baselines: one run per distinct tuned rate, to the longest horizon it serves.
    serve = {}  # (family, name, lr) -> longest horizon
    for (f, n), t in tuned.items():
        for (h, _), tb in t.items():
            key = (f, n, tb.hparams["lr"])
            serve[key] = max(serve.get(key, 0), h)
    base_specs = [("baseline", f, n, lr, h) for (f, n, lr), h in serve.items()]
    t0 = time.perf_counter()
    base_runs = dict(zip(base_specs, parallel_map(run_job, [(cfg, s) for s in base_specs], cfg.workers)))
    t_phase_b = time.perf_counter() - t0

    def tuned_run(f, n, h, metric):
        """The evaluation run of baseline ``n`` tuned for (``h``, the tuning metric of ``metric``'s row)."""
        lr = tuned[(f, n)][(h, ROWS[metric])].hparams["lr"]
        return base_runs[("baseline", f, n, lr, serve[(f, n, lr)])]

    def values(f, method, h, metric):
        """Per-task values ``(seeds or 1, tasks)`` of ``method`` on ``metric`` at ``h``."""
        if method == "learned":
            v = np.stack([free[("learned", f, s, h)]["at"][h][metric] for s in seeds])
        elif method == DEFAULT_NAME:
            v = free[("baseline", f, "adam", cfg.default_lr, h10)]["at"][h][metric][None]
        elif method == cfg.flagship:
            v = free[("flagship", f, h10)]["at"][h][metric][None]
        else:
            v = tuned_run(f, method, h, metric)["at"][h][metric][None]
        return v

    def lower(f, method, h, metric):
        """:func:`values` with lower better (accuracy as the error rate), for ratios."""
        v = values(f, method, h, metric)
        return 1.0 - v if metric == "accuracy" else v

    def runs_of(f, method, h):
        """Every run of ``method`` that reports horizon ``h`` (the tuned baselines: both tuning metrics)."""
        if method == "learned":
            return [free[("learned", f, s, h)] for s in seeds]
        if method == DEFAULT_NAME:
            return [free[("baseline", f, "adam", cfg.default_lr, h10)]]
        if method == cfg.flagship:
            return [free[("flagship", f, h10)]]
        lrs = {tuned[(f, method)][(h, m)].hparams["lr"] for m in set(ROWS.values())}
        return [base_runs[("baseline", f, method, lr, serve[(f, method, lr)])] for lr in sorted(lrs)]

    methods = ["learned", *cfg.baselines, DEFAULT_NAME] + ([cfg.flagship] if cfg.flagship else [])

    # 3. Per family: means, paired comparisons, time per step, divergences.
    fam_out, curves = {}, {}
    for f in fams:
        e = SUITE[f]
        metrics = [m for m in ROWS if m in free[("learned", f, seeds[0], h1)]["at"][h1]]
        rec = {"role": e.role, "kind": e.kind, "data": e.data, "loss": e.loss, "description": e.description,
               "horizons": {}, "ms_per_step": {}, "divergences": {}}
        for h in (h1, h10):
            hr = rec["horizons"][str(h)] = {}
            for metric in metrics:
                L = lower(f, "learned", h, metric)
                row = {"reported": metric, "tuned_on": ROWS[metric], "mean": {}, "median": {},
                       "paired_on": "test error rate (1 - accuracy)" if metric == "accuracy" else metric,
                       "paired": {}}
                for m in methods:
                    v = values(f, m, h, metric)
                    row["mean"][m], row["median"][m] = float(v.mean()), float(np.median(v))
                    if m != "learned":
                        row["paired"][m] = paired(floored(L), floored(lower(f, m, h, metric)), n_boot=cfg.n_boot)
                hr[metric] = row
            for m in methods:
                rec["divergences"].setdefault(m, {})[str(h)] = int(sum(diverged(r["at"], h).sum()
                                                                       for r in runs_of(f, m, h)))
        for m in methods:
            rec["ms_per_step"][m] = float(np.mean([r["ms_per_step"] for r in runs_of(f, m, h10)]))
        rec["ms_per_step"]["learned@h1"] = float(np.mean([r["ms_per_step"] for r in runs_of(f, "learned", h1)]))
        # the one-family ratios of the table, with their bootstrap intervals
        best = min(cfg.baselines, key=lambda n: rec["horizons"][str(h1)]["train_loss"]["mean"][n])
        rec["best_tuned_at_h1"] = best

        def one(m, h, metric, f=f):
            return gmean_ratio({f: (values(f, "learned", h, metric), values(f, m, h, metric))}, n_boot=cfg.n_boot)

        rec["gmean_ratios"] = {"vs_tuned_adam_1x": one("adam", h1, "train_loss"),
                               "vs_tuned_adam_10x": one("adam", h10, "train_loss"),
                               "vs_adam_default_1x": one(DEFAULT_NAME, h1, "train_loss"),
                               "vs_best_tuned_1x": {**one(best, h1, "train_loss"), "baseline": best},
                               "test_loss_vs_tuned_adam_1x": one("adam", h1, "test_loss")}
        fam_out[f] = rec
        curves[f] = {"learned": np.nanmean(np.stack([r["curve"] for r in runs_of(f, "learned", h10)]), 0)}
        for n in cfg.baselines:
            curves[f][f"{n} (tuned)"] = tuned_run(f, n, h10, "train_loss")["curve"]
        curves[f]["adam 1e-3"] = runs_of(f, DEFAULT_NAME, h10)[0]["curve"]
        if cfg.flagship:
            curves[f][cfg.flagship] = runs_of(f, cfg.flagship, h10)[0]["curve"]

    # 4. Targets: geometric means over families, per role.
    summary = {"config": asdict(cfg), "provenance": prov, "seeds": seeds, "families_evaluated": list(fams)}
    for prefix, bounds in (("heldout", (1.0, 1.2, 1.0, 0.5)), ("meta", (None,) * 4)):
        group = [f for f in fams if SUITE[f].role == prefix]

        def g(method, h, metric, group=group):
            return gmean_ratio({f: (values(f, "learned", h, metric), values(f, method, h, metric)) for f in group},
                               n_boot=cfg.n_boot)

        for key, rec, bound in ((f"{prefix}_gmean_ratio_vs_tuned_adam_1x", g("adam", h1, "train_loss"), bounds[0]),
                                (f"{prefix}_gmean_ratio_vs_tuned_adam_10x", g("adam", h10, "train_loss"), bounds[1]),
                                (f"{prefix}_test_loss_gmean_ratio_vs_tuned_adam", g("adam", h1, "test_loss"),
                                 bounds[2]),
                                (f"{prefix}_gmean_ratio_vs_adam_default", g(DEFAULT_NAME, h1, "train_loss"),
                                 bounds[3])):
            summary[key] = target(rec, bound)
    div = {f: {h: fam_out[f]["divergences"]["learned"][h] for h in (str(h1), str(h10))} for f in fams}
    n_div = sum(sum(d.values()) for d in div.values())
    summary["divergences"] = {"count": n_div, "runs": len(seeds) * cfg.test_tasks * 2 * len(fams),
                              "by_family": div, "bound": 0, "met": n_div == 0,
                              "definition": "learned optimizer's evaluation runs (every seed, task, family and "
                                            "horizon) whose final whole-split train loss is non-finite or above "
                                            "the initial one"}
    summary["step_time_over_adam_mlp200k"] = target(bench, 3.0)
    target_keys = [k for k in summary if k.startswith("heldout_")] + ["divergences", "step_time_over_adam_mlp200k"]
    summary["targets_met"] = {k: summary[k]["met"] for k in target_keys}
    summary["protocol"] = protocol_record(
        meta_training_seeds=len(seeds), validation_tasks=cfg.tune_tasks,
        tuning_metric={"train_loss": "whole-split train loss at the horizon",
                       "test_loss": "validation-split loss at the horizon",
                       "accuracy": "validation-split loss at the horizon"},
        test_split=test_split_name(cfg), test_tasks=cfg.test_tasks, lr_resolution_decades=cfg.resolution,
        tuned_hyperparameters="learning rate only, per family and per horizon; betas (0.9, 0.999), AdamW weight "
                              "decay 1e-2 and momentum 0.9 at their defaults",
        lr_axis=f"{cfg.grid_low:g} .. {cfg.grid_high:g}, {cfg.per_decade} per decade, widened until interior",
        validation_tasks_per_family=cfg.tune_tasks, tuning_stream="tune",
        untuned=["learned (every seed)", f"adam lr {cfg.default_lr:g}"] + ([cfg.flagship] if cfg.flagship else []),
        horizons=[h1, h10], learned_runs="separately at each horizon (its scheduler reads the fraction done)",
        ratio="geometric mean over families of the family's geometric mean over seeds x tasks of per-task ratios; "
              "bootstrap over seeds and tasks within each family")
    summary["tuned"] = {f: {n: {f"{h}/{m}": {"hparams": tb.hparams, "score": tb.score, "edges": tb.edges,
                                              "at_grid_edge": any(v == "grid" for v in tb.edges.values()),
                                              "points_searched": len(tb.table)}
                                for (h, m), tb in sorted(tuned[(f, n)].items())} for n in cfg.baselines}
                        for f in fams}
    summary["families"] = fam_out
    summary["seconds"] = {"step_time_bench": t_bench, "tuning_and_untuned_evals_wall": t_phase_a,
                          "tuned_evals_wall": t_phase_b, "tuning_job": tune_seconds,
                          "eval_jobs_cpu": float(sum(o["seconds"] for o in free.values())
                                                 + sum(o["seconds"] for o in base_runs.values())),
                          "tuning_jobs_cpu": float(sum(tune_seconds.values())),
                          "total": time.perf_counter() - t_start}

    # 5. The table and the figure.
    def ci(r):
        return f"{r['ratio']:.3g} [{r['ci_low']:.3g}, {r['ci_high']:.3g}]"

    rows, table_rows = [], []
    for f in fams:
        r = fam_out[f]
        gr = r["gmean_ratios"]
        acc = r["horizons"][str(h1)].get("accuracy")
        acc_txt = f"{acc['mean']['learned']:.3f} / {acc['mean']['adam']:.3f}" if acc else "-"
        d = r["divergences"]["learned"]
        row = [f, r["role"], r["kind"], r["data"], ci(gr["vs_tuned_adam_1x"]), ci(gr["vs_tuned_adam_10x"]),
               ci(gr["vs_adam_default_1x"]), ci(gr["vs_best_tuned_1x"]) + f" ({r['best_tuned_at_h1']})",
               ci(gr["test_loss_vs_tuned_adam_1x"]), acc_txt,
               f"{d[str(h1)] + d[str(h10)]} / {2 * len(seeds) * cfg.test_tasks}"]
        rows.append(row)
        table_rows.append(dict(zip(["family", "role", "kind", "data", "vs_tuned_adam_1x", "vs_tuned_adam_10x",
                                    "vs_adam_default_1x", "vs_best_tuned_1x", "test_loss_vs_tuned_adam_1x",
                                    "accuracy_learned_over_adam", "divergences_learned"], row)))
    summary["table"] = table_rows
    header = ["family", "role", "kind", "data", f"vs tuned Adam @{h1}", f"vs tuned Adam @{h10}",
              f"vs Adam {cfg.default_lr:g} @{h1}", f"vs best tuned @{h1}", f"test loss vs tuned Adam @{h1}",
              f"accuracy learned / Adam @{h1}", "divergences (learned)"]
    lines = [f"General learned optimizer ({len(seeds)} seeds from {cfg.train_dir}, untuned) vs baselines tuned per "
             f"family and horizon (learning rate only) on {cfg.tune_tasks} validation tasks each; evaluation: "
             f"{test_split_name(cfg)}, {cfg.test_tasks} tasks per family. Ratios: learned / baseline final "
             f"whole-split train loss, geometric mean over seeds x tasks [95% bootstrap CI]; the test-loss row's "
             f"baseline is tuned on the validation loss.", "", markdown_table(header, rows), "",
             "| target | bound | ratio [95% CI] | verdict |", "|---|---|---|---|"]
    for k in [k for k in summary if k.startswith(("heldout_", "meta_"))] + ["step_time_over_adam_mlp200k"]:
        v = summary[k]
        lines.append(f"| {k} | {v['bound']} | {ci(v)} | {v['verdict']} |")
    lines.append(f"| divergences (learned) | 0 | {n_div} of {summary['divergences']['runs']} runs | "
                 f"{'met' if n_div == 0 else 'not met'} |")
    lines += ["", "Time per step (ms, evaluation runs at the long horizon, checkpoints included):", "",
              markdown_table(["family"] + methods, [[f] + [fam_out[f]["ms_per_step"][m] for m in methods]
                                                    for f in fams]), "",
              f"- step time on a 784-256-10 MLP, batch 128: learned {bench['learned_ms']:.2f} ms, Adam "
              f"{bench['adam_ms']:.2f} ms (median of {bench['reps']} interleaved repetitions)",
              f"- paired (learned vs tuned Adam, train loss @{h1}) per family: " + "; ".join(
                  f"{f} {fmt_paired(fam_out[f]['horizons'][str(h1)]['train_loss']['paired']['adam'])}"
                  for f in fams),
              f"- whole script {summary['seconds']['total']:.0f} s (tuning jobs {sum(tune_seconds.values()):.0f} "
              f"s CPU, evaluation jobs {summary['seconds']['eval_jobs_cpu']:.0f} s CPU, workers {cfg.workers})"]
    text = "\n".join(lines)
    save_report(cfg.out_dir, text, summary)
    plot_families(os.path.join(cfg.out_dir, "curves.png"), curves, h10,
                  f"mean minibatch train loss over {cfg.test_tasks} tasks ({test_split_name(cfg)}); baselines tuned "
                  f"for {h10} steps on the train loss")
    return summary


def plot_families(path: str, curves: dict, steps: int, title: str) -> None:
    """One panel per family: mean train loss per step (log y), one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(curves)
    cols = min(4, n)
    rows = int(math.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
    for ax, (f, cs) in zip(axes.flat, curves.items()):
        for name, c in cs.items():
            c = np.where(np.isfinite(c) & (c > 0), c, np.nan)
            ax.plot(np.arange(len(c)), c, label=name, lw=2 if name == "learned" else 1)
        ax.set_yscale("log")
        ax.set_title(f"{f} ({SUITE[f].role})", fontsize=9)
        ax.set_xlabel("step", fontsize=8)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    run_main(main)
