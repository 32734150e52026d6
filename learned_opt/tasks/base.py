"""The task protocol (after learned_optimization's ``Task``) and helpers shared by the tasks.

A task is one inner problem: ``init(generator) -> params``, ``sample_batch(generator, split) -> batch``,
``loss(params, batch) -> scalar``. ``losses(params, batch)`` gives one loss per independent problem (a task
may hold a batch of problems, as the L2L quadratics do; the scalar ``loss`` is their sum so that each problem
gets its own gradient). A task family is a callable ``family(generator) -> task``. All randomness comes from
explicit ``torch.Generator`` objects.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Protocol, Sequence

import torch
from torch import Tensor

# SPLITS and the argument checks live in learned_opt.validate; re-exported here for older imports.
from ..validate import SPLITS, check_positive_int, check_split  # noqa: F401


class Task(Protocol):
    """One inner problem."""
    num_problems: int

    def init(self, generator: torch.Generator) -> List[Tensor]:
        """Initial learner parameters."""

    def sample_batch(self, generator: torch.Generator, split: str = "train") -> Any:
        """A batch of data from ``split`` (``train``, ``val`` or ``test``)."""

    def loss(self, params: Sequence[Tensor], batch: Any) -> Tensor:
        """Scalar loss (sum over problems) of ``params`` on ``batch``."""

    def losses(self, params: Sequence[Tensor], batch: Any) -> Tensor:
        """Per-problem losses, shape ``(num_problems,)``."""


def generator(seed: int, device: Optional[torch.device] = None) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded with ``seed`` (tasks move sampled tensors to their device)."""
    g = torch.Generator()
    g.manual_seed(int(seed))
    return g


def sample_minibatch(x: Tensor, y: Tensor, batch_size: Optional[int], generator: torch.Generator):
    """A random minibatch of ``batch_size`` rows (all rows when ``batch_size`` is None or too large)."""
    n = x.shape[0]
    if batch_size is None or batch_size >= n:
        return x, y
    idx = torch.randperm(n, generator=generator)[:batch_size].to(x.device)
    return x[idx], y[idx]


def random_rotation(generator: torch.Generator, dim: int) -> Tensor:
    """A uniformly random ``dim x dim`` orthogonal matrix (QR of a Gaussian matrix, signs fixed), float64."""
    q, r = torch.linalg.qr(torch.randn((dim, dim), generator=generator, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r)).unsqueeze(0)


def finite_or_inf(x: float) -> float:
    """``x`` if finite, else ``inf`` (diverged runs rank last)."""
    return x if math.isfinite(x) else math.inf


Metrics = Dict[str, float]
