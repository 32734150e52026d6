"""The evaluation run: an optimizer (and a controller) on tasks of one split, keeping no graph, with whole-split
metrics measured at checkpoint steps."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional

import numpy as np
import torch

from ..tasks.base import generator
from ..unroll import unroll
from ..validate import check_positive_int
from .splits import task_seed

METRICS = ("train_loss", "val_loss", "test_loss", "accuracy")


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


def run_task(task, g: torch.Generator, optimizer, ctrl, steps: int, marks: List[int], val_every: int = 0):
    """One evaluation run of ``task`` (drawing from ``g``, which built it): ``(curve, stop step, metrics per mark)``,
    the curve ``(problems, steps + 1)`` of minibatch losses (``inf`` after a divergence), the metrics those of
    :func:`checkpoint_metrics` at each of ``marks`` (after a stop or divergence: the end-of-run values)."""
    seen: Dict[int, Dict[str, np.ndarray]] = {}

    def observe(t, params):
        if t in marks and t != steps:
            seen[t] = checkpoint_metrics(task, params)

    res = unroll(task, optimizer, ctrl, steps=steps, generator=g, val_every=val_every,
                 observe=observe if len(marks) > 1 else None)
    m = res.problem_loss_matrix().double().numpy()
    fill = np.inf if res.diverged else m[-1]
    pad = np.broadcast_to(fill, (steps + 1 - m.shape[0], m.shape[1]))
    curve = np.nan_to_num(np.concatenate([m, pad], 0), nan=np.inf, posinf=np.inf).T
    end = checkpoint_metrics(task, res.params)
    if res.diverged:
        end = _inf_like(end)
    # checkpoints after a stop (or a divergence) take the end-of-run values
    return curve, (res.stop_step if res.stopped else steps), {mark: seen.get(mark, end) for mark in marks}


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
        curve, stop, metrics = run_task(task, g, optimizer, controller_fn() if controller_fn is not None else None,
                                        steps, marks, val_every)
        curves.append(curve)
        stops.append(stop)
        for mark in marks:
            at[mark].append(metrics[mark])
    return EvalResult(np.concatenate(curves, 0), {mark: gather(vals) for mark, vals in at.items()}, stops, split,
                      seeds)


def gather(vals: List[Dict[str, np.ndarray]]) -> Dict[str, np.ndarray]:
    """Per-task metric dicts joined into one array per metric; a family mixing classification and regression
    tasks gets NaN accuracy for the tasks without one."""
    keys = list(dict.fromkeys(k for v in vals for k in v))
    return {k: np.concatenate([v[k] if k in v else np.full(len(v["train_loss"]), np.nan) for v in vals])
            for k in keys}
