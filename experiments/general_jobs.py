"""The general evaluation's jobs (issues #23 and #24): tuning, the suite-wide single Adam rate, every evaluation run,
each cached on disk so that a final run that a session ends resumes in the next one, and :class:`Runs`, which finds
a method's run by family, horizon and metric.

A job's result is stored under ``<out_dir>/jobs/<key>.pkl``; the key hashes the job, the config fields that decide
what it computes, the weights it reads and the sources it runs (an evaluation run: the files it executes,
:data:`general_runs.BASELINE_SOURCES` / :data:`general_runs.LEARNED_SOURCES`; any other job: every package and
experiment source), so a changed code base never mixes with cached results (it recomputes). The final-test read is
opened once: ``jobs/read.json`` holds it until the summary is written, and a run interrupted before that resumes
the same read (same config, weights and sources) instead of counting a second one.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import time
from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from common import ROOT, final_test_read, fmt_hp, parallel_map, write_json
from general_runs import BASELINE_SOURCES, LEARNED_SOURCES, baseline_run, horizons, learned_run

from learned_opt.evaluate import ledger, tune, tune_baseline
from learned_opt.evaluate.baselines import PROTOCOL_AXES, default_lr_axis, make_baseline
from learned_opt.evaluate.batched import evaluate_batched
from learned_opt.evaluate.search import lr_grid
from learned_opt.evaluate.stats import robust_mean
from learned_opt.evaluate.tuning import ScoreCache
from learned_opt.optim import get_optimizer
from learned_opt.tasks.suite import SUITE, suite_family

# reported metric -> the metric its baselines are tuned on (validation tasks): each row's own
ROWS = {"train_loss": "train_loss", "test_loss": "val_loss", "accuracy": "val_loss"}
DEFAULT_NAME = "adam_lr1e-3"  # Adam at its default rate, untuned
SINGLE_NAME = "adam_single_lr"  # Adam at the one rate best over every evaluated family (tuned on validation tasks)
HEAVY_KINDS = ("cnn", "rnn", "transformer")  # scheduled first, so that the workers finish together


def hp_key(hparams: Dict[str, float]) -> Tuple[Tuple[str, float], ...]:
    """Hyper-parameters as a hashable, ordered key (a job's and a run's)."""
    return tuple(sorted((k, float(v)) for k, v in hparams.items()))


# ------------------------------------------------------------------------------------------------- job cache
def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


# The config fields the validation-only jobs of stage 1 ("tune", "sweep") depend on; the evaluation jobs also depend
# on the split they read and its task draw. A tuning that finished in a --tune_only run is found again by --final.
STAGE1_FIELDS = ("tune_tasks", "horizon", "long_factor", "long_axes", "grid_low", "grid_high", "per_decade",
                 "resolution", "single_low", "single_high", "single_per_decade")
EVAL_FIELDS = STAGE1_FIELDS + ("final", "test_draw", "test_tasks", "stress_factor", "stress_tasks", "checkpoints")


def computing_fields(cfg, kind: str = "eval") -> Dict[str, Any]:
    """The config fields a job of ``kind`` depends on (not where it is written, how many workers, or bounds)."""
    return {k: getattr(cfg, k) for k in (STAGE1_FIELDS if kind in ("tune", "sweep") else EVAL_FIELDS)}


class JobCache:
    """Finished jobs' results on disk, keyed by job, computing config, weights and sources."""

    def __init__(self, cfg, paths: Dict[int, str]):
        self.dir = cfg.jobs_dir or os.path.join(cfg.out_dir, "jobs")
        self.cfg, self.sources = cfg, ledger.sources_digest(ROOT)
        self.run_sources = {"baseline": ledger.sources_digest(ROOT, BASELINE_SOURCES),
                            "learned": ledger.sources_digest(ROOT, LEARNED_SOURCES)}
        self.weights = {s: _sha256(p) for s, p in paths.items()}

    def key(self, spec: tuple) -> str:
        """The job, the config fields it computes with, the weights it reads (learned runs) and the sources it runs:
        :data:`BASELINE_SOURCES` / :data:`LEARNED_SOURCES` for an evaluation run, every source file otherwise."""
        extra = {"weights": self.weights[spec[2]]} if spec[0] == "learned" else {}
        sources = self.run_sources.get(spec[0], self.sources)
        base = {"config": computing_fields(self.cfg, spec[0]), "sources": sources}
        return ledger.digest({**base, "spec": repr(spec), **extra})[:24]

    def path(self, spec: tuple) -> str:
        return os.path.join(self.dir, f"{self.key(spec)}.pkl")

    def get(self, spec: tuple) -> Optional[Dict[str, Any]]:
        p = self.path(spec)
        if not os.path.exists(p):
            return None
        with open(p, "rb") as f:
            return pickle.load(f)

    def put(self, spec: tuple, value: Dict[str, Any]) -> None:
        os.makedirs(self.dir, exist_ok=True)
        tmp = self.path(spec) + ".tmp"
        with open(tmp, "wb") as f:
            pickle.dump(value, f)
        os.replace(tmp, self.path(spec))


