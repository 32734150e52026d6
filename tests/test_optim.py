"""Tests for the hand-coded optimizers (:mod:`learned_opt.optim.baselines`); the ``torch.optim`` adapter is
tested in ``tests/test_adapter.py``.

As in ``higher``'s own test suite, every optimizer is checked step for step against ``torch.optim``: 200 steps
on a random small MLP loss whose parameters include a scalar, vectors and matrices, in float32 and float64.
Meta-gradients through :func:`learned_opt.unroll.unroll` are checked against central finite differences and,
for SGD / heavy ball, against ``higher.innerloop_ctx``. Adding an optimizer means one new entry in ``CASES``.
"""
from __future__ import annotations

import math

import higher
import pytest
import torch
from torch import nn
from torch.utils._pytree import tree_leaves, tree_map

from learned_opt.optim import OPTIMIZERS, SGD, Adam, AdamW, Momentum, Nesterov, RMSprop, get_optimizer
from learned_opt.optim.baselines import Muon
from learned_opt.tasks.quadratic import Quadratic
from learned_opt.unroll import unroll

T = torch.optim

# (name, our factory, torch factory taking the list of parameters). One entry per setting.
CASES = [
    ("sgd", lambda: SGD(lr=0.05), lambda ps: T.SGD(ps, lr=0.05, foreach=False)),
    ("sgd_wd", lambda: SGD(lr=0.05, weight_decay=0.1),
     lambda ps: T.SGD(ps, lr=0.05, weight_decay=0.1, foreach=False)),
    ("sgd_by_name", lambda: get_optimizer("SGD", lr=0.03), lambda ps: T.SGD(ps, lr=0.03, foreach=False)),
    ("momentum", lambda: Momentum(lr=0.02), lambda ps: T.SGD(ps, lr=0.02, momentum=0.9, foreach=False)),
    ("momentum_damp_wd", lambda: Momentum(lr=0.03, momentum=0.7, dampening=0.3, weight_decay=0.05),
     lambda ps: T.SGD(ps, lr=0.03, momentum=0.7, dampening=0.3, weight_decay=0.05, foreach=False)),
    ("sgd_momentum", lambda: SGD(lr=0.02, momentum=0.5),
     lambda ps: T.SGD(ps, lr=0.02, momentum=0.5, foreach=False)),
    ("nesterov", lambda: Nesterov(lr=0.02),
     lambda ps: T.SGD(ps, lr=0.02, momentum=0.9, nesterov=True, foreach=False)),
    ("nesterov_m_wd", lambda: Nesterov(lr=0.03, momentum=0.6, weight_decay=0.02),
     lambda ps: T.SGD(ps, lr=0.03, momentum=0.6, nesterov=True, weight_decay=0.02, foreach=False)),
    ("adam", lambda: Adam(lr=1e-2), lambda ps: T.Adam(ps, lr=1e-2, foreach=False)),
    ("adam_betas_eps", lambda: Adam(lr=3e-3, betas=(0.8, 0.95), eps=1e-4),
     lambda ps: T.Adam(ps, lr=3e-3, betas=(0.8, 0.95), eps=1e-4, foreach=False)),
    ("adam_wd_amsgrad", lambda: Adam(lr=1e-2, betas=(0.5, 0.9), weight_decay=0.05, amsgrad=True),
     lambda ps: T.Adam(ps, lr=1e-2, betas=(0.5, 0.9), weight_decay=0.05, amsgrad=True, foreach=False)),
    ("adam_by_name", lambda: get_optimizer("adam", lr=5e-3, weight_decay=0.01),
     lambda ps: T.Adam(ps, lr=5e-3, weight_decay=0.01, foreach=False)),
    ("adamw", lambda: AdamW(lr=1e-2), lambda ps: T.AdamW(ps, lr=1e-2, foreach=False)),
    ("adamw_wd_amsgrad", lambda: AdamW(lr=5e-3, betas=(0.85, 0.99), weight_decay=0.3, amsgrad=True),
     lambda ps: T.AdamW(ps, lr=5e-3, betas=(0.85, 0.99), weight_decay=0.3, amsgrad=True, foreach=False)),
    ("rmsprop", lambda: RMSprop(lr=1e-3), lambda ps: T.RMSprop(ps, lr=1e-3, foreach=False)),
    ("rmsprop_alpha_eps_wd", lambda: RMSprop(lr=3e-3, alpha=0.9, eps=1e-4, weight_decay=0.05),
     lambda ps: T.RMSprop(ps, lr=3e-3, alpha=0.9, eps=1e-4, weight_decay=0.05, foreach=False)),
    ("rmsprop_momentum", lambda: RMSprop(lr=1e-3, momentum=0.8),
     lambda ps: T.RMSprop(ps, lr=1e-3, momentum=0.8, foreach=False)),
    ("rmsprop_centered", lambda: RMSprop(lr=2e-3, centered=True),
     lambda ps: T.RMSprop(ps, lr=2e-3, centered=True, foreach=False)),
    ("rmsprop_centered_momentum", lambda: RMSprop(lr=1e-3, alpha=0.95, centered=True, momentum=0.5,
                                                  weight_decay=0.01),
     lambda ps: T.RMSprop(ps, lr=1e-3, alpha=0.95, centered=True, momentum=0.5, weight_decay=0.01,
                          foreach=False)),
]


