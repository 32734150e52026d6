"""The ``torch.optim`` adapter (:class:`learned_opt.optim.ProtocolOptimizer`): it behaves like ``torch.optim``.

Checked step for step against ``torch.optim`` (the hand-coded baselines) and against
:func:`learned_opt.unroll.unroll` (a meta-network's LR and stop heads): parameters without gradients are left
exactly alone and keep their state, parameter groups and ``add_param_group``, schedulers, the model's dtype,
sparse gradients, the learned heads, and state dicts that resume exactly with ``weights_only=True``.
"""
from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from torch import nn

from learned_opt.control import Constant, EarlyStopping
from learned_opt.optim import SGD, Adam, AdamW, Momentum, ProtocolOptimizer
from learned_opt.optim.learned import CoordLSTM, CoordMLP
from learned_opt.optim.normmlp import NormMLP
from learned_opt.tasks.supervised import SupervisedTask
from learned_opt.unroll import unroll
from tests.test_optim import CASES

T = torch.optim

# ---------------------------------------------------------------------------------------------------------
# Drop-in use, parity with torch.optim.


def _digits(n=512):
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data[:n], dtype=torch.float32) / 16.0
    return x, torch.tensor(d.target[:n], dtype=torch.long)


def _mlp(seed=0):
    torch.manual_seed(seed)  # nn.Linear initialises from the global RNG; tests run in their own process order
    return nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))


def test_adapter_trains_a_module():
    """zero_grad / backward / step with the adapter drives a digits MLP's loss down substantially."""
    x, y = _digits()
    model = _mlp()
    opt = ProtocolOptimizer(model.parameters(), Adam(lr=1e-2))
    loss_fn = nn.CrossEntropyLoss()
    with torch.no_grad():
        first = float(loss_fn(model(x), y))
    g = torch.Generator().manual_seed(0)
    for _ in range(150):
        idx = torch.randperm(x.shape[0], generator=g)[:128]
        opt.zero_grad()
        loss_fn(model(x[idx]), y[idx]).backward()
        opt.step()
    with torch.no_grad():
        last = float(loss_fn(model(x), y))
        acc = float((model(x).argmax(1) == y).float().mean())
    assert last < 0.15 * first, (first, last)
    assert acc > 0.9


ADAPTER_CASES = [c for c in CASES if c[0] in ("momentum_damp_wd", "adam", "adamw_wd_amsgrad", "rmsprop_centered")]


@pytest.mark.parametrize("name,make_ours,make_torch", ADAPTER_CASES, ids=[c[0] for c in ADAPTER_CASES])
def test_adapter_matches_torch_optim(name, make_ours, make_torch):
    """The adapter reproduces torch.optim's trajectory on an nn.Module (closure loss returned)."""
    x, y = _digits(256)
    a = _mlp(1)
    b = copy.deepcopy(a)
    opt_a, opt_b = ProtocolOptimizer(a.parameters(), make_ours()), make_torch(list(b.parameters()))
    loss_fn = nn.CrossEntropyLoss()
    for t in range(10):
        idx = slice(16 * t, 16 * t + 64)

        def closure(m=a, opt=opt_a):
            opt.zero_grad()
            loss = loss_fn(m(x[idx]), y[idx])
            loss.backward()
            return loss

        ret = opt_a.step(closure)
        assert torch.is_tensor(ret) and ret.ndim == 0
        opt_b.zero_grad()
        loss_fn(b(x[idx]), y[idx]).backward()
        opt_b.step()
        for pa, pb in zip(a.parameters(), b.parameters()):
            torch.testing.assert_close(pa, pb, atol=1e-6, rtol=1e-6)
    assert not torch.equal(a[0].weight, _mlp(1)[0].weight)


def test_adapter_lr_scheduler_scales_updates():
    """StepLR on the adapter multiplies the wrapped optimizer's updates by the schedule's factor."""
    c = torch.tensor([1.0, -2.0, 0.5])
    w = nn.Parameter(torch.zeros(3))
    opt = ProtocolOptimizer([w], SGD(lr=0.1))
    sched = T.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    for t in range(6):
        before = w.detach().clone()
        opt.zero_grad()
        (w * c).sum().backward()  # constant gradient c: the update is -0.1 * scale * c
        opt.step()
        sched.step()
        expected = -0.1 * 0.5 ** (t // 2) * c
        torch.testing.assert_close(w.detach() - before, expected, atol=1e-7, rtol=1e-6)


def test_adapter_with_scheduler_matches_torch():
    """Adapter(Momentum) + StepLR follows torch.optim.SGD(momentum) + StepLR on an MLP."""
    x, y = _digits(128)
    a = _mlp(2)
    b = copy.deepcopy(a)
    opt_a = ProtocolOptimizer(a.parameters(), Momentum(lr=0.1, momentum=0.9))
    opt_b = T.SGD(b.parameters(), lr=0.1, momentum=0.9, foreach=False)
    scheds = [T.lr_scheduler.StepLR(o, step_size=3, gamma=0.3) for o in (opt_a, opt_b)]
    loss_fn = nn.CrossEntropyLoss()
    for _ in range(9):
        for m, o, s in zip((a, b), (opt_a, opt_b), scheds):
            o.zero_grad()
            loss_fn(m(x), y).backward()
            o.step()
            s.step()
    # torch scales the buffer's contribution by the current lr only, as does the adapter (scale * -lr * buf)
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, atol=1e-6, rtol=1e-6)


