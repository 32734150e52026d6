"""The evaluation protocol: disjoint splits, checkpoint metrics on the right split, tuning on validation tasks only
(with grids widened and refined), paired statistics, t intervals and the speedup envelope."""
import math
import warnings

import numpy as np
import pytest
import torch

from learned_opt.control import Decision
from learned_opt.evaluate import (SPLITS, TEST_DRAW, Axis, coordinate_search, envelope_speedup, evaluate, lr_grid,
                                  mean_ci, paired, robust_mean, split_of, steps_to_reach, task_seed, tune,
                                  tune_baseline, tune_lr)
from learned_opt.optim import SGD, Adam
from learned_opt.tasks import MetaNetFamily, QuadraticFamily
from learned_opt.tasks.base import generator
from learned_opt.unroll import unroll


class RecordingFamily:
    """A family that records the seed of every task it builds (to see which split was touched)."""

    def __init__(self, inner=None):
        self.inner = inner or QuadraticFamily(dim=4, num_problems=8)
        self.seeds = []

    def __call__(self, g):
        self.seeds.append(g.initial_seed())
        return self.inner(g)

    def __repr__(self):
        return f"Recording({self.inner!r})"

    @property
    def splits(self):
        return {split_of(s) for s in self.seeds}


# --------------------------------------------------------------------------------------------------- splits
def test_split_seeds_are_disjoint_by_construction_up_to_a_million_seeds_and_indices():
    # every (seed, index) pair up to a million carries its split in the two low bits, so no two splits share one
    rng = np.random.default_rng(0)
    pairs = list(zip(rng.integers(0, 10**6, 3000), rng.integers(0, 10**6, 3000))) + [(10**6, 10**6), (0, 0)]
    for split in SPLITS:
        for stream in ("", "tune", "select"):
            assert {split_of(task_seed(split, i, s, stream=stream)) for s, i in pairs} == {split}
    # and the hash really spreads them: a full block of seeds x indices has no collision inside a split either
    block = {task_seed("val", i, s) for s in range(300) for i in range(300)}
    assert len(block) == 300 * 300
    other = {task_seed("test", i, s) for s in range(300) for i in range(300)}
    assert not (block & other)


def test_streams_and_test_draws_give_new_tasks():
    assert task_seed("val", 3, 0, stream="tune") != task_seed("val", 3, 0, stream="select")
    assert task_seed("test", 3, 0) == task_seed("test", 3, 0, draw=TEST_DRAW)
    assert task_seed("test", 3, 0, draw=TEST_DRAW + 1) != task_seed("test", 3, 0)
    with pytest.raises(ValueError, match="only the test split has draws"):
        task_seed("val", 0, draw=3)
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        task_seed("dev", 0)
    assert 0 < task_seed("test", 10**6, 10**6) < 2**63  # a valid torch seed


def test_evaluate_requires_an_explicit_split():
    with pytest.raises(TypeError):
        evaluate(QuadraticFamily(dim=2), SGD(lr=0.1), num_tasks=1, steps=2)  # noqa - no split on purpose


# --------------------------------------------------------------------------------------------------- evaluation
def test_checkpoint_metrics_equal_separate_shorter_runs_and_use_the_named_splits():
    fam = RecordingFamily(MetaNetFamily(n_train=16, n_val=32, n_test=48))
    long = evaluate(fam, Adam(lr=0.01), num_tasks=2, steps=30, split="val", checkpoints=(10, 20))
    short = evaluate(fam, Adam(lr=0.01), num_tasks=2, steps=10, split="val")
    for m in ("train_loss", "val_loss", "test_loss"):
        np.testing.assert_allclose(long.metric(m, 10), short.metric(m), rtol=1e-6)
    assert fam.splits == {"val"}
    # by hand: each metric is the whole named split at the returned parameters
    g = generator(task_seed("val", 0))
    task = fam.inner(g)
    res = unroll(task, Adam(lr=0.01), steps=30, generator=g)
    with torch.no_grad():
        for split, m in (("train", "train_loss"), ("val", "val_loss"), ("test", "test_loss")):
            x, y = task.data[split]
            want = float(torch.nn.functional.mse_loss(task.fn(res.params, x), y))
            assert long.metric(m)[0] == pytest.approx(want, rel=1e-6), m
    assert len({long.metric(m)[0] for m in ("train_loss", "val_loss", "test_loss")}) == 3


