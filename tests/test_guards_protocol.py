"""Guards on the evaluation protocol: realistic bugs that an outside audit found passing every other test (issue 23,
item 6). Each test asserts a *property* of the protocol, read from what the code actually did (every task an
evaluation ran, the images a task holds, the numbers a summary reports against a recomputation), not the shape of
the code; ``tests/mutations/`` holds one mutation per bug and ``tests/mutations/run.py`` shows each test failing
under its mutation.

(a) a baseline's rate is the argmin of its *validation* scores, and tuning never runs a test task;
(b) the digits experiment's final-test tasks hold no image of the meta-training pool;
(c) no held-out suite family holds an image of the meta-training pool;
(d) the per-seed numbers of the general and digits experiments are each seed's own (they differ across seeds and
    match a recomputation from each seed's saved weights);
(e) a tuning-cache entry is never reused when the tuning tasks change (stream, seed, task count, image pool);
(f) checkpoint selection (MetaTrainer's ``select`` stream) and restore-best read no test data.

The digits and general smoke runs (module fixtures) cost about 10 s each; the whole file about a minute on one
thread.
"""
from __future__ import annotations

import os
import warnings

import numpy as np
import pytest
import torch

import learned_opt.evaluate as E
from learned_opt.control import EarlyStopping
from learned_opt.evaluate import default_lr_axis, evaluate, robust_mean, tune, tune_baseline
from learned_opt.evaluate.baselines import make_baseline
from learned_opt.meta import MetaConfig, MetaTrainer, load_lopt
from learned_opt.optim import get_optimizer
from learned_opt.optim.learned import CoordLSTM
from learned_opt.tasks import DigitsFamily, QuadraticFamily
from learned_opt.tasks.base import generator
from learned_opt.tasks.digits import digits_splits
from learned_opt.tasks.suite import SUITE, heldout_families, meta_families, suite_family
from learned_opt.unroll import unroll
from test_exp_general import train_dir  # noqa: F401  (the 2-seed general_train smoke fixture)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_DIGITS = DigitsFamily(hidden=(4,), batch_size=16)


# ------------------------------------------------------------------------------------------------------ helpers
def image_keys(x: torch.Tensor) -> set:
    """Each 8x8 digit image (a row of 64 values k / 16) as a hashable key; rows of another width are no images."""
    x = x.detach().reshape(x.shape[0], -1) if x.ndim > 1 else x.detach()[None]
    if x.shape[1] != 64:
        return set()
    return {bytes(r) for r in (x.double() * 16).round().to(torch.int8).numpy()}


META_IMAGES = set().union(*(image_keys(x) for x, _ in digits_splits("meta").values()))


def task_images(task) -> set:
    """Every digit image the task holds (inputs and targets of each of its splits; none for a task without data,
    e.g. a quadratic)."""
    task = getattr(task, "task", task)  # a reparametrised task wraps the real one
    return set().union(*(image_keys(t) for x, y in getattr(task, "data", {}).values() for t in (x, y)
                         if t.is_floating_point()))


class EvaluationSpy:
    """Records the split of every task any :func:`evaluate` draws, and (split, task) of every task it runs."""

    def __init__(self, mp):
        self.splits, self.tasks, self._last = [], [], None
        real_seed, real_unroll = E.run.task_seed, E.run.unroll

        def spy_seed(split, *a, **k):
            self.splits.append(split)
            self._last = split
            return real_seed(split, *a, **k)

        def spy_unroll(task, *a, **k):
            self.tasks.append((self._last, task))
            return real_unroll(task, *a, **k)

        mp.setattr(E.run, "task_seed", spy_seed)
        mp.setattr(E.run, "unroll", spy_unroll)


def import_experiment(mp, name: str):
    """The script ``experiments/<name>.py`` as a module (its folder on the path, W&B off, for ``mp``'s duration)."""
    import importlib

    mp.syspath_prepend(os.path.join(ROOT, "experiments"))
    mp.setenv("WANDB_MODE", "disabled")
    return importlib.import_module(name)


