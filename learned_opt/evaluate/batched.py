"""Many tasks in one inner loop: :func:`evaluate` for hand-coded, coordinatewise or slicewise optimizers, several times
faster.

Tuning a baseline the protocol's way (20 validation tasks per family, every hyper-parameter, horizons up to tens of
thousands of steps) runs the same small learner thousands of times; on a CPU the cost of such a step is Python
and dispatch, not arithmetic. :func:`evaluate_batched` stacks the parameters of the tasks that share an
architecture (leading dimension: the task) and runs one step for all of them: the losses through
``torch.func.vmap`` of the learner, one ``autograd.grad`` for every task (the tasks share no parameter, so each
task's gradient is its own), and one update of the optimizer on the stacked tensors, which is exact when the
update of every coordinate reads that coordinate only (:func:`coordinatewise`: SGD, momentum, Adam, AdamW,
RMSprop), or when the optimizer is told that its tensors carry a leading task dimension and treats every slice
along it as a problem of its own (:func:`slicewise`: Muon, whose Newton–Schulz iteration becomes a batched matrix
product with one norm per task; such an optimizer is a dataclass with an integer field ``batch_dims``, the number
of leading batch dimensions, which the batched run raises by one with ``dataclasses.replace``). Not a learned
optimizer, not a controller.

What stays the same as :func:`evaluate`: the tasks (same seeds), each task's own minibatch stream, initial
parameters and data, the divergence rule (a task whose loss is non-finite stops there: the rest of its curve and
its later checkpoints are ``inf``) and the whole-split metrics at the checkpoints. What does not: the batched
matrix products round differently, so the losses agree to float32 rounding (about 1e-7 relative at first),
not bitwise, and a long run may drift further on a chaotic trajectory. It therefore serves tuning scores (which
pick a setting; the reported runs use :func:`evaluate`) and its cache entries are keyed apart.

Tasks are batched only when that is safe: :class:`~learned_opt.tasks.supervised.SupervisedTask` learners with no
buffers and the same architecture, loss and batch size, at least :data:`MIN_GROUP` of them. Anything else (and any
task the vectorised forward refuses, e.g. dropout) runs through evaluate()'s own :func:`run_task`, one at a time.
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Dict, Iterable, List, Optional

import numpy as np
import torch

from ..tasks.base import generator
from ..tasks.supervised import SupervisedTask
from ..validate import check_positive_int
from .run import EvalResult, _inf_like, checkpoint_metrics, gather, run_task
from .splits import task_seed


MIN_GROUP = 4  # fewer tasks of one shape than this run one at a time: a batch of 1-3 costs more than it saves


class _Alone(Exception):
    """A task that runs through :func:`run_task` on its own."""


def coordinatewise(optimizer) -> bool:
    """Whether every coordinate's update reads only that coordinate (its gradient, parameter and state)."""
    return bool(getattr(type(optimizer), "coordinatewise", False))


def slicewise(optimizer) -> bool:
    """Whether the optimizer updates every slice along its tensors' leading ``batch_dims`` dimensions as a problem
    of its own (class attribute ``slicewise``; a dataclass field ``batch_dims``)."""
    return bool(getattr(type(optimizer), "slicewise", False)) and dataclasses.is_dataclass(optimizer) and any(
        f.name == "batch_dims" for f in dataclasses.fields(optimizer))


def batchable(optimizer) -> bool:
    """Whether :func:`evaluate_batched` can run ``optimizer`` on tasks stacked along a leading dimension."""
    return coordinatewise(optimizer) or slicewise(optimizer)


def _stacked(optimizer):
    """The optimizer for tensors with one more leading (task) dimension."""
    if coordinatewise(optimizer):
        return optimizer
    return dataclasses.replace(optimizer, batch_dims=optimizer.batch_dims + 1)


