"""Antithetic evolution strategies on each truncation (Salimans et al. 2017, as in Metz et al.'s learned
optimizers): ``particles`` perturbations of the flattened meta-weights run the truncation without a graph, from
the task's current (unperturbed) state, and their antithetic loss differences weight the perturbations. The noise
math lives in :mod:`learned_opt.estimators`; :class:`~learned_opt.meta.pes.PES` extends this class.
"""
from __future__ import annotations

import math
from typing import Any, Callable, List, Sequence

import torch
from torch import Tensor

from ..estimators import antithetic_noise, antithetic_sum, local_pairs
from ..evaluate import task_seed
from ..tasks.base import generator
from .losses import InnerRun, copy_run, truncation_loss


def _set_flat(params: Sequence[Tensor], flat: Tensor) -> None:
    """Copy a flat vector into the parameters in place (no grad; the parameters keep their own storage)."""
    offset = 0
    for p in params:
        p.copy_(flat[offset:offset + p.numel()].view_as(p))
        offset += p.numel()


class ES:
    """ES meta-gradient of each truncation, every particle from the task's current state."""

    population = True
    supports_halting = False  # the survival state is not carried per particle

    def __init__(self, cfg: Any, meta_params: Sequence[Tensor], unroll_run: Callable, dist: Any = None):
        self.cfg, self.meta_params, self.unroll_run = cfg, meta_params, unroll_run
        self.rank, self.world = (dist.rank, dist.world_size) if dist is not None else (0, 1)
        # this rank's pairs: rank, rank + world, ... (every rank holds a pair, or ValueError)
        self.half = len(local_pairs(cfg.particles, self.rank, self.world))

    def reset(self) -> None:
        """Nothing is kept across truncations but the runs themselves."""

    # ------------------------------------------------------------------ what PES changes
    def _start(self, runs: List[InnerRun], theta: Tensor) -> None:
        """Before the first particle of a truncation."""

    def _particle(self, r: int, i: int, run: InnerRun) -> InnerRun:
        """The inner run particle ``i`` of task ``r`` unrolls: a copy of the task's state."""
        return copy_run(run)

    def _ran(self, particle: InnerRun, res) -> None:
        """After a particle's truncation (its copy is thrown away)."""

    def _weights(self, r: int, eps: Tensor) -> Tensor:
        """What weights each particle's loss in the estimate: its perturbation."""
        return eps

    def _restart(self, r: int, ok: Tensor, run: InnerRun) -> None:
        """After pairs with a non-finite loss were left out of the estimate."""

    # ------------------------------------------------------------------ the estimate
    def gradient(self, runs: List[InnerRun], length: int, ctrl, meta_step: int):
        """ES / PES meta-gradient of one truncation (see :mod:`learned_opt.estimators` for the estimators).

        For every task, ``particles`` antithetic perturbations ``e`` of the flattened meta-weights each run the
        truncation without a graph: ES from the task's current state, PES from the particle's own state (kept
        across the task's truncations, with the sum of its perturbations). The data order is the task's for every
        particle (common random numbers). The estimate is ``sum_pairs (L+ - L-) w / (2 sigma^2)`` over finite
        pairs, ``w`` the perturbation (ES) or its running sum (PES), averaged over pairs and tasks. The task
        then advances under the unperturbed weights. The noise of meta-step ``k`` is drawn from a generator
        seeded by (seed, k), the same on every rank, so resuming at an iteration boundary (where every checkpoint
        is written, and where PES particles start afresh with the new tasks) is exact. Returns (the gradient as
        a list shaped like the meta-parameters, *summed* over this rank's finite pairs; their number; the
        advanced runs' unroll results; log entries). With ranks, pair ``j`` of the population lives on rank
        ``j % world_size``.
        """
        cfg = self.cfg
        theta = torch.nn.utils.parameters_to_vector([p.detach() for p in self.meta_params]).clone()
        noise = generator(task_seed("train", meta_step, cfg.seed, stream="es-noise"))
        half = self.half
        restore_best = getattr(ctrl, "restore_best", False)
        self._start(runs, theta)
        total, pairs, dropped, losses_seen = torch.zeros_like(theta), 0, 0, []
        try:
            for r, run in enumerate(runs):
                eps = antithetic_noise(cfg.particles, theta.numel(), cfg.sigma, noise, theta.dtype, self.rank,
                                       self.world)
                losses = theta.new_full((2 * half,), math.nan)
                for i in range(2 * half):
                    particle = self._particle(r, i, run)
                    with torch.no_grad():
                        _set_flat(self.meta_params, theta + eps[i])
                        res = self.unroll_run(particle, length, ctrl, differentiable=False)
                        loss = truncation_loss(cfg.meta_loss, res, particle, cfg.halting_lambda, restore_best)
                    losses[i] = float(loss)
                    self._ran(particle, res)
                part, ok = antithetic_sum(losses, self._weights(r, eps), cfg.sigma)
                total = total + part
                pairs += int(ok.sum()) // 2
                dropped += int((~ok).sum())
                losses_seen.append(losses[ok])
                if not ok.all():
                    self._restart(r, ok, run)
        finally:
            with torch.no_grad():
                _set_flat(self.meta_params, theta)
        with torch.no_grad():
            results = [self.unroll_run(run, length, ctrl, differentiable=False) for run in runs]
        seen = torch.cat(losses_seen)
        extra = {"meta_loss": float(seen.mean()) if seen.numel() else math.nan, "particles_dropped": dropped}
        grads, offset = [], 0
        for p in self.meta_params:
            grads.append(total[offset:offset + p.numel()].view_as(p).to(p.dtype))
            offset += p.numel()
        return grads, pairs, results, extra
