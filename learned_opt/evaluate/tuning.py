"""The evaluation protocol: task splits, evaluation at checkpoints, baseline tuning, paired statistics.

Every experiment script goes through this module, so that one set of rules holds everywhere:

- **Splits disjoint by construction.** A task's seed is a hash of ``(split, seed, stream, index)`` with the split
  written into its two lowest bits (:func:`task_seed`, :func:`split_of`): meta-training (``train``), validation
  (``val``: tuning, checkpoint selection, every development choice) and final-test (``test``) tasks can never
  coincide, whatever the seeds and indices. ``stream`` separates uses of one split (tuning, checkpoint
  selection, development evaluation) so that a choice is never checked on the tasks it was made on.
- **A final-test split that is drawn again** whenever results on it were seen during development:
  :data:`TEST_DRAW` enters the hash of every test task. Scripts touch ``test`` only when run for the reported
  numbers and record the draw in their summary.
- **Baselines tuned on the metric their row reports**, on validation tasks only, by :func:`tune`: a
  coordinate search in which every axis (learning rate, momentum, betas, schedule parameters) is widened until
  its best value is interior, and the learning rate is refined to 1/8 decade around the best. Scores are whole-
  split losses at the horizon (never one minibatch). Runs whose trajectory does not depend on the horizon are
  shared by every horizon.
- **Paired statistics** (:func:`paired`): every optimizer runs on the same tasks, so a learned-vs-baseline claim is
  the per-task ratio, with a bootstrap interval over tasks and meta-training seeds, a Wilcoxon signed-rank
  p-value and the win rate; intervals over seeds use the t quantile (:func:`mean_ci`).
- **Speedup against an envelope** (:func:`envelope_speedup`): steps needed by the baseline *tuned for each
  target horizon*, not by one run tuned for the longest horizon.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .tasks.base import check_positive_int, generator
from .unroll import unroll

SPLITS = ("train", "val", "test")
_SPLIT_CODE = {"train": 0, "val": 1, "test": 2}
TEST_DRAW = 2
"""The current draw of the final-test split. Draw 1 was the offset-based split of the first sessions, whose
test tasks were looked at during development; bump this whenever test results are seen before a final run."""
METRICS = ("train_loss", "val_loss", "test_loss", "accuracy")
MIN_TUNING_TASKS = 20


def task_seed(split: str, index: int, seed: int = 0, *, stream: str = "", draw: Optional[int] = None) -> int:
    """The seed of task ``index`` of ``split`` (and ``stream``) for ``seed``; disjoint across splits by
    construction: the split is the seed's two lowest bits, the rest a 60-bit hash of everything else."""
    if split not in _SPLIT_CODE:
        raise ValueError(f"unknown split {split!r}; known: {', '.join(SPLITS)}")
    if split == "test":
        draw = TEST_DRAW if draw is None else draw
    elif draw is not None:
        raise ValueError(f"only the test split has draws; got draw={draw!r} for split {split!r}")
    key = f"{split}|{int(seed)}|{stream}|{int(index)}|{draw}".encode()
    h = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 4
    return (h << 2) | _SPLIT_CODE[split]


def split_of(seed: int) -> str:
    """The split a task seed made by :func:`task_seed` belongs to."""
    code = int(seed) & 3
    for name, c in _SPLIT_CODE.items():
        if c == code:
            return name
    raise ValueError(f"seed {seed} belongs to no split")