class TorchMuonPair:
    """Muon as used in practice: ``torch.optim.Muon`` on the matrices, ``torch.optim.AdamW`` on the rest."""

    def __init__(self, params, lr: float):
        params = list(params)
        self.opts = [T.Muon([p for p in params if p.ndim == 2], lr=lr),
                     T.AdamW([p for p in params if p.ndim != 2], lr=1e-3, foreach=False)]

    def zero_grad(self):
        for o in self.opts:
            o.zero_grad()

    def step(self):
        for o in self.opts:
            o.step()


# the name seeds the case's problem: another name could land on a trajectory where one bfloat16 rounding of the
# Newton-Schulz iteration flips (tests/test_muon.py checks Muon's parity in depth)
CASES.append(("muon", lambda: Muon(lr=0.02), lambda ps: TorchMuonPair(ps, lr=0.02)))
CASE_IDS = [c[0] for c in CASES]

STEPS = 200
TOLERANCES = {torch.float32: dict(atol=1e-6, rtol=1e-6), torch.float64: dict(atol=1e-12, rtol=1e-12)}


def test_cases_cover_every_registered_optimizer():
    """Every class in ``OPTIMIZERS`` has at least one parity case (a new optimizer needs a new entry)."""
    covered = {type(make()) for _, make, _ in CASES}
    assert set(OPTIMIZERS.values()) <= covered


# ---------------------------------------------------------------------------------------------------------
# A random problem: a small tanh MLP with a learnable output scale, on varying minibatches.


class Problem:
    """A random regression loss over five tensors: (4, 3) matrix, (4,) vector, scalar, (2, 4), (2,)."""

    def __init__(self, dtype, seed=0, n=64, batch=16):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 3, generator=g).to(dtype)
        self.y = torch.randn(n, 2, generator=g).to(dtype)
        self.init = [(torch.randn(4, 3, generator=g) * 0.7).to(dtype),
                     (torch.randn(4, generator=g) * 0.1).to(dtype),
                     torch.tensor(1.3).to(dtype),
                     (torch.randn(2, 4, generator=g) * 0.7).to(dtype),
                     torch.zeros(2).to(dtype)]
        self.batches = [torch.randperm(n, generator=g)[:batch] for _ in range(STEPS)]

    def loss(self, params, step):
        w1, b1, scale, w2, b2 = params
        idx = self.batches[step]
        h = torch.tanh(self.x[idx] @ w1.T + b1)
        out = scale * (h @ w2.T) + b2
        return ((out - self.y[idx]) ** 2).mean() + 0.05 * scale ** 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("name,make_ours,make_torch", CASES, ids=CASE_IDS)
def test_matches_torch_optim_for_200_steps(name, make_ours, make_torch, dtype):
    """Our parameter trajectory equals torch.optim's (single-tensor path) at every one of 200 steps."""
    prob = Problem(dtype, seed=sum(map(ord, name)))
    ours = [p.clone() for p in prob.init]
    theirs = [p.clone().requires_grad_(True) for p in prob.init]
    opt, topt = make_ours(), make_torch(theirs)
    state = opt.init(ours)
    tol = TOLERANCES[dtype]
    for t in range(STEPS):
        ps = [p.requires_grad_(True) for p in ours]
        grads = torch.autograd.grad(prob.loss(ps, t), ps)
        with torch.no_grad():
            updates, state = opt.update(grads, state, [p.detach() for p in ps])
            ours = [p.detach() + u for p, u in zip(ps, updates)]
        topt.zero_grad()
        prob.loss(theirs, t).backward()
        topt.step()
        for i, (a, b) in enumerate(zip(ours, theirs)):
            assert a.dtype == dtype and a.shape == b.shape
            torch.testing.assert_close(a, b.detach(), **tol,
                                       msg=lambda m, i=i, t=t: f"param {i} after step {t + 1}: {m}")
    moved = max(float((a - b).abs().max()) for a, b in zip(ours, prob.init))
    assert moved > 1e-2, "the trajectory barely moved: the comparison would be vacuous"


