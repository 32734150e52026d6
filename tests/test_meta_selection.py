"""The whole-run selection metric ``mean_log_train_val`` (issue #24: select meta-weights on the whole run and on
held-out loss, not on the last step's training loss)."""
import json
import math

import numpy as np
import pytest

from learned_opt.meta import MetaConfig, MetaTrainer
from learned_opt.meta.trainer import train_val_marks
from learned_opt.optim.normmlp import NormMLP
from learned_opt.tasks.quadratic import QuadraticFamily


def test_marks_are_evenly_spaced_and_end_at_the_horizon():
    assert train_val_marks(2000) == tuple(range(200, 2001, 200))
    assert train_val_marks(5) == (1, 2, 3, 4, 5)  # fewer steps than marks: every step once


class Fake:
    """An evaluation result with given whole-split losses at every mark (one task)."""
    def __init__(self, marks, train, val):
        self.at = {m: {"train_loss": np.array([t]), "val_loss": np.array([v])} for m, t, v in zip(marks, train, val)}


def test_the_score_is_the_mean_over_marks_of_log_train_and_log_val_weighed_alike(monkeypatch):
    import learned_opt.meta.trainer as meta

    cfg = MetaConfig(horizon=40, truncation=20, val_every=1, val_tasks=1, val_horizon=40,
                     val_metric="mean_log_train_val")
    trainer = MetaTrainer(NormMLP(), QuadraticFamily(dim=2), cfg)
    marks = train_val_marks(40)
    seen = []

    def run(train, val):
        def fake(*a, **k):
            seen.append(tuple(k["checkpoints"]))
            return Fake(marks, train, val)
        monkeypatch.setattr(meta, "evaluate", fake)
        return trainer.validate()

    n = len(marks)
    fits = run([1e-2] * n, [1e-1] * n)
    assert seen[-1] == marks
    assert fits == pytest.approx(0.5 * math.log(1e-2) + 0.5 * math.log(1e-1), rel=1e-9)
    # the same train losses with a validation loss that climbs back (memorising) score worse
    assert run([1e-2] * n, [1e-1] * (n // 2) + [1.0] * (n - n // 2)) > fits
    # low only at the end scores worse than low throughout: the whole run counts, not the last step
    assert run([1.0] * (n - 1) + [1e-2], [1.0] * (n - 1) + [1e-1]) > fits
    assert run([1e-2] * n, [1e-1] * (n - 1) + [math.inf]) == math.inf


def test_a_real_selection_run_scores_finite_and_reads_validation_tasks_only(monkeypatch):
    import learned_opt.meta.trainer as meta

    calls = []
    real = meta.evaluate

    def spy(*a, **k):
        calls.append((k["split"], k["stream"]))
        return real(*a, **k)

    monkeypatch.setattr(meta, "evaluate", spy)
    cfg = MetaConfig(horizon=20, truncation=10, val_every=1, val_tasks=2, val_horizon=20,
                     val_metric="mean_log_train_val")
    score = MetaTrainer(NormMLP(), QuadraticFamily(dim=2), cfg).validate()
    assert math.isfinite(score) and calls == [("val", "select")]


def test_an_unknown_metric_is_refused():
    with pytest.raises(ValueError, match="val_metric"):
        MetaConfig(val_metric="mean_log_everything").validate()


@pytest.mark.parametrize("at_start", [False, True])
def test_val_at_start_scores_the_initial_weights_and_keeps_them_when_training_never_beats_them(monkeypatch, tmp_path,
                                                                                              at_start):
    """With ``val_at_start`` the initial meta-weights are a candidate of the selection (iteration 0 is logged); a run
    whose every later score is worse ends on them. Without it (the default, every earlier result) they are not."""
    import torch

    torch.manual_seed(0)
    net = NormMLP(hidden=4)
    start = {k: v.clone() for k, v in net.state_dict().items()}
    scores = iter([0.5, 1.0, 2.0] if at_start else [1.0, 2.0])
    monkeypatch.setattr(MetaTrainer, "validate", lambda self: next(scores))
    cfg = MetaConfig(horizon=4, truncation=2, iterations=2, val_every=1, val_tasks=1, meta_lr=0.1,
                     val_at_start=at_start)
    trainer = MetaTrainer(net, QuadraticFamily(dim=2), cfg, run_dir=str(tmp_path)).run()
    with open(tmp_path / "metrics.jsonl") as f:
        logged = [(r["iteration"], r["val_score"]) for r in map(json.loads, f) if "val_score" in r]
    after = net.state_dict()
    same = all(torch.equal(after[k], start[k]) for k in start)
    assert same == at_start  # meta-training moved the weights; only val_at_start can bring the initial ones back
    assert trainer.best_score == (0.5 if at_start else 1.0)
    assert logged == ([(0, 0.5), (1, 1.0), (2, 2.0)] if at_start else [(1, 1.0), (2, 2.0)])
