"""Hand-coded meta-control: schedules against ``torch.optim.lr_scheduler``, early stopping, composition."""
import math
import random
import warnings

import pytest
import torch
from torch.optim import lr_scheduler

from learned_opt.control import (Compose, Constant, Cosine, Decision, EarlyStopping, EarlyStoppingState,
                                 ExponentialDecay, Observation, ReduceOnPlateau, StepDecay, get_controller,
                                 multiply_scales)

STEPS = 300
BASE_LR = 0.3


def obs(step, val=None, horizon=STEPS):
    """An observation carrying only what the hand-coded controllers read."""
    return Observation(step=step, horizon=horizon, loss=torch.tensor(1.0),
                       val_loss=None if val is None else torch.tensor(float(val), dtype=torch.float64))


def torch_scales(make_scheduler, steps=STEPS, base_lr=BASE_LR):
    """``lr_t / base_lr`` of a torch scheduler for t = 0 .. steps-1 (the lr used by the t-th update)."""
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=base_lr)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sched = make_scheduler(opt)
        out = []
        for _ in range(steps):
            out.append(opt.param_groups[0]["lr"] / base_lr)
            opt.step()
            sched.step()
    return out


def our_scales(controller, steps=STEPS):
    """The controller's lr scale at each step, through the ``init`` / ``decide`` protocol."""
    state = controller.init()
    out = []
    for t in range(steps):
        d, state = controller.decide(obs(t), state)
        assert not d.stop and d.stop_prob == 0.0
        out.append(float(d.lr_scale))
    return out


def assert_same(ours, ref, tol=1e-12):
    assert len(ours) == len(ref)
    for t, (a, b) in enumerate(zip(ours, ref)):
        assert a == pytest.approx(b, rel=tol, abs=tol), f"step {t}: ours {a!r}, torch {b!r}"


# ----------------------------------------------------------------------------------------------- schedules

@pytest.mark.parametrize("value", [1.0, 0.25, 3.0])
def test_constant_matches_constant_lr(value):
    ref = torch_scales(lambda o: lr_scheduler.LambdaLR(o, lambda t: value))
    assert_same(our_scales(Constant(value)), ref)


@pytest.mark.parametrize("step_size,gamma", [(30, 0.1), (7, 0.5), (1, 0.98), (50, 2.0)])
def test_step_decay_matches_step_lr(step_size, gamma):
    ref = torch_scales(lambda o: lr_scheduler.StepLR(o, step_size=step_size, gamma=gamma))
    ours = our_scales(StepDecay(step_size, gamma))
    assert_same(ours, ref)
    assert len(set(ours)) >= 3  # the schedule actually moved


@pytest.mark.parametrize("gamma", [0.99, 0.9, 0.5])
def test_exponential_decay_matches_exponential_lr(gamma):
    ref = torch_scales(lambda o: lr_scheduler.ExponentialLR(o, gamma=gamma))
    assert_same(our_scales(ExponentialDecay(gamma)), ref, tol=1e-10)


@pytest.mark.parametrize("total,min_scale", [(100, 0.0), (100, 0.1), (37, 0.02), (300, 0.0)])
def test_cosine_matches_cosine_annealing_past_total_steps(total, min_scale):
    ref = torch_scales(lambda o: lr_scheduler.CosineAnnealingLR(o, T_max=total, eta_min=min_scale * BASE_LR))
    ours = our_scales(Cosine(total_steps=total, min_scale=min_scale))
    assert_same(ours, ref, tol=1e-10)
    assert ours[0] == 1.0
    if total < STEPS:
        assert ours[total] == pytest.approx(min_scale, abs=1e-12)
        assert max(ours[total:]) > min_scale + 0.1  # periodic past T, as torch


@pytest.mark.parametrize("total,min_scale,warmup,start", [(100, 0.0, 10, 0.1), (100, 0.05, 25, 0.01),
                                                          (60, 0.2, 1, 0.5), (250, 0.0, 40, 1.0)])