def open_read(cfg, prereg: Dict[str, Any], weights: Sequence[str]) -> Dict[str, Any]:
    """The final-test read of ``weights``: a new one (:func:`final_test_read`), or the open read of an interrupted
    run with the same config, weights and sources (``resumed: true``; not a second read)."""
    marker = os.path.join(cfg.out_dir, "jobs", "read.json")
    ident = {"config": ledger.config_digest(asdict(cfg)), "weights": [_sha256(w) for w in weights],
             "sources": ledger.sources_digest(ROOT)}
    if cfg.final and os.path.exists(marker):
        with open(marker) as f:
            rec = json.load(f)
        if rec["ident"] == ident and not rec["complete"]:
            return {**rec["read"], "resumed": True}
    read = final_test_read(cfg, prereg, weights=list(weights))
    if cfg.final:
        write_json(marker, {"ident": ident, "read": read, "complete": False})
    return read


def close_read(cfg) -> None:
    """Mark the open read complete (its summary is written): a later run is a new read, refused by the ledger."""
    marker = os.path.join(cfg.out_dir, "jobs", "read.json")
    if os.path.exists(marker):
        with open(marker) as f:
            rec = json.load(f)
        write_json(marker, {**rec, "complete": True})


# ------------------------------------------------------------------------------------------------------ jobs
def single_lr_axis(cfg) -> List[float]:
    """The shared grid of the suite-wide single Adam rate."""
    n = int(round(np.log10(cfg.single_high / cfg.single_low) * cfg.single_per_decade)) + 1
    return lr_grid(cfg.single_low, cfg.single_high, n)


def tuning_cache_dir(cfg) -> str:
    """Where tuning scores are cached (validation tasks only; committed with the results, so that a re-run or a
    reproducibility check re-uses them instead of re-tuning for CPU-hours)."""
    return cfg.cache_dir or os.path.join(cfg.out_dir, "tuning_cache")


def sweep_cache(cfg, fam: str) -> ScoreCache:
    """The single-rate sweep's scores per rate, kept with the tuning scores (``tuning_cache_dir``) and keyed like
    them on what they measure (the family's settings, the tasks, the horizons), not on the sources: validation
    tasks only, so that a later evaluation (another version's, a reproducibility check) re-uses them instead of
    re-running CPU-hours of sweeps after any source change."""
    h1, h10, _ = horizons(cfg)
    ident = repr(("adam-single-rate", repr(suite_family(fam)), cfg.tune_tasks, "tune", h1, h10, "batched"))
    digest = hashlib.sha1(ident.encode()).hexdigest()[:16]
    return ScoreCache(os.path.join(tuning_cache_dir(cfg), f"sweep-{fam}-{digest}.json"))