def test_adapter_passes_closure_loss_and_only_tensors_with_gradients():
    """The closure's loss reaches ``update(..., loss=)`` and is returned; a parameter without a gradient is not
    passed at all (it used to get a zero gradient) and stays exactly as it is."""
    seen = []

    class Spy:
        def init(self, params):
            return 0

        def update(self, grads, state, params, *, loss=None):
            seen.append((loss, [g.clone() for g in grads]))
            return [-g for g in grads], state + 1

    w, unused = nn.Parameter(torch.ones(2)), nn.Parameter(torch.ones(3))
    opt = ProtocolOptimizer([w, unused], Spy())

    def closure():
        opt.zero_grad()
        loss = (3 * w).sum()
        loss.backward()
        return loss

    assert float(opt.step(closure).detach()) == 6.0
    assert float(seen[0][0]) == 6.0 and not seen[0][0].requires_grad
    assert len(seen[0][1]) == 1 and torch.equal(seen[0][1][0], torch.full((2,), 3.0))
    assert torch.equal(w.detach(), torch.full((2,), -2.0)) and torch.equal(unused.detach(), torch.ones(3))
    assert opt.group_states[0]["opt"] == 1 and opt.group_states[0]["active"] == [0]
    opt.step(loss=torch.tensor(2.5))  # the loss without a closure
    assert float(seen[1][0]) == 2.5


def test_adapter_rejects_bad_arguments():
    """A non-optimizer is refused with a TypeError naming its type; a negative lr or weight decay with a
    ValueError naming it."""
    with pytest.raises(TypeError, match="str"):
        ProtocolOptimizer([nn.Parameter(torch.ones(1))], "adam")
    with pytest.raises(ValueError, match=r"^lr .*-0\.1"):
        ProtocolOptimizer([nn.Parameter(torch.ones(1))], SGD(), lr=-0.1)
    with pytest.raises(ValueError, match=r"parameter group 0: weight_decay .*-1"):
        ProtocolOptimizer([nn.Parameter(torch.ones(1))], SGD(), weight_decay=-1.0)


def test_lr_zero_is_accepted_and_its_groups_read_lr_as_a_plain_multiplier():
    """lr=0 (torch.optim accepts it): nothing moves; the reference of the multiplier is then 1, so a warm-up
    that raises group['lr'] to 0.5 takes half of the wrapped optimizer's update. lr > 0 keeps its reference."""
    c = torch.tensor([1.0, -2.0])
    w = nn.Parameter(torch.zeros(2))
    opt = ProtocolOptimizer([w], SGD(lr=0.1), lr=0.0)
    assert opt.param_groups[0]["lr"] == 0.0 and opt.param_groups[0]["lr_ref"] == 1.0
    for lr, expected in ((0.0, torch.zeros(2)), (0.5, -0.05 * c)):
        opt.param_groups[0]["lr"] = lr
        opt.zero_grad()
        (w * c).sum().backward()
        before = w.detach().clone()
        opt.step()
        torch.testing.assert_close(w.detach() - before, expected)
    assert int(opt.state[w]["step"]) == 2  # the frozen step still counted, as in torch.optim
    assert ProtocolOptimizer([w], SGD(lr=0.1), lr=0.1).param_groups[0]["lr_ref"] == 0.1


# ---------------------------------------------------------------------------------------------------------
# Parameters without gradients: left exactly as they are, their state not advanced (as torch.optim).


