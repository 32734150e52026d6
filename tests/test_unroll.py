"""The one inner loop: records, validation cadence, the differentiable switch, memory, stopping, lr scales."""
import gc
import math
import warnings
import weakref

import pytest
import torch
from torch.optim import lr_scheduler

from learned_opt.control import Compose, Constant, Decision, EarlyStopping, FixedBudget, StepDecay
from learned_opt.optim import SGD, Adam
from learned_opt.tasks import SPLITS, MetaNetRegression, Quadratic, generator
from learned_opt.tasks.base import check_split
from learned_opt.unroll import RECORD_KEYS, unroll


def quadratic(num_problems=3, dim=5, seed=0):
    return Quadratic(generator(seed), dim=dim, num_problems=num_problems, dtype=torch.float64)


def small_metanet(seed=0, **kw):
    return MetaNetRegression(generator(seed), n_train=16, n_val=32, n_test=8, **kw)


class StopAt:
    """Stops at a given step; its stop probability is a tensor so ``stop_probs`` is filled."""

    def __init__(self, step):
        self.step = step

    def init(self):
        return []

    def decide(self, obs, state):
        stop = obs.step == self.step
        return Decision(stop_prob=torch.tensor(float(stop)), stop=stop), state + [obs.step]


class PerTensor:
    """A fixed per-tensor learning-rate scale."""

    def __init__(self, scales):
        self.scales = scales

    def init(self):
        return None

    def decide(self, obs, state):
        return Decision(lr_scale=[torch.tensor(s) for s in self.scales]), None


class Line:
    """One scalar parameter; training pulls it to 1, validation prefers 0.5 (so it "overfits")."""
    num_problems = 1

    def init(self, generator):
        return [torch.zeros(1, dtype=torch.float64)]

    def sample_batch(self, generator, split="train"):
        check_split(split)
        return split

    def losses(self, params, batch):
        target = 1.0 if batch == "train" else 0.5
        return ((params[0] - target) ** 2).sum().reshape(1)

    def loss(self, params, batch):
        return self.losses(params, batch)[0]


def manual_sgd(task, lr, steps, seed=0):
    """Reference plain-autograd SGD on a deterministic task: losses, grad norms and params per step."""
    theta = [p.clone() for p in task.init(generator(seed))]
    losses, norms, trail = [], [], []
    for _ in range(steps):
        ps = [p.clone().requires_grad_() for p in theta]
        loss = task.loss(ps, task.sample_batch(None, "train"))
        grads = torch.autograd.grad(loss, ps)
        losses.append(loss.item())
        norms.append(math.sqrt(sum((g ** 2).sum().item() for g in grads)))
        trail.append(theta)
        theta = [p - lr * g for p, g in zip(theta, grads)]
    trail.append(theta)
    losses.append(task.loss(theta, None).item())
    return losses, norms, trail


# ------------------------------------------------------------------------------------------------ records

@pytest.mark.parametrize("final_eval", [True, False])
def test_records_every_key_with_matching_lengths(final_eval):
    T = 6
    task = quadratic()
    res = unroll(task, Adam(lr=0.05), steps=T, generator=generator(0), final_eval=final_eval)
    rows = T + 1 if final_eval else T
    assert tuple(res.records) == RECORD_KEYS
    assert all(len(v) == rows for v in res.records.values()), {k: len(v) for k, v in res.records.items()}
    assert res.records["step"] == list(range(rows))
    assert len(res.train_losses) == len(res.val_losses) == len(res.problem_losses) == rows
    assert res.problem_loss_matrix().shape == (rows, task.num_problems)
    assert res.step == T and not res.stopped and res.stop_step is None and not res.diverged
    assert res.records["stop"] == [False] * rows
    assert res.records["stop_prob"] == [0.0] * rows
    assert res.records["lr_scale"] == [1.0] * rows
    assert all(math.isfinite(x) for x in res.records["grad_norm"][:T])
    assert all(math.isfinite(x) for x in res.records["update_norm"][:T])
    if final_eval:  # the final row only evaluates: no gradient, no update
        assert math.isnan(res.records["grad_norm"][T]) and math.isnan(res.records["update_norm"][T])
    assert res.opt_state.count == T


