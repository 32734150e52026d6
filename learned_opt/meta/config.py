"""Meta-training settings: :class:`MetaConfig` (the experiment scripts and the CLI expose its fields as flags), the
names its settings accept and the limit on inner steps its checks enforce.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Tuple

from ..validate import check_positive_int
from .estimator import ESTIMATOR_TYPES, ESTIMATORS

META_LOSSES = ("sum", "mean_log", "val", "halting", "mean_log_val")
VAL_LOSSES = ("val", "halting", "mean_log_val")  # meta-losses that read the validation loss at every inner step
CONTROLS = ("none", "learned")
VAL_METRICS = ("mean_final", "mean_log_final", "mean_log_curve", "val_at_stop", "mean_log_train_val")
# checkpoints of the whole-run selection metric "mean_log_train_val" (evenly spaced over the validation horizon)
TRAIN_VAL_MARKS = 10
# Inner steps per task at most (horizons, evaluation steps). The per-step records of an unroll and an
# evaluation's loss curves grow with the horizon, and a million steps of even the smallest task take hours on a
# CPU: a larger number is a typo (1e12 used to exhaust memory before the first step).
MAX_HORIZON = 1_000_000
# Settings a resumed run may change: they decide how long it runs and how often it saves, not what it learns.
RESUMABLE = ("iterations", "checkpoint_every", "checkpoint_seconds")


@dataclass
class MetaConfig:
    """Meta-training settings (the experiment scripts expose these as flags)."""
    horizon: int = 100
    truncation: int = 20
    tasks_per_step: int = 1
    iterations: int = 100
    meta_lr: float = 1e-3
    # a cosine decay of the meta-learning rate from meta_lr to meta_lr * meta_lr_min_ratio over this many
    # meta-iterations, then flat (0: constant). Its own setting, not ``iterations``: a run stopped at a compute
    # budget and resumed with more iterations follows the one schedule (meta_lr_factor)
    meta_lr_decay_iterations: int = 0
    meta_lr_min_ratio: float = 0.1
    clip_norm: float = 1.0
    meta_loss: str = "sum"
    halting_lambda: float = 0.0
    second_order: bool = False
    control: str = "none"  # "none": update only; "learned": the LR and stop heads drive the unroll
    loss_ceiling: float = 10.0  # inner losses clipped at this multiple of the task's initial loss
    curriculum: Tuple[int, ...] = ()  # horizons, each used for an equal share of the iterations
    # horizons to draw from, uniformly and independently per meta-iteration (overrides horizon and curriculum):
    # a task mixture meta-trained at one horizon learns one schedule; drawn horizons make it read the time features
    sample_horizons: Tuple[int, ...] = ()
    random_offset: bool = False
    val_every: int = 0  # meta-iterations between validations on held-out tasks (0: never)
    val_tasks: int = 8
    val_horizon: int = 0  # inner steps of each validation run (0: the meta-training horizon)
    # or "mean_log_final", "mean_log_curve" (every step), "val_at_stop", "mean_log_train_val" (the whole-split train
    # and validation losses on a log scale, weighed alike, averaged over TRAIN_VAL_MARKS evenly spaced checkpoints)
    val_metric: str = "mean_final"
    keep_best: bool = True
    # score the initial meta-weights too (iteration 0, before any meta-step): the kept weights are then never worse
    # on the selection stream than where meta-training started, and the log shows whether it helped at all
    val_at_start: bool = False
    # With a run_dir, a checkpoint every checkpoint_every meta-iterations or checkpoint_seconds of training,
    # whichever comes first (0 turns either off; with both 0, only at the end): a killed run loses little.
    checkpoint_every: int = 10
    checkpoint_seconds: float = 60.0
    # The meta-gradient estimator: "tbptt" (backprop through each truncation, through higher / torch.func),
    # "es" (antithetic evolution strategies on each truncation, from the unperturbed state) or "pes" (persistent
    # ES: each particle keeps its own inner state across the truncations of a task and the sum of its
    # perturbations; unbiased across truncations). ES / PES use ``particles`` perturbations of scale ``sigma``
    # per task and truncation and run the inner loop without a graph.
    estimator: str = "tbptt"
    particles: int = 8
    sigma: float = 0.01
    seed: int = 0

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad setting."""
        check_positive_int("horizon", self.horizon)
        check_at_most("horizon", self.horizon, MAX_HORIZON)
        check_positive_int("truncation", self.truncation)
        check_positive_int("tasks_per_step", self.tasks_per_step)
        check_positive_int("iterations", self.iterations)
        if self.truncation > self.horizon:
            raise ValueError(f"truncation {self.truncation} is longer than the horizon {self.horizon}")
        for h in self.curriculum:
            check_positive_int("curriculum horizon", h)
            check_at_most("curriculum horizon", h, MAX_HORIZON)
        for h in self.sample_horizons:
            check_positive_int("sampled horizon", h)
            check_at_most("sampled horizon", h, MAX_HORIZON)
        if not (self.meta_lr > 0 and math.isfinite(self.meta_lr)):
            raise ValueError(f"meta_lr must be a finite number > 0, got {self.meta_lr!r}")
        value = self.meta_lr_decay_iterations
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"meta_lr_decay_iterations must be an integer >= 0 (0: no decay), got {value!r}")
        if isinstance(self.meta_lr_min_ratio, bool) or not (isinstance(self.meta_lr_min_ratio, (int, float))
                                                            and 0 <= self.meta_lr_min_ratio <= 1):
            raise ValueError(f"meta_lr_min_ratio must be a number in [0, 1], got {self.meta_lr_min_ratio!r}")
        if not self.clip_norm > 0:
            raise ValueError(f"clip_norm must be > 0, got {self.clip_norm!r}")
        if self.meta_loss not in META_LOSSES:
            raise ValueError(f"unknown meta-loss {self.meta_loss!r}; known: {', '.join(META_LOSSES)}")
        if self.control not in CONTROLS:
            raise ValueError(f"control must be 'none' or 'learned', got {self.control!r}")
        if self.meta_loss == "halting" and self.control != "learned":
            raise ValueError("the halting meta-loss trains the stop head: it needs control='learned'")
        if not self.loss_ceiling > 1:
            raise ValueError(f"loss_ceiling must be > 1, got {self.loss_ceiling!r}")
        if self.val_metric not in VAL_METRICS:
            raise ValueError(f"unknown val_metric {self.val_metric!r}")
        # Negative intervals used to pass and then act as "every iteration" (i % -1 == 0); zero validation
        # tasks failed only at the first validation, mid-run.
        for name in ("val_every", "checkpoint_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
        check_positive_int("val_tasks", self.val_tasks)
        if isinstance(self.val_horizon, bool) or not isinstance(self.val_horizon, int) or self.val_horizon < 0:
            raise ValueError(f"val_horizon must be an integer >= 0 (0: the horizon), got {self.val_horizon!r}")
        check_at_most("val_horizon", self.val_horizon, MAX_HORIZON)
        if isinstance(self.checkpoint_seconds, bool) or not (isinstance(self.checkpoint_seconds, (int, float))
                                                            and 0 <= self.checkpoint_seconds < math.inf):
            raise ValueError(f"checkpoint_seconds must be a finite number >= 0, got {self.checkpoint_seconds!r}")
        if not (self.halting_lambda >= 0 and math.isfinite(self.halting_lambda)):
            raise ValueError(f"halting_lambda must be a finite number >= 0, got {self.halting_lambda!r}")
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"unknown estimator {self.estimator!r}; known: {', '.join(ESTIMATORS)}")
        check_positive_int("particles", self.particles)
        if self.particles % 2:
            raise ValueError(f"particles must be an even integer >= 2 (antithetic pairs), got {self.particles!r}")
        if isinstance(self.sigma, bool) or not (isinstance(self.sigma, (int, float)) and 0 < self.sigma < math.inf):
            raise ValueError(f"sigma must be a finite number > 0, got {self.sigma!r}")
        if self.meta_loss == "halting" and not ESTIMATOR_TYPES[self.estimator].supports_halting:
            raise ValueError("the halting meta-loss needs estimator='tbptt' (its survival state is not carried per "
                             "ES / PES particle)")


def meta_lr_factor(cfg: MetaConfig, iteration: int) -> float:
    """The meta-learning rate of meta-iteration ``iteration`` (0-based) over ``cfg.meta_lr``: 1 without a decay;
    with ``meta_lr_decay_iterations = n``, ``r + (1 - r) (1 + cos(pi min(i, n) / n)) / 2`` for
    ``r = meta_lr_min_ratio`` (1 at the start, ``r`` from iteration ``n`` on)."""
    n = cfg.meta_lr_decay_iterations
    if n <= 0:
        return 1.0
    r = cfg.meta_lr_min_ratio
    return r + (1 - r) * 0.5 * (1 + math.cos(math.pi * min(iteration, n) / n))


def check_at_most(name: str, value: int, limit: int) -> None:
    """Raise ``ValueError`` naming ``name`` when ``value`` exceeds ``limit`` (:data:`MAX_HORIZON` says why)."""
    if value > limit:
        raise ValueError(f"{name} {value} exceeds the maximum of {limit} inner steps")