def _signature(task):
    """Tasks with equal signatures run in one batch; None: this task runs alone."""
    if not isinstance(task, SupervisedTask) or any(getattr(type(task), f) is not getattr(SupervisedTask, f)
                                                   for f in ("losses", "loss", "sample_batch", "init")):
        return None
    module = task.fn.module
    # a buffer, or a plain tensor attribute (e.g. a fixed random projection), may differ between tasks whose reprs
    # agree, and the batch runs every task through the first one's module: such tasks run alone
    if any(True for _ in module.buffers()) or any(isinstance(v, torch.Tensor) for m in module.modules()
                                                  for v in vars(m).values()):
        return None
    shapes = tuple((split, tuple(t.shape), t.dtype) for split, pair in task.data.items() for t in pair)
    return (repr(module), task.loss_name, task.batch_size, shapes)


def _group_loss(task):
    """Per-task losses ``f(params, x, y) -> (tasks,)`` of ``task``'s architecture and loss, for parameters and
    batches with a leading task axis: the learner's forward vectorised by ``vmap``, the loss batched directly."""
    module = copy.deepcopy(task.fn.module)
    names = [n for n, _ in module.named_parameters()]
    forward = torch.func.vmap(lambda params, x: torch.func.functional_call(module, dict(zip(names, params)), (x,)))

    def losses(params, x, y):
        out = forward(params, x)
        n = out.shape[0]
        if task.loss_name == "mse":
            return (out - y).pow(2).reshape(n, -1).mean(1)
        # classes on dimension 1 of each task's output: (N, C) for a classifier, (N, C, L) for a sequence model
        per_row = torch.nn.functional.cross_entropy(out.flatten(0, 1), y.flatten(0, 1), reduction="none")
        return per_row.reshape(n, -1).mean(1)
    return losses


class _Batches:
    """Each task's training minibatch, drawn from its own generator exactly as ``SupervisedTask.sample_batch``
    draws it (the same rows), gathered from the tasks' stacked training sets in one indexing operation."""

    def __init__(self, tasks, gens):
        self.tasks, self.gens = tasks, gens
        x, y = zip(*(t.data["train"] for t in tasks))
        self.x, self.y = torch.stack(x), torch.stack(y)
        self.rows = torch.arange(len(tasks)).unsqueeze(1)
        n, size = self.x.shape[1], tasks[0].batch_size
        self.full = size is None or size >= n
        self.size = size

    def __call__(self, peek: bool = False):
        if self.full:
            return self.x, self.y
        idx = []
        for g in self.gens:
            st = g.get_state() if peek else None
            idx.append(torch.randperm(self.x.shape[1], generator=g)[:self.size])
            if peek:
                g.set_state(st)
        flat = (torch.stack(idx) + self.rows * self.x.shape[1]).reshape(-1)  # rows of the flattened sets
        x = self.x.reshape(-1, *self.x.shape[2:]).index_select(0, flat)
        y = self.y.reshape(-1, *self.y.shape[2:]).index_select(0, flat)
        return x.reshape(len(self.gens), -1, *x.shape[1:]), y.reshape(len(self.gens), -1, *y.shape[1:])


def _run_group(tasks, gens, optimizer, steps: int, marks: List[int]):
    """One batched inner loop over ``tasks`` (same signature). Returns ``(curves, at, per-task end metrics)``."""
    n = len(tasks)
    params0 = [t.init(g) for t, g in zip(tasks, gens)]
    params = [torch.stack([p[k] for p in params0]) for k in range(len(params0[0]))]
    with torch.no_grad():
        state = optimizer.init([p.detach() for p in params])
    losses_of, batch = _group_loss(tasks[0]), _Batches(tasks, gens)
    curves = np.full((n, steps + 1), np.inf)
    seen: List[Dict[int, Dict[str, np.ndarray]]] = [{} for _ in range(n)]
    dead_at: List[Optional[List[torch.Tensor]]] = [None] * n  # a diverged task's parameters where it stopped
    alive = np.ones(n, bool)

    def observe(t):
        if t in marks and t != steps:
            for i in np.flatnonzero(alive):
                seen[i][t] = checkpoint_metrics(tasks[i], [p[i] for p in params])

    for t in range(steps):
        observe(t)
        x, y = batch()
        p = [q.detach().requires_grad_(True) for q in params]
        per_task = losses_of(p, x, y)
        grads = torch.autograd.grad(per_task.sum(), p)
        vals = per_task.detach().double().numpy()
        curves[alive, t] = vals[alive]
        with torch.no_grad():
            updates, state = optimizer.update(list(grads), state, [q.detach() for q in p],
                                              loss=per_task.detach().sum())
            params = list(torch._foreach_add([q.detach() for q in p], updates))
        for i in np.flatnonzero(alive & ~np.isfinite(vals)):  # evaluate()'s divergence: the run stops here
            alive[i] = False
            dead_at[i] = [q[i].clone() for q in params]
        if not alive.any():
            break
    else:
        observe(steps)
        x, y = batch(peek=True)
        with torch.no_grad():
            last = losses_of(params, x, y).double().numpy()
        curves[alive, steps] = last[alive]
    curves = np.nan_to_num(curves, nan=np.inf, posinf=np.inf)
    ends = []
    for i in range(n):
        if dead_at[i] is None:
            ends.append(checkpoint_metrics(tasks[i], [q[i] for q in params]))
        else:
            ends.append(_inf_like(checkpoint_metrics(tasks[i], dead_at[i])))
    return curves, seen, ends