def test_records_match_a_manual_sgd_loop():
    task, lr, T = quadratic(num_problems=4), 0.01, 25
    res = unroll(task, SGD(lr=lr), steps=T, generator=generator(0))
    losses, norms, trail = manual_sgd(task, lr, T)
    rec = res.records
    assert rec["train_loss"] == pytest.approx([x / task.num_problems for x in losses], rel=1e-10)
    assert [float(x) for x in res.train_losses] == pytest.approx(losses, rel=1e-10)
    assert rec["grad_norm"][:T] == pytest.approx(norms, rel=1e-10)
    assert rec["update_norm"][:T] == pytest.approx([lr * n for n in norms], rel=1e-10)
    assert torch.allclose(res.params[0], trail[-1][0], rtol=1e-10)
    for row, theta in zip(res.problem_losses, trail):
        assert torch.allclose(row, task.losses(theta), rtol=1e-10)
    assert losses[-1] < 0.5 * losses[0]


def test_schedule_reproduces_torch_sgd_with_step_lr():
    """The controller's scale multiplies the updates exactly as a torch scheduler changes the lr."""
    task, lr, T = quadratic(num_problems=2), 0.01, 40
    res = unroll(task, SGD(lr=lr, momentum=0.5), StepDecay(step_size=7, gamma=0.5), steps=T,
                 generator=generator(0))
    theta = task.init(generator(0))[0].clone().requires_grad_()
    opt = torch.optim.SGD([theta], lr=lr, momentum=0.5)
    sched = lr_scheduler.StepLR(opt, step_size=7, gamma=0.5)
    for t in range(T):
        opt.zero_grad()
        loss = task.loss([theta])
        assert loss.item() == pytest.approx(float(res.train_losses[t]), rel=1e-10)
        assert res.records["lr_scale"][t] == pytest.approx(opt.param_groups[0]["lr"] / lr, rel=1e-12)
        loss.backward()
        opt.step()
        sched.step()
    assert torch.allclose(res.params[0], theta.detach(), rtol=1e-10, atol=1e-12)


def test_validation_loss_only_every_k_steps():
    task = small_metanet()
    res = unroll(task, Adam(lr=1e-2), steps=10, generator=generator(0), val_every=3)
    val = res.records["val_loss"]
    checked = [t for t, v in zip(res.records["step"], val) if not math.isnan(v)]
    assert checked == [0, 3, 6, 9]
    assert [t for t, v in enumerate(res.val_losses) if v is not None] == checked
    assert val[0] == pytest.approx(task.loss(task.init(generator(0)), task.data["val"]).item(), rel=1e-6)
    assert val[0] != pytest.approx(res.records["train_loss"][0])  # a different split, not the train loss

    res9 = unroll(task, Adam(lr=1e-2), steps=9, generator=generator(0), val_every=3)
    assert res9.records["step"][-1] == 9 and not math.isnan(res9.records["val_loss"][-1])  # final row too
    assert res9.records["val_loss"][-1] == pytest.approx(task.loss(res9.params, task.data["val"]).item(),
                                                         rel=1e-6)
    never = unroll(task, Adam(lr=1e-2), steps=5, generator=generator(0))
    assert all(math.isnan(v) for v in never.records["val_loss"]) and set(never.val_losses) == {None}


@pytest.mark.parametrize("kwargs,match", [(dict(steps=0), "steps.*0"), (dict(steps=-3), "steps.*-3"),
                                          (dict(steps=2.5), "steps.*2.5"),
                                          (dict(steps=5, val_every=-1), "val_every.*-1"),
                                          (dict(steps=5, horizon=0), "horizon.*0")])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        unroll(quadratic(), SGD(lr=0.1), generator=generator(0), **kwargs)