def _quiet(fn, *a, **k):
    """``fn`` with the fewer-than-20-tuning-tasks warning silenced (these tests tune on 2-3 tasks for speed)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*a, **k)


# --------------------------------------------------------------------------------------- (a) tuning by validation
def test_tuned_rate_is_the_argmin_of_validation_scores_and_tuning_runs_no_test_task(monkeypatch):
    family, n, h = TINY_DIGITS, 3, 8
    with monkeypatch.context() as mp:
        spy = EvaluationSpy(mp)
        tuned = _quiet(tune_baseline, "sgd", family, horizons=[h], metrics=["train_loss", "val_loss"], num_tasks=n,
                       lr_axis=default_lr_axis(1e-2, 1.0, 1), resolution=0.5)
    assert spy.splits and set(spy.splits) == {"val"}, f"tuning drew tasks of splits {sorted(set(spy.splits))}"
    recomputed = {}  # point -> whole-split metrics of a direct run on the validation tasks of stream 'tune'
    for (hh, metric), tb in tuned.items():
        assert len(tb.table) >= 3
        for row in tb.table:
            point = tuple(sorted((k, v) for k, v in row.items() if k != "score"))
            if point not in recomputed:
                res = evaluate(family, make_baseline("sgd", dict(point)), num_tasks=n, steps=h, split="val",
                               stream="tune")
                recomputed[point] = res.at[h]
            assert row["score"] == pytest.approx(robust_mean(recomputed[point][metric]), rel=1e-9), (metric, point)
        scores = {p: robust_mean(recomputed[p][metric]) for p in recomputed}
        best = min(scores, key=scores.get)
        assert tb.hparams == dict(best), f"{metric}: chose {tb.hparams}, the validation argmin is {dict(best)}"


# ----------------------------------------------------------------------------------- (b), (d) the digits experiment
@pytest.fixture(scope="module")
def digits_final(tmp_path_factory):
    """A 2-seed final smoke run of experiments/digits.py, with every task its evaluations ran."""
    out = tmp_path_factory.mktemp("digits_final")
    with pytest.MonkeyPatch.context() as mp:
        digits = import_experiment(mp, "digits")
        spy = EvaluationSpy(mp)
        summary = digits.main(["--preset", "smoke", "--final", "true", "--seeds", "2", "--workers", "1",
                               "--out_dir", str(out)])
    return digits, summary, out, spy


def test_digits_final_test_tasks_hold_no_meta_training_image(digits_final):
    _, _, _, spy = digits_final
    test_tasks = [t for split, t in spy.tasks if split == "test"]
    assert test_tasks, "the final run evaluated no test task"
    for task in test_tasks:
        images = task_images(task)
        assert images, "a digits test task holds no digit image"
        assert not images & META_IMAGES, f"a final-test task holds {len(images & META_IMAGES)} meta-pool images"
    # the check can see a meta-pool image: the tuning and selection tasks hold them
    assert all(task_images(t) <= META_IMAGES for split, t in spy.tasks if split == "val")


def _seed_weights_differ(paths) -> bool:
    sds = [load_lopt(p).state_dict() for p in paths]
    return any(not torch.equal(sds[0][k], sd[k]) for sd in sds[1:] for k in sds[0])


def test_digits_per_seed_numbers_are_each_seeds_own(digits_final):
    digits, summary, out, _ = digits_final
    cfg = digits.Config(**summary["config"])
    h = max(cfg.eval_horizons)
    paths = [os.path.join(out, f"run_seed{s}", "lopt.pt") for s in range(cfg.seeds)]
    assert _seed_weights_differ(paths)
    per_seed = summary["learned"][str(h)]["train_loss"]["per_seed_mean"]
    assert len(per_seed) == cfg.seeds and len(set(per_seed)) == cfg.seeds, per_seed
    _, evals, _ = digits.families(cfg)
    for s, path in enumerate(paths):  # every seed's cell, recomputed from that seed's own saved weights
        net = load_lopt(path)
        res = evaluate(evals["base"], net, net.as_controller, num_tasks=cfg.test_tasks, steps=h,
                       **digits.eval_split(cfg))
        assert per_seed[s] == pytest.approx(float(res.at[h]["train_loss"].mean()), rel=1e-6), s


# ---------------------------------------------------------------------------------------------- (c) suite pools
def test_heldout_suite_families_hold_no_meta_training_image():
    for name in heldout_families():
        task = suite_family(name)(generator(0))
        images = task_images(task)
        if SUITE[name].data.startswith("digits"):
            assert images, f"{name}: a digits family whose task holds no digit image"
        assert not images & META_IMAGES, f"held-out {name} holds {len(images & META_IMAGES)} meta-pool images"
    digit_meta = [n for n in meta_families() if SUITE[n].data == "digits-meta"]
    assert digit_meta and all(task_images(suite_family(n)(generator(0))) <= META_IMAGES for n in digit_meta)


# ---------------------------------------------------------------------------------------- (d) general experiment
@pytest.fixture(scope="module")
def general_dev(tmp_path_factory, train_dir):  # noqa: F811
    """A development smoke run of experiments/general.py on the 2 smoke seeds."""
    out = tmp_path_factory.mktemp("general_guard")
    with pytest.MonkeyPatch.context() as mp:
        general = import_experiment(mp, "general")
        summary = general.main(["--preset", "smoke", "--train_dir", str(train_dir), "--out_dir", str(out),
                                "--workers", "1", "--baselines", "adam", "--stress_tasks", "0"])
    return general, summary, train_dir


def test_general_per_seed_numbers_are_each_seeds_own(general_dev):
    general, summary, tdir = general_dev
    cfg = general.Config(**summary["config"])
    paths = general.seed_paths(str(tdir))
    assert summary["seeds"] == list(paths) and len(paths) >= 2 and _seed_weights_differ(list(paths.values()))
    h = cfg.horizon
    for f in summary["families_evaluated"]:
        row = summary["families"][f]["horizons"][str(h)]["train_loss"]
        per_seed = summary["families"][f]["ratios"]["train_vs_tuned_adam_1x"]["per_seed_ratio"]
        assert len(per_seed) == len(paths) and len(set(per_seed)) == len(paths), (f, per_seed)
        own = []  # each seed's per-task values, recomputed from its own saved weights
        for path in paths.values():
            net = load_lopt(path)
            res = evaluate(suite_family(f), net, net.as_controller, num_tasks=cfg.test_tasks, steps=h,
                           **general.eval_split(cfg))
            own.append(res.at[h]["train_loss"])
        assert len({float(v.mean()) for v in own}) == len(own), f"{f}: the seeds' own values do not differ"
        assert row["mean"]["learned"] == pytest.approx(float(np.mean(own)), rel=1e-6), f


# ----------------------------------------------------------------------------------------------- (e) tuning cache
CHANGES = {"stream": dict(stream="tune-b"), "seed": dict(seed=1), "num_tasks": dict(num_tasks=3),
           "pool": dict(family=DigitsFamily(hidden=(4,), batch_size=16, pool="heldout"))}


@pytest.mark.parametrize("change", list(CHANGES))
def test_tuning_cache_is_not_reused_when_the_tuning_tasks_change(tmp_path, change):
    def run(cache_dir, **over):
        kw = {**dict(family=TINY_DIGITS, num_tasks=2, seed=0, stream="tune"), **over}
        fam = kw.pop("family")
        out = _quiet(tune, "sgd", lambda hp: (make_baseline("sgd", hp), None), fam, [default_lr_axis(1e-2, 1.0, 1)],
                     horizons=[6], cache_dir=cache_dir, resolution=1.0, **kw)
        return out[(6, "train_loss")].table

    cache = str(tmp_path / "cache")
    first = run(cache)
    assert run(cache) == first  # the cache serves the same tasks
    changed_cached, changed_fresh = run(cache, **CHANGES[change]), run(None, **CHANGES[change])
    assert changed_fresh != first  # the change does change the tuning tasks ...
    assert changed_cached == changed_fresh  # ... and the cache then serves nothing it had for the old ones


# ------------------------------------------------------------------------------- (f) checkpoint selection, restore
def test_checkpoint_selection_reads_no_test_task(monkeypatch, tmp_path):
    import learned_opt.meta.trainer as trainer_mod

    drawn = []
    real = E.run.task_seed

    def spy(split, *a, **k):
        drawn.append((split, k.get("stream", "")))
        return real(split, *a, **k)

    monkeypatch.setattr(E.run, "task_seed", spy)
    monkeypatch.setattr(trainer_mod, "task_seed", spy)
    torch.manual_seed(0)
    net = CoordLSTM(hidden=4)
    cfg = MetaConfig(horizon=4, truncation=2, iterations=2, val_every=1, val_tasks=2, val_horizon=4, seed=0)
    MetaTrainer(net, QuadraticFamily(dim=3, num_problems=2), cfg, run_dir=str(tmp_path), progress=False).run()
    assert ("val", "select") in drawn  # checkpoint selection ran ...
    assert {s for s, _ in drawn} <= {"train", "val"}, sorted(set(drawn))  # ... on no test task


class RecordingTask:
    """A task that records the split of every batch or whole-split loss read from it."""

    def __init__(self, task):
        self.task, self.reads = task, []

    def __getattr__(self, name):
        return getattr(self.task, name)

    def sample_batch(self, g, split="train"):
        """The wrapped task's batch, recorded."""
        self.reads.append(split)
        return self.task.sample_batch(g, split)

    def split_losses(self, params, split):
        """The wrapped task's whole-split losses, recorded."""
        self.reads.append(split)
        return self.task.split_losses(params, split)


def test_restore_best_reads_only_validation_data():
    g = generator(3)
    task = RecordingTask(TINY_DIGITS(g))
    unroll(task, get_optimizer("sgd", lr=3.0), EarlyStopping(patience=2, restore_best=True), steps=12, generator=g,
           val_every=1)
    assert "val" in task.reads  # the stopping rule read validation data ...
    assert "test" not in task.reads, task.reads.count("test")  # ... and nothing of the test split