@pytest.mark.parametrize("name,make_ours,make_torch", CASES, ids=CASE_IDS)
def test_update_is_out_of_place(name, make_ours, make_torch):
    """``update`` mutates neither grads, params nor the old state (they may sit in a meta-graph)."""
    prob = Problem(torch.float64)
    params = [p.clone() for p in prob.init]
    opt = make_ours()
    state = opt.init(params)
    for t in range(3):
        grads = torch.autograd.grad(prob.loss([p.requires_grad_() for p in params], t), params)
        snap = tree_map(lambda x: x.detach().clone() if torch.is_tensor(x) else x,
                        (list(grads), [p.detach() for p in params], state))
        updates, new_state = opt.update(grads, state, params)
        for a, b in zip(grads, snap[0]):
            assert torch.equal(a, b)
        for a, b in zip(params, snap[1]):
            assert torch.equal(a, b)
        for a, b in zip(tree_leaves(state), tree_leaves(snap[2])):
            assert (torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b)
        assert [u.shape for u in updates] == [p.shape for p in params]
        params = [p.detach() + u for p, u in zip(params, updates)]
        state = new_state


# ---------------------------------------------------------------------------------------------------------
# Meta-gradients through the unrolled inner loop.

META_STEPS = 10
META_OPTS = {
    "sgd": lambda lr: SGD(lr=lr),
    "momentum": lambda lr: Momentum(lr=lr, momentum=0.8),
    "nesterov": lambda lr: Nesterov(lr=lr, momentum=0.8),
    "adam": lambda lr: Adam(lr=lr, betas=(0.8, 0.9)),
    "rmsprop": lambda lr: RMSprop(lr=lr, alpha=0.9, momentum=0.5, centered=True),
}
META_LR = {"sgd": 0.01, "momentum": 0.005, "nesterov": 0.005, "adam": 0.05, "rmsprop": 0.02}


def _quadratic():
    return Quadratic(torch.Generator().manual_seed(3), dim=4, num_problems=2, dtype=torch.float64)


def _theta0():
    return torch.randn(2, 4, generator=torch.Generator().manual_seed(4), dtype=torch.float64)


def _final_loss(task, make, lr, theta0, *, differentiable=True, second_order=True):
    res = unroll(task, make(lr), steps=META_STEPS, generator=torch.Generator().manual_seed(0),
                 params=[theta0], differentiable=differentiable, second_order=second_order)
    assert res.records["step"][-1] == META_STEPS  # the last loss is at the parameters after 10 updates
    return res.train_losses[-1]


def _meta_grads(task, make, lr0, theta0, **kw):
    lr = torch.tensor(lr0, dtype=torch.float64, requires_grad=True)
    th = theta0.clone().requires_grad_(True)
    loss = _final_loss(task, make, lr, th, **kw)
    d_lr, d_th = torch.autograd.grad(loss, [lr, th])
    return float(loss.detach()), d_lr, d_th


def _finite_differences(task, make, lr0, theta0, h_lr=1e-7, h_th=1e-6):
    def f(lr, th):
        return float(_final_loss(task, make, torch.tensor(lr, dtype=torch.float64), th, differentiable=False))

    d_lr = (f(lr0 + h_lr, theta0) - f(lr0 - h_lr, theta0)) / (2 * h_lr)
    d_th = torch.zeros_like(theta0)
    for i in range(theta0.numel()):
        e = torch.zeros_like(theta0).view(-1)
        e[i] = h_th
        e = e.view_as(theta0)
        d_th.view(-1)[i] = (f(lr0, theta0 + e) - f(lr0, theta0 - e)) / (2 * h_th)
    return d_lr, d_th


@pytest.mark.parametrize("name", list(META_OPTS))
def test_meta_gradients_match_finite_differences(name):
    """d(final loss)/d(lr) and d(final loss)/d(theta0) through a 10-step unroll equal central differences."""
    task, theta0, make, lr0 = _quadratic(), _theta0(), META_OPTS[name], META_LR[name]
    loss, d_lr, d_th = _meta_grads(task, make, lr0, theta0)
    fd_lr, fd_th = _finite_differences(task, make, lr0, theta0)
    init_loss = float(task.loss([theta0]))
    assert loss < init_loss  # a sensible learning rate: the unroll makes progress
    assert abs(float(d_lr)) > 1e-3
    assert math.isclose(float(d_lr), fd_lr, rel_tol=1e-6), (float(d_lr), fd_lr)
    torch.testing.assert_close(d_th, fd_th, rtol=1e-6, atol=1e-6 * float(fd_th.abs().max()))