def _frozen_model(seed=0):
    """A 4 -> 5 -> 2 MLP whose first layer is frozen, plus a parameter the forward pass never uses."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2))
    model.unused = nn.Parameter(torch.randn(3))
    model[0].requires_grad_(False)
    return model


def _regression(seed=0, n=32, d_in=4, d_out=2, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=g)
    return x.to(dtype), (x @ torch.randn(d_in, d_out, generator=g)).to(dtype)


LEARNED = {
    "lstm": lambda: CoordLSTM(hidden=4, init_zero=False),
    "lstm_adam": lambda: CoordLSTM(hidden=4, base="adam", base_lr=0.01, init_zero=False, output_scale=0.01),
    "mlp": lambda: CoordMLP(hidden=8, init_zero=False),
}


@pytest.mark.parametrize("make", [*LEARNED.values(), lambda: Adam(lr=1e-2), lambda: Momentum(lr=0.1)],
                         ids=[*LEARNED, "adam", "momentum"])
def test_parameters_without_gradients_stay_exactly_untouched(make):
    """A frozen layer (requires_grad=False) and a parameter no loss reaches do not move at all (a CoordLSTM moved
    a frozen weight by 0.126 in 10 steps when zeros were fed for them), and the trainable ones follow exactly
    the trajectory of an optimizer given the trainable parameters only."""
    torch.manual_seed(0)
    proto = make()
    x, y = _regression()
    a, b = _frozen_model(), _frozen_model()
    frozen = [p.detach().clone() for p in (*a[0].parameters(), a.unused)]
    opt_a = ProtocolOptimizer(a.parameters(), proto)
    opt_b = ProtocolOptimizer(b[2].parameters(), proto)
    for _ in range(10):
        for m, o in ((a, opt_a), (b, opt_b)):
            o.zero_grad()
            loss = nn.functional.mse_loss(m(x), y)
            loss.backward()
            o.step(lambda: loss)
    assert all(torch.equal(p, q) for p, q in zip((*a[0].parameters(), a.unused), frozen))
    assert all(torch.equal(p, q) for p, q in zip(a[2].parameters(), b[2].parameters()))
    assert not torch.equal(a[2].weight, _frozen_model()[2].weight)  # the trainable layer did move


@pytest.mark.parametrize("make", [NormMLP, LEARNED["lstm"], lambda: Adam(lr=1e-2)], ids=["norm_mlp", "lstm", "adam"])
def test_an_empty_parameter_is_skipped_and_the_rest_trains_as_without_it(make):
    """A zero-element parameter (a layer of width 0) has nothing to update; a meta-network's per-tensor means over
    it were 0 / 0, and the NaN reached its learning-rate head and every parameter."""
    torch.manual_seed(0)
    proto = make()
    x, y = _regression()
    a, b = _frozen_model(), _frozen_model()
    a.empty = nn.Parameter(torch.zeros(0, 3))
    opt_a = ProtocolOptimizer(a.parameters(), proto)
    opt_b = ProtocolOptimizer(b.parameters(), proto)
    for _ in range(5):
        for m, o in ((a, opt_a), (b, opt_b)):
            o.zero_grad()
            loss = nn.functional.mse_loss(m(x), y) + (m.empty.sum() if hasattr(m, "empty") else 0.0)
            loss.backward()
            o.step(lambda: loss)
    assert a.empty.grad is not None and a.empty.shape == (0, 3)
    assert all(torch.isfinite(p).all() for p in a.parameters())
    same = dict(b.named_parameters())
    assert all(torch.equal(p, same[name]) for name, p in a.named_parameters() if name != "empty")


PER_TENSOR_CASES = [c for c in CASES if c[0] in ("momentum", "nesterov_m_wd", "adam_wd_amsgrad", "adamw",
                                                 "rmsprop_centered_momentum")]


@pytest.mark.parametrize("name,make_ours,make_torch", PER_TENSOR_CASES, ids=[c[0] for c in PER_TENSOR_CASES])
def test_hand_coded_state_of_a_skipped_tensor_is_kept_like_torch_optim(name, make_ours, make_torch):
    """Gradients that come and go (None at some steps, per tensor): step for step the trajectory of torch.optim,
    whose per-parameter state (moments, buffers, step count) a skipped tensor keeps unchanged."""
    x, y = _regression(1, dtype=torch.float64)
    a = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    b = copy.deepcopy(a)
    opt_a, opt_b = ProtocolOptimizer(a.parameters(), make_ours()), make_torch(list(b.parameters()))
    # tensor i is skipped at step t when skip[i] holds t: the first layer's weight from step 2 to 5, its bias on
    # every odd step, the second layer's bias before step 3
    skip = [set(range(2, 6)), set(range(1, 20, 2)), set(), set(range(3))]
    for t in range(20):
        for m, o in ((a, opt_a), (b, opt_b)):
            o.zero_grad()
            nn.functional.mse_loss(m(x), y).backward()
            for i, p in enumerate(m.parameters()):
                if t in skip[i]:
                    p.grad = None
            o.step()
        for pa, pb in zip(a.parameters(), b.parameters()):
            torch.testing.assert_close(pa, pb, atol=1e-12, rtol=1e-12)
    counts = [int(opt_a.state[p]["step"]) for p in a.parameters()]
    assert counts == [20 - len(s) for s in skip]
    if "step" in opt_b.state[next(b.parameters())]:  # torch.optim's own count (SGD keeps none)
        assert counts == [int(opt_b.state[p]["step"]) for p in b.parameters()]


SPLIT = {**LEARNED, "norm_mlp": lambda: NormMLP(hidden=4)}


def _two_losses(a, b, x, use_b):
    """A loss in which ``a`` always takes part and ``b`` only when ``use_b`` (a conditional branch): ``a``'s
    gradient does not depend on ``b``."""
    loss = ((x @ a - 1.0) ** 2).mean()
    return loss + ((x @ b + 1.0) ** 2).mean() if use_b else loss


@pytest.mark.parametrize("kind", sorted(SPLIT))
def test_learned_state_is_kept_per_parameter_when_others_lose_their_gradients(kind):
    """A meta-network's state is kept per parameter: when a branch's parameter has no gradient, the others carry
    on with theirs (they used to restart, the branch's included). Without a controller (whose global features
    would see the branch), the always-used parameter follows exactly an optimizer of its own, and the branch's
    parameter that of an optimizer stepped only when it is used (its own step count)."""
    torch.manual_seed(0)
    proto = SPLIT[kind]()
    x = torch.randn(16, 3)
    a, b = nn.Parameter(torch.randn(3, 2)), nn.Parameter(torch.randn(3, 2))
    a1, b1 = nn.Parameter(a.detach().clone()), nn.Parameter(b.detach().clone())
    opt = ProtocolOptimizer([a, b], proto, controller=None)
    only_a, only_b = ProtocolOptimizer([a1], proto, controller=None), ProtocolOptimizer([b1], proto, controller=None)
    used = [t % 3 != 1 for t in range(10)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no restart warning
        for use_b in used:
            opt.zero_grad()
            _two_losses(a, b, x, use_b).backward()
            opt.step()
            for o, loss, on in ((only_a, lambda: ((x @ a1 - 1.0) ** 2).mean(), True),
                                (only_b, lambda: ((x @ b1 + 1.0) ** 2).mean(), use_b)):
                if on:  # the same gradients as a's and b's in the joint run
                    o.zero_grad()
                    loss().backward()
                    o.step()
            torch.testing.assert_close(a, a1, rtol=1e-6, atol=1e-7)
            torch.testing.assert_close(b, b1, rtol=1e-6, atol=1e-7)
    assert int(opt.state[a]["step"]) == 10 and int(opt.state[b]["step"]) == sum(used)


@pytest.mark.parametrize("kind", ["lstm_heads", "norm_mlp"])
def test_tensors_of_different_step_counts_resume_exactly(tmp_path, kind):
    """With a branch used every other step the tensors' step counts differ and the network runs in one call per
    count, the learned heads reading all of them: a state dict saved there resumes bit for bit."""
    torch.manual_seed(0)
    proto = _heads_lstm() if kind == "lstm_heads" else NormMLP(hidden=4)
    x = torch.randn(16, 3)

    def run(opt, a, b, steps):
        for t in steps:
            opt.zero_grad()
            loss = _two_losses(a, b, x, t % 2 == 0)
            loss.backward()
            opt.step(loss=loss)

    params = [nn.Parameter(torch.randn(3, 2)) for _ in range(2)]
    twins = [nn.Parameter(p.detach().clone()) for p in params]
    opt = ProtocolOptimizer(params, proto)
    run(opt, *params, range(9))
    half = ProtocolOptimizer(twins, proto)
    run(half, *twins, range(5))
    assert [int(half.state[p]["step"]) for p in twins] == [5, 3]
    torch.save(half.state_dict(), tmp_path / "opt.pt")
    resumed = ProtocolOptimizer(twins, proto)
    resumed.load_state_dict(torch.load(tmp_path / "opt.pt", weights_only=True))
    run(resumed, *twins, range(5, 9))
    assert all(torch.equal(p, q) for p, q in zip(params, twins))
    assert all(torch.isfinite(p).all() for p in params)


def test_a_state_that_cannot_be_split_restarts_per_group_with_a_warning():
    """An optimizer whose state the adapter does not know how to split per tensor keeps one state per group;
    when the set of tensors with gradients changes it restarts over the new set, and says so."""
    class Concat:  # a state over all tensors at once: the running sum of the flattened gradients
        def init(self, params):
            return torch.zeros(sum(p.numel() for p in params))

        def update(self, grads, state, params, *, loss=None):
            state = state + torch.cat([g.reshape(-1) for g in grads])
            return [-0.1 * s.reshape(g.shape) for s, g in zip(state.split([g.numel() for g in grads]), grads)], state

    a, b = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(3))
    opt = ProtocolOptimizer([a, b], Concat())
    for use_b in (True, True, False):
        opt.zero_grad()
        (a.sum() + (b.sum() if use_b else 0.0)).backward()
        if use_b:
            opt.step()
        else:
            with pytest.warns(UserWarning, match=r"parameter group 0 changed \(2 -> 1\).*restarts"):
                opt.step()
    torch.testing.assert_close(a.detach(), torch.full((2,), -0.4))  # -0.1, -0.2, then -0.1 again (restarted)
    assert [int(opt.state[p]["step"]) for p in (a, b)] == [3, 2]


# ---------------------------------------------------------------------------------------------------------
# Parameter groups and add_param_group.


def test_parameter_groups_and_schedulers_match_torch_optim():
    """Two groups with their own rates (relative to the constructor's lr) and a StepLR on top follow
    torch.optim.SGD(momentum) with the same groups: group lr 0.1 on Momentum(lr=0.2) with lr=1 is a rate 0.02."""
    x, y = _regression(3, dtype=torch.float64)
    a = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    b = copy.deepcopy(a)
    opt_a = ProtocolOptimizer([{"params": a[0].parameters()}, {"params": a[2].parameters(), "lr": 0.1}],
                              Momentum(lr=0.2, momentum=0.9))
    opt_b = T.SGD([{"params": b[0].parameters()}, {"params": b[2].parameters(), "lr": 0.02}], lr=0.2,
                  momentum=0.9, foreach=False)
    scheds = [T.lr_scheduler.StepLR(o, step_size=3, gamma=0.5) for o in (opt_a, opt_b)]
    for _ in range(10):
        for m, o, s in zip((a, b), (opt_a, opt_b), scheds):
            o.zero_grad()
            nn.functional.mse_loss(m(x), y).backward()
            o.step()
            s.step()
        for pa, pb in zip(a.parameters(), b.parameters()):
            torch.testing.assert_close(pa, pb, atol=1e-12, rtol=1e-12)
    assert [g["lr"] for g in opt_a.param_groups] == pytest.approx([0.125, 0.0125])


def test_parameter_groups_of_a_learned_optimizer_have_their_own_state_and_lr():
    """Each group has its own meta-network state (over its own tensors) and its own multiplier group lr / lr:
    at the first step the groups move 0.25 and 0.5 times as far as one group at multiplier 1; a group at lr 0
    does not move."""
    torch.manual_seed(0)
    net = CoordLSTM(hidden=4, init_zero=False)
    x, y = _regression(4)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2))
    ref = copy.deepcopy(model)
    start = [p.detach().clone() for p in model.parameters()]
    opt = ProtocolOptimizer([{"params": model[0].parameters(), "lr": 0.5},
                             {"params": model[2].parameters(), "lr": 1.0}], net, lr=2.0)
    opt_ref = ProtocolOptimizer(ref.parameters(), net)
    for m, o in ((model, opt), (ref, opt_ref)):
        o.zero_grad()
        nn.functional.mse_loss(m(x), y).backward()
        o.step()
    assert [opt.state[p]["h"].shape[1] for p in model.parameters()] == [20, 5, 10, 2]  # one slice per tensor
    for i, (p, p0, q) in enumerate(zip(model.parameters(), start, ref.parameters())):
        factor = 0.25 if i < 2 else 0.5
        torch.testing.assert_close(p - p0, factor * (q - p0), rtol=1e-5, atol=1e-7)
    opt.param_groups[1]["lr"] = 0.0
    before = [p.detach().clone() for p in model[2].parameters()]
    opt.zero_grad()
    nn.functional.mse_loss(model(x), y).backward()
    opt.step()
    assert all(torch.equal(p, q) for p, q in zip(model[2].parameters(), before))
    assert opt.group_states[1]["step"] == 2  # its state advanced all the same, as in torch.optim


@pytest.mark.parametrize("make_ours,make_torch", [
    (lambda: Adam(lr=1e-2), lambda ps: T.Adam(ps, lr=1e-2, foreach=False)),
    (lambda: Momentum(lr=0.05), lambda ps: T.SGD(ps, lr=0.05, momentum=0.9, foreach=False)),
], ids=["adam", "momentum"])
def test_add_param_group_is_stepped_like_torch_optim(make_ours, make_torch):
    """A group added after 3 steps (with its own lr) is stepped from then on, as torch.optim does."""
    x, y = _regression(5, dtype=torch.float64)
    a = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    b = copy.deepcopy(a)
    opt_a, opt_b = ProtocolOptimizer(a[2].parameters(), make_ours()), make_torch(list(b[2].parameters()))
    start = [p.detach().clone() for p in a[0].parameters()]
    for t in range(8):
        if t == 3:
            opt_a.add_param_group({"params": a[0].parameters(), "lr": 0.5})
            lr_b = opt_b.param_groups[0]["lr"] * 0.5
            opt_b.add_param_group({"params": b[0].parameters(), "lr": lr_b})
        for m, o in ((a, opt_a), (b, opt_b)):
            o.zero_grad()
            nn.functional.mse_loss(m(x), y).backward()
            o.step()
        for pa, pb in zip(a.parameters(), b.parameters()):
            torch.testing.assert_close(pa, pb, atol=1e-12, rtol=1e-12)
    assert not any(torch.equal(p, q) for p, q in zip(a[0].parameters(), start))
    assert len(opt_a.group_states) == 2 and opt_a.group_states[1]["step"] == 5


def test_add_param_group_is_stepped_by_a_learned_optimizer():
    torch.manual_seed(0)
    net = CoordLSTM(hidden=4, init_zero=False)
    x, y = _regression(6)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2))
    opt = ProtocolOptimizer(model[2].parameters(), net)
    opt.add_param_group({"params": model[0].parameters()})
    start = [p.detach().clone() for p in model[0].parameters()]
    opt.zero_grad()
    nn.functional.mse_loss(model(x), y).backward()
    opt.step()
    assert not any(torch.equal(p, q) for p, q in zip(model[0].parameters(), start))
    assert [opt.state[p]["h"].shape[1] for p in model[0].parameters()] == [20, 5]
    assert [int(opt.state[p]["step"]) for p in model.parameters()] == [1, 1, 1, 1]


def test_bad_group_lr_names_the_group():
    w = nn.Parameter(torch.ones(2))
    opt = ProtocolOptimizer([w], SGD())
    with pytest.raises(ValueError, match=r"parameter group 1: lr must be a finite number >= 0, got -0\.1"):
        opt.add_param_group({"params": [nn.Parameter(torch.ones(1))], "lr": -0.1})
    with pytest.raises(ValueError, match=r"parameter group 1: lr .*nan"):
        ProtocolOptimizer([{"params": [w]}, {"params": [nn.Parameter(torch.ones(1))], "lr": float("nan")}],
                          SGD())


# ---------------------------------------------------------------------------------------------------------
# The model's dtype.


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=["f32", "f64", "bf16"])
@pytest.mark.parametrize("make", [lambda: Adam(lr=2e-2), lambda: CoordLSTM(hidden=4, base="adam", base_lr=2e-2),
                                  lambda: CoordLSTM(hidden=4, base="sgd", base_lr=0.1, init_zero=False,
                                                    output_scale=1e-3, base_lr_range=0.5)],
                         ids=["adam", "lstm_adam", "lstm_sgd"])
def test_follows_the_model_dtype(dtype, make):
    """float32, float64 and bfloat16 models train with a float32 meta-network as it is (no .double()): the
    parameters keep their dtype, the loss falls, the meta-network is left in float32."""
    torch.manual_seed(0)
    proto = make()
    x, y = _regression(7, n=64, d_in=5, d_out=1, dtype=dtype)
    model = nn.Linear(5, 1).to(dtype)
    opt = ProtocolOptimizer(model.parameters(), proto)
    losses = []
    for _ in range(40):
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step(lambda: loss)
        losses.append(float(loss.detach()))
    assert all(p.dtype == dtype for p in model.parameters())
    assert all(p.dtype == torch.float32 for p in getattr(proto, "parameters", lambda: [])())
    assert math.isfinite(losses[-1]) and losses[-1] < 0.5 * losses[0], losses


def test_float64_model_with_float32_network_matches_float32_model():
    """A float64 model's trajectory under a float32 meta-network stays within float32 rounding of the float32
    model's (the network computes in its own dtype; only the additions to the parameters are in float64)."""
    torch.manual_seed(0)
    net = CoordLSTM(hidden=4, init_zero=False)
    x, y = _regression(8)
    a = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2))
    b = copy.deepcopy(a).double()
    opt_a, opt_b = ProtocolOptimizer(a.parameters(), net), ProtocolOptimizer(b.parameters(), net)
    for _ in range(5):
        for m, o, xx, yy in ((a, opt_a, x, y), (b, opt_b, x.double(), y.double())):
            o.zero_grad()
            nn.functional.mse_loss(m(xx), yy).backward()
            o.step()
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa.double(), pb, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------------------------
# Sparse gradients.


