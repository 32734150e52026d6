"""Baselines tuned on the metric their row reports, on validation tasks only: :func:`tune` runs one
:func:`~learned_opt.evaluate.search.coordinate_search` per (horizon, metric), scored by whole-split losses at the
horizon (never one minibatch), with scores cached on disk; runs whose trajectory does not depend on the horizon are
shared by every horizon."""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import asdict, dataclass
from typing import Callable, Dict, Optional, Sequence, Tuple

import numpy as np

from ..validate import check_positive_int
from .batched import batchable, evaluate_batched
from .baselines import BASELINE_AXES, TunedBaseline, default_lr_axis, make_baseline
from .run import METRICS, evaluate
from .search import Axis, coordinate_search, point_key
from .stats import robust_mean

MIN_TUNING_TASKS = 20


class ScoreCache:
    """Validation scores of evaluated points, kept in memory and (with ``path``) on disk between runs."""

    def __init__(self, path: Optional[str]):
        self.path = path
        self.data: Dict[str, Dict[str, float]] = {}
        if path and os.path.exists(path):
            with open(path) as f:
                self.data = json.load(f)

    def get(self, key: str):
        return self.data.get(key)

    def put(self, key: str, value: Dict[str, float]) -> None:
        self.data[key] = value
        if self.path:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            tmp = self.path + ".tmp"
            with open(tmp, "w") as f:
                json.dump(self.data, f, default=float)
            os.replace(tmp, self.path)


def tune(name: str, make: Callable[[Dict[str, float]], Tuple[object, Optional[Callable[[], object]]]],
         family, axes: Sequence[Axis], *, horizons: Sequence[int], metrics: Sequence[str] = ("train_loss",),
         num_tasks: int = MIN_TUNING_TASKS, seed: int = 0, stream: str = "tune", val_every: int = 0,
         horizon_independent: bool = True, cache_dir: Optional[str] = None, resolution: float = 0.125,
         max_widen: int = 8, batched: bool = False) -> Dict[Tuple[int, str], TunedBaseline]:
    """Tune ``make(hparams) -> (optimizer, controller_fn or None)`` on ``num_tasks`` *validation* tasks, separately
    for every ``(horizon, metric)``: each target gets its own :func:`coordinate_search` over ``axes``, scored by
    the mean over tasks of the whole-split ``metric`` at that horizon (:func:`checkpoint_metrics`; ``accuracy``
    is maximised). With ``horizon_independent`` (no schedule that depends on the horizon), one run to the
    longest horizon serves every horizon. ``name`` must identify ``make`` (it keys the cache in ``cache_dir``).
    ``batched``: score a coordinatewise or slicewise optimizer without a controller with :func:`evaluate_batched`
    (the same tasks, several times faster, equal to float32 rounding; Muon's bfloat16 Newton–Schulz turns that
    rounding into larger differences, see tests/test_muon.py); its scores are cached apart from evaluate()'s.
    """
    for m in metrics:
        if m not in METRICS:
            raise ValueError(f"unknown metric {m!r}; known: {', '.join(METRICS)}")
    horizons = sorted({int(h) for h in horizons})
    for h in horizons:
        check_positive_int("horizon", h)
    check_positive_int("num_tasks", num_tasks)
    if num_tasks < MIN_TUNING_TASKS:
        warnings.warn(f"{name}: tuned on {num_tasks} validation tasks, fewer than the protocol's "
                      f"{MIN_TUNING_TASKS}")
    ident = repr((name, repr(family), num_tasks, seed, stream, val_every, horizons, horizon_independent,
                  [asdict(a) for a in axes]) + (("batched",) if batched else ()))
    digest = hashlib.sha1(ident.encode()).hexdigest()[:16]
    cache = ScoreCache(os.path.join(cache_dir, f"tune-{_safe(name)}-{digest}.json") if cache_dir else None)

    def scores_at(point: Dict[str, float], h: int) -> Dict[str, float]:
        runs = [max(horizons)] if horizon_independent else [h]
        key = point_key(point) + ("" if horizon_independent else f"@{h}")
        got = cache.get(key)
        if got is None:
            opt, ctrl_fn = make(dict(point))
            kw = dict(num_tasks=num_tasks, steps=runs[0], split="val", seed=seed, stream=stream,
                      checkpoints=horizons if horizon_independent else ())
            if batched and ctrl_fn is None and not val_every and batchable(opt):
                res = evaluate_batched(family, opt, **kw)
            else:
                res = evaluate(family, opt, ctrl_fn, val_every=val_every, **kw)
            got = {}
            for hh in (horizons if horizon_independent else [h]):
                for m in METRICS:
                    if m in res.at[hh]:
                        v = res.at[hh][m]
                        got[f"{hh}/{m}"] = -float(np.mean(v)) if m == "accuracy" else robust_mean(v)
            cache.put(key, got)
        return got

    out = {}
    for h in horizons:
        for m in metrics:
            res = coordinate_search(lambda p, h=h, m=m: scores_at(p, h)[f"{h}/{m}"], axes, resolution=resolution,
                                    max_widen=max_widen, name=f"{name}@{h} ({m})")
            out[(h, m)] = TunedBaseline(name, h, m, res.best, res.score, res.edges, res.grids, res.widened,
                                        res.table, num_tasks)
    return out


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:60]


