"""The drop-in optimizer follows the ``torch.optim`` semantics real training recipes rely on (issue 25).

Every check runs on ``torch.optim.AdamW`` and on :class:`learned_opt.LearnedOptimizer` (the shipped weights,
loaded offline from the package) alike: per-parameter state in ``optimizer.state[p]`` with a step count, state
kept for always-used parameters when a conditional branch's parameters get no gradient, weight decay per group
(no-decay groups), ``lr=0``, ``OneCycleLR`` and other schedulers, state dicts that resume bit for bit, frozen
parameters and ``add_param_group``.
"""
from __future__ import annotations

import io

import pytest
import torch
from torch import nn

import learned_opt

T = torch.optim


def _adamw(params, **kw):
    return T.AdamW(params, **kw)


def _learned(params, **kw):
    return learned_opt.LearnedOptimizer(params, **kw)


MAKERS = {"adamw": _adamw, "learned": _learned}
# Each optimizer's base rate (AdamW's lr; the learned optimizer's lr is a multiplier of its learned step)
BASE_LR = {"adamw": 1e-3, "learned": 1.0}
# OneCycleLR: AdamW cycles its betas by default; the learned rule has no momentum hyper-parameter to cycle
ONE_CYCLE = {"adamw": {}, "learned": {"cycle_momentum": False}}
KINDS = sorted(MAKERS)


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2))


def _data(seed=0, n=16):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=g), torch.randn(n, 2, generator=g)


def _train(model, opt, steps, seed=0, scheduler=None):
    """``steps`` steps on fresh minibatches (seeded by step), the loss through a closure (both accept one)."""
    for t in range(steps):
        x, y = _data(seed + t)

        def closure():
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            return loss

        opt.step(closure)
        if scheduler is not None:
            scheduler.step()


def _copy(model):
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("kind", KINDS)
def test_per_parameter_state_with_a_step_count(kind):
    model = _model()
    opt = MAKERS[kind](model.parameters())
    _train(model, opt, 3)
    for p in model.parameters():
        state = opt.state[p]
        assert int(state["step"]) == 3
        assert any(torch.is_tensor(v) and v.numel() >= p.numel() for k, v in state.items() if k != "step")


def _first_moment(kind, opt, p):
    """The EMA of the gradient with decay 0.9 in ``p``'s state: AdamW's ``exp_avg``; the learned optimizer's
    second momentum (decays 0.5, 0.9, 0.99)."""
    state = opt.state[p]
    m = state["exp_avg"] if kind == "adamw" else state["momenta"][1].reshape(p.shape)
    return m.detach().clone(), 0.9


@pytest.mark.parametrize("kind", KINDS)
def test_state_is_kept_for_always_used_parameters_when_a_branch_has_no_gradient(kind):
    """A branch used on even steps only: its parameters get no gradient on odd steps, the trunk's always do.
    The trunk's state carries on (its first moment is 0.9 * the last one + 0.1 * the gradient, never restarted)
    and the step counts are per parameter."""
    torch.manual_seed(0)
    trunk, branch = nn.Linear(4, 6), nn.Linear(6, 6)
    head = nn.Linear(6, 2)
    params = [*trunk.parameters(), *branch.parameters(), *head.parameters()]
    opt = MAKERS[kind](params)
    for t in range(6):
        x, y = _data(t)
        opt.zero_grad()
        h = torch.tanh(trunk(x))
        if t % 2 == 0:
            h = torch.tanh(branch(h))
        loss = nn.functional.mse_loss(head(h), y)
        loss.backward()
        before = {id(p): _first_moment(kind, opt, p)[0] for p in trunk.parameters()} if t > 0 else None
        opt.step(lambda: loss)
        if before is not None:
            for p in trunk.parameters():
                m, beta = _first_moment(kind, opt, p)
                torch.testing.assert_close(m, beta * before[id(p)] + (1 - beta) * p.grad, rtol=1e-5, atol=1e-7)
    assert [int(opt.state[p]["step"]) for p in params] == [6, 6, 3, 3, 6, 6]


@pytest.mark.parametrize("kind", KINDS)
def test_weight_decay_is_honoured_per_group(kind):
    """One step from the same state and gradients: with weight_decay in the weights' group the weights end up
    shrunk by a positive multiple of themselves (decoupled decay) against weight_decay=0; the no-decay group
    (biases) is bitwise unaffected. Accepted in the constructor and per group."""
    runs = []
    for wd in (0.0, 0.5):
        model = _model()
        opt = MAKERS[kind]([{"params": [model[0].weight, model[2].weight], "weight_decay": wd},
                            {"params": [model[0].bias, model[2].bias], "weight_decay": 0.0}])
        _train(model, opt, 1)
        runs.append(_copy(model))
    start = _copy(_model())
    for i in (0, 2):  # the weights: (no decay - decay) / p0 is one positive number per tensor
        ratio = (runs[0][i] - runs[1][i]) / start[i]
        assert float(ratio.min()) > 0
        torch.testing.assert_close(ratio, torch.full_like(ratio, float(ratio.mean())), rtol=1e-3, atol=0)
    for i in (1, 3):
        assert torch.equal(runs[0][i], runs[1][i])
    model = _model()
    opt = MAKERS[kind](model.parameters(), weight_decay=0.01)
    assert opt.param_groups[0]["weight_decay"] == 0.01


@pytest.mark.parametrize("kind", KINDS)
def test_lr_zero_is_accepted_and_freezes_the_parameters(kind):
    model = _model()
    start = _copy(model)
    opt = MAKERS[kind](model.parameters(), lr=0.0)
    _train(model, opt, 3)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), start))
    assert all(int(opt.state[p]["step"]) == 3 for p in model.parameters())  # the state still advances