def tune_job(cfg, name: str, family) -> Dict[Tuple[int, str], Any]:
    """Baseline ``name`` tuned for (h1, h10) x (train loss, validation loss) on validation tasks: at h1 every axis
    of :data:`PROTOCOL_AXES` and the learning rate (runs to h1); at h10 the learning rate again (runs to h10) at
    the other hyper-parameters tuned for h1 on the same metric (``long_axes="lr"``: the affordable search, the
    rate being the hyper-parameter the horizon moves most), or every axis again (``long_axes="all"``)."""
    h1, h10, _ = horizons(cfg)
    metrics = sorted(set(ROWS.values()))
    lr_axis = default_lr_axis(cfg.grid_low, cfg.grid_high, cfg.per_decade)
    kw = dict(num_tasks=cfg.tune_tasks, cache_dir=tuning_cache_dir(cfg),
              resolution=cfg.resolution, batched=True)
    if cfg.long_axes == "all":
        return tune_baseline(name, family, horizons=(h1, h10), metrics=metrics, lr_axis=lr_axis,
                             extra=PROTOCOL_AXES[name], **kw)
    out = tune_baseline(name, family, horizons=(h1,), metrics=metrics, lr_axis=lr_axis, extra=PROTOCOL_AXES[name],
                        **kw)
    for m in metrics:
        fixed = {k: v for k, v in out[(h1, m)].hparams.items() if k != "lr"}
        long = tune(f"{name}[{fmt_hp(fixed)}]", lambda hp, fixed=fixed: (make_baseline(name, {**fixed, **hp}), None),
                    family, [lr_axis], horizons=(h10,), metrics=(m,), **kw)[(h10, m)]
        long.hparams = {**fixed, **long.hparams}
        out[(h10, m)] = long
    return out


def run_job(cfg, spec: tuple, paths: Dict[int, str]) -> Dict[str, Any]:
    """One job, on one thread:

    - ``('tune', family, baseline)``: every hyper-parameter of :data:`PROTOCOL_AXES` for (h1, h10) x (train loss,
      validation loss) on ``tune_tasks`` validation tasks (stream ``tune``, batched where the optimizer allows);
    - ``('sweep', family)``: Adam (default betas and eps) at every rate of the single-rate grid on the same tasks:
      whole-split train loss at h1 and h10;
    - ``('learned', family, seed, steps, tasks)`` and ``('baseline', family, name, hparams, steps, tasks)``: one
      evaluation run per task (per-task metrics at :func:`marks`, mean minibatch curve, wall time)."""
    kind, fam = spec[0], spec[1]
    if kind == "baseline":
        return baseline_run(cfg, spec)
    if kind == "learned":
        return learned_run(cfg, spec, paths)
    torch.set_num_threads(1)
    family = suite_family(fam)
    h1, h10, _ = horizons(cfg)
    start = time.perf_counter()
    if kind == "tune":
        return {"tuned": tune_job(cfg, spec[2], family), "seconds": time.perf_counter() - start}
    if kind == "sweep":
        cache, scores = sweep_cache(cfg, fam), {}
        for lr in single_lr_axis(cfg):
            key = repr(float(lr))
            got = cache.get(key)
            if got is None:
                res = evaluate_batched(family, get_optimizer("adam", lr=lr), num_tasks=cfg.tune_tasks, steps=h10,
                                       split="val", stream="tune", checkpoints=(h1,))
                got = {str(h): robust_mean(res.at[h]["train_loss"]) for h in (h1, h10)}
                cache.put(key, got)
            scores[lr] = {h: got[str(h)] for h in (h1, h10)}
        return {"scores": scores, "seconds": time.perf_counter() - start}
    raise ValueError(f"unknown job {kind!r}")


def _cached_job(cfg, spec: tuple, paths: Dict[int, str]) -> Dict[str, Any]:
    cache = JobCache(cfg, paths)
    got = cache.get(spec)
    if got is None:
        got = run_job(cfg, spec, paths)
        cache.put(spec, got)
    return got