@pytest.mark.parametrize("make", [lambda: Adam(), lambda: CoordLSTM(hidden=4)], ids=["adam", "lstm"])
@pytest.mark.parametrize("named", [False, True], ids=["params", "named"])
def test_sparse_gradient_is_one_clear_error_naming_the_parameter(make, named):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 3, sparse=True), nn.Linear(3, 1))
    before = [p.detach().clone() for p in model.parameters()]
    opt = ProtocolOptimizer(model.named_parameters() if named else model.parameters(), make())
    opt.zero_grad()
    model(torch.tensor([1, 2, 3])).sum().backward()
    shown = "'0.weight'" if named else "0 of parameter group 0"
    with pytest.raises(ValueError, match=rf"^parameter {shown} \(shape \(10, 3\)\) has a sparse gradient"):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))  # nothing moved


# ---------------------------------------------------------------------------------------------------------
# The learned LR and stop heads.


def _supervised(seed=9, n=48):
    x, y = _regression(seed, n=n)
    xv, yv = _regression(seed + 100, n=n)
    torch.manual_seed(seed)
    module = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2))
    return module, {"train": (x, y), "val": (xv, yv), "test": (xv, yv)}


@pytest.mark.parametrize("lr_mode", ["global", "per_tensor"])
def test_heads_drive_the_drop_in_exactly_as_unroll(lr_mode):
    """With a trained-looking LR head (random last layer), the drop-in driven by step(closure, val_loss=) gives
    the very parameters, LR multipliers and stop probabilities of unroll(task, net, net.as_controller())."""
    torch.manual_seed(0)
    net = CoordLSTM(hidden=4, base="sgd", base_lr=0.1, lr_mode=lr_mode)
    with torch.no_grad():
        net.heads.lr[-1].weight.normal_(0, 0.5)
        net.heads.stop[-1].weight.normal_(0, 0.5)
    module, data = _supervised()
    task = SupervisedTask(copy.deepcopy(module), data, "mse")
    params0 = [p.detach().clone() for p in module.parameters()]
    steps = 8
    res = unroll(task, net, net.as_controller(), steps=steps, generator=torch.Generator().manual_seed(0),
                 params=params0, val_every=1)
    opt = ProtocolOptimizer(module.parameters(), net)  # controller="auto": the network's own heads
    lr_scales, stop_probs = [], []
    for t in range(steps):
        with torch.no_grad():
            val = nn.functional.mse_loss(module(data["val"][0]), data["val"][1])

        def closure():
            opt.zero_grad()
            loss = nn.functional.mse_loss(module(data["train"][0]), data["train"][1])
            loss.backward()
            return loss

        opt.step(closure, val_loss=val)
        scale = opt.decisions[0].lr_scale
        lr_scales.append(float(sum(scale) / len(scale)) if isinstance(scale, list) else float(scale))
        stop_probs.append(opt.stop_prob)
    assert not res.stopped and not opt.should_stop
    assert len(set(lr_scales)) == steps and all(s != 1.0 for s in lr_scales)  # the head does scale the steps
    assert lr_scales == pytest.approx(res.records["lr_scale"][:steps], rel=1e-6)
    assert stop_probs == pytest.approx(res.records["stop_prob"][:steps], rel=1e-6)
    for p, q in zip(module.parameters(), res.params):
        torch.testing.assert_close(p.detach(), q, rtol=1e-6, atol=1e-7)


