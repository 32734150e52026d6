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

import os
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (ProtocolConfig, configure, eval_split, fmt_paired, markdown_table, open_run,  # noqa: E402
                    paired, parallel_map, run_main, test_split_name, save_report, floored, LOSS_FLOOR,
                    final_test_read, preregistered, record_test_read)
import general_checks as checks  # noqa: E402
from general_checks import seed_paths  # noqa: E402  (the seeds of train_dir, also the shipped seed's candidates)
from figures import plot_families  # noqa: E402
from stats_common import ci, diverged, families_fixed_ci, target  # noqa: E402

from learned_opt.evaluate import (bootstrap_interval, default_lr_axis, evaluate, protocol_record,  # noqa: E402
                                  require_final_seeds, tune_baseline)
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
    seeds: int = 5  # the least number of seeds train_dir must hold (every seed found there is evaluated)
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
    bounds: tuple = (1.0, 1.2, 1.0, 0.5)  # held-out targets: vs tuned Adam 1x, 10x, test loss, vs Adam default
    loss_floor: float = LOSS_FLOOR  # losses below it count as it in ratios (the verdicts' floor)
    floors: tuple = (0.0, 1e-8, 1e-6, 1e-4)  # the headline ratios are also reported at each of these floors
    smoke: bool = False  # a smoke run (seconds, for the tests): may run final with fewer than 5 seeds; no result
    out_dir: str = "results/general"
    cache_dir: str = ""  # default: out_dir/tuning_cache


PRESETS = {
    "smoke": dict(seeds=2, tune_tasks=2, test_tasks=2, horizon=5, families=("logistic_regression", "wine_mlp"),
                  grid_low=1e-3, grid_high=1.0, per_decade=1, resolution=0.5, bench_reps=3, bench_steps=2,
                  n_boot=500, train_dir="runs/general_train_smoke", out_dir="runs/general_smoke",
                  smoke=True),
}


def family_names(cfg: Config) -> tuple:
    """The evaluated families, in suite order."""
    return tuple(n for n in SUITE if n in cfg.families) if cfg.families else tuple(SUITE)


def horizons(cfg: Config) -> tuple:
    """(h1, h10)."""
    return cfg.horizon, LONG * cfg.horizon


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
    lo, hi = bootstrap_interval(np.stack([L, A], 1), lambda b: np.median(b[..., 0], 1) / np.median(b[..., 1], 1),
                                n_boot=cfg.n_boot)
    return {"ratio": float(np.median(L) / np.median(A)), "ci_low": lo, "ci_high": hi,
            "learned_ms": 1e3 * float(np.median(L)), "adam_ms": 1e3 * float(np.median(A)),
            "params": sum(p.numel() for p in m_a.parameters()), "reps": cfg.bench_reps, "steps": cfg.bench_steps,
            "lopt": lopt_path}


@dataclass
class Runs:
    """Every evaluation run, looked up by family, method, horizon and metric (``tuned``: the tuning results;
    ``serve``: the longest horizon each tuned rate serves; ``free``: runs that need no tuning)."""
    cfg: Config
    seeds: list
    tuned: dict
    serve: dict
    free: dict
    base_runs: dict

    def tuned_run(self, f, n, h, metric):
        """The evaluation run of baseline ``n`` tuned for (``h``, the tuning metric of ``metric``'s row)."""
        lr = self.tuned[(f, n)][(h, ROWS[metric])].hparams["lr"]
        return self.base_runs[("baseline", f, n, lr, self.serve[(f, n, lr)])]

    def values(self, f, method, h, metric):
        """Per-task values ``(seeds or 1, tasks)`` of ``method`` on ``metric`` at ``h``."""
        cfg, h10 = self.cfg, horizons(self.cfg)[1]
        if method == "learned":
            return np.stack([self.free[("learned", f, s, h)]["at"][h][metric] for s in self.seeds])
        if method == DEFAULT_NAME:
            return self.free[("baseline", f, "adam", cfg.default_lr, h10)]["at"][h][metric][None]
        if method == cfg.flagship:
            return self.free[("flagship", f, h10)]["at"][h][metric][None]
        return self.tuned_run(f, method, h, metric)["at"][h][metric][None]

    def lower(self, f, method, h, metric):
        """:meth:`values` with lower better (accuracy as the error rate), for ratios."""
        v = self.values(f, method, h, metric)
        return 1.0 - v if metric == "accuracy" else v

    def runs_of(self, f, method, h):
        """Every run of ``method`` that reports horizon ``h`` (the tuned baselines: both tuning metrics)."""
        cfg, h10 = self.cfg, horizons(self.cfg)[1]
        if method == "learned":
            return [self.free[("learned", f, s, h)] for s in self.seeds]
        if method == DEFAULT_NAME:
            return [self.free[("baseline", f, "adam", cfg.default_lr, h10)]]
        if method == cfg.flagship:
            return [self.free[("flagship", f, h10)]]
        lrs = {self.tuned[(f, method)][(h, m)].hparams["lr"] for m in set(ROWS.values())}
        return [self.base_runs[("baseline", f, method, lr, self.serve[(f, method, lr)])] for lr in sorted(lrs)]