def test_continuing_an_unroll_equals_one_long_unroll():
    task, opt = quadratic(), Adam(lr=0.05)
    whole = unroll(task, opt, StepDecay(4, 0.5), steps=12, generator=generator(0))
    first = unroll(task, opt, StepDecay(4, 0.5), steps=5, generator=generator(0), horizon=12)
    second = unroll(task, opt, StepDecay(4, 0.5), steps=7, generator=generator(0), params=first.params,
                    opt_state=first.opt_state, ctrl_state=first.ctrl_state, start_step=5, horizon=12)
    assert second.records["step"] == list(range(5, 13)) and second.step == 12
    assert torch.allclose(second.params[0], whole.params[0], rtol=1e-12)
    assert second.opt_state.count == 12
    assert second.records["lr_scale"] == whole.records["lr_scale"][5:]
    assert second.records["train_loss"] == pytest.approx(whole.records["train_loss"][5:], rel=1e-12)


def test_divergence_stops_the_loop():
    res = unroll(quadratic(), SGD(lr=10.0), steps=2000, generator=generator(0))
    assert res.diverged and res.step < 2000
    assert not math.isfinite(res.records["train_loss"][-1])
    ok = unroll(quadratic(), SGD(lr=1e-3), steps=50, generator=generator(0))
    assert not ok.diverged


# ---------------------------------------------------------------------------------- the differentiable switch

def test_differentiable_first_order_reaches_the_initial_params():
    """Gradients enter as constants: d theta_T / d theta_0 = I, so dL(theta_T)/d theta_0 = grad L(theta_T)."""
    task = quadratic(num_problems=2)
    theta0 = task.init(generator(0))[0].requires_grad_()
    res = unroll(task, SGD(lr=0.01), steps=8, generator=generator(0), params=[theta0], differentiable=True)
    final = res.train_losses[-1]
    assert final.grad_fn is not None and res.params[0].grad_fn is not None
    (g,) = torch.autograd.grad(final, theta0)
    theta_T = res.params[0].detach().requires_grad_()
    (want,) = torch.autograd.grad(task.loss([theta_T]), theta_T)
    assert torch.allclose(g, want, rtol=1e-10)


def test_differentiable_second_order_gives_the_exact_meta_gradient():
    """With second_order, the gradient through the unroll equals the analytic one of the unrolled map."""
    task, lr, T = quadratic(num_problems=2, dim=4), 0.02, 6
    theta0 = task.init(generator(0))[0].requires_grad_()
    res = unroll(task, SGD(lr=lr), steps=T, generator=generator(0), params=[theta0], differentiable=True,
                 second_order=True)
    (g,) = torch.autograd.grad(res.train_losses[-1], theta0)
    # theta_{t+1} = (I - 2 lr W^T W) theta_t + 2 lr W^T y, so dtheta_T/dtheta_0 = (I - 2 lr W^T W)^T
    want = []
    for i in range(2):
        W, y = task.W[i], task.y[i]
        A = torch.eye(4, dtype=W.dtype) - 2 * lr * W.T @ W
        theta_T = res.params[0][i].detach()
        grad_T = 2 * W.T @ (W @ theta_T - y)
        want.append(torch.linalg.matrix_power(A, T).T @ grad_T)
    assert torch.allclose(g, torch.stack(want), rtol=1e-8)
    first = unroll(task, SGD(lr=lr), steps=T, generator=generator(0), params=[theta0], differentiable=True)
    (g1,) = torch.autograd.grad(first.train_losses[-1], theta0)
    assert not torch.allclose(g1, g, rtol=1e-3)  # the switch matters


def test_differentiable_meta_gradient_reaches_optimizer_hyperparameters():
    lr = torch.tensor(0.01, dtype=torch.float64, requires_grad=True)
    res = unroll(quadratic(), SGD(lr=lr), steps=5, generator=generator(0), differentiable=True)
    meta_loss = sum(res.train_losses)
    (g,) = torch.autograd.grad(meta_loss, lr)
    assert g < 0  # a larger step lowers the losses on this well-conditioned early stretch