def run_jobs(cfg, specs: List[tuple], paths: Dict[int, str]) -> Dict[tuple, Dict[str, Any]]:
    """Every job of ``specs`` (cached ones are read back), in ``cfg.workers`` processes."""
    outs = parallel_map(_cached_job, [(cfg, s, paths) for s in specs], cfg.workers, context="spawn")
    return dict(zip(specs, outs))


def heavy_first(fams: Sequence[str]) -> List[str]:
    """``fams`` with the expensive model classes first (the workers finish together)."""
    return sorted(fams, key=lambda f: SUITE[f].kind not in HEAVY_KINDS)


def single_rate(scores: Dict[str, Dict[float, Dict[int, float]]], h: int, floor: float) -> Dict[str, Any]:
    """The one Adam rate best over every family at horizon ``h``: the smallest mean over families of
    log(score(lr) / the family's best score) (a family's scores normalised by its best, so that no family's loss
    scale dominates; a diverged rate is infinitely bad). ``at_grid_edge``: the best rate is the grid's end."""
    lrs = sorted(next(iter(scores.values())))
    gap = {}
    for lr in lrs:
        per = []
        for s in scores.values():
            v = np.array([s[x][h] for x in lrs], float)
            best = max(np.nanmin(np.where(np.isfinite(v), v, np.nan)), floor)
            x = s[lr][h]
            per.append(np.log(max(x, floor) / best) if np.isfinite(x) else np.inf)
        gap[lr] = float(np.mean(per))
    best_lr = min(lrs, key=lambda x: (gap[x], x))
    return {"lr": best_lr, "mean_log_gap": gap[best_lr], "at_grid_edge": best_lr in (lrs[0], lrs[-1]),
            "grid": lrs, "gaps": {f"{k:g}": v for k, v in gap.items()}}


# ---------------------------------------------------------------------------------------------------- lookups
@dataclass
class Runs:
    """Every run, looked up by family, method, horizon and metric. ``tuned[(f, n)][(h, tuning metric)]``: the
    tuning results; ``single[h]``: the suite-wide Adam rate; ``results``: every evaluation job's output."""
    cfg: Any
    seeds: list
    tuned: dict
    single: dict
    results: dict

    def spec(self, f: str, method: str, h: int, metric: str, *, seed: Optional[int] = None) -> tuple:
        """The evaluation job that reports ``method`` at ``h`` (``h30``: the stress run, fewer tasks)."""
        h1, h10, h30 = horizons(self.cfg)
        tasks = self.cfg.stress_tasks if h == h30 else self.cfg.test_tasks
        if method == "learned":
            return ("learned", f, seed, h, tasks)
        if method == DEFAULT_NAME:
            return ("baseline", f, "adam", hp_key({"lr": self.cfg.default_lr}), max(h, h10), tasks)
        if method == SINGLE_NAME:
            return ("baseline", f, "adam", hp_key({"lr": self.single[min(h, h10)]["lr"]}), max(h, h10), tasks)
        tb = self.tuned[(f, method)][(min(h, h10), ROWS[metric])]  # the 30x run uses the rate tuned for h10
        return ("baseline", f, method, hp_key(tb.hparams), self.serve(f, method, tb.hparams) if h != h30 else h30,
                tasks)

    def serve(self, f: str, method: str, hparams: Dict[str, float]) -> int:
        """The longest tuned horizon these hyper-parameters serve (one run to it gives every shorter one)."""
        return max(h for (h, _), tb in self.tuned[(f, method)].items() if hp_key(tb.hparams) == hp_key(hparams))

    def runs_of(self, f: str, method: str, h: int) -> List[Dict[str, Any]]:
        """Every evaluation run of ``method`` that reports ``h`` (tuned baselines: both tuning metrics)."""
        if method == "learned":
            return [self.results[self.spec(f, method, h, "train_loss", seed=s)] for s in self.seeds]
        stress = h == horizons(self.cfg)[2]  # the 30x run: the train-loss setting only
        specs = {self.spec(f, method, h, m) for m in (("train_loss",) if stress else ROWS)}
        return [self.results[s] for s in sorted(specs, key=repr)]

    def values(self, f: str, method: str, h: int, metric: str) -> np.ndarray:
        """Per-task values ``(seeds or 1, tasks)`` of ``method`` on ``metric`` at ``h``."""
        if method == "learned":
            return np.stack([self.results[self.spec(f, method, h, metric, seed=s)]["at"][h][metric]
                             for s in self.seeds])
        return np.asarray(self.results[self.spec(f, method, h, metric)]["at"][h][metric])[None]

    def lower(self, f: str, method: str, h: int, metric: str) -> np.ndarray:
        """:meth:`values` with lower better (accuracy as the error rate)."""
        v = self.values(f, method, h, metric)
        return 1.0 - v if metric == "accuracy" else v


