"""The evaluation protocol: task splits, evaluation at checkpoints, baseline tuning, paired statistics.

Every experiment script goes through this module, so that one set of rules holds everywhere:

- **Splits disjoint by construction.** A task's seed is a hash of ``(split, seed, stream, index)`` with the split
  written into its two lowest bits (:func:`task_seed`, :func:`split_of`): meta-training (``train``), validation
  (``val``: tuning, checkpoint selection, every development choice) and final-test (``test``) tasks can never
  coincide, whatever the seeds and indices. ``stream`` separates uses of one split (tuning, checkpoint
  selection, development evaluation) so that a choice is never checked on the tasks it was made on.
- **A final-test split that is drawn again** whenever results on it were seen during development:
  :data:`TEST_DRAW` enters the hash of every test task. Scripts touch ``test`` only when run for the reported
  numbers and record the draw in their summary.
- **Baselines tuned on the metric their row reports**, on validation tasks only, by :func:`tune`: a
  coordinate search in which every axis (learning rate, momentum, betas, schedule parameters) is widened until
  its best value is interior, and the learning rate is refined to 1/8 decade around the best. Scores are whole-
  split losses at the horizon (never one minibatch). Runs whose trajectory does not depend on the horizon are
  shared by every horizon.
- **Paired statistics** (:func:`paired`): every optimizer runs on the same tasks, so a learned-vs-baseline claim is
  the per-task ratio, with a nested bootstrap interval (:func:`hierarchical_bootstrap`: families, then tasks within
  each drawn family, then meta-training seeds within each drawn task), a Wilcoxon signed-rank p-value with its
  floor (no claim below 6 tasks) and the win rate; ratios over several families resample the families
  (:func:`family_ratio`); intervals over seeds use the t quantile (:func:`mean_ci`); a target is met only when the
  whole interval clears its bound (:func:`verdict`); a final run meta-trains at least 5 seeds
  (:func:`require_final_seeds`).
- **Speedup against an envelope** (:func:`envelope_speedup`): steps needed by the baseline *tuned for each
  target horizon*, not by one run tuned for the longest horizon.
"""
from __future__ import annotations

from .baselines import BASELINE_AXES, TunedBaseline, baseline_kwargs, default_lr_axis, make_baseline
from .ledger import LEDGER_FILE, LedgerError, TestReadRefused, open_test_read, read_key
from .run import METRICS, EvalResult, checkpoint_metrics, evaluate
from .batched import coordinatewise, evaluate_batched
from .search import AXIS_KINDS, Axis, SearchResult, coordinate_search, lr_grid
from .splits import SPLITS, TEST_DRAW, split_of, task_seed
from .bootstrap import bootstrap_interval, hierarchical_bootstrap, percentile_interval
from .stats import (MIN_FINAL_SEEDS, envelope_speedup, family_ratio, log_ratios, mean_ci, paired, protocol_record,
                    require_final_seeds, robust_mean, steps_to_reach, t_quantile, verdict, wilcoxon_floor)
from .tuning import MIN_TUNING_TASKS, TuneResult, tune, tune_baseline, tune_lr

__all__ = ["AXIS_KINDS", "Axis", "BASELINE_AXES", "EvalResult", "METRICS", "MIN_FINAL_SEEDS", "MIN_TUNING_TASKS",
           "SPLITS", "SearchResult", "TEST_DRAW", "TuneResult", "TunedBaseline", "baseline_kwargs",
           "bootstrap_interval", "checkpoint_metrics", "coordinate_search", "default_lr_axis", "envelope_speedup",
           "evaluate",
           "family_ratio", "hierarchical_bootstrap", "log_ratios", "lr_grid", "make_baseline", "mean_ci", "paired",
           "percentile_interval", "protocol_record", "require_final_seeds", "robust_mean", "split_of",
           "steps_to_reach", "t_quantile", "task_seed", "tune", "tune_baseline", "tune_lr", "verdict",
           "wilcoxon_floor"]
__all__ += ["coordinatewise", "evaluate_batched"]  # many tasks in one inner loop (tuning scores)
__all__ += ["LEDGER_FILE", "LedgerError", "TestReadRefused", "open_test_read", "read_key"]  # the test-read ledger
