"""The meta-gradient estimator interface and the registry of estimators (``MetaConfig.estimator``).

:class:`~learned_opt.meta.trainer.MetaTrainer` builds one estimator per run, ``cls(cfg, meta_params, unroll_run,
dist)``, and asks it for the meta-gradient of every truncation; guards, clipping, the all-reduce across ranks and
the meta-update stay in the trainer. The math the population estimators share (antithetic noise and sums) lives
in :mod:`learned_opt.estimators`. Adding an estimator: one file with its class, one line in :data:`ESTIMATOR_TYPES`.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Protocol, Tuple

from torch import Tensor

from ..unroll import UnrollResult
from .es import ES
from .losses import InnerRun
from .pes import PES
from .tbptt import TBPTT

# ``unroll_run(run, length, ctrl, differentiable)``: one truncation of ``run`` under the current meta-weights
UnrollRun = Callable[[InnerRun, int, Any, bool], UnrollResult]
# (the gradient, shaped like the meta-parameters, or None when non-finite; the number of antithetic pairs it
# sums over (population estimators); every run's unroll result; entries for the step's log record)
Estimate = Tuple[Optional[List[Tensor]], int, List[UnrollResult], Dict[str, Any]]


class Estimator(Protocol):
    """What the trainer asks of a meta-gradient estimator, built as ``cls(cfg, meta_params, unroll_run, dist)``."""

    # True for a population estimate (ES, PES): every rank draws the same tasks and holds its share of the
    # antithetic pairs, and the gradient is a *sum* over pairs that the trainer divides by their number (after
    # the all-reduce, with ranks). False: each rank draws its own tasks and the gradient is a mean already.
    population: bool
    # whether the halting meta-loss can be trained with it (its survival state is carried per inner run)
    supports_halting: bool

    def reset(self) -> None:
        """A new batch of tasks begins: forget what was kept across the truncations of the last one."""

    def gradient(self, runs: List[InnerRun], length: int, ctrl: Any, meta_step: int) -> Estimate:
        """The meta-gradient of meta-step ``meta_step``: one truncation of ``length`` steps on every run (the runs
        themselves are not changed; the trainer advances them with the returned results)."""


ESTIMATOR_TYPES: Dict[str, type] = {
    "tbptt": TBPTT,
    "es": ES,
    "pes": PES,
}
ESTIMATORS = tuple(ESTIMATOR_TYPES)  # the names MetaConfig.estimator accepts