def test_accuracy_is_measured_on_the_test_split():
    from learned_opt.tasks import DigitsFamily

    fam = DigitsFamily(batch_size=64)
    res = evaluate(fam, Adam(lr=0.03), num_tasks=1, steps=40, split="val")
    g = generator(task_seed("val", 0))
    task = fam(g)
    out = unroll(task, Adam(lr=0.03), steps=40, generator=g)
    assert res.accuracy[0] == task.accuracy(out.params, "test")
    assert task.accuracy(out.params, "test") != task.accuracy(out.params, "train")


def test_evaluate_keeps_the_last_value_after_a_stop_and_inf_after_divergence():
    fam = QuadraticFamily(dim=4, num_problems=2)
    stopped = evaluate(fam, SGD(lr=0.01), StopAt7, num_tasks=1, steps=50, split="val", checkpoints=(5, 20))
    assert stopped.stop_steps[0] == 7
    c = stopped.curves[0]
    assert np.all(c[stopped.stop_steps[0]:] == c[stopped.stop_steps[0]])
    np.testing.assert_array_equal(stopped.metric("train_loss", 20), stopped.metric("train_loss"))
    assert not np.array_equal(stopped.metric("train_loss", 5), stopped.metric("train_loss"))
    diverged = evaluate(fam, SGD(lr=1e6), num_tasks=1, steps=50, split="val", checkpoints=(40,))
    assert np.isinf(diverged.final()).all() and np.isinf(diverged.metric("train_loss", 40)).all()
    assert robust_mean([1.0, float("nan")]) == math.inf


class StopAt7:
    """A controller that stops at inner step 7."""

    def init(self):
        return None

    def decide(self, obs, state):
        return Decision(stop_prob=float(obs.step == 7), stop=obs.step == 7), None


# --------------------------------------------------------------------------------------------------- search
def _bowl(center):
    """A smooth score in log(lr) and log(1 - momentum) with its minimum at ``center``."""
    def score(p):
        d = (math.log10(p["lr"]) - math.log10(center["lr"])) ** 2
        if "momentum" in p:
            d += (math.log10(1 - p["momentum"]) - math.log10(1 - center["momentum"])) ** 2
        return d
    return score


def test_search_widens_every_axis_until_interior_and_refines_the_rate_to_an_eighth_decade():
    axes = [Axis("lr", (1e-2, 1e-1, 1.0), refine=True), Axis("momentum", (0.5, 0.9), "log1m", start=0.9)]
    res = coordinate_search(_bowl({"lr": 3e-5, "momentum": 0.9995}), axes)
    assert res.edges == {"lr": "interior", "momentum": "interior"}
    assert res.widened["lr"] >= 3 and res.widened["momentum"] >= 2
    assert abs(math.log10(res.best["lr"]) - math.log10(3e-5)) <= 0.0625 + 1e-9  # within half of 1/8 decade
    lrs = sorted({row["lr"] for row in res.table})
    near = [x for x in lrs if abs(math.log10(x / res.best["lr"])) < 0.2]
    assert any(0 < abs(math.log10(x / res.best["lr"])) <= 0.125 + 1e-9 for x in near)  # refined neighbours


def test_search_stops_at_a_domain_edge_and_warns_at_a_grid_edge():
    res = coordinate_search(lambda p: p["momentum"] + abs(math.log10(p["lr"] / 0.1)),
                            [Axis("lr", (0.01, 1.0), refine=False), Axis("momentum", (0.5, 0.9), "log1m")])
    assert res.best["momentum"] == 0.0 and res.edges["momentum"] == "domain"
    # widening (0.9, ...) downwards lands exactly on the domain edge 0, not on a rounding residue of it
    assert Axis("beta2", (0.9, 0.99, 0.999), "log1m").extend([0.9, 0.99, 0.999], "low") == [0.0, 0.9, 0.99, 0.999]
    with pytest.warns(UserWarning, match="still at the edge"):
        res = coordinate_search(lambda p: p["lr"], [Axis("lr", (1.0, 10.0))], max_widen=2)
    assert res.edges["lr"] == "grid"


def test_an_axis_without_effect_stays_at_its_start_and_is_not_widened():
    res = coordinate_search(lambda p: abs(math.log10(p["lr"] / 0.1)),
                            [Axis("lr", (0.01, 0.1, 1.0)), Axis("gamma", (0.5, 0.9, 0.99), "log1m", start=0.9)])
    assert res.best == {"lr": 0.1, "gamma": 0.9} and res.widened["gamma"] == 0 and res.edges["gamma"] == "interior"
    assert len(res.table) == 5