def test_untrained_heads_change_nothing_and_lr_head_scales_the_update():
    """Fresh heads (those of a network meta-trained without control) give a multiplier of exactly 1: "auto"
    and controller=None take identical steps. A head that outputs z scales the update by exp(log(10) tanh z)."""
    torch.manual_seed(0)
    net = CoordLSTM(hidden=4, init_zero=False)
    x, y = _regression(10)

    def first_steps(controller, n=3):
        torch.manual_seed(1)
        m = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2))
        start = [p.detach().clone() for p in m.parameters()]
        opt = ProtocolOptimizer(m.parameters(), net, controller=controller)
        for _ in range(n):
            opt.zero_grad()
            loss = nn.functional.mse_loss(m(x), y)
            loss.backward()
            opt.step(loss=loss)
        return [p.detach() - s for p, s in zip(m.parameters(), start)], opt

    auto, opt = first_steps("auto")
    none, _ = first_steps(None)
    assert all(torch.equal(a, b) for a, b in zip(auto, none))
    assert opt.controller is not None and float(opt.decisions[0].lr_scale) == 1.0
    assert opt.stop_prob == pytest.approx(torch.sigmoid(torch.tensor(-6.0)).item()) and not opt.should_stop
    with torch.no_grad():
        net.heads.lr[-1].bias.fill_(0.5)
    scaled, opt = first_steps("auto", n=1)
    unscaled, _ = first_steps(None, n=1)
    factor = math.exp(math.log(10.0) * math.tanh(0.5))
    for a, b in zip(scaled, unscaled):
        torch.testing.assert_close(a, factor * b, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("make", [lambda: CoordLSTM(hidden=4), lambda: CoordMLP(hidden=8)], ids=["lstm", "mlp"])
def test_meta_training_without_control_leaves_the_heads_at_a_multiplier_of_one(make):
    """What makes controller='auto' safe as the default: meta-training with control='none' never moves the
    heads, so a saved network's LR multiplier is exactly 1 in the drop-in while its update rule did train."""
    import warnings

    from learned_opt.meta import MetaConfig, MetaTrainer
    from learned_opt.tasks import QuadraticFamily

    torch.manual_seed(0)
    net = make()
    heads = {k: v.clone() for k, v in net.heads.state_dict().items()}
    body = {k: v.clone() for k, v in net.state_dict().items() if not k.startswith("heads.")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        MetaTrainer(net, QuadraticFamily(num_problems=2), MetaConfig(horizon=6, truncation=3, iterations=3,
                                                                     meta_lr=0.01, seed=0)).run()
    assert all(torch.equal(v, net.heads.state_dict()[k]) for k, v in heads.items())
    assert any(not torch.equal(v, net.state_dict()[k]) for k, v in body.items())
    w = nn.Parameter(torch.randn(5))
    opt = ProtocolOptimizer([w], net)
    opt.zero_grad()
    (w ** 2).sum().backward()
    opt.step(loss=(w ** 2).sum())
    assert float(opt.decisions[0].lr_scale) == 1.0


def test_stop_head_is_exposed_and_the_stopping_step_applies_no_update():
    torch.manual_seed(0)
    net = CoordLSTM(hidden=4, init_zero=False)
    with torch.no_grad():
        net.heads.stop[-1].bias.fill_(10.0)  # stop logit 10 - 6 = 4: probability 0.982 > threshold 0.5
    x, y = _regression(11)
    model = nn.Linear(4, 2)
    before = [p.detach().clone() for p in model.parameters()]
    opt = ProtocolOptimizer(model.parameters(), net)
    opt.zero_grad()
    nn.functional.mse_loss(model(x), y).backward()
    opt.step()
    assert opt.should_stop and opt.stop_prob == pytest.approx(1 / (1 + math.exp(-4.0)), rel=1e-6)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    off = ProtocolOptimizer(model.parameters(), net, controller=None)
    off.step()
    assert not off.should_stop and off.stop_prob == 0.0
    assert not all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


def test_any_controller_can_drive_the_drop_in():
    """A hand-coded controller fed through step(val_loss=): early stopping says stop after `patience` checks
    without improvement; a constant multiplier scales Adam's updates."""
    w = nn.Parameter(torch.ones(3))
    opt = ProtocolOptimizer([w], Adam(lr=0.1), controller=EarlyStopping(patience=2))
    stops = []
    for _ in range(4):
        opt.zero_grad()
        (w ** 2).sum().backward()
        opt.step(val_loss=1.0)
        stops.append(opt.should_stop)
    assert stops == [False, False, True, True]
    a, b = nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(3))
    oa, ob = ProtocolOptimizer([a], Adam(lr=0.1), controller=Constant(0.5)), ProtocolOptimizer([b], Adam(lr=0.05))
    for p, o in ((a, oa), (b, ob)):
        o.zero_grad()
        (p ** 2).sum().backward()
        o.step()
    torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-6, atol=0)  # 0.5 x Adam(0.1) = Adam(0.05)