def _first_update(kind, scheduler_factory, **opt_kw):
    model = _model()
    start = _copy(model)
    opt = MAKERS[kind](model.parameters(), **opt_kw)
    sched = scheduler_factory(opt) if scheduler_factory is not None else None
    _train(model, opt, 1, scheduler=sched)
    return [p.detach() - q for p, q in zip(model.parameters(), start)], opt, model, sched


@pytest.mark.parametrize("kind", KINDS)
def test_one_cycle_lr_runs_and_scales_the_step(kind):
    """OneCycleLR (defaults for AdamW, cycle_momentum=False for the learned optimizer, the one setting it
    supports, which its error message names) starts at max_lr / 25: the first update is 1/25 of the plain one,
    and the rate then rises."""
    lr = BASE_LR[kind]

    def one_cycle(opt):
        return T.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=10, **ONE_CYCLE[kind])

    plain, _, _, _ = _first_update(kind, None, lr=lr, weight_decay=0.0)
    cycled, opt, model, sched = _first_update(kind, one_cycle, lr=lr, weight_decay=0.0)
    for a, b in zip(plain, cycled):  # (float32 parameters: the difference p - p0 carries their rounding)
        torch.testing.assert_close(b * 25, a, rtol=1e-2, atol=1e-7)
    first = opt.param_groups[0]["lr"]
    _train(model, opt, 2, seed=1, scheduler=sched)
    assert opt.param_groups[0]["lr"] > first
    if kind == "learned":
        with pytest.raises(ValueError, match="cycle_momentum=False"):
            T.lr_scheduler.OneCycleLR(MAKERS[kind](_model().parameters()), max_lr=1.0, total_steps=10)


SCHEDULERS = {
    "step": lambda opt: T.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5),
    "cosine": lambda opt: T.lr_scheduler.CosineAnnealingLR(opt, T_max=2, eta_min=0.0),
    "warmup": lambda opt: T.lr_scheduler.LambdaLR(opt, lambda t: min(1.0, t / 2)),
}


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
@pytest.mark.parametrize("kind", KINDS)
def test_schedulers_drive_the_step(kind, name):
    """StepLR halves the rate every step; CosineAnnealingLR reaches 0 at step 2; the LambdaLR warm-up starts
    from 0: a step at rate 0 moves nothing, the others move the parameters."""
    lr = BASE_LR[kind]
    model = _model()
    opt = MAKERS[kind](model.parameters(), lr=lr)
    sched = SCHEDULERS[name](opt)
    expected = {"step": [lr, lr / 2, lr / 4], "cosine": [lr, lr / 2, 0.0], "warmup": [0.0, lr / 2, lr]}[name]
    for t, rate in enumerate(expected):
        assert opt.param_groups[0]["lr"] == pytest.approx(rate, abs=1e-12)
        before = _copy(model)
        _train(model, opt, 1, seed=t, scheduler=sched)
        moved = [not torch.equal(p, q) for p, q in zip(model.parameters(), before)]
        assert all(moved) if rate > 0 else not any(moved)


@pytest.mark.parametrize("kind", KINDS)
def test_state_dict_round_trip_resumes_bit_for_bit(kind):
    """5 steps, save (torch.save, loaded with weights_only=True), load into a fresh optimizer over a copy of the
    model, 5 more steps: bitwise the parameters of 10 uninterrupted steps."""
    model = _model()
    opt = MAKERS[kind](model.parameters())
    _train(model, opt, 10)
    other = _model()
    opt2 = MAKERS[kind](other.parameters())
    _train(other, opt2, 5)
    buf = io.BytesIO()
    torch.save({"model": other.state_dict(), "opt": opt2.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    resumed_model = _model(seed=1)
    resumed_model.load_state_dict(saved["model"])
    resumed = MAKERS[kind](resumed_model.parameters())
    resumed.load_state_dict(saved["opt"])
    _train(resumed_model, resumed, 5, seed=5)
    twin = _model()
    twin_opt = MAKERS[kind](twin.parameters())
    _train(twin, twin_opt, 5)
    _train(twin, twin_opt, 5, seed=5)
    assert all(torch.equal(p, q) for p, q in zip(resumed_model.parameters(), twin.parameters()))


@pytest.mark.parametrize("kind", KINDS)
def test_frozen_parameters_are_untouched(kind):
    model = _model()
    model[0].requires_grad_(False)
    start = _copy(model)
    opt = MAKERS[kind](model.parameters(), weight_decay=0.1)
    _train(model, opt, 3)
    assert all(torch.equal(p, q) for p, q in zip(model[0].parameters(), start[:2]))
    assert all(p not in opt.state or not opt.state[p] for p in model[0].parameters())
    assert not torch.equal(model[2].weight, start[2])


@pytest.mark.parametrize("kind", KINDS)
def test_add_param_group(kind):
    """A group added after 2 steps (its own lr and weight_decay) is stepped from then on, with its own state."""
    model = _model()
    start = _copy(model)
    opt = MAKERS[kind](model[2].parameters(), weight_decay=0.0)
    _train(model, opt, 2)
    assert all(torch.equal(p, q) for p, q in zip(model[0].parameters(), start[:2]))
    opt.add_param_group({"params": model[0].parameters(), "lr": BASE_LR[kind] / 2, "weight_decay": 0.5})
    assert opt.param_groups[1]["weight_decay"] == 0.5 and opt.param_groups[1]["lr"] == BASE_LR[kind] / 2
    _train(model, opt, 1, seed=2)
    assert not any(torch.equal(p, q) for p, q in zip(model[0].parameters(), start[:2]))
    assert [int(opt.state[p]["step"]) for p in model.parameters()] == [1, 1, 3, 3]
