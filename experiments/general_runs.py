"""One evaluation run of the general evaluation (issues #23 and #24): what a baseline's or the learned optimizer's
run on one family executes, and nothing else, so that a run's cache key can hash the files it runs instead of every
source file (:data:`BASELINE_SOURCES`, :data:`LEARNED_SOURCES`): a change to a learned optimizer or to meta-training
keeps the baselines' cached runs (1.6 CPU-hours of an evaluation), a change to the statistics, the reports or the
job runner keeps every run; a change to a task, the evaluation loop, an optimizer or this module recomputes them.
``tests/test_exp_general.py`` traces runs of every suite family and fails when they call a function defined outside
their files.
"""
from __future__ import annotations

import time
from typing import Any, Dict, List, Tuple

import numpy as np
import torch

from learned_opt.evaluate.baselines import make_baseline
from learned_opt.evaluate.run import evaluate
from learned_opt.evaluate.splits import evaluation_split
from learned_opt.tasks.suite import suite_family

# Every source file whose code a baseline evaluation run executes (the package's and this module).
BASELINE_SOURCES = ("experiments/general_runs.py", "learned_opt/control.py", "learned_opt/evaluate/baselines.py",
                    "learned_opt/evaluate/run.py", "learned_opt/evaluate/splits.py", "learned_opt/functional.py",
                    "learned_opt/optim/base.py", "learned_opt/optim/baselines.py", "learned_opt/optim/muon.py",
                    "learned_opt/registry.py", "learned_opt/tasks", "learned_opt/unroll.py",
                    "learned_opt/validate.py")
# ... and a learned optimizer's run: those, every optimizer, and meta-training (loading weights rebuilds what
# saved them); not the statistics, the tuning, the reports or the job runner, which change far more often.
LEARNED_SOURCES = BASELINE_SOURCES + ("learned_opt/distributed.py", "learned_opt/estimators.py", "learned_opt/meta",
                                      "learned_opt/optim")


def horizons(cfg) -> Tuple[int, int, int]:
    """(h1, h10, h30): the horizon, ``long_factor`` and ``stress_factor`` times it."""
    return cfg.horizon, cfg.long_factor * cfg.horizon, cfg.stress_factor * cfg.horizon


def marks(cfg, steps: int) -> List[int]:
    """Checkpoint steps of a run to ``steps``: 0, h1 and h10 where the run passes them, and ``cfg.checkpoints``
    evenly spaced steps (the whole-split losses that late spikes are measured on)."""
    h1, h10, _ = horizons(cfg)
    even = np.linspace(0, steps, cfg.checkpoints + 1).round().astype(int).tolist()
    return sorted({m for m in (0, h1, h10, *even) if m <= steps})


def evaluation_run(cfg, fam: str, opt, ctrl, steps: int, tasks: int) -> Dict[str, Any]:
    """``tasks`` runs of ``opt`` (and its controller) on family ``fam`` to ``steps``, one thread: per-task metrics
    at :func:`marks`, the mean minibatch curve (non-finite steps left out), wall time."""
    torch.set_num_threads(1)
    start = time.perf_counter()
    res = evaluate(suite_family(fam), opt, ctrl, num_tasks=tasks, steps=steps, checkpoints=marks(cfg, steps),
                   **evaluation_split(cfg.final, cfg.test_draw))
    seconds = time.perf_counter() - start
    c = np.where(np.isfinite(res.curves), res.curves, np.nan)
    with np.errstate(all="ignore"):
        curve = np.nanmean(c, 0) if np.isfinite(c).any() else np.full(c.shape[1], np.nan)
    return {"at": res.at, "curve": curve, "seconds": seconds, "ms_per_step": 1e3 * seconds / (steps * tasks)}


def learned_run(cfg, spec: tuple, paths: Dict[int, str]) -> Dict[str, Any]:
    """The job ``('learned', family, seed, steps, tasks)``: the weights ``paths[seed]``, their own controller."""
    from learned_opt.meta import load_lopt

    _, fam, seed, steps, tasks = spec
    net = load_lopt(paths[seed])
    return evaluation_run(cfg, fam, net, net.as_controller, steps, tasks)


def baseline_run(cfg, spec: tuple) -> Dict[str, Any]:
    """The job ``('baseline', family, name, hparams, steps, tasks)``."""
    _, fam, name, hparams, steps, tasks = spec
    return evaluation_run(cfg, fam, make_baseline(name, dict(hparams)), None, steps, tasks)
