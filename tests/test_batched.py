"""evaluate_batched: the tasks of a family run in one vectorised inner loop for coordinatewise baselines. It must
give what evaluate() gives (the same tasks, minibatches and divergence rule; losses equal to float32 rounding),
fall back to evaluate()'s own runs for tasks it cannot batch, and refuse optimizers that would mix the tasks."""
import numpy as np
import pytest
import torch

from learned_opt.evaluate import evaluate
from learned_opt.evaluate.batched import coordinatewise, evaluate_batched
from learned_opt.optim import get_optimizer
from learned_opt.optim.learned import build_learned
from learned_opt.tasks import QuadraticFamily
from learned_opt.tasks.digits import DigitsFamily
from learned_opt.tasks.synthetic import LinearRegressionFamily


def _both(family, opt, **kw):
    kw = dict(split="val", seed=3, stream="tune", **kw)
    return evaluate(family, opt, None, **kw), evaluate_batched(family, opt, **kw)


def _same(a, b, rtol):
    assert a.seeds == b.seeds and a.curves.shape == b.curves.shape
    assert np.array_equal(np.isinf(a.curves), np.isinf(b.curves))
    fin = np.isfinite(a.curves)
    np.testing.assert_allclose(b.curves[fin], a.curves[fin], rtol=rtol)
    assert sorted(a.at) == sorted(b.at)
    for m in a.at:
        assert sorted(a.at[m]) == sorted(b.at[m])
        for k in a.at[m]:
            atol = 0.02 if k == "accuracy" else 0.0  # one test image may flip at a rounding-level difference
            np.testing.assert_allclose(b.at[m][k], a.at[m][k], rtol=rtol, atol=atol, err_msg=f"{k} at {m}")


@pytest.mark.parametrize("name,hp", [("adam", dict(lr=1e-2)), ("momentum", dict(lr=0.3)),
                                     ("rmsprop", dict(lr=1e-3)), ("adamw", dict(lr=1e-2, weight_decay=0.1))])
def test_batched_digits_runs_match_evaluate(name, hp):
    a, b = _both(DigitsFamily(pool="meta"), get_optimizer(name, **hp), num_tasks=5, steps=40, checkpoints=[0, 15])
    _same(a, b, rtol=1e-4)


def test_tasks_of_different_shapes_run_in_their_own_groups_and_match(monkeypatch):
    from learned_opt.evaluate import batched

    sizes = []
    real = batched._run_group
    monkeypatch.setattr(batched, "_run_group", lambda tasks, *a: sizes.append(len(tasks)) or real(tasks, *a))
    fam = LinearRegressionFamily(dims=(3, 5), sizes=(96, 32, 32), batch_size=16)
    a, b = _both(fam, get_optimizer("adam", lr=3e-2), num_tasks=16, steps=30, checkpoints=[10])
    _same(a, b, rtol=1e-4)
    assert len(sizes) == 3 and all(n >= batched.MIN_GROUP for n in sizes)  # one batch per dimension (3, 4, 5)


def test_a_diverging_task_stops_as_in_evaluate_and_the_others_go_on(monkeypatch):
    from learned_opt.evaluate import batched

    sizes = []
    real = batched._run_group
    monkeypatch.setattr(batched, "_run_group", lambda tasks, *a: sizes.append(len(tasks)) or real(tasks, *a))
    fam = LinearRegressionFamily(dims=(3, 4), feature_scale=10.0, sizes=(96, 32, 32), batch_size=16)
    a, b = _both(fam, get_optimizer("sgd", lr=0.1), num_tasks=10, steps=60, checkpoints=[5])
    assert sum(sizes) == 10  # every task in a batch
    died = np.isinf(a.curves[:, -1])
    assert died.any() and not died.all()  # the test needs both kinds
    _same(a, b, rtol=1e-3)
    assert np.all(np.isinf(b.at[60]["train_loss"][died])) and np.all(np.isfinite(b.at[60]["train_loss"][~died]))


def test_tasks_it_cannot_batch_run_through_evaluate_exactly():
    a, b = _both(QuadraticFamily(), get_optimizer("adam", lr=0.1), num_tasks=3, steps=20, checkpoints=[5])
    assert np.array_equal(a.curves, b.curves)
    for m in a.at:
        for k in a.at[m]:
            assert np.array_equal(a.at[m][k], b.at[m][k])


def test_only_coordinatewise_optimizers_are_batched():
    assert all(coordinatewise(get_optimizer(n)) for n in ("sgd", "momentum", "nesterov", "adam", "adamw",
                                                          "rmsprop"))
    net = build_learned("norm_mlp")
    assert not coordinatewise(net)
    with pytest.raises(ValueError, match="NormMLP is not coordinatewise"):
        evaluate_batched(DigitsFamily(), net, num_tasks=2, steps=3, split="val")


def test_batched_run_leaves_the_global_rng_alone():
    torch.manual_seed(0)
    before = torch.rand(1)
    torch.manual_seed(0)
    evaluate_batched(DigitsFamily(), get_optimizer("adam"), num_tasks=2, steps=3, split="val")
    assert torch.equal(torch.rand(1), before)


def test_batched_tuning_picks_what_sequential_tuning_picks_and_caches_apart(tmp_path):
    import warnings

    from learned_opt.evaluate import Axis, tune_baseline
    from learned_opt.evaluate import tuning

    fam = DigitsFamily(pool="meta")
    used = []
    real = tuning.evaluate_batched
    tuning.evaluate_batched = lambda *a, **k: used.append(k["steps"]) or real(*a, **k)
    axis = Axis("lr", (1e-3, 1e-2, 1e-1), "log", refine=True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # fewer than 20 tuning tasks
            kw = dict(horizons=[20, 40], num_tasks=3, lr_axis=axis, extra=(), cache_dir=str(tmp_path))
            seq = tune_baseline("adam", fam, **kw)
            assert used == []
            bat = tune_baseline("adam", fam, batched=True, **kw)
    finally:
        tuning.evaluate_batched = real
    assert used and set(used) == {40}
    assert {k: v.hparams for k, v in bat.items()} == {k: v.hparams for k, v in seq.items()}
    for k in seq:
        assert bat[k].score == pytest.approx(seq[k].score, rel=1e-4)
    assert len(list(tmp_path.iterdir())) == 2  # one cache file each: scores of the two engines never mix


def test_a_learner_with_a_plain_tensor_attribute_is_never_batched():
    """Its repr would not show a per-task tensor, and the batch runs every task through the first task's module."""
    from torch import nn

    from learned_opt.evaluate.batched import _signature
    from learned_opt.tasks.supervised import SupervisedTask

    class Projected(nn.Linear):
        def __init__(self, proj):
            super().__init__(3, 1)
            self.proj = proj  # a plain attribute, not a buffer

        def forward(self, x):
            return super().forward(x @ self.proj)

    data = {k: (torch.randn(8, 3), torch.randn(8, 1)) for k in ("train", "val", "test")}
    plain = SupervisedTask(nn.Linear(3, 1), data, "mse", batch_size=4)
    assert _signature(plain) is not None
    assert _signature(SupervisedTask(Projected(torch.eye(3)), data, "mse", batch_size=4)) is None
