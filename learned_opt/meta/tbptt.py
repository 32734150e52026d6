"""Truncated backpropagation through time (Andrychowicz et al. 2016): the exact gradient of each truncation's
meta-loss, backpropagated through the unrolled inner steps (run functionally through ``higher`` / ``torch.func``
by :func:`learned_opt.unroll.unroll`), with the inner state entering each truncation as a constant.
"""
from __future__ import annotations

from typing import Any, Callable, List, Sequence

import torch
from torch import Tensor

from .losses import InnerRun, truncation_loss


class TBPTT:
    """Backpropagation through each truncation; the gradient of the mean meta-loss over the tasks."""

    population = False
    supports_halting = True

    def __init__(self, cfg: Any, meta_params: Sequence[Tensor], unroll_run: Callable, dist: Any = None):
        self.cfg, self.meta_params, self.unroll_run = cfg, meta_params, unroll_run

    def reset(self) -> None:
        """Nothing is kept across truncations but the runs themselves."""

    def gradient(self, runs: List[InnerRun], length: int, ctrl, meta_step: int):
        """The meta-gradient of one truncation on every run: ``None`` when the meta-loss or an inner loss is
        non-finite (see :class:`~learned_opt.meta.estimator.Estimator`)."""
        cfg = self.cfg
        losses, results = [], []
        for run in runs:
            res = self.unroll_run(run, length, ctrl, differentiable=True)
            losses.append(truncation_loss(cfg.meta_loss, res, run, cfg.halting_lambda,
                                          getattr(ctrl, "restore_best", False)))
            results.append(res)
        meta_loss = torch.stack(losses).mean()
        extra = {"meta_loss": float(meta_loss.detach())}
        inner_finite = all(torch.isfinite(torch.stack([r.sum() for r in res.problem_losses])).all()
                           for res in results)
        grads = None
        if torch.isfinite(meta_loss) and inner_finite:
            grads = torch.autograd.grad(meta_loss, self.meta_params, allow_unused=True)
            grads = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, self.meta_params)]
        return grads, len(runs), results, extra
