"""Inner runs and meta-losses: the state of one task's inner training carried across truncations, and the loss of
one truncation that meta-training minimises.

Following Andrychowicz et al. (2016), the meta-loss of a truncation sums the inner losses it produced (``sum``);
the alternatives are the mean log loss, the validation loss, and the halting objective of the stop head
(``sum_t q_t (L_val(t) + lam t)`` over the halting distribution ``q``). Inner losses are clipped at a per-task
ceiling, so that one diverging unroll cannot dominate a meta-gradient.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, List

import torch
from torch import Tensor

from ..tasks.base import generator
from ..unroll import UnrollResult


def tree_detach(x: Any) -> Any:
    """Detach every tensor in a nested structure of tuples, lists, dicts and NamedTuples."""
    if isinstance(x, Tensor):
        return x.detach()
    if isinstance(x, tuple) and hasattr(x, "_fields"):
        return type(x)(*(tree_detach(v) for v in x))
    if isinstance(x, (tuple, list)):
        return type(x)(tree_detach(v) for v in x)
    if isinstance(x, dict):
        return {k: tree_detach(v) for k, v in x.items()}
    return x


def tree_finite(x: Any) -> bool:
    """True when every floating tensor in a nested structure is finite."""
    if isinstance(x, Tensor):
        return not x.is_floating_point() or bool(torch.isfinite(x).all())
    if isinstance(x, (tuple, list)):
        return all(tree_finite(v) for v in x)
    if isinstance(x, dict):
        return all(tree_finite(v) for v in x.values())
    return True


@dataclass
class InnerRun:
    """One task's inner training in progress across truncations."""
    task: Any
    gen: torch.Generator
    params: List[Tensor]
    opt_state: Any
    ctrl_state: Any
    step: int
    horizon: int
    ceiling: Tensor  # per-problem loss ceiling
    survival: float = 1.0  # halting: probability of not having stopped before ``step``
    best_val: float = math.inf  # halting with restore_best: lowest validation loss seen before ``step``


def new_run(family, seed: int, optimizer, ctrl, horizon: int, loss_ceiling: float) -> InnerRun:
    """The inner run of the task ``family`` draws from seed ``seed``: initial parameters, optimizer and controller
    states, and a loss ceiling of ``loss_ceiling`` times the task's initial loss per problem."""
    task_gen = generator(seed)
    task = family(task_gen)
    params = task.init(task_gen)
    with torch.no_grad():
        initial = task.losses(params, task.sample_batch(task_gen, "train"))
    return InnerRun(task, task_gen, params, optimizer.init([p.detach() for p in params]),
                    ctrl.init() if ctrl is not None else None, 0, horizon,
                    initial.detach().abs() * loss_ceiling + 1e-8)


def copy_run(run: InnerRun) -> InnerRun:
    """An independent copy of an inner run's state (its own data generator at the same position)."""
    gen = torch.Generator(device=run.gen.device)
    gen.set_state(run.gen.get_state())
    return InnerRun(run.task, gen, [p.detach().clone() for p in run.params], tree_detach(run.opt_state),
                    tree_detach(run.ctrl_state), run.step, run.horizon, run.ceiling, run.survival, run.best_val)


def advance(run: InnerRun, res: UnrollResult) -> None:
    """Carry a run's state past the truncation ``res`` (without a graph)."""
    run.params = [p.detach() for p in res.params]
    run.opt_state = tree_detach(res.opt_state)
    run.ctrl_state = tree_detach(res.ctrl_state)
    run.step = res.step


# "mean_log_val" counts every loss below this as this (the evaluation's verdict floor, experiments/common.py's
# LOSS_FLOOR): on a log scale, driving an already solved task (a quadratic, a separable classification) from 1e-6
# to 1e-10 would otherwise outweigh any divergence, whose cost the loss ceiling caps, and teach larger steps
META_LOSS_FLOOR = 1e-6