def test_bad_controller_arguments():
    w = [nn.Parameter(torch.ones(1))]
    with pytest.raises(ValueError, match=r"controller must be 'auto', None or a controller object, got 'heads'"):
        ProtocolOptimizer(w, Adam(), controller="heads")
    with pytest.raises(TypeError, match="int"):
        ProtocolOptimizer(w, Adam(), controller=3)


# ---------------------------------------------------------------------------------------------------------
# State dicts.


def test_adapter_state_dict_round_trip_keeps_protocol_state():
    """A resumed adapter continues exactly like one that never stopped (Adam's moments survive)."""
    torch.manual_seed(0)
    model_a = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 1))
    model_b = copy.deepcopy(model_a)
    x, y = torch.randn(16, 4), torch.randn(16, 1)

    def train(model, opt, n):
        for _ in range(n):
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()

    opt_a = ProtocolOptimizer(model_a.parameters(), Adam(lr=0.01))
    train(model_a, opt_a, 10)
    opt_b = ProtocolOptimizer(model_b.parameters(), Adam(lr=0.01))
    train(model_b, opt_b, 5)
    saved = copy.deepcopy(opt_b.state_dict())
    opt_b2 = ProtocolOptimizer(model_b.parameters(), Adam(lr=0.01))
    opt_b2.load_state_dict(saved)
    train(model_b, opt_b2, 5)
    for pa, pb in zip(model_a.parameters(), model_b.parameters()):
        assert torch.equal(pa, pb)


