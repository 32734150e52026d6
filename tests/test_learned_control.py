"""Learned meta-control: the stand-alone LearnedController over hand-coded optimizers."""
import math

import pytest
import torch

from learned_opt.control import Observation
from learned_opt.evaluate import evaluate
from learned_opt.meta import MetaConfig, MetaTrainer
from learned_opt.optim import Adam
from learned_opt.optim.learned import LearnedController
from learned_opt.tasks import MetaNetFamily

OVERFITS = MetaNetFamily(n_train=16, noise=0.5)  # validation loss turns up after a few dozen Adam steps
IMPROVES = MetaNetFamily(n_train=512, noise=0.0)  # validation loss keeps falling for the whole horizon


class Mixed:
    """Half the tasks overfit, half keep improving: the stop head must tell them apart."""

    def __call__(self, g):
        return (OVERFITS if torch.rand((), generator=g) < 0.5 else IMPROVES)(g)


def test_stop_head_learns_to_stop_on_overfitting_tasks_only():
    torch.manual_seed(0)
    ctrl = LearnedController(learn_lr=False, stop_bias=-4.0)
    opt = Adam(lr=0.03)
    cfg = MetaConfig(horizon=60, truncation=20, iterations=30, meta_loss="halting", control="learned",
                     halting_lambda=0.0, meta_lr=3e-2, tasks_per_step=4)
    fresh_stops = evaluate(OVERFITS, opt, lambda: LearnedController(learn_lr=False, stop_bias=-4.0),
                           num_tasks=6, steps=60, val_every=1, split="test").stop_steps
    assert fresh_stops == [60] * 6  # an untrained stop head never fires
    MetaTrainer(ctrl, Mixed(), cfg, optimizer=opt).run()
    over = evaluate(OVERFITS, opt, lambda: ctrl, num_tasks=10, steps=60, val_every=1, split="test").stop_steps
    improves = evaluate(IMPROVES, opt, lambda: ctrl, num_tasks=10, steps=60, val_every=1, split="test").stop_steps
    assert sum(s < 60 for s in over) >= 8, over
    assert all(s == 60 for s in improves), improves


def test_fixed_optimizer_needs_learned_control():
    with pytest.raises(ValueError, match="control='learned'"):
        MetaTrainer(LearnedController(), OVERFITS, MetaConfig(horizon=10, truncation=5), optimizer=Adam())


@pytest.mark.parametrize("loss,val,gnorm", [(1e30, 1e30, 1e30), (1e-30, 1e-30, 0.0), (math.inf, math.nan, math.inf),
                                            (0.0, 0.0, 0.0), (-5.0, -1.0, 1e-12)])
def test_controller_outputs_stay_in_bounds_for_extreme_inputs(loss, val, gnorm):
    torch.manual_seed(1)
    ctrl = LearnedController(lr_bound=5.0)
    with torch.no_grad():
        for p in ctrl.parameters():  # saturate: large random weights everywhere
            p.copy_(torch.randn_like(p) * 50)
    state = ctrl.init()
    for t in range(5):
        obs = Observation(t, 10, torch.tensor(loss * (t + 1)), torch.tensor(val), torch.tensor(gnorm))
        d, state = ctrl.decide(obs, state)
        assert 1 / 5.0 - 1e-6 <= float(d.lr_scale.detach()) <= 5.0 + 1e-6
        assert 0.0 <= float(d.stop_prob.detach()) <= 1.0
        assert math.isfinite(float(d.lr_scale.detach())) and math.isfinite(float(d.stop_prob.detach()))


def test_disabled_heads_are_exactly_neutral():
    ctrl = LearnedController(learn_lr=False, learn_stop=False)
    with torch.no_grad():
        for p in ctrl.parameters():
            p.copy_(torch.randn_like(p))
    d, _ = ctrl.decide(Observation(3, 10, torch.tensor(1.0), torch.tensor(2.0), torch.tensor(0.5)), ctrl.init())
    assert d.lr_scale == 1.0 and float(d.stop_prob.detach()) == 0.0 and not d.stop


def test_restore_best_returns_the_parameters_of_the_lowest_validation_loss():
    from learned_opt.tasks.base import generator
    from learned_opt.unroll import unroll

    g = generator(3)
    task = OVERFITS(g)
    ctrl = LearnedController(learn_lr=False, restore_best=True)
    res = unroll(task, Adam(lr=0.03), ctrl, steps=60, generator=g, val_every=1)
    vals = res.records["val_loss"][:-1]
    best = min(range(len(vals)), key=vals.__getitem__)
    assert 0 < best < 59 and res.best_step == best  # the task overfits: the best is inside the run
    with torch.no_grad():
        again = task.loss(res.params, task.sample_batch(g, "val"))
    assert math.isclose(float(again), vals[best], rel_tol=1e-6)


def test_halting_with_restore_charges_the_running_minimum():
    from learned_opt.meta import InnerRun, halting_loss
    from learned_opt.unroll import UnrollResult

    vals = [torch.tensor(v) for v in (3.0, 1.0, 2.0, 4.0)]
    probs = [torch.tensor(p) for p in (0.1, 0.2, 0.5)]
    res = UnrollResult([], None, None, 3, train_losses=[torch.tensor(0.0)] * 4, val_losses=vals, stop_probs=probs)
    res.records["step"] = [0, 1, 2, 3]
    run = InnerRun(None, None, [], None, None, 0, 3, torch.tensor(1.0))
    q = [0.1, 0.9 * 0.2, 0.9 * 0.8 * 0.5, 0.9 * 0.8 * 0.5]
    plain = halting_loss(res, run, 0.0)
    assert math.isclose(float(plain), sum(qi * v for qi, v in zip(q, (3.0, 1.0, 2.0, 4.0))), rel_tol=1e-6)
    run2 = InnerRun(None, None, [], None, None, 0, 3, torch.tensor(1.0))
    restored = halting_loss(res, run2, 0.0, restore_best=True)
    assert math.isclose(float(restored), sum(qi * v for qi, v in zip(q, (3.0, 1.0, 1.0, 1.0))), rel_tol=1e-6)
    assert run2.best_val == 1.0