def test_axis_rejects_bad_grids():
    with pytest.raises(ValueError, match="at least two values"):
        Axis("lr", (0.1,))
    with pytest.raises(ValueError, match=r"lie in \[0, 1\)"):
        Axis("momentum", (0.5, 1.0), "log1m")
    with pytest.raises(ValueError, match="unknown kind"):
        Axis("lr", (0.1, 1.0), "linear")


# --------------------------------------------------------------------------------------------------- tuning
@pytest.mark.parametrize("helper", ["tune_baseline", "tune_lr", "tune"])
def test_every_tuning_helper_touches_validation_tasks_only(helper):
    fam = RecordingFamily()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if helper == "tune_baseline":
            tune_baseline("momentum", fam, horizons=[5, 10], num_tasks=2)
        elif helper == "tune_lr":
            tune_lr(lambda lr: SGD(lr=lr), fam, grid=lr_grid(1e-3, 0.1, 3), steps=10, num_tasks=2)
        else:
            tune("sgd+stop", lambda hp: (SGD(lr=hp["lr"]), lambda: StopAt7()), fam,
                 [Axis("lr", (1e-3, 1e-2, 1e-1), refine=True)], horizons=[10], num_tasks=2,
                 horizon_independent=False)
    assert fam.seeds and fam.splits == {"val"}


def test_tune_baseline_tunes_each_horizon_and_metric_on_its_own_and_caches(tmp_path):
    fam = MetaNetFamily(n_train=16, n_val=64, n_test=64)
    calls = []
    real = tune.__globals__["evaluate"]

    def counting(*a, **k):
        calls.append(k["steps"])
        return real(*a, **k)

    tune.__globals__["evaluate"] = counting
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = tune_baseline("adam", fam, horizons=[10, 60], metrics=["train_loss", "val_loss"], num_tasks=3,
                                cache_dir=str(tmp_path))
            first = len(calls)
            again = tune_baseline("adam", fam, horizons=[10, 60], metrics=["train_loss", "val_loss"], num_tasks=3,
                                  cache_dir=str(tmp_path))
    finally:
        tune.__globals__["evaluate"] = real
    assert set(res) == {(10, "train_loss"), (10, "val_loss"), (60, "train_loss"), (60, "val_loss")}
    assert set(calls) == {60}  # one run to the longest horizon serves every horizon
    assert len(calls) == first  # the second call re-ran nothing
    assert {k: v.hparams for k, v in again.items()} == {k: v.hparams for k, v in res.items()}
    for (h, m), t in res.items():
        best = min(t.table, key=lambda r: r["score"])
        assert t.score == best["score"] and t.metric == m and t.horizon == h
        assert set(t.hparams) == {"lr", "beta1", "beta2"}
    # train loss keeps falling with more steps on a 16-point training set; the validation loss does not
    assert res[(60, "train_loss")].score < res[(10, "train_loss")].score
    assert res[(60, "train_loss")].hparams != res[(60, "val_loss")].hparams or \
        res[(60, "train_loss")].score != res[(60, "val_loss")].score


def test_tuning_with_few_tasks_warns():
    with pytest.warns(UserWarning, match="fewer than the protocol's 20"):
        tune_lr(lambda lr: SGD(lr=lr), QuadraticFamily(dim=2), grid=[0.01, 0.1, 0.3], steps=3, num_tasks=1)


# --------------------------------------------------------------------------------------------------- statistics
def test_mean_ci_uses_the_t_quantile():
    m, lo, hi = mean_ci([1.0, 2.0, 3.0])
    assert m == 2.0 and hi - m == pytest.approx(4.302653 * 1.0 / math.sqrt(3), rel=1e-5)
    m, lo, hi = mean_ci([1.0, 2.0, 3.0, 4.0])
    assert hi - m == pytest.approx(3.182446 * np.std([1, 2, 3, 4], ddof=1) / 2, rel=1e-5)
    assert mean_ci([3.0]) == (3.0, 3.0, 3.0)