# ------------------------------------------------------------------------------------------------ evaluation
@dataclass
class EvalResult:
    """What :func:`evaluate` measured.

    ``curves``: per-problem minibatch train loss at every step, ``(problems, steps + 1)`` (the last value kept
    after a stop, ``inf`` after divergence). ``at[step][metric]``: per-problem values at each checkpoint step,
    measured on *whole* splits: ``train_loss`` (the task's own training data), ``val_loss``, ``test_loss`` and,
    for classification, ``accuracy`` on the test split. ``at[steps]`` is taken at the parameters the run returns
    (after a stop, the restored best ones when the controller restores them).
    """
    curves: np.ndarray
    at: Dict[int, Dict[str, np.ndarray]]
    stop_steps: List[int] = field(default_factory=list)
    split: str = "val"
    seeds: List[int] = field(default_factory=list)

    @property
    def steps(self) -> int:
        """The evaluated horizon."""
        return self.curves.shape[1] - 1

    def final(self, step: Optional[int] = None) -> np.ndarray:
        """Per-problem minibatch loss at ``step`` (default: the last)."""
        return self.curves[:, -1 if step is None else step]

    def metric(self, name: str, step: Optional[int] = None) -> np.ndarray:
        """Per-problem ``name`` (one of :data:`METRICS`) at checkpoint ``step`` (default: the end)."""
        step = self.steps if step is None else step
        if step not in self.at:
            raise KeyError(f"step {step} was not a checkpoint of this evaluation; have {sorted(self.at)}")
        if name not in self.at[step]:
            raise KeyError(f"metric {name!r} was not measured; have {sorted(self.at[step])}")
        return self.at[step][name]

    @property
    def val_at_stop(self) -> List[float]:
        """Validation loss (whole split) at the returned parameters, per problem."""
        return self.metric("val_loss").tolist()

    @property
    def test_at_stop(self) -> List[float]:
        """Test-split loss at the returned parameters, per problem."""
        return self.metric("test_loss").tolist()

    @property
    def accuracy(self) -> List[float]:
        """Test-split accuracy at the returned parameters (classification tasks; empty otherwise)."""
        return self.at[self.steps]["accuracy"].tolist() if "accuracy" in self.at[self.steps] else []