def tune_baseline(name: str, family, *, horizons: Sequence[int], metrics: Sequence[str] = ("train_loss",),
                  num_tasks: int = MIN_TUNING_TASKS, seed: int = 0, lr_axis: Optional[Axis] = None,
                  extra: Optional[Sequence[Axis]] = None, cache_dir: Optional[str] = None,
                  resolution: float = 0.125, batched: bool = False) -> Dict[Tuple[int, str], TunedBaseline]:
    """Tune the hand-coded optimizer ``name`` (its learning rate and the axes of :data:`BASELINE_AXES`, or
    ``extra``, e.g. ``PROTOCOL_AXES[name]`` for every hyper-parameter) for every horizon and metric, on validation
    tasks (see :func:`tune`)."""
    from ..optim import OPTIMIZERS

    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; known: {', '.join(sorted(OPTIMIZERS))}")
    axes = (lr_axis or default_lr_axis(),) + tuple(BASELINE_AXES.get(name, ()) if extra is None else extra)
    return tune(name, lambda hp: (make_baseline(name, hp), None), family, axes, horizons=horizons,
                metrics=metrics, num_tasks=num_tasks, seed=seed, cache_dir=cache_dir, resolution=resolution,
                batched=batched)


@dataclass
class TuneResult:
    """The chosen learning rate, every evaluated rate's validation score, and whether it is at a grid edge."""
    best_lr: float
    scores: Dict[float, float]
    at_edge: bool


def tune_lr(make_optimizer: Callable[[float], object], family, *, grid: Sequence[float], steps: int,
            num_tasks: int = MIN_TUNING_TASKS, seed: int = 0, name: str = "optimizer",
            controller_fn: Optional[Callable[[], object]] = None, val_every: int = 0,
            metric: str = "train_loss", cache_dir: Optional[str] = None) -> TuneResult:
    """Tune the learning rate alone (``grid`` widened until interior, refined to 1/8 decade) for one horizon
    and one whole-split ``metric``, on validation tasks; a thin wrapper of :func:`tune`."""
    if len(grid) < 2:
        raise ValueError(f"the learning-rate grid needs at least two values, got {list(grid)!r}")
    axis = Axis("lr", tuple(grid), "log", refine=True)
    res = tune(name, lambda hp: (make_optimizer(hp["lr"]), controller_fn), family, [axis], horizons=[steps],
               metrics=[metric], num_tasks=num_tasks, seed=seed, val_every=val_every,
               horizon_independent=controller_fn is None, cache_dir=cache_dir)[(steps, metric)]
    scores = {row["lr"]: row["score"] for row in res.table}
    return TuneResult(res.hparams["lr"], scores, res.edges["lr"] == "grid")