def _clip(per_problem: Tensor, ceiling: Tensor) -> Tensor:
    # min(loss, ceiling) keeps the gradient below the ceiling and cuts it above: a diverging unroll
    # contributes a bounded constant instead of dominating the meta-gradient.
    return torch.minimum(per_problem, ceiling)


def truncation_loss(kind: str, res: UnrollResult, run: InnerRun, lam: float = 0.0,
                    restore_best: bool = False) -> Tensor:
    """The meta-loss of one truncation (rows after the first: the losses that depend on this truncation)."""
    rows = res.problem_losses[1:]
    if kind in ("sum", "mean_log"):
        if not rows:
            return res.train_losses[0] * 0
        stacked = torch.stack([_clip(r, run.ceiling) for r in rows])  # (steps, problems)
        if kind == "sum":
            return stacked.mean(-1).sum()
        return torch.log(stacked + 1e-12).mean()
    vals = [v for v in res.val_losses[1:] if v is not None]
    if kind == "mean_log_val":  # the whole run's train and validation losses, each on a log scale, weighed alike,
        if not rows or not vals:  # both floored at META_LOSS_FLOOR
            raise ValueError("the 'mean_log_val' meta-loss needs train and validation losses (val_every=1)")
        train = torch.log(torch.stack([_clip(r, run.ceiling) for r in rows]).clamp_min(META_LOSS_FLOOR)).mean()
        return 0.5 * train + 0.5 * torch.log(torch.stack(vals).clamp_min(META_LOSS_FLOOR)).mean()
    if kind == "val":
        if not vals:
            raise ValueError("the 'val' meta-loss needs validation losses (val_every=1)")
        return torch.stack(vals).mean()
    return halting_loss(res, run, lam, restore_best)


def halting_loss(res: UnrollResult, run: InnerRun, lam: float, restore_best: bool = False) -> Tensor:
    """Truncated halting objective ``sum_t q_t (L_val(t) + lam t)``, ``q_t = p_t prod_{s<t} (1 - p_s)``.

    The survival probability is carried (detached) across truncations; the mass left at the horizon is
    charged to the last validation loss there. Before the horizon, the mass that survives the truncation is
    charged, *for the gradient only*, to the validation loss at the truncation's end (a bootstrap of the cost
    of continuing): without it, truncated backpropagation sees stopping cost ``L_val(t)`` and continuing cost
    nothing, and drives every stop probability to zero. The term has value zero, so the logged objective
    summed over truncations still equals the one-piece objective. With ``restore_best`` (the controller
    returns the best parameters seen, as patience-based early stopping does) stopping at ``t`` costs the
    lowest validation loss up to ``t`` instead of ``L_val(t)``.
    """
    best = torch.as_tensor(run.best_val, dtype=res.train_losses[0].dtype)

    def cost(val):
        nonlocal best
        if not restore_best:
            return val
        best = torch.minimum(best, val)
        return best

    survival = torch.as_tensor(run.survival, dtype=res.train_losses[0].dtype)
    total = res.train_losses[0].new_zeros(())
    steps = res.records["step"]
    for i, p in enumerate(res.stop_probs):
        t = steps[i]
        val = cost(res.val_losses[i])
        total = total + survival * p * (val + lam * t)
        survival = survival * (1 - p)
    last = len(res.stop_probs)
    if last < len(res.val_losses) and res.val_losses[last] is not None:
        tail = survival * (cost(res.val_losses[last]) + lam * steps[last])
        total = total + (tail if res.step >= run.horizon else tail - tail.detach())
    run.survival = float(survival.detach())
    if restore_best:
        run.best_val = float(best.detach())
    return total


def halting_distribution(stop_probs: Tensor) -> Tensor:
    """``q`` over steps ``0..T``: ``q_t = p_t prod_{s<t} (1 - p_s)`` for ``t < T``, the rest at ``T``."""
    survival = torch.cumprod(torch.cat([stop_probs.new_ones(1), 1 - stop_probs]), 0)
    return torch.cat([stop_probs * survival[:-1], survival[-1:]])