def test_paired_statistics():
    rng = np.random.default_rng(0)
    base = rng.uniform(1, 2, size=40)
    learned = np.stack([base * 0.8, base * 0.9, base * 0.7])  # three seeds, always better
    out = paired(learned, base)
    assert out["ratio"] == pytest.approx(0.8)
    assert out["ci_low"] <= 0.8 <= out["ci_high"] and out["ci_high"] < 1
    assert out["win_rate"] == 1.0 and out["wilcoxon_p"] < 1e-6
    assert out["per_seed_ratio"] == pytest.approx([0.8, 0.9, 0.7])
    lo, hi = out["per_seed_t_ci"]
    assert hi - 0.8 == pytest.approx(4.302653 * 0.1 / math.sqrt(3), rel=1e-4)
    # no difference: ratio 1, p large, interval around 1
    eps = rng.normal(0, 0.1, size=20)
    noisy = base * np.exp(np.concatenate([eps, -eps]))  # symmetric in log: no effect
    tie = paired(noisy, base)
    assert tie["ci_low"] < 1 < tie["ci_high"] and tie["wilcoxon_p"] > 0.05
    # a diverged task makes the ratio infinite, not smaller
    bad = learned.copy()
    bad[1, 3] = np.inf
    assert paired(bad, base)["ratio"] == math.inf
    with pytest.raises(ValueError, match="same tasks"):
        paired(np.ones(3), np.ones(4))


def test_envelope_speedup_and_steps_to_reach():
    env = {10: 1.0, 100: 0.1, 1000: 0.01}
    assert envelope_speedup(env, 0.1, 10) == (10.0, None)  # Adam tuned for 100 steps gets there in 100
    s, bound = envelope_speedup(env, math.sqrt(0.1 * 0.01), 10)  # half-way in log between 100 and 1000
    assert bound is None and s == pytest.approx(math.sqrt(100 * 1000) / 10, rel=1e-6)
    assert envelope_speedup(env, 1e-4, 100) == (10.0, "lower")  # never reached: at least 1000 / 100
    assert envelope_speedup(env, 5.0, 100) == (0.1, "upper")  # reached before the first horizon: at most
    # the envelope is a running minimum: a worse baseline at 100 steps than at 10 does not count
    frac = math.log(2 / 1.5) / math.log(2 / 0.5)
    assert envelope_speedup({10: 2.0, 100: 3.0, 1000: 0.5}, 1.5, 10)[0] == pytest.approx(10 ** (2 + frac) / 10)
    with pytest.raises(ValueError, match="step must be >= 1"):
        envelope_speedup(env, 0.1, 0)
    assert steps_to_reach(np.array([10.0, 8, 6, 4]), 4.0) == 3.0


def test_learned_optimizer_with_its_lr_head_is_horizon_independent():
    # the digits experiment evaluates the learned optimizer once to the longest horizon and reads the shorter ones
    # at checkpoints: valid only while nothing it computes depends on the horizon
    from learned_opt.optim.learned import CoordLSTM

    torch.manual_seed(0)
    net = CoordLSTM(hidden=8, base="adam", base_lr=0.05, lr_max=1.0, base_lr_range=1.0, init_zero=False)
    with torch.no_grad():
        for p in net.heads.lr.parameters():
            p.add_(0.3 * torch.randn_like(p))
        net.heads.lr[-1].bias.fill_(-3.0)  # a lower-only head with a positive output would pin the rate at 1
    fam = MetaNetFamily(n_train=16, n_val=32, n_test=32)
    long = evaluate(fam, net, net.as_controller, num_tasks=2, steps=25, split="val", checkpoints=(10,))
    short = evaluate(fam, net, net.as_controller, num_tasks=2, steps=10, split="val")
    for m in ("train_loss", "val_loss", "test_loss"):
        np.testing.assert_array_equal(long.metric(m, 10), short.metric(m))
    np.testing.assert_array_equal(long.curves[:, :11], short.curves)
    g = generator(task_seed("val", 0))
    rates = unroll(fam(g), net, net.as_controller(), steps=10, generator=g).records["lr_scale"][:-1]
    assert 0.1 < min(rates) and max(rates) < 0.99  # the head is active: it is what the equality checks


def test_make_baseline_builds_nesterov_at_momentum_zero_as_sgd():
    from learned_opt.evaluate import make_baseline

    assert make_baseline("nesterov", {"lr": 0.1, "momentum": 0.0}) == SGD(lr=0.1)
    assert make_baseline("adam", {"lr": 0.1, "beta1": 0.5, "beta2": 0.9}) == Adam(lr=0.1, betas=(0.5, 0.9))
