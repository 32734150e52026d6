"""Persistent evolution strategies (Vicol et al. 2021): ES whose particles each keep their own inner state across
the truncations of a task, and the sum of every perturbation they have received; weighting a particle's loss by
that sum makes the estimate unbiased across truncations, where truncated backprop and plain ES are not.
"""
from __future__ import annotations

from typing import Any, Callable, List, Optional, Sequence

import torch
from torch import Tensor

from .es import ES
from .losses import InnerRun, advance, copy_run


class PES(ES):
    """PES meta-gradient of each truncation: persistent particles per task, weighted by their summed noise."""

    def __init__(self, cfg: Any, meta_params: Sequence[Tensor], unroll_run: Callable, dist: Any = None):
        super().__init__(cfg, meta_params, unroll_run, dist)
        self.particles: Optional[List[List[InnerRun]]] = None  # per task, its particles' inner runs
        self.accumulated: List[Tensor] = []  # per task, each particle's summed perturbations

    def reset(self) -> None:
        """PES particles belong to one batch of tasks: the next truncation starts them afresh."""
        self.particles = None

    def _start(self, runs: List[InnerRun], theta: Tensor) -> None:
        """On a batch of tasks' first truncation: every particle starts from its task's state, its sum at zero."""
        if self.particles is None:
            self.particles = [[copy_run(run) for _ in range(2 * self.half)] for run in runs]
            self.accumulated = [theta.new_zeros(2 * self.half, theta.numel()) for _ in runs]

    def _particle(self, r: int, i: int, run: InnerRun) -> InnerRun:
        """The particle's own inner run."""
        return self.particles[r][i]

    def _ran(self, particle: InnerRun, res) -> None:
        """The particle carries its state on to the next truncation."""
        advance(particle, res)

    def _weights(self, r: int, eps: Tensor) -> Tensor:
        """Each particle's perturbations summed over the task's truncations so far."""
        self.accumulated[r] = self.accumulated[r] + eps
        return self.accumulated[r]

    def _restart(self, r: int, ok: Tensor, run: InnerRun) -> None:
        """A pair that blew up restarts from the task's state, its sum cleared."""
        for i in torch.nonzero(~ok).flatten().tolist():
            self.particles[r][i] = copy_run(run)
            self.accumulated[r][i] = 0
