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
                           num_tasks=6, steps=60, val_every=1).stop_steps
    assert fresh_stops == [60] * 6  # an untrained stop head never fires
    MetaTrainer(ctrl, Mixed(), cfg, optimizer=opt).run()
    over = evaluate(OVERFITS, opt, lambda: ctrl, num_tasks=10, steps=60, val_every=1).stop_steps
    improves = evaluate(IMPROVES, opt, lambda: ctrl, num_tasks=10, steps=60, val_every=1).stop_steps
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
    assert d.lr_scale == 1.0 and float(d.stop_prob) == 0.0 and not d.stop