def test_non_differentiable_keeps_no_graph():
    task = small_metanet()
    init = [p.requires_grad_() for p in task.init(generator(0))]
    lr = torch.tensor(1e-2, requires_grad=True)
    res = unroll(task, Adam(lr=lr), StopAt(10 ** 9), steps=6, generator=generator(0), params=init,
                 val_every=2)
    tensors = list(res.params) + list(res.opt_state.mu) + list(res.opt_state.nu) + res.train_losses + \
        [v for v in res.val_losses if v is not None] + res.problem_losses + res.stop_probs
    assert len(res.stop_probs) == 6 and len([v for v in res.val_losses if v is not None]) == 4
    for t in tensors:
        assert t.grad_fn is None and not t.requires_grad
    assert all(p.grad is None for p in init) and lr.grad is None
    assert not torch.equal(res.params[0], init[0].detach())


def _alive_saved_tensors(run):
    """Distinct tensors saved for backward during ``run()`` that are still alive after it and gc."""
    refs = []

    def pack(t):
        refs.append(weakref.ref(t))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = run()
    gc.collect()
    alive = {id(r()): r() for r in refs if r() is not None}
    return result, list(alive.values()), len(refs)


@pytest.mark.parametrize("make_task", [quadratic, small_metanet], ids=["quadratic", "metanet"])
def test_non_differentiable_memory_is_flat_in_the_horizon(make_task):
    """Nothing saved for backward outlives its step (the task's own data tensors excepted)."""
    task = make_task()
    if isinstance(task, Quadratic):
        constants = [task.W, task.y]
    else:
        constants = [t for s in SPLITS for t in task.data[s]]

    def leaked(T, differentiable):
        res, alive, n = _alive_saved_tensors(
            lambda: unroll(task, Adam(lr=1e-2), steps=T, generator=generator(0), val_every=5,
                           differentiable=differentiable))
        assert n >= T  # every step did save tensors for its backward pass
        return res, [a for a in alive if not any(a is c for c in constants)]

    res10, leak10 = leaked(10, False)
    res200, leak200 = leaked(200, False)  # results held alive while counting: they must not pin graphs
    assert len(leak10) == 0 and len(leak200) == 0
    # the probe does see retained graphs: a differentiable unroll keeps them, growing with T
    res_d10, leak_d10 = leaked(10, True)
    res_d40, leak_d40 = leaked(40, True)
    assert len(leak_d10) > 10 and len(leak_d40) > 3 * len(leak_d10)


# ---------------------------------------------------------------------------------------------- stopping

def test_controller_stop_ends_the_loop_at_that_step():
    task = quadratic()
    res = unroll(task, Adam(lr=0.05), StopAt(7), steps=20, generator=generator(0))
    assert res.stopped and res.stop_step == 7 and res.step == 7
    assert res.records["step"] == list(range(8))
    assert res.records["stop"] == [False] * 7 + [True]
    assert res.records["stop_prob"] == [0.0] * 7 + [1.0]
    assert [float(p) for p in res.stop_probs] == [0.0] * 7 + [1.0]
    assert res.ctrl_state == list(range(8))
    assert math.isnan(res.records["update_norm"][7])  # the stopping step applies no update
    seven = unroll(task, Adam(lr=0.05), steps=7, generator=generator(0))
    assert torch.equal(res.params[0], seven.params[0])
    assert res.opt_state.count == 8  # the optimizer saw the stop step's gradient


def test_early_stopping_restores_the_best_validation_params():
    lr, patience = 0.1, 4
    res = unroll(Line(), SGD(lr=lr), EarlyStopping(patience=patience), steps=100, generator=generator(0),
                 val_every=1)
    # theta_t = 1 - 0.8^t; the validation loss (theta - 0.5)^2 is smallest at t = 3
    val = res.records["val_loss"]
    best = min(range(len(val)), key=val.__getitem__)
    assert best == 3 and res.best_step == 3
    assert res.stopped and res.stop_step == best + patience
    assert res.params[0].item() == pytest.approx(1 - 0.8 ** 3, rel=1e-12)
    assert Line().loss(res.params, "val").item() == pytest.approx(val[best], rel=1e-12)

    keep = unroll(Line(), SGD(lr=lr), EarlyStopping(patience=patience, restore_best=False), steps=100,
                  generator=generator(0), val_every=1)
    assert keep.stop_step == res.stop_step and keep.best_step is None
    assert keep.params[0].item() == pytest.approx(1 - 0.8 ** keep.stop_step, rel=1e-12)