def _inf_like(values: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    return {k: (np.full_like(v, np.inf) if k != "accuracy" else v) for k, v in values.items()}


def checkpoint_metrics(task, params) -> Dict[str, np.ndarray]:
    """Whole-split losses (per problem) and, for classification, test accuracy of ``params`` on ``task``.

    Uses the task's ``split_losses`` when it has one; otherwise the batch ``sample_batch`` returns for each
    evaluation split, drawn from a fixed generator so the task's own data stream is untouched.
    """
    out = {}
    with torch.no_grad():
        for split, key in (("train", "train_loss"), ("val", "val_loss"), ("test", "test_loss")):
            if hasattr(task, "split_losses"):
                v = task.split_losses(params, split)
            else:
                v = task.losses(params, task.sample_batch(generator(0), split))
            out[key] = np.nan_to_num(v.detach().double().cpu().numpy(), nan=np.inf, posinf=np.inf)
        if getattr(task, "loss_name", None) == "cross_entropy" and hasattr(task, "accuracy"):
            out["accuracy"] = np.asarray([task.accuracy(params, "test")], dtype=float)
    return out


def evaluate(family, optimizer, controller_fn: Optional[Callable[[], object]] = None, *, num_tasks: int,
             steps: int, split: str, seed: int = 0, stream: str = "", val_every: int = 0,
             checkpoints: Iterable[int] = (), draw: Optional[int] = None, stop_metrics: bool = True) -> EvalResult:
    """Run ``optimizer`` (and a fresh controller per task) on ``num_tasks`` tasks of ``split``, keeping no graph.

    ``split`` has no default: every caller says which tasks it touches. ``checkpoints``: steps (besides
    ``steps``) at which :func:`checkpoint_metrics` are measured. ``stop_metrics`` is accepted for compatibility:
    the end-of-run metrics are always measured.
    """
    check_positive_int("num_tasks", num_tasks)
    check_positive_int("steps", steps)
    marks = sorted({int(c) for c in checkpoints} | {steps})
    if marks[0] < 0 or marks[-1] > steps:
        raise ValueError(f"checkpoints must lie in [0, {steps}], got {sorted(checkpoints)}")
    curves, stops, seeds = [], [], []
    at: Dict[int, List[Dict[str, np.ndarray]]] = {m: [] for m in marks}
    for i in range(num_tasks):
        s = task_seed(split, i, seed, stream=stream, draw=draw)
        seeds.append(s)
        g = generator(s)
        task = family(g)
        ctrl = controller_fn() if controller_fn is not None else None
        seen: Dict[int, Dict[str, np.ndarray]] = {}

        def observe(t, params, task=task, seen=seen):
            if t in at and t != steps:
                seen[t] = checkpoint_metrics(task, params)

        res = unroll(task, optimizer, ctrl, steps=steps, generator=g, val_every=val_every,
                     observe=observe if len(marks) > 1 else None)
        m = res.problem_loss_matrix().double().numpy()
        fill = np.inf if res.diverged else m[-1]
        pad = np.broadcast_to(fill, (steps + 1 - m.shape[0], m.shape[1]))
        curves.append(np.nan_to_num(np.concatenate([m, pad], 0), nan=np.inf, posinf=np.inf).T)
        stops.append(res.stop_step if res.stopped else steps)
        end = checkpoint_metrics(task, res.params)
        if res.diverged:
            end = _inf_like(end)
        for mark in marks:  # checkpoints after a stop (or a divergence) take the end-of-run values
            at[mark].append(seen.get(mark, end))
    def gather(vals):
        # a family mixing classification and regression tasks: accuracy is NaN for the tasks without one
        keys = list(dict.fromkeys(k for v in vals for k in v))
        return {k: np.concatenate([v[k] if k in v else np.full(len(v["train_loss"]), np.nan) for v in vals])
                for k in keys}

    return EvalResult(np.concatenate(curves, 0), {mark: gather(vals) for mark, vals in at.items()}, stops, split,
                      seeds)


def lr_grid(low: float, high: float, num: int) -> List[float]:
    """``num`` log-spaced learning rates from ``low`` to ``high``."""
    if not (0 < low < high and math.isfinite(high)):
        raise ValueError(f"need 0 < low < high < inf, got low={low!r}, high={high!r}")
    check_positive_int("num", num)
    return [float(x) for x in np.logspace(math.log10(low), math.log10(high), num)]


def robust_mean(x) -> float:
    """Mean with non-finite values counted as ``inf`` (a diverged run ranks last)."""
    x = np.asarray(x, dtype=float)
    with np.errstate(over="ignore", invalid="ignore"):
        return float(np.mean(np.where(np.isfinite(x), x, np.inf)))


# ------------------------------------------------------------------------------------------------ tuning
AXIS_KINDS = ("log", "log1m")


@dataclass(frozen=True)
class Axis:
    """One hyper-parameter's grid for :func:`coordinate_search`.

    ``kind='log'``: positive values, log-spaced, widened by the grid's own ratio (learning rates, step sizes).
    ``kind='log1m'``: values in [0, 1) whose ``1 - x`` is log-spaced (momenta, betas, decay rates), widened
    towards 1 without limit and towards 0 down to 0 itself (a domain edge). ``start``: the value the other axes
    are searched at first (default: the middle of ``values``). ``refine``: after the search, halve the spacing
    around the best value until it is at most ``resolution`` decades (the learning rate).
    """
    name: str
    values: Tuple[float, ...]
    kind: str = "log"
    start: Optional[float] = None
    refine: bool = False

    def __post_init__(self):
        if self.kind not in AXIS_KINDS:
            raise ValueError(f"axis {self.name}: unknown kind {self.kind!r}; known: {', '.join(AXIS_KINDS)}")
        if len(self.values) < 2:
            raise ValueError(f"axis {self.name}: a grid needs at least two values, got {list(self.values)!r}")
        vals = [float(v) for v in self.values]
        if self.kind == "log" and not all(v > 0 and math.isfinite(v) for v in vals):
            raise ValueError(f"axis {self.name}: values must be finite and > 0, got {vals!r}")
        if self.kind == "log1m" and not all(0 <= v < 1 for v in vals):
            raise ValueError(f"axis {self.name}: values must lie in [0, 1), got {vals!r}")

    def _u(self, v: float) -> float:
        return v if self.kind == "log" else 1.0 - v

    def _v(self, u: float) -> float:
        return _clean(u if self.kind == "log" else 1.0 - u)

    def ratio(self, grid: Sequence[float]) -> float:
        """The grid's spacing as a factor (in ``x`` or ``1 - x``), from its two closest interior values."""
        us = sorted(self._u(v) for v in grid if self._u(v) > 0 and self._u(v) < (math.inf if self.kind == "log"
                                                                                  else 1.0))
        if len(us) < 2:
            return 10.0
        return min(b / a for a, b in zip(us[:-1], us[1:]) if b > a)

    def extend(self, grid: List[float], side: str) -> Optional[List[float]]:
        """The grid with one more value beyond its ``low`` or ``high`` end; ``None`` at a domain edge."""
        r = self.ratio(grid)
        lo, hi = min(grid), max(grid)
        if self.kind == "log":
            new = lo / r if side == "low" else hi * r
        elif side == "low":  # smaller x: larger 1 - x; 0 is the domain edge
            if lo == 0.0:
                return None
            u = (1 - lo) * r
            new = 0.0 if u >= 1 - 1e-9 else self._v(u)  # (1 - 0.9) * 10 rounds to just below 1: that is 0
        else:
            u = (1 - hi) / r
            if u < 1e-7:
                return None
            new = self._v(u)
        return sorted(set(grid) | {_clean(new)})


def _clean(x: float) -> float:
    """Round to 10 significant digits, so that grid values are stable cache keys."""
    return float(f"{x:.10g}")


def _key(point: Dict[str, float]) -> str:
    return json.dumps({k: _clean(v) for k, v in sorted(point.items())}, sort_keys=True)


@dataclass
class SearchResult:
    """The best point, its score, every point evaluated and, per axis, where the best value sits:
    ``interior``, ``domain`` (at a domain edge such as momentum 0) or ``grid`` (still at a grid edge after the
    allowed widenings: the search could not bracket the optimum)."""
    best: Dict[str, float]
    score: float
    table: List[Dict[str, float]]
    edges: Dict[str, str]
    grids: Dict[str, List[float]]
    widened: Dict[str, int]


def coordinate_search(score: Callable[[Dict[str, float]], float], axes: Sequence[Axis], *,
                      resolution: float = 0.125, max_rounds: int = 4, max_widen: int = 8,
                      name: str = "search") -> SearchResult:
    """Minimise ``score(point)`` over ``axes``.

    Round 1 scans each axis's whole grid in turn (the others at their current value), widening it while the best
    value sits at an edge; later rounds try each axis's neighbours of the current value (widening likewise) until
    a round changes nothing; finally each ``refine`` axis is refined to ``resolution`` decades. ``score`` should
    cache: points are asked for again.
    """
    if not axes:
        raise ValueError("coordinate_search needs at least one axis")
    grids = {a.name: sorted({_clean(v) for v in a.values}) for a in axes}
    point = {}
    for a in axes:
        g = grids[a.name]
        start = g[len(g) // 2] if a.start is None else _clean(a.start)
        grids[a.name] = sorted(set(g) | {start})
        point[a.name] = start
    seen: Dict[str, float] = {}
    widened = {a.name: 0 for a in axes}
    domain_edge = {a.name: False for a in axes}

    def s(p):
        k = _key(p)
        if k not in seen:
            v = float(score(dict(p)))
            seen[k] = v if math.isfinite(v) else math.inf
        return seen[k]

    def scan(a: Axis, full: bool) -> bool:
        """Move ``a`` to its best value; returns whether it moved."""
        moved = False
        while True:
            g = grids[a.name]
            i = g.index(point[a.name])
            cand = g if full else g[max(0, i - 1):i + 2]
            scores = {v: s({**point, a.name: v}) for v in cand}
            # ties keep the current value: an axis with no effect stays put instead of widening to its limit
            best = min(cand, key=lambda v: (scores[v], v != point[a.name], cand.index(v)))
            if all(math.isinf(x) for x in scores.values()):
                best = g[0]  # nothing converged: look below
            if best != point[a.name]:
                point[a.name] = best
                moved = True
            side = "low" if best == g[0] else ("high" if best == g[-1] else None)
            domain_edge[a.name] = False
            if side is None:
                return moved
            if widened[a.name] >= max_widen:
                return moved
            new = a.extend(g, side)
            if new is None:
                domain_edge[a.name] = True
                return moved
            grids[a.name] = new
            widened[a.name] += 1
            full = False  # after widening, the new neighbour is enough

    for a in axes:
        scan(a, full=True)
    for _ in range(max_rounds - 1):
        if not any([scan(a, full=False) for a in axes]):
            break
    for a in axes:
        if not a.refine:
            continue
        step = math.log10(a.ratio(grids[a.name]))
        while step > resolution + 1e-9:
            step /= 2
            here = point[a.name]
            cand = [here, a._v(a._u(here) / 10 ** step), a._v(a._u(here) * 10 ** step)]
            cand = [v for v in cand if (v > 0 if a.kind == "log" else 0 <= v < 1)]
            grids[a.name] = sorted(set(grids[a.name]) | set(cand))
            point[a.name] = min(cand, key=lambda v: (s({**point, a.name: v}), cand.index(v)))
    edges = {}
    for a in axes:
        g, v = grids[a.name], point[a.name]
        if domain_edge[a.name] or (a.kind == "log1m" and v == 0.0 and v == g[0]):
            edges[a.name] = "domain"
        elif v in (g[0], g[-1]):
            edges[a.name] = "grid"
            warnings.warn(f"{name}: best {a.name} {v:g} is still at the edge of its grid "
                          f"[{g[0]:g}, {g[-1]:g}] after {widened[a.name]} widenings")
        else:
            edges[a.name] = "interior"
    table = [{**json.loads(k), "score": v} for k, v in sorted(seen.items())]
    return SearchResult(dict(point), s(point), table, edges, {k: list(v) for k, v in grids.items()}, widened)


def default_lr_axis(low: float = 1e-4, high: float = 1.0, per_decade: int = 2) -> Axis:
    """The learning-rate axis: ``per_decade`` points per decade from ``low`` to ``high``, refined later."""
    n = int(round(math.log10(high / low) * per_decade)) + 1
    return Axis("lr", tuple(lr_grid(low, high, max(n, 2))), "log", refine=True)


BASELINE_AXES: Dict[str, Tuple[Axis, ...]] = {
    "sgd": (),
    "momentum": (Axis("momentum", (0.5, 0.9, 0.99), "log1m", start=0.9),),
    "nesterov": (Axis("momentum", (0.5, 0.9, 0.99), "log1m", start=0.9),),
    "adam": (Axis("beta1", (0.5, 0.9, 0.99), "log1m", start=0.9),
             Axis("beta2", (0.99, 0.999, 0.9999), "log1m", start=0.999)),
    "adamw": (Axis("beta1", (0.5, 0.9, 0.99), "log1m", start=0.9),
              Axis("beta2", (0.99, 0.999, 0.9999), "log1m", start=0.999)),
    "rmsprop": (Axis("alpha", (0.9, 0.99, 0.999), "log1m", start=0.99),),
}


def baseline_kwargs(hparams: Dict[str, float]) -> Dict[str, Any]:
    """Search coordinates -> optimizer keyword arguments (``beta1, beta2 -> betas``)."""
    kw = {k: v for k, v in hparams.items() if k not in ("beta1", "beta2")}
    if "beta1" in hparams or "beta2" in hparams:
        kw["betas"] = (hparams.get("beta1", 0.9), hparams.get("beta2", 0.999))
    return kw


def make_baseline(name: str, hparams: Dict[str, float]):
    """The hand-coded optimizer ``name`` with the searched ``hparams``. Nesterov at momentum 0 (the search widens
    the momentum axis down to its domain edge) is exactly SGD, which is what it builds there."""
    from .optim import get_optimizer

    if name == "nesterov" and hparams.get("momentum") == 0.0:
        name, hparams = "sgd", {k: v for k, v in hparams.items() if k != "momentum"}
    return get_optimizer(name, **baseline_kwargs(hparams))


@dataclass
class TunedBaseline:
    """A baseline's best hyper-parameters for one (horizon, metric), chosen on validation tasks."""
    name: str
    horizon: int
    metric: str
    hparams: Dict[str, float]
    score: float
    edges: Dict[str, str]
    grids: Dict[str, List[float]]
    widened: Dict[str, int]
    table: List[Dict[str, float]]
    num_tasks: int

    @property
    def kwargs(self) -> Dict[str, Any]:
        """Optimizer keyword arguments."""
        return baseline_kwargs(self.hparams)


class _ScoreCache:
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
         max_widen: int = 8) -> Dict[Tuple[int, str], TunedBaseline]:
    """Tune ``make(hparams) -> (optimizer, controller_fn or None)`` on ``num_tasks`` *validation* tasks, separately
    for every ``(horizon, metric)``: each target gets its own :func:`coordinate_search` over ``axes``, scored by
    the mean over tasks of the whole-split ``metric`` at that horizon (:func:`checkpoint_metrics`; ``accuracy``
    is maximised). With ``horizon_independent`` (no schedule that depends on the horizon), one run to the
    longest horizon serves every horizon. ``name`` must identify ``make`` (it keys the cache in ``cache_dir``).
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
                  [asdict(a) for a in axes]))
    digest = hashlib.sha1(ident.encode()).hexdigest()[:16]
    cache = _ScoreCache(os.path.join(cache_dir, f"tune-{_safe(name)}-{digest}.json") if cache_dir else None)

    def scores_at(point: Dict[str, float], h: int) -> Dict[str, float]:
        runs = [max(horizons)] if horizon_independent else [h]
        key = _key(point) + ("" if horizon_independent else f"@{h}")
        got = cache.get(key)
        if got is None:
            opt, ctrl_fn = make(dict(point))
            res = evaluate(family, opt, ctrl_fn, num_tasks=num_tasks, steps=runs[0], split="val", seed=seed,
                           stream=stream, val_every=val_every,
                           checkpoints=horizons if horizon_independent else ())
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
                  resolution: float = 0.125) -> Dict[Tuple[int, str], TunedBaseline]:
    """Tune the hand-coded optimizer ``name`` (its learning rate and the axes of :data:`BASELINE_AXES`, or
    ``extra``) for every horizon and metric, on validation tasks (see :func:`tune`)."""
    from .optim import OPTIMIZERS

    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; known: {', '.join(sorted(OPTIMIZERS))}")
    axes = (lr_axis or default_lr_axis(),) + tuple(BASELINE_AXES.get(name, ()) if extra is None else extra)
    return tune(name, lambda hp: (make_baseline(name, hp), None), family, axes, horizons=horizons,
                metrics=metrics, num_tasks=num_tasks, seed=seed, cache_dir=cache_dir, resolution=resolution)


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


# ------------------------------------------------------------------------------------------------ statistics
def t_quantile(level: float, dof: int) -> float:
    """Two-sided Student-t quantile for a ``level`` interval with ``dof`` degrees of freedom."""
    from scipy import stats

    return float(stats.t.ppf(0.5 + level / 2, dof))


def mean_ci(values: Sequence[float], level: float = 0.95) -> tuple:
    """Mean and a Student-t ``level`` confidence interval ``(mean, low, high)`` (t quantile, not z: with 3
    values the half-width is 4.30 standard errors, not 1.96)."""
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        raise ValueError("mean_ci needs at least one value")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level!r}")
    m = float(x.mean())
    if x.size == 1 or not np.all(np.isfinite(x)):
        return (m, m, m) if x.size == 1 else (m, -math.inf if not np.isfinite(m) else m, math.inf)
    half = t_quantile(level, x.size - 1) * float(x.std(ddof=1)) / math.sqrt(x.size)
    return m, m - half, m + half


def _as_seeds_tasks(x) -> np.ndarray:
    a = np.asarray(x, dtype=float)
    return a[None, :] if a.ndim == 1 else a


def paired(learned, baseline, *, level: float = 0.95, n_boot: int = 4000, seed: int = 0) -> Dict[str, Any]:
    """Paired comparison of ``learned`` against ``baseline`` on the same tasks (lower is better).

    ``learned``: per-task values ``(tasks,)`` or ``(seeds, tasks)`` (one row per meta-training seed);
    ``baseline``: ``(tasks,)`` or the same shape. Returns ``ratio`` (the mean over seeds and tasks of the per-task
    ratio learned / baseline) with a ``level`` bootstrap interval ``ci_low .. ci_high`` (resampling seeds, then
    tasks), ``ratio_of_means`` with its own bootstrap interval, ``gmean_ratio``, the two-sided Wilcoxon signed-rank
    p-value on the per-task log ratios (averaged over seeds) and ``favours`` (the side of their median),
    ``win_rate`` (fraction of seed-task pairs where learned is lower), the per-seed mean ratios and their t
    interval.
    """
    from scipy import stats

    L = _as_seeds_tasks(learned)
    B = _as_seeds_tasks(baseline)
    if B.shape[1] != L.shape[1]:
        raise ValueError(f"learned {L.shape} and baseline {B.shape} must cover the same tasks")
    if B.shape[0] == 1:
        B = np.broadcast_to(B, L.shape)
    if L.shape != B.shape:
        raise ValueError(f"learned {L.shape} and baseline {B.shape} must cover the same tasks")
    S, T = L.shape
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        R = np.where(np.isfinite(L), L, np.inf) / np.where(B > 0, B, np.nan)
        R = np.where(np.isnan(R), np.where(L <= B, 1.0, np.inf), R)  # baseline at exactly 0: tie or loss
        logr = np.log(R)
    rng = np.random.default_rng(seed)
    si = rng.integers(0, S, size=(n_boot, S)) if S > 1 else np.zeros((n_boot, 1), dtype=int)
    ti = rng.integers(0, T, size=(n_boot, T))
    Rb = R[si[:, :, None], ti[:, None, :]]
    Lb, Bb = L[si[:, :, None], ti[:, None, :]], B[si[:, :, None], ti[:, None, :]]
    with np.errstate(invalid="ignore", over="ignore"):
        boot = Rb.mean(axis=(1, 2))
        boot_rom = Lb.mean(axis=(1, 2)) / Bb.mean(axis=(1, 2))
    q = [(1 - level) / 2 * 100, (1 + level) / 2 * 100]
    lo, hi = (float(v) for v in np.percentile(boot, q))
    rlo, rhi = (float(v) for v in np.percentile(boot_rom, q))
    per_task_log = logr.mean(0)
    finite = per_task_log[np.isfinite(per_task_log)]
    if np.all(per_task_log == 0) or per_task_log.size < 2:
        p = 1.0
    else:
        d = np.where(np.isfinite(per_task_log), per_task_log, np.sign(per_task_log) * 1e9)
        try:
            p = float(stats.wilcoxon(d, zero_method="wilcox").pvalue) if np.any(d != 0) else 1.0
        except ValueError:
            p = 1.0
    per_seed = [float(v) for v in R.mean(1)]
    _, slo, shi = mean_ci(per_seed, level)
    with np.errstate(over="ignore", invalid="ignore"):
        out = {"ratio": float(R.mean()), "ci_low": lo, "ci_high": hi, "ci": "bootstrap",
               "ratio_of_means": float(L.mean() / B.mean()), "ratio_of_means_ci": [rlo, rhi],
               "gmean_ratio": float(np.exp(logr.mean())) if np.all(np.isfinite(logr)) else math.inf,
               "wilcoxon_p": p, "favours": ("learned" if np.median(per_task_log) < 0 else
                                            "baseline" if np.median(per_task_log) > 0 else "neither"),
               "win_rate": float(np.mean(L < B)), "n_seeds": S, "n_tasks": T,
               "per_seed_ratio": per_seed, "per_seed_t_ci": [slo, shi],
               "finite_tasks": int(finite.size)}
    return out


def steps_to_reach(curve: np.ndarray, target: float) -> float:
    """First step at which a mean loss curve is <= ``target`` (``inf`` if never)."""
    hit = np.nonzero(np.asarray(curve) <= target)[0]
    return float(hit[0]) if hit.size else math.inf


def envelope_speedup(envelope: Dict[int, float], learned_loss: float, step: int) -> Tuple[float, Optional[str]]:
    """Speedup of reaching ``learned_loss`` in ``step`` steps over a baseline *tuned for each horizon*.

    ``envelope[h]`` is the baseline's mean loss at step ``h`` when tuned for horizon ``h``. Returns
    ``(h* / step, bound)`` where ``h*`` is the smallest horizon whose tuned baseline reaches ``learned_loss``,
    interpolated log-linearly between the envelope's horizons (made non-increasing by a running minimum), and
    ``bound`` is None. When no horizon reaches it, ``h*`` is only bounded below by the largest horizon
    (``bound='lower'``); when even the smallest horizon already reaches it, only bounded above by the smallest
    (``bound='upper'``).
    """
    if step < 1:
        raise ValueError(f"step must be >= 1, got {step!r}")
    hs = sorted(envelope)
    vals = np.minimum.accumulate([envelope[h] for h in hs])
    if not any(v <= learned_loss for v in vals):
        return hs[-1] / step, "lower"
    i = next(k for k, v in enumerate(vals) if v <= learned_loss)
    if vals[i] == learned_loss:
        return hs[i] / step, None
    if i == 0:
        return hs[0] / step, "upper"
    h0, h1, v0, v1 = hs[i - 1], hs[i], vals[i - 1], vals[i]
    if not (v0 > v1 > 0 and learned_loss > 0):
        return h1 / step, None
    frac = (math.log(v0) - math.log(learned_loss)) / (math.log(v0) - math.log(v1))
    h = math.exp(math.log(h0) + frac * (math.log(h1) - math.log(h0)))
    return h / step, None


def protocol_record(*, meta_training_seeds: int, validation_tasks: int, tuning_metric: Any, test_split: str,
                    test_tasks: int, **extra) -> Dict[str, Any]:
    """The ``protocol`` object every comparing summary carries."""
    return {"meta_training_seeds": meta_training_seeds, "validation_tasks": validation_tasks, "ci": "bootstrap",
            "ci_over_seeds": "t", "tuning_metric": tuning_metric, "test_split": test_split,
            "test_tasks": test_tasks, "test_draw": TEST_DRAW if test_split.startswith("test") else None,
            "lr_resolution_decades": 0.125, **extra}
