"""Task augmentation by reparametrisation (after Metz et al. 2022, "Practical tradeoffs between memory,
compute, and performance in learned optimizers", section on task augmentation).

Each parameter tensor ``w`` is rewritten as ``w = c * u`` with a per-tensor constant ``c``: the optimizer sees and
updates ``u`` and its gradient ``c * dL/dw``. The function the learner computes is unchanged, but every
optimizer whose step is of a fixed size in parameter space (Adam, sign-like updates, learned optimizers built
on them) now takes steps ``c`` times larger in ``w``, and SGD ``c^2`` times. Drawing ``c`` log-uniformly per
tensor per task exposes a meta-training distribution of one architecture to the range of stable step sizes
that other architectures have, so the learned optimizer must sense stability instead of memorising one rate.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, List, Sequence

import torch
from torch import Tensor


class Reparametrized:
    """``task`` with parameter tensor ``i`` optimised as ``w_i / scales[i]``."""

    def __init__(self, task: Any, scales: Sequence[float]):
        if any(not (math.isfinite(float(c)) and float(c) > 0) for c in scales):
            raise ValueError(f"reparametrisation scales must be finite and > 0, got {list(scales)!r}")
        self.task, self.scales = task, [float(c) for c in scales]
        self.num_problems = getattr(task, "num_problems", 1)
        self.loss_name = getattr(task, "loss_name", None)

    def _w(self, params: Sequence[Tensor]) -> List[Tensor]:
        if len(params) != len(self.scales):
            raise ValueError(f"got {len(params)} parameter tensors for {len(self.scales)} scales")
        return [c * u for c, u in zip(self.scales, params)]

    def init(self, generator: torch.Generator) -> List[Tensor]:
        """The wrapped task's initial parameters, divided by their scales."""
        params = self.task.init(generator)
        if len(params) != len(self.scales):
            raise ValueError(f"the task has {len(params)} parameter tensors but {len(self.scales)} scales were "
                             "given")
        return [w / c for c, w in zip(self.scales, params)]

    def sample_batch(self, generator: torch.Generator, split: str = "train"):
        """The wrapped task's batch."""
        return self.task.sample_batch(generator, split)

    def losses(self, params: Sequence[Tensor], batch) -> Tensor:
        """Per-problem losses of the reparametrised parameters."""
        return self.task.losses(self._w(params), batch)

    def loss(self, params: Sequence[Tensor], batch) -> Tensor:
        """Scalar loss of the reparametrised parameters."""
        return self.task.loss(self._w(params), batch)

    def split_losses(self, params: Sequence[Tensor], split: str) -> Tensor:
        """The wrapped task's loss on a whole split, at the reparametrised parameters."""
        return self.task.split_losses(self._w(params), split)

    def accuracy(self, params: Sequence[Tensor], split: str = "test") -> float:
        """The wrapped task's accuracy (classification tasks only)."""
        return self.task.accuracy(self._w(params), split)


@dataclass(frozen=True)
class ReparamFamily:
    """Samples a task from ``family`` and reparametrises it with per-tensor scales drawn log-uniformly from
    ``[1 / max_scale, max_scale]``, times one factor shared by all tensors drawn log-uniformly from
    ``[1 / shared_scale, shared_scale]`` (both 1: the family unchanged). The shared factor makes the whole
    learner hotter or colder at once, as a change of architecture or activation does."""
    family: Any
    max_scale: float = 3.0
    shared_scale: float = 1.0

    def __post_init__(self):
        for name in ("max_scale", "shared_scale"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 1):
                raise ValueError(f"{name} must be a finite number >= 1, got {value!r}")

    def __call__(self, generator: torch.Generator) -> Reparametrized:
        """A reparametrised task; the scales come from ``generator`` after the task is drawn."""
        task = self.family(generator)
        n = len(task.init(torch.Generator().manual_seed(0)))
        log_c = (torch.rand(n, generator=generator, dtype=torch.float64) * 2 - 1) * math.log(self.max_scale)
        if self.shared_scale > 1:
            log_c = log_c + (torch.rand((), generator=generator, dtype=torch.float64) * 2 - 1) \
                * math.log(self.shared_scale)
        return Reparametrized(task, torch.exp(log_c).tolist())