@pytest.mark.parametrize("make", [lambda: Adam(lr=1e-2), lambda: Momentum(lr=1e-2, momentum=0.9),
                                  lambda: CoordLSTM(hidden=4, base="adam", extra_inputs=["agreement"],
                                                    init_zero=False)])
def test_adapter_state_dict_loads_weights_only_and_resumes_exactly(tmp_path, make):
    torch.manual_seed(0)
    proto = make()
    x = torch.randn(64, 5)
    y = x @ torch.randn(5, 1)

    def train(module, opt, steps):
        for _ in range(steps):
            opt.zero_grad()
            loss = ((module(x) - y) ** 2).mean()
            loss.backward()
            opt.step(lambda: loss)

    a = torch.nn.Linear(5, 1)
    b = copy.deepcopy(a)
    opt_a = ProtocolOptimizer(a.parameters(), proto)
    train(a, opt_a, 10)
    opt_b = ProtocolOptimizer(b.parameters(), proto)
    train(b, opt_b, 4)
    torch.save(opt_b.state_dict(), tmp_path / "opt.pt")
    resumed = ProtocolOptimizer(b.parameters(), proto)
    resumed.load_state_dict(torch.load(tmp_path / "opt.pt", weights_only=True))  # plain containers only
    train(b, resumed, 6)
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=0)


def test_adapter_refuses_to_rebuild_foreign_classes():
    from learned_opt.optim.adapter import from_plain

    with pytest.raises(ValueError, match="not a learned_opt state"):
        from_plain({"__namedtuple__": "os:system", "fields": {}})


def _heads_lstm():
    net = CoordLSTM(hidden=4, base="adam", base_lr=0.01, init_zero=False, output_scale=0.01,
                    extra_inputs=["agreement"])
    with torch.no_grad():
        net.heads.lr[-1].weight.normal_(0, 0.5)  # a learned step-size schedule that depends on the features
    return net


@pytest.mark.parametrize("make", [lambda: Adam(lr=1e-2), lambda: Momentum(lr=1e-2, momentum=0.9), _heads_lstm],
                         ids=["adam", "momentum", "lstm_heads"])
def test_state_dict_with_groups_skipped_tensors_and_heads_resumes_exactly(tmp_path, make):
    """Two groups (own lr), a frozen parameter, gradients that come and go (per-tensor optimizers) and the
    learned heads' statistics: 4 steps, save, load with weights_only=True into a new optimizer, 6 more steps,
    bit-identical to 10 uninterrupted steps."""
    torch.manual_seed(0)
    proto = make()
    x, y = _regression(12, n=64, d_in=5, d_out=2)
    per_tensor = getattr(proto, "per_tensor", False)

    def build(model):
        return ProtocolOptimizer([{"params": [model[0].weight, model[0].bias], "lr": 0.5},
                                  {"params": model[2].parameters()}, {"params": [model.frozen]}], proto)

    def train(model, opt, steps, start):
        for t in range(start, start + steps):
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            if per_tensor and t % 3 == 1:
                model[0].bias.grad = None
            opt.step(lambda: loss)

    torch.manual_seed(1)
    a = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 2))
    a.frozen = nn.Parameter(torch.ones(2), requires_grad=False)
    b = copy.deepcopy(a)
    train(a, build(a), 10, 0)
    opt_b = build(b)
    train(b, opt_b, 4, 0)
    torch.save(opt_b.state_dict(), tmp_path / "opt.pt")
    resumed = build(b)
    resumed.load_state_dict(torch.load(tmp_path / "opt.pt", weights_only=True))
    assert [g["step"] for g in resumed.group_states] == [4, 4, 0]
    train(b, resumed, 6, 4)
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=0)
    assert torch.equal(b.frozen, torch.ones(2))


def test_load_state_dict_refuses_other_formats_and_group_counts():
    w, v = nn.Parameter(torch.ones(2)), nn.Parameter(torch.ones(1))
    opt = ProtocolOptimizer([w], Adam())
    older = {**opt.state_dict(), "proto_state": None}  # what the first adapter saved: one bare protocol state
    with pytest.raises(ValueError, match="no format version"):
        opt.load_state_dict(older)
    with pytest.raises(ValueError, match="no format version"):
        opt.load_state_dict(T.Adam([w]).state_dict())  # torch.optim's own
    two = ProtocolOptimizer([{"params": [w]}, {"params": [v]}], Adam())
    with pytest.raises(ValueError, match="2 parameter groups, this optimizer 1"):
        opt.load_state_dict(two.state_dict())


def test_an_old_format_state_dict_is_refused_naming_the_versions():
    """Format 2 kept a meta-network's state per parameter group (in ``proto_state``): loading it into the
    per-parameter layout would misplace it, so it is refused with both versions named, not misloaded."""
    w = nn.Parameter(torch.ones(4))
    net = NormMLP(hidden=4)
    opt = ProtocolOptimizer([w], net)
    w.grad = torch.ones(4)
    opt.step()
    state = opt.state_dict()
    old = {"state": {}, "param_groups": [{k: v for k, v in state["param_groups"][0].items() if k != "weight_decay"}],
           "proto_state": {"format": "learned_opt.adapter/2",
                           "groups": [{"step": 1, "active": [0], "opt": None, "ctrl": None}]}}
    fresh = ProtocolOptimizer([w], net)
    with pytest.raises(ValueError, match=r"format 'learned_opt\.adapter/2'.*reads 'learned_opt\.adapter/3'"):
        fresh.load_state_dict(old)
    assert not fresh.state and fresh.group_states[0]["step"] == 0  # nothing half-loaded
    assert state["proto_state"]["format"] == "learned_opt.adapter/3"