# ---------------------------------------------------------------------------------------------------- stages
def check(cfg: Config) -> None:
    """Exit with a message naming the first bad setting, before any work starts."""
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
    require_final_seeds(cfg.seeds, cfg.final, smoke=cfg.smoke or cfg.check_run)


def configure_run(argv=None) -> tuple:
    """The checked config, the meta-trained seeds' ``{seed: lopt path}`` and the evaluated families."""
    cfg = configure(Config, PRESETS, argv, check)
    fams = family_names(cfg)
    paths = seed_paths(cfg.train_dir)
    if len(paths) < cfg.seeds:
        sys.exit(f"error: {cfg.train_dir} holds {len(paths)} meta-trained seeds (seed{{N}}/lopt.pt), fewer than "
                 f"--seeds {cfg.seeds}: run experiments/general_train.py first")
    return cfg, paths, fams


def tune_and_evaluate(cfg: Config, fams: tuple, seeds: list, timing: dict) -> Runs:
    """Tuning (validation tasks only) and every evaluation that needs no tuned rate, as one pool of jobs (the
    expensive families first so the workers finish together); then the tuned baselines, one run per distinct
    tuned rate to the longest horizon it serves."""
    h1, h10 = horizons(cfg)
    light = lambda f: SUITE[f].kind not in HEAVY_KINDS  # noqa: E731  (False sorts first: heavy families)
    tune_specs = [("tune", f, n) for f in sorted(fams, key=light) for n in cfg.baselines]
    free_specs = [("learned", f, s, h) for f in sorted(fams, key=light) for h in (h10, h1) for s in seeds]
    free_specs += [("baseline", f, "adam", cfg.default_lr, h10) for f in fams]
    free_specs += [("flagship", f, h10) for f in fams] if cfg.flagship else []
    t0 = time.perf_counter()
    out_a = parallel_map(run_job, [(cfg, s) for s in tune_specs + free_specs], cfg.workers)
    timing["tuning_and_untuned_evals_wall"] = time.perf_counter() - t0
    tuned = {(s[1], s[2]): o["tuned"] for s, o in zip(tune_specs, out_a)}
    timing["tuning_job"] = {f"{s[1]}/{s[2]}": o["seconds"] for s, o in zip(tune_specs, out_a)}
    free = dict(zip(free_specs, out_a[len(tune_specs):]))
    serve = {}  # (family, name, lr) -> longest horizon
    for (f, n), t in tuned.items():
        for (h, _), tb in t.items():
            key = (f, n, tb.hparams["lr"])
            serve[key] = max(serve.get(key, 0), h)
    base_specs = [("baseline", f, n, lr, h) for (f, n, lr), h in serve.items()]
    t0 = time.perf_counter()
    base_runs = dict(zip(base_specs, parallel_map(run_job, [(cfg, s) for s in base_specs], cfg.workers)))
    timing["tuned_evals_wall"] = time.perf_counter() - t0
    return Runs(cfg, seeds, tuned, serve, free, base_runs)