def test_first_order_meta_gradient_differs():
    """Dropping second-order terms changes the meta-gradient, so the checks above do exercise them."""
    task, theta0, make = _quadratic(), _theta0(), META_OPTS["sgd"]
    _, d_lr2, d_th2 = _meta_grads(task, make, 0.01, theta0)
    _, d_lr1, d_th1 = _meta_grads(task, make, 0.01, theta0, second_order=False)
    assert abs(float(d_lr1 - d_lr2)) > 1e-3 * abs(float(d_lr2))
    assert float((d_th1 - d_th2).abs().max()) > 1e-3 * float(d_th2.abs().max())


# Hyper-parameters other than lr, passed as tensors, must carry meta-gradients too.
HPARAM_CASES = [
    ("adam_betas", lambda b1, b2: Adam(lr=0.05, betas=(b1, b2)), (0.8, 0.9)),
    ("adam_eps", lambda eps: Adam(lr=0.05, eps=eps), (0.3,)),
    ("adamw_wd", lambda wd: AdamW(lr=0.05, weight_decay=wd), (0.5,)),
    ("sgd_wd", lambda wd: SGD(lr=0.01, weight_decay=wd), (0.5,)),
    ("momentum_dampening", lambda m, d: Momentum(lr=0.005, momentum=m, dampening=d), (0.8, 0.2)),
    ("nesterov_momentum", lambda m: Nesterov(lr=0.005, momentum=m), (0.8,)),
    ("rmsprop_alpha_momentum", lambda a, m: RMSprop(lr=0.02, alpha=a, momentum=m, centered=True), (0.9, 0.5)),
]


@pytest.mark.parametrize("name,make,values", HPARAM_CASES, ids=[c[0] for c in HPARAM_CASES])
def test_hyperparameter_meta_gradients_match_finite_differences(name, make, values):
    """d(final loss)/d(hyper-parameter) for tensor betas, eps, decay, momentum, alpha equals central differences."""
    task, theta0 = _quadratic(), _theta0()

    def f(*hps, differentiable=False):
        return _final_loss(task, lambda _: make(*hps), None, theta0, differentiable=differentiable)

    hps = [torch.tensor(v, dtype=torch.float64, requires_grad=True) for v in values]
    grads = torch.autograd.grad(f(*hps, differentiable=True), hps)
    h = 1e-7
    for i, (v, g) in enumerate(zip(values, grads)):
        up = [torch.tensor(x + (h if j == i else 0.0), dtype=torch.float64) for j, x in enumerate(values)]
        down = [torch.tensor(x - (h if j == i else 0.0), dtype=torch.float64) for j, x in enumerate(values)]
        fd = (float(f(*up)) - float(f(*down))) / (2 * h)
        assert abs(fd) > 1e-3, (i, fd)
        assert math.isclose(float(g), fd, rel_tol=1e-6), (i, float(g), fd)


class QuadraticModule(nn.Module):
    """The same quadratic as an ``nn.Module`` whose one parameter is theta."""

    def __init__(self, task, theta0):
        super().__init__()
        self.W, self.y = task.W, task.y
        self.theta = nn.Parameter(theta0.clone())

    def forward(self):
        r = torch.einsum("bij,bj->bi", self.W, self.theta) - self.y
        return (r * r).sum()


@pytest.mark.parametrize("name,momentum", [("sgd", 0.0), ("momentum", 0.8)])
def test_meta_gradients_match_higher(name, momentum):
    """SGD and heavy-ball meta-gradients equal those of ``higher.innerloop_ctx`` with torch.optim.SGD."""
    task, theta0, lr0 = _quadratic(), _theta0(), META_LR[name]
    loss, d_lr, d_th = _meta_grads(task, META_OPTS[name], lr0, theta0)

    model = QuadraticModule(task, theta0)
    lr = torch.tensor(lr0, dtype=torch.float64, requires_grad=True)
    inner = T.SGD(model.parameters(), lr=lr0, momentum=momentum, dampening=0.0)
    with higher.innerloop_ctx(model, inner, copy_initial_weights=False, override={"lr": [lr]}) as (fm, diffopt):
        for _ in range(META_STEPS):
            diffopt.step(fm())
        h_loss = fm()
        h_lr, h_th = torch.autograd.grad(h_loss, [lr, model.theta])
    assert math.isclose(float(h_loss.detach()), loss, rel_tol=1e-12)
    assert math.isclose(float(h_lr), float(d_lr), rel_tol=1e-10)
    torch.testing.assert_close(d_th, h_th, rtol=1e-10, atol=1e-10 * float(h_th.abs().max()))