def tuning_specs(cfg, fams: Sequence[str]) -> List[tuple]:
    """Stage 1's validation-only jobs: every baseline's tuning and the single-rate sweep, per family."""
    order = heavy_first(fams)
    return [("tune", f, n) for f in order for n in cfg.baselines] + [("sweep", f) for f in order]


def tuned_settings(cfg, out: Dict[tuple, Dict[str, Any]]) -> Tuple[dict, dict]:
    """``(tuned, single)`` from stage 1's job outputs."""
    h1, h10, _ = horizons(cfg)
    tuned = {(s[1], s[2]): o["tuned"] for s, o in out.items() if s[0] == "tune"}
    sweeps = {s[1]: o["scores"] for s, o in out.items() if s[0] == "sweep"}
    return tuned, {h: single_rate(sweeps, h, cfg.loss_floor) for h in (h1, h10)}


def tune_and_evaluate(cfg, fams: Sequence[str], paths: Dict[int, str], timing: Dict[str, Any],
                      snapshots: Optional[Dict[str, str]] = None, snapshot_specs: Sequence[tuple] = ()) -> Runs:
    """Stage 1 (validation tasks only): tuning of every baseline and the single-rate sweep, together with the
    learned optimizer's runs (they need no tuning; ``snapshot_specs``: the runs of the seeds' intermediate weights,
    ``snapshots`` their paths). Stage 2: the baselines' evaluation runs at their tuned hyper-parameters (one run
    per distinct setting, to the longest horizon it serves), Adam at its default and at the single rate, and the
    30x stress runs."""
    h1, h10, h30 = horizons(cfg)
    seeds = list(paths)
    order = heavy_first(fams)
    tune_specs = tuning_specs(cfg, fams)
    learned = [("learned", f, s, h, cfg.test_tasks) for f in order for h in (h10, h1) for s in seeds]
    learned += [("learned", f, s, h30, cfg.stress_tasks) for f in order for s in seeds] if cfg.stress_tasks else []
    learned += list(snapshot_specs)
    t0 = time.perf_counter()
    out = run_jobs(cfg, tune_specs + learned, {**paths, **(snapshots or {})})
    timing["stage1_wall"] = time.perf_counter() - t0
    tuned, single = tuned_settings(cfg, {s: out[s] for s in tune_specs})
    runs = Runs(cfg, seeds, tuned, single, {s: out[s] for s in learned})
    evals = {runs.spec(f, m, h, metric) for f in fams for m in (*cfg.baselines, DEFAULT_NAME, SINGLE_NAME)
             for h in (h1, h10) for metric in ROWS}
    if cfg.stress_tasks:
        evals |= {runs.spec(f, "adam", h30, "train_loss") for f in fams}
    t0 = time.perf_counter()
    runs.results.update(run_jobs(cfg, sorted(evals, key=lambda s: (order.index(s[1]), repr(s))), paths))
    timing["stage2_wall"] = time.perf_counter() - t0
    timing["tuning_jobs_cpu"] = float(sum(out[s]["seconds"] for s in tune_specs))
    timing["eval_jobs_cpu"] = float(sum(o["seconds"] for k, o in runs.results.items()))
    return runs