def family_statistics(cfg: Config, runs: Runs, fams: tuple, methods: list) -> tuple:
    """Per family: means, paired comparisons, time per step, divergences, one-family ratios; and the mean curves
    for the figure. Returns ``(per family record, curves)``."""
    h1, h10 = horizons(cfg)
    fam_out, curves = {}, {}
    for f in fams:
        e = SUITE[f]
        metrics = [m for m in ROWS if m in runs.free[("learned", f, runs.seeds[0], h1)]["at"][h1]]
        rec = {"role": e.role, "kind": e.kind, "data": e.data, "loss": e.loss, "description": e.description,
               "horizons": {}, "ms_per_step": {}, "divergences": {}}
        for h in (h1, h10):
            hr = rec["horizons"][str(h)] = {}
            for metric in metrics:
                L = runs.lower(f, "learned", h, metric)
                row = {"reported": metric, "tuned_on": ROWS[metric], "mean": {}, "median": {},
                       "paired_on": "test error rate (1 - accuracy)" if metric == "accuracy" else metric,
                       "paired": {}}
                for m in methods:
                    v = runs.values(f, m, h, metric)
                    row["mean"][m], row["median"][m] = float(v.mean()), float(np.median(v))
                    if m != "learned":
                        row["paired"][m] = paired(floored(L, cfg.loss_floor), floored(runs.lower(f, m, h, metric),
                                                                                      cfg.loss_floor),
                                                  n_boot=cfg.n_boot)
                hr[metric] = row
            for m in methods:
                rec["divergences"].setdefault(m, {})[str(h)] = int(sum(diverged(r["at"], h).sum()
                                                                       for r in runs.runs_of(f, m, h)))
        for m in methods:
            rec["ms_per_step"][m] = float(np.mean([r["ms_per_step"] for r in runs.runs_of(f, m, h10)]))
        rec["ms_per_step"]["learned@h1"] = float(np.mean([r["ms_per_step"] for r in runs.runs_of(f, "learned", h1)]))
        # the one-family ratios of the table, with their bootstrap intervals
        best = min(cfg.baselines, key=lambda n: rec["horizons"][str(h1)]["train_loss"]["mean"][n])
        rec["best_tuned_at_h1"] = best

        def one(m, h, metric, f=f):
            return checks.group_ratio(runs, [f], m, h, metric, floor=cfg.loss_floor, n_boot=cfg.n_boot)

        rec["gmean_ratios"] = {"vs_tuned_adam_1x": one("adam", h1, "train_loss"),
                               "vs_tuned_adam_10x": one("adam", h10, "train_loss"),
                               "vs_adam_default_1x": one(DEFAULT_NAME, h1, "train_loss"),
                               "vs_best_tuned_1x": {**one(best, h1, "train_loss"), "baseline": best},
                               "test_loss_vs_tuned_adam_1x": one("adam", h1, "test_loss")}
        fam_out[f] = rec
        curves[f] = {"learned": np.nanmean(np.stack([r["curve"] for r in runs.runs_of(f, "learned", h10)]), 0)}
        for n in cfg.baselines:
            curves[f][f"{n} (tuned)"] = runs.tuned_run(f, n, h10, "train_loss")["curve"]
        curves[f]["adam 1e-3"] = runs.runs_of(f, DEFAULT_NAME, h10)[0]["curve"]
        if cfg.flagship:
            curves[f][cfg.flagship] = runs.runs_of(f, cfg.flagship, h10)[0]["curve"]
    return fam_out, curves


def summarize(cfg: Config, prov: dict, fams: tuple, runs: Runs, fam_out: dict, bench: dict, timing: dict) -> dict:
    """``summary.json``'s dict: the targets (geometric means over families, per role; divergences; step time),
    the protocol record, the tuned rates and the per-family records."""
    h1, h10 = horizons(cfg)
    seeds, tuned = runs.seeds, runs.tuned
    summary = {"config": asdict(cfg), "provenance": prov, "seeds": seeds, "families_evaluated": list(fams)}
    for prefix, bounds in (("heldout", cfg.bounds), ("meta", (None,) * 4)):
        group = [f for f in fams if SUITE[f].role == prefix]

        def g(method, h, metric, group=group):
            return checks.group_ratio(runs, group, method, h, metric, floor=cfg.loss_floor, n_boot=cfg.n_boot)

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
              "nested bootstrap over families, tasks within each family and seeds within each task (families_fixed: "
              "the same with the families held fixed)", loss_floor=cfg.loss_floor)
    summary["tuned"] = {f: {n: {f"{h}/{m}": {"hparams": tb.hparams, "score": tb.score, "edges": tb.edges,
                                              "at_grid_edge": any(v == "grid" for v in tb.edges.values()),
                                              "points_searched": len(tb.table)}
                                for (h, m), tb in sorted(tuned[(f, n)].items())} for n in cfg.baselines}
                        for f in fams}
    summary["families"] = fam_out
    summary["seconds"] = {"step_time_bench": timing["step_time_bench"],
                          "tuning_and_untuned_evals_wall": timing["tuning_and_untuned_evals_wall"],
                          "tuned_evals_wall": timing["tuned_evals_wall"], "tuning_job": timing["tuning_job"],
                          "eval_jobs_cpu": float(sum(o["seconds"] for o in runs.free.values())
                                                 + sum(o["seconds"] for o in runs.base_runs.values())),
                          "tuning_jobs_cpu": float(sum(timing["tuning_job"].values())),
                          "total": time.perf_counter() - timing["start"]}
    return summary