# ---------------------------------------------------------------------------------------------------------
# Weight decay, schedulers that cycle momentum, the missing-loss warning.


@pytest.mark.parametrize("ours,theirs", [
    (lambda: AdamW(lr=1e-2, weight_decay=0.1), lambda groups: T.AdamW(groups, lr=1e-2, weight_decay=0.1,
                                                                       foreach=False)),
    (lambda: Adam(lr=1e-2, weight_decay=0.1), lambda groups: T.Adam(groups, lr=1e-2, weight_decay=0.1,
                                                                     foreach=False)),
    (lambda: Momentum(lr=0.05), lambda groups: T.SGD(groups, lr=0.05, momentum=0.9, foreach=False)),
], ids=["adamw", "adam_l2", "momentum"])
def test_a_baseline_takes_each_groups_weight_decay_like_torch_optim(ours, theirs):
    """A hand-coded baseline runs in each group with the group's weight_decay in its own field (its own kind of
    decay): a no-decay group for the biases and a stronger one for a layer step like torch.optim with the same
    groups; the default is the baseline's own value, visible in the groups."""
    x, y = _regression(7, dtype=torch.float64)
    a = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    b = copy.deepcopy(a)

    def groups(m):
        return [{"params": [m[0].weight]}, {"params": [m[0].bias, m[2].bias], "weight_decay": 0.0},
                {"params": [m[2].weight], "weight_decay": 0.3}]

    opt_a, opt_b = ProtocolOptimizer(groups(a), ours()), theirs(groups(b))
    assert opt_a.param_groups[0]["weight_decay"] == opt_b.param_groups[0]["weight_decay"]
    for _ in range(10):
        for m, o in ((a, opt_a), (b, opt_b)):
            o.zero_grad()
            nn.functional.mse_loss(m(x), y).backward()
            o.step()
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, atol=1e-12, rtol=1e-12)


def test_a_network_without_a_base_step_refuses_weight_decay():
    """Decoupled decay is scaled by the network's base step; a CoordMLP has none, so weight_decay > 0 is refused
    (an accepted key must be honoured), and 0 is fine."""
    w = nn.Parameter(torch.ones(2))
    with pytest.raises(ValueError, match=r"parameter group 0: weight_decay must be 0 for CoordMLP"):
        ProtocolOptimizer([w], CoordMLP(hidden=4), weight_decay=0.01)
    opt = ProtocolOptimizer([w], CoordMLP(hidden=4))
    with pytest.raises(ValueError, match=r"parameter group 1: weight_decay must be 0"):
        opt.add_param_group({"params": [nn.Parameter(torch.ones(1))], "weight_decay": 0.1})


def test_network_weight_decay_is_decoupled_and_scaled_by_the_step_size():
    """The adapter's decay for a NormMLP: p <- p (1 - factor * exp(log_lr) * s * wd) + factor * s * u, exactly
    (s = 1 without a controller)."""
    torch.manual_seed(0)
    net = NormMLP(hidden=4)
    w0 = torch.randn(3, 2)
    grad = torch.randn(3, 2)
    moved = []
    for wd in (0.0, 0.5):
        w = nn.Parameter(w0.clone())
        opt = ProtocolOptimizer([{"params": [w], "lr": 0.5}], net, lr=2.0, controller=None, weight_decay=wd)
        w.grad = grad.clone()
        opt.step()
        moved.append(w.detach())
    u = (moved[0] - w0) / 0.25  # the update at factor 0.5 / 2
    expected = w0 * (1 - 0.25 * torch.exp(net.log_lr.detach()) * 0.5) + 0.25 * u
    torch.testing.assert_close(moved[1], expected, rtol=1e-6, atol=1e-7)
    assert not torch.equal(moved[0], moved[1])


def test_one_cycle_with_cycle_momentum_says_to_turn_it_off():
    """OneCycleLR's default cycle_momentum=True needs a momentum hyper-parameter; there is none, and the error
    says what to do. Other lookups of the defaults behave as a dict's."""
    opt = ProtocolOptimizer([nn.Parameter(torch.ones(2))], NormMLP(hidden=4))
    with pytest.raises(ValueError, match="cycle_momentum=False"):
        T.lr_scheduler.OneCycleLR(opt, max_lr=1.0, total_steps=10)
    assert "momentum" not in opt.defaults and "betas" not in opt.defaults and "lr" in opt.defaults
    T.lr_scheduler.OneCycleLR(opt, max_lr=1.0, total_steps=10, cycle_momentum=False)


def test_a_controller_that_reads_the_loss_warns_once_when_it_gets_none():
    """Trained heads read the loss: a step without one warns once, naming the fix; untouched heads (their output
    ignores the loss) and optimizers without a controller do not warn, nor does a step given the loss."""
    def steps(opt, w, n, **kw):
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            for _ in range(n):
                opt.zero_grad()
                loss = (w ** 2).sum()
                loss.backward()
                opt.step(**({"loss": loss} if kw.get("with_loss") else {}))
        return [str(m.message) for m in seen]

    w = nn.Parameter(torch.ones(3))
    seen = steps(ProtocolOptimizer([w], _heads_lstm()), w, 3)
    assert len(seen) == 1 and "opt.step(loss=loss)" in seen[0] and "HF Trainer" in seen[0]
    assert steps(ProtocolOptimizer([w], _heads_lstm()), w, 2, with_loss=True) == []
    assert steps(ProtocolOptimizer([w], CoordLSTM(hidden=4)), w, 2) == []  # untouched heads
    assert steps(ProtocolOptimizer([w], Adam()), w, 2) == []