@pytest.mark.parametrize("controller", [FixedBudget(budget=100), EarlyStopping(patience=50)])
def test_restore_best_considers_the_final_parameters(controller):
    # theta_t = 1 - 0.8^t, validation loss (theta - 0.5)^2: checks at 0 and 2 (val_every=2), then the final
    # parameters after 3 updates (theta = 0.488) beat the best check (t = 2, theta = 0.36) and are kept
    res = unroll(Line(), SGD(lr=0.1), controller, steps=3, generator=generator(0), val_every=2)
    assert res.best_step == 3 and res.params[0].item() == pytest.approx(1 - 0.8 ** 3, rel=1e-12)
    assert res.records["val_loss"][-1] == pytest.approx((0.5 - (1 - 0.8 ** 3)) ** 2, rel=1e-9)
    # past the best: after 5 updates (theta = 0.672) the check at t = 3 stays the best and is restored
    res = unroll(Line(), SGD(lr=0.1), controller, steps=5, generator=generator(0), val_every=1)
    assert res.best_step == 3 and res.params[0].item() == pytest.approx(1 - 0.8 ** 3, rel=1e-12)


def test_early_stopping_counts_only_validation_steps():
    res = unroll(Line(), SGD(lr=0.1), Compose(Constant(), EarlyStopping(patience=2)), steps=100,
                 generator=generator(0), val_every=5)
    # checks at 0, 5, 10, ...: best at 5 (theta = 0.672), then 10 and 15 do not improve
    assert res.best_step == 5 and res.stop_step == 15
    assert res.params[0].item() == pytest.approx(1 - 0.8 ** 5, rel=1e-12)


# ------------------------------------------------------------------------------------ per-tensor lr scales

def test_per_tensor_lr_scale_sequences():
    task, lr = small_metanet(), 0.05
    scales = [0.0, 1.0, 2.0, 0.5, 1.0, 3.0]
    init = task.init(generator(0))
    res = unroll(task, SGD(lr=lr), PerTensor(scales), steps=1, generator=generator(0), final_eval=False)
    ps = [p.clone().requires_grad_() for p in init]
    grads = torch.autograd.grad(task.loss(ps, task.sample_batch(generator(0), "train")), ps)
    for p0, p1, g, s in zip(init, res.params, grads, scales):
        assert torch.allclose(p1 - p0, -lr * s * g, atol=1e-7)
    assert torch.equal(res.params[0], init[0])  # scale 0 freezes that tensor
    assert res.records["lr_scale"] == [pytest.approx(sum(scales) / len(scales))]
    # composed with a scalar schedule, the scales multiply per tensor
    both = unroll(task, SGD(lr=lr), Compose(Constant(2.0), PerTensor(scales)), steps=1,
                  generator=generator(0), final_eval=False)
    for p0, p1, g, s in zip(init, both.params, grads, scales):
        assert torch.allclose(p1 - p0, -lr * 2 * s * g, atol=1e-7)


def test_learned_scale_and_stop_prob_are_differentiable():
    """A learned per-tensor scale and stop probability get meta-gradients and record as plain floats."""
    task = small_metanet()
    s = torch.ones(6, requires_grad=True)

    class Learned:
        def init(self):
            return None

        def decide(self, obs, state):
            return Decision(lr_scale=list(s.unbind()), stop_prob=torch.sigmoid(s.sum() - 10)), None

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. float() of a tensor that requires grad
        res = unroll(task, SGD(lr=0.05), Learned(), steps=3, generator=generator(0), differentiable=True)
    (g,) = torch.autograd.grad(res.train_losses[-1], s)
    assert torch.isfinite(g).all() and (g != 0).all()
    assert len(res.stop_probs) == 3 and all(p.grad_fn is not None for p in res.stop_probs)
    assert res.records["stop_prob"] == pytest.approx([torch.sigmoid(torch.tensor(-4.0)).item()] * 3 + [0.0])
    assert res.records["lr_scale"] == [1.0] * 4