def report(cfg: Config, summary: dict, fams: tuple, methods: list) -> str:
    """The table (also stored as ``summary["table"]``) and ``table.md``'s text."""
    h1, h10 = horizons(cfg)
    fam_out, seeds, bench = summary["families"], summary["seeds"], summary["step_time_over_adam_mlp200k"]
    n_div = summary["divergences"]["count"]
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
             f"whole-split train loss, geometric mean over seeds x tasks [95% CI: nested bootstrap, tasks then seeds]; "
             f"the test-loss row's baseline is tuned on the validation loss. Targets resample the families too "
             f"('families fixed' does not).", "", markdown_table(header, rows), "",
             "| target | bound | ratio [95% CI] | families fixed | verdict |", "|---|---|---|---|---|"]
    for k in [k for k in summary if k.startswith(("heldout_", "meta_"))] + ["step_time_over_adam_mlp200k"]:
        v = summary[k]
        lines.append(f"| {k} | {v['bound']} | {ci(v)} | {families_fixed_ci(v)} | {v['verdict']} |")
    lines.append(f"| divergences (learned) | 0 | {n_div} of {summary['divergences']['runs']} runs | - | "
                 f"{'met' if n_div == 0 else 'not met'} |")
    lines += ["", "Time per step (ms, evaluation runs at the long horizon, checkpoints included):", "",
              markdown_table(["family"] + methods, [[f] + [fam_out[f]["ms_per_step"][m] for m in methods]
                                                    for f in fams]), "",
              f"- step time on a 784-256-10 MLP, batch 128: learned {bench['learned_ms']:.2f} ms, Adam "
              f"{bench['adam_ms']:.2f} ms (median of {bench['reps']} interleaved repetitions)",
              f"- paired (learned vs tuned Adam, train loss @{h1}) per family: " + "; ".join(
                  f"{f} {fmt_paired(fam_out[f]['horizons'][str(h1)]['train_loss']['paired']['adam'])}"
                  for f in fams),
              f"- whole script {summary['seconds']['total']:.0f} s (tuning jobs "
              f"{summary['seconds']['tuning_jobs_cpu']:.0f} s CPU, evaluation jobs "
              f"{summary['seconds']['eval_jobs_cpu']:.0f} s CPU, workers {cfg.workers})"]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- main
def main(argv=None) -> dict:
    """Tune, evaluate, compare; write summary.json, table.md and curves.png."""
    cfg, paths, fams = configure_run(argv)
    seeds = list(paths)
    prov = open_run(cfg.out_dir)
    h10 = horizons(cfg)[1]
    timing = {"start": time.perf_counter()}
    # the step-time benchmark first, alone on its thread (no worker competes with it)
    bench = step_time_bench(cfg, paths[seeds[0]])
    timing["step_time_bench"] = time.perf_counter() - timing["start"]
    read = final_test_read(cfg, preregistered(cfg, checks.PREREGISTERED), weights=[paths[s] for s in seeds])
    runs = tune_and_evaluate(cfg, fams, seeds, timing)
    methods = ["learned", *cfg.baselines, DEFAULT_NAME] + ([cfg.flagship] if cfg.flagship else [])
    fam_out, curves = family_statistics(cfg, runs, fams, methods)
    summary = summarize(cfg, prov, fams, runs, fam_out, bench, timing)
    extra = checks.add_checks(cfg, summary, runs, fams, paths, checks.headlines(*horizons(cfg), DEFAULT_NAME))
    text = report(cfg, summary, fams, methods) + "\n" + extra
    save_report(cfg.out_dir, text, record_test_read(summary, read))
    plot_families(os.path.join(cfg.out_dir, "curves.png"), curves, {f: SUITE[f].role for f in curves},
                  f"mean minibatch train loss over {cfg.test_tasks} tasks ({test_split_name(cfg)}); baselines tuned "
                  f"for {h10} steps on the train loss")
    return summary


if __name__ == "__main__":
    run_main(main)