# ---------------------------------------------------------------------------------------------------------
# Bad input.


@pytest.mark.parametrize("cls", [SGD, Momentum, Nesterov, Adam, AdamW, RMSprop])
@pytest.mark.parametrize("lr,shown", [(0.0, "0.0"), (-0.1, "-0.1"), (float("nan"), "nan"),
                                      (float("inf"), "inf"), (torch.tensor(-1.0), r"tensor\(-1\.\)")])
def test_bad_lr(cls, lr, shown):
    """Non-positive, NaN or infinite learning rates raise ValueError naming lr and the value."""
    with pytest.raises(ValueError, match=rf"lr.*{shown}"):
        cls(lr=lr)


@pytest.mark.parametrize("cls", [Adam, AdamW])
@pytest.mark.parametrize("betas,match", [((1.0, 0.999), r"betas\[0\].*1\.0"), ((-0.1, 0.999), r"betas\[0\].*-0\.1"),
                                         ((0.9, 1.5), r"betas\[1\].*1\.5"),
                                         ((0.9, float("nan")), r"betas\[1\].*nan"),
                                         ((0.9,), r"betas.*\(0\.9,\)")])
def test_bad_betas(cls, betas, match):
    """Betas outside [0, 1) (or not a pair) raise ValueError naming the offending beta and its value."""
    with pytest.raises(ValueError, match=match):
        cls(betas=betas)


@pytest.mark.parametrize("make,match", [
    (lambda: SGD(momentum=1.0), r"momentum.*1\.0"),
    (lambda: SGD(momentum=0.9, dampening=-0.5), r"dampening.*-0\.5"),
    (lambda: SGD(weight_decay=-1e-3), r"weight_decay.*-0\.001"),
    (lambda: Nesterov(dampening=0.1), r"nesterov.*dampening=0\.1"),
    (lambda: SGD(nesterov=True), r"nesterov.*momentum=0\.0"),
    (lambda: Adam(eps=0.0), r"eps.*0\.0"),
    (lambda: AdamW(weight_decay=float("nan")), r"weight_decay.*nan"),
    (lambda: RMSprop(alpha=1.0), r"alpha.*1\.0"),
    (lambda: RMSprop(momentum=-0.2), r"momentum.*-0\.2"),
    (lambda: RMSprop(eps=-1e-8), r"eps.*-1e-08"),
])
def test_bad_hyperparameters(make, match):
    """Other out-of-range hyper-parameters raise ValueError naming the parameter and its value."""
    with pytest.raises(ValueError, match=match):
        make()


def test_get_optimizer():
    """Names are case-insensitive; an unknown name raises ValueError naming it and listing the known ones."""
    assert get_optimizer("Nesterov", lr=0.1) == Nesterov(lr=0.1)
    assert isinstance(get_optimizer("rmsprop"), RMSprop)
    with pytest.raises(ValueError, match=r"unknown optimizer 'adagrad'.*adam"):
        get_optimizer("adagrad")


@pytest.mark.parametrize("name,make_ours,make_torch", CASES, ids=CASE_IDS)
def test_mismatched_grads(name, make_ours, make_torch):
    """Gradients of the wrong shape or number raise ValueError naming the shapes / counts."""
    params = [torch.zeros(2, 3), torch.zeros(4)]
    opt = make_ours()
    state = opt.init(params)
    with pytest.raises(ValueError, match=r"gradient 1 has shape \(5,\) but parameter 1 has shape \(4,\)"):
        opt.update([torch.zeros(2, 3), torch.zeros(5)], state, params)
    with pytest.raises(ValueError, match=r"gradient 0 has shape \(3, 2\).*\(2, 3\)"):
        opt.update([torch.zeros(3, 2), torch.zeros(4)], state, params)
    with pytest.raises(ValueError, match=r"got 1 gradients for 2 parameters"):
        opt.update([torch.zeros(2, 3)], state, params)
    with pytest.raises(ValueError, match=r"got 3 gradients for 2 parameters"):
        opt.update([torch.zeros(2, 3), torch.zeros(4), torch.zeros(1)], state, params)
