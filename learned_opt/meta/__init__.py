"""Meta-training of learned optimizers: the settings (:mod:`.config`), inner runs and meta-losses (:mod:`.losses`),
checkpoint files and the run lock (:mod:`.checkpoint`), the trainer loop (:mod:`.trainer`, :mod:`.update`) and
the meta-gradient estimators behind one interface (:mod:`.estimator`: TBPTT, ES, PES in :mod:`.tbptt`,
:mod:`.es`, :mod:`.pes`). Every name below is importable from ``learned_opt.meta``.
"""
from __future__ import annotations

from .checkpoint import (CHECKPOINT, LOCK_NAME, LOPT_FORMAT, TRAINING_FORMAT, RunDirBusy, RunLock, has_checkpoint,
                         load_checkpoint, load_lopt, save_checkpoint, save_lopt)
from .checkpoint import _why_unreadable  # noqa: F401 - learned_opt.pretrained shares the rule
from .config import CONTROLS, MAX_HORIZON, META_LOSSES, RESUMABLE, VAL_METRICS, MetaConfig, check_at_most
from .estimator import ESTIMATOR_TYPES, ESTIMATORS, Estimator
from .losses import InnerRun, halting_distribution, halting_loss, tree_detach, tree_finite, truncation_loss
from .trainer import Interrupted, MetaTrainer

__all__ = ["CHECKPOINT", "CONTROLS", "ESTIMATORS", "ESTIMATOR_TYPES", "Estimator", "InnerRun", "Interrupted",
           "LOCK_NAME", "LOPT_FORMAT", "MAX_HORIZON", "META_LOSSES", "MetaConfig", "MetaTrainer", "RESUMABLE",
           "RunDirBusy", "RunLock", "TRAINING_FORMAT", "VAL_METRICS", "check_at_most",
           "halting_distribution", "halting_loss", "has_checkpoint", "load_checkpoint", "load_lopt",
           "save_checkpoint", "save_lopt", "tree_detach", "tree_finite", "truncation_loss"]