def test_cosine_with_warmup_matches_sequential_lr(total, min_scale, warmup, start):
    def make(o):
        return lr_scheduler.SequentialLR(
            o, [lr_scheduler.LinearLR(o, start_factor=start, end_factor=1.0, total_iters=warmup),
                lr_scheduler.CosineAnnealingLR(o, T_max=total - warmup, eta_min=min_scale * BASE_LR)],
            milestones=[warmup])
    ours = our_scales(Cosine(total_steps=total, min_scale=min_scale, warmup_steps=warmup, warmup_start=start))
    assert_same(ours, torch_scales(make), tol=1e-10)
    assert ours[0] == pytest.approx(start)
    assert ours[warmup] == pytest.approx(1.0)


def test_schedules_are_pure_functions_of_the_step():
    """Stateless schedules ignore losses and give the same scale whatever the order of the queries."""
    c = Cosine(total_steps=50, warmup_steps=5)
    forward = [c.scale(t) for t in range(80)]
    backward = [c.scale(t) for t in reversed(range(80))][::-1]
    assert forward == backward
    d, state = c.decide(obs(17, val=123.0), c.init())
    assert state is None and d.lr_scale == c.scale(17)


# ---------------------------------------------------------------------------------------- reduce on plateau

def metric_sequence(seed, n=STEPS):
    """A noisy, slowing, sometimes flat loss curve with exact repeats (exercises both threshold modes)."""
    rng = random.Random(seed)
    out, v = [], 1.0
    for t in range(n):
        phase = (t // 25) % 3
        if phase == 0:
            v *= 1 - rng.uniform(0.0, 0.05)
        elif phase == 1:
            v *= 1 + rng.uniform(-0.003, 0.003)
        out.append(round(v + rng.choice([0.0, 0.0, 0.002, -0.001]), 4))
    return out


PLATEAU_CONFIGS = [
    dict(factor=0.5, patience=3),
    dict(factor=0.1, patience=0, threshold=0.01, threshold_mode="abs"),
    dict(factor=0.5, patience=2, threshold=0.02, threshold_mode="rel", cooldown=4),
    dict(factor=0.7, patience=1, threshold=1e-3, threshold_mode="abs", cooldown=2),
    dict(factor=0.3, patience=1, cooldown=1, min_scale=0.01),
    dict(factor=0.0, patience=5, threshold=0.0, min_scale=0.05),
]


def _torch_plateau(base, cfg):
    kw = dict(cfg)
    min_scale = kw.pop("min_scale", 0.0)
    return lambda o: lr_scheduler.ReduceLROnPlateau(o, mode="min", min_lr=min_scale * base, **kw)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("cfg", PLATEAU_CONFIGS)
def test_reduce_on_plateau_matches_torch(cfg, seed):
    metrics = metric_sequence(seed)
    base = 1.0  # torch's eps=1e-8 guard then acts on the same numbers as ours
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=base)
    sched = _torch_plateau(base, cfg)(opt)
    ctrl = ReduceOnPlateau(**cfg)
    state = ctrl.init()
    ours, ref = [], []
    for t, m in enumerate(metrics):
        d, state = ctrl.decide(obs(t, val=m), state)
        opt.step()
        sched.step(m)
        ours.append(d.lr_scale)
        ref.append(opt.param_groups[0]["lr"] / base)
        assert not d.stop
    assert_same(ours, ref, tol=1e-12)
    # the sequence triggers several reductions (factor 0 drops straight to min_scale once)
    assert len(set(ours)) >= (2 if cfg["factor"] == 0 else 3)
    if cfg.get("min_scale"):
        assert min(ours) == pytest.approx(cfg["min_scale"])