def evaluate_batched(family, optimizer, *, num_tasks: int, steps: int, split: str, seed: int = 0,
                     stream: str = "", checkpoints: Iterable[int] = (), draw: Optional[int] = None) -> EvalResult:
    """:func:`evaluate` (no controller, no validation checks) with the tasks that can share a batch run together.

    ``optimizer`` must be :func:`coordinatewise` or :func:`slicewise` (``ValueError`` otherwise: batching it would
    mix the tasks).
    """
    if not batchable(optimizer):
        raise ValueError(f"{type(optimizer).__name__} is not coordinatewise (nor slicewise): its tasks cannot share "
                         f"a batch; use evaluate()")
    check_positive_int("num_tasks", num_tasks)
    check_positive_int("steps", steps)
    marks = sorted({int(c) for c in checkpoints} | {steps})
    if marks[0] < 0 or marks[-1] > steps:
        raise ValueError(f"checkpoints must lie in [0, {steps}], got {sorted(checkpoints)}")
    seeds = [task_seed(split, i, seed, stream=stream, draw=draw) for i in range(num_tasks)]
    gens = [generator(s) for s in seeds]
    tasks = [family(g) for g in gens]
    groups: Dict[object, List[int]] = {}
    for i, task in enumerate(tasks):
        sig = _signature(task)
        groups.setdefault(("alone", i) if sig is None else sig, []).append(i)
    curves = np.zeros((num_tasks, steps + 1))
    at_rows: Dict[int, List[Optional[Dict[str, np.ndarray]]]] = {m: [None] * num_tasks for m in marks}
    for key, members in groups.items():
        try:
            if key[0] == "alone" or len(members) < MIN_GROUP:
                raise _Alone
            c, seen, ends = _run_group([tasks[i] for i in members], [gens[i] for i in members],
                                       _stacked(optimizer), steps, marks)
        except (_Alone, RuntimeError):  # not batchable, or the vectorised forward refuses (e.g. random ops)
            c, seen, ends = _one_by_one(family, optimizer, [seeds[i] for i in members], steps, marks)
        for j, i in enumerate(members):
            curves[i] = c[j]
            for m in marks:
                at_rows[m][i] = seen[j].get(m, ends[j])

    return EvalResult(curves, {m: gather(rows) for m, rows in at_rows.items()}, [steps] * num_tasks, split, seeds)


def _one_by_one(family, optimizer, seeds: List[int], steps: int, marks: List[int]):
    """The tasks of ``seeds`` through :func:`run_task` (rebuilt from their seeds: a batched attempt may have drawn
    from their generators), in the shape :func:`_run_group` returns."""
    curves, seen, ends = [], [], []
    for s in seeds:
        g = generator(s)
        curve, _, metrics = run_task(family(g), g, optimizer, None, steps, marks)
        curves.append(curve[0])
        seen.append(metrics)
        ends.append(metrics[steps])
    return np.stack(curves), seen, ends