def test_reduce_on_plateau_counts_only_steps_with_a_validation_loss():
    """Steps without a validation loss keep the scale; torch steps only on the checks."""
    cfg = dict(factor=0.5, patience=2, cooldown=1)
    metrics = metric_sequence(3, n=120)
    every = 4
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = _torch_plateau(1.0, cfg)(opt)
    ctrl = ReduceOnPlateau(**cfg)
    state = ctrl.init()
    changes = 0
    for t in range(len(metrics) * every):
        check = t % every == 0
        before = state
        d, state = ctrl.decide(obs(t, val=metrics[t // every] if check else None), state)
        if check:
            opt.step()
            sched.step(metrics[t // every])
        else:
            assert state == before
        assert d.lr_scale == pytest.approx(opt.param_groups[0]["lr"], rel=1e-12)
        changes += d.lr_scale != before.scale
    assert changes >= 2


def test_reduce_on_plateau_rel_and_abs_thresholds_differ():
    """0.995 vs best 1.0: an improvement under abs 1e-3, not under rel 1e-2."""
    for mode, threshold, improves in [("abs", 1e-3, True), ("rel", 1e-2, False), ("abs", 1e-2, False),
                                      ("rel", 1e-3, True)]:
        ctrl = ReduceOnPlateau(factor=0.5, patience=0, threshold=threshold, threshold_mode=mode)
        _, s = ctrl.decide(obs(0, 1.0), ctrl.init())
        d, s = ctrl.decide(obs(1, 0.995), s)
        assert (d.lr_scale == 1.0) == improves, (mode, threshold)
        assert (s.best == 0.995) == improves


# ------------------------------------------------------------------------------------------ early stopping

def run_early_stopping(ctrl, vals):
    """Feed validation losses (None: no check that step); return (stop index or None, is_best flags, states)."""
    state = ctrl.init()
    flags, states = [], []
    for t, v in enumerate(vals):
        d, state = ctrl.decide(obs(t, v), state)
        flags.append(d.is_best)
        states.append(state)
        assert d.stop_prob == float(d.stop)
        assert d.lr_scale == 1.0
        if d.stop:
            return t, flags, states
    return None, flags, states


def reference_stop(vals, patience, min_delta):
    """Straightforward reference: count consecutive checks with ``val >= best - min_delta``."""
    best, bad, flags = math.inf, 0, []
    for t, v in enumerate(vals):
        if v is None:
            flags.append(False)
            continue
        if v < best - min_delta:
            best, bad = v, 0
            flags.append(True)
        else:
            bad += 1
            flags.append(False)
            if bad == patience:
                return t, flags
    return None, flags


@pytest.mark.parametrize("vals,patience,min_delta,stop,best", [
    # strictly improving: never stops, every check is the best so far
    ([5, 4, 3, 2, 1, 0.5], 1, 0.0, None, [0, 1, 2, 3, 4, 5]),
    # equal values are not improvements: stops at the 3rd consecutive non-improvement
    ([5, 4, 4, 4, 4, 3], 3, 0.0, 4, [0, 1]),
    # an improvement resets the counter
    ([5, 4, 4.5, 4.2, 3.9, 4.0, 4.1, 4.0], 3, 0.0, 7, [0, 1, 4]),
    # min_delta: 3.99 is not better than 4 - 0.05
    ([5, 4, 4, 3.99, 4, 4, 4], 3, 0.05, 4, [0, 1]),
    ([5, 4, 4, 3.99, 4, 4, 4], 3, 0.0, 6, [0, 1, 3]),
    # patience 1 stops at the first non-improvement
    ([3, 2, 2.5], 1, 0.0, 2, [0, 1]),
    # steps without a validation loss are not checks
    ([3, None, None, 3.5, None, 2, None, 2, None, None, 2.1], 2, 0.0, 10, [0, 5]),
    # the first check is always the best so far, however large
    ([1e12, 2e12, 5e11], 2, 0.0, None, [0, 2]),
    # a non-finite validation loss is never an improvement
    ([1.0, float("nan"), float("inf"), 0.5], 2, 0.0, 2, [0]),
])
def test_early_stopping_on_hand_built_sequences(vals, patience, min_delta, stop, best):
    ctrl = EarlyStopping(patience=patience, min_delta=min_delta)
    got_stop, flags, states = run_early_stopping(ctrl, vals)
    assert got_stop == stop
    assert [t for t, f in enumerate(flags) if f] == best
    last = states[-1]
    assert last.best_step == best[-1]
    assert last.best == vals[best[-1]]
    if stop is not None:
        assert last.num_bad == patience


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("patience,min_delta", [(1, 0.0), (3, 0.0), (4, 0.01), (10, 0.003)])
def test_early_stopping_matches_reference_on_random_curves(seed, patience, min_delta):
    rng = random.Random(seed)
    vals, v = [], 1.0
    for _ in range(400):
        v = max(v * (1 + rng.gauss(-0.01, 0.02)), 0.0)
        vals.append(None if rng.random() < 0.2 else round(v, 3))
    want_stop, want_flags = reference_stop(vals, patience, min_delta)
    got_stop, got_flags, _ = run_early_stopping(EarlyStopping(patience, min_delta), vals)
    assert got_stop == want_stop
    assert got_flags == want_flags[:len(got_flags)]


def test_early_stopping_state_is_untouched_without_validation_loss():
    ctrl = EarlyStopping(patience=2)
    state = EarlyStoppingState(1.0, 3, 1)
    d, new = ctrl.decide(obs(9), state)
    assert new == state and d == Decision()


# ------------------------------------------------------------------------------------------------- compose

def test_compose_multiplies_scales_at_every_step():
    parts = (StepDecay(10, 0.5), ExponentialDecay(0.97), Cosine(total_steps=120, warmup_steps=8))
    comp = Compose(*parts)
    want = [math.prod(p.scale(t) for p in parts) for t in range(STEPS)]
    assert_same(our_scales(comp), want, tol=1e-12)


def test_compose_stops_if_any_member_stops_and_combines_stop_probs():
    class Fixed:
        def __init__(self, p, stop_at=None, scale=1.0):
            self.p, self.stop_at, self.scale = p, stop_at, scale

        def init(self):
            return 0

        def decide(self, o, s):
            return Decision(lr_scale=self.scale, stop_prob=self.p, stop=o.step == self.stop_at), s + 1

    comp = Compose(Fixed(0.2), Fixed(0.5, stop_at=4, scale=[2.0, 3.0]), Fixed(0.1, scale=0.5))
    state = comp.init()
    assert state == (0, 0, 0)
    for t in range(6):
        d, state = comp.decide(obs(t), state)
        assert d.stop_prob == pytest.approx(1 - 0.8 * 0.5 * 0.9)
        assert d.lr_scale == [1.0, 1.5]
        assert d.stop == (t == 4)
    assert state == (6, 6, 6)  # every member's state advances


def test_compose_with_early_stopping_and_plateau():
    es, rp = EarlyStopping(patience=3), ReduceOnPlateau(factor=0.5, patience=1)
    comp = Compose(es, rp, Constant(2.0))
    assert comp.restore_best and not Compose(rp).restore_best
    vals = [5, 4, 4.1, 4.2, 3.0, 3.5, 3.5, 3.5, 3.5]
    s_c, s_e, s_r = comp.init(), es.init(), rp.init()
    for t, v in enumerate(vals):
        dc, s_c = comp.decide(obs(t, v), s_c)
        de, s_e = es.decide(obs(t, v), s_e)
        dr, s_r = rp.decide(obs(t, v), s_r)
        assert dc.lr_scale == pytest.approx(2.0 * dr.lr_scale)
        assert dc.is_best == de.is_best and dc.stop == de.stop
        if dc.stop:
            break
    assert t == 7 and dc.stop


def test_multiply_scales_mixes_scalars_and_sequences():
    a, b = [torch.tensor(2.0), torch.tensor(3.0)], [torch.tensor(0.5), torch.tensor(4.0)]
    assert multiply_scales(2.0, 3.0) == 6.0
    assert [float(x) for x in multiply_scales(a, 2.0)] == [4.0, 6.0]
    assert [float(x) for x in multiply_scales(2.0, b)] == [1.0, 8.0]
    assert [float(x) for x in multiply_scales(a, b)] == [1.0, 12.0]


# ------------------------------------------------------------------------------------ factory and bad input

@pytest.mark.parametrize("name,kwargs,cls", [
    ("constant", dict(value=0.5), Constant), ("step", dict(step_size=3, gamma=0.5), StepDecay),
    ("exponential", dict(gamma=0.9), ExponentialDecay), ("Cosine", dict(total_steps=10), Cosine),
    ("plateau", dict(patience=2), ReduceOnPlateau), ("early_stopping", dict(patience=4), EarlyStopping)])
def test_get_controller_builds_by_name(name, kwargs, cls):
    c = get_controller(name, **kwargs)
    assert isinstance(c, cls)
    for k, v in kwargs.items():
        assert getattr(c, k) == v


def test_get_controller_unknown_name():
    with pytest.raises(ValueError, match="'warp_drive'"):
        get_controller("warp_drive")


@pytest.mark.parametrize("make,match", [
    (lambda: EarlyStopping(patience=0), "patience.*0"),
    (lambda: EarlyStopping(patience=-2), "patience.*-2"),
    (lambda: EarlyStopping(patience=2.5), "patience.*2.5"),
    (lambda: EarlyStopping(patience=3, min_delta=-0.1), "min_delta.*-0.1"),
    (lambda: StepDecay(step_size=0), "step_size.*0"),
    (lambda: StepDecay(step_size=-5), "step_size.*-5"),
    (lambda: StepDecay(gamma=0.0), "gamma.*0.0"),
    (lambda: StepDecay(gamma=-0.5), "gamma.*-0.5"),
    (lambda: StepDecay(gamma=float("nan")), "gamma.*nan"),
    (lambda: ExponentialDecay(gamma=0.0), "gamma.*0.0"),
    (lambda: ExponentialDecay(gamma=-1.0), "gamma.*-1.0"),
    (lambda: Constant(0.0), "value.*0.0"),
    (lambda: Cosine(total_steps=0), "total_steps.*0"),
    (lambda: Cosine(total_steps=10, warmup_steps=10), "warmup_steps.*10"),
    (lambda: Cosine(total_steps=10, min_scale=-0.1), "min_scale.*-0.1"),
    (lambda: Cosine(total_steps=10, warmup_steps=2, warmup_start=0.0), "warmup_start.*0.0"),
    (lambda: ReduceOnPlateau(factor=1.0), "factor.*1.0"),
    (lambda: ReduceOnPlateau(patience=-1), "patience.*-1"),
    (lambda: ReduceOnPlateau(threshold_mode="relative"), "threshold_mode.*'relative'"),
    (lambda: ReduceOnPlateau(threshold=-1e-3), "threshold.*-0.001"),
    (lambda: get_controller("step", step_size=0), "step_size.*0"),
    (lambda: get_controller("early_stopping", patience=0), "patience.*0"),
])
def test_bad_hyperparameters_raise_value_error_naming_the_value(make, match):
    with pytest.raises(ValueError, match=match):
        make()


# ------------------------------------------------------------------------------------------------ fixed budget

def test_fixed_budget_stops_at_its_budget_and_marks_every_new_best():
    from learned_opt.control import FixedBudget

    ctrl = FixedBudget(budget=5)
    vals = [3.0, 2.0, 2.5, None, 1.0, 1.5, 0.5]
    state, flags, stop_at = ctrl.init(), [], None
    for t, v in enumerate(vals):
        d, state = ctrl.decide(obs(t, v), state)
        flags.append(d.is_best)
        assert d.lr_scale == 1.0
        if d.stop:
            stop_at = t
            break
    assert stop_at == 5  # after 5 updates, never earlier, whatever the validation loss does
    assert [t for t, f in enumerate(flags) if f] == [0, 1, 4]  # a step without a validation loss is no check
    assert state.best == 1.0 and ctrl.restore_best


def test_fixed_budget_in_the_inner_loop_returns_the_best_parameters_seen():
    """On an overfitting task, the budget run returns exactly the parameters early stopping would restore at the
    same step (the lowest validation loss seen), not the last ones."""
    from learned_opt.control import FixedBudget
    from learned_opt.optim import get_optimizer
    from learned_opt.tasks import MetaNetFamily
    from learned_opt.tasks.base import generator
    from learned_opt.unroll import unroll

    def run(ctrl):
        g = generator(7)
        task = MetaNetFamily(n_train=8)(g)
        return task, unroll(task, get_optimizer("adam", lr=0.05), ctrl, steps=60, generator=g, val_every=1)

    task, res = run(FixedBudget(budget=40))
    assert res.stopped and res.stop_step == 40
    vals = res.records["val_loss"]
    best = min(range(41), key=lambda t: vals[t])
    assert res.best_step == best < 40  # the task overfits before the budget runs out
    last = run(FixedBudget(budget=40, restore_best=False))[1]
    assert last.best_step is None
    with torch.no_grad():
        got = float(task.split_losses(res.params, "val"))
        end = float(task.split_losses(last.params, "val"))
    assert got == pytest.approx(vals[best], rel=1e-6) and got < end


def test_fixed_budget_is_built_by_name_and_rejects_bad_budgets():
    from learned_opt.control import FixedBudget

    assert get_controller("fixed_budget", budget=7) == FixedBudget(7)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="budget"):
            FixedBudget(budget=bad)
