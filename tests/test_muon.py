"""Muon (:class:`learned_opt.optim.Muon`): our own math against ``torch.optim.Muon`` on the matrices plus
``torch.optim.AdamW`` on the other tensors, and its batched form (a leading task dimension) in
:func:`~learned_opt.evaluate.evaluate_batched`.

Why two kinds of parity. torch's Newton–Schulz runs in bfloat16, and rounding a number to bfloat16 is a step
function: two float32 inputs one unit in the last place apart round, now and then, to bfloat16 values 2^-8 apart.
Our update is additive (``p + u``), and ``p + (q - p)`` cannot always give torch's new parameter ``q`` exactly (a
parameter that shrinks by more than half, e.g. through zero, loses low bits), so a free run drifts by float32
rounding, bfloat16 turns that into ~1e-3 differences of single elements, and the two trajectories part (chaos,
not a different rule). Hence: (1) along torch's own trajectory (teacher forcing), every one of 200 steps of ours
must land on torch's next parameters to float rounding and keep the same state, in float32 and float64; (2) a free
run matches tightly in float64 (the remainders there are ~1e-17, too small to flip a bfloat16 rounding in 200
steps) and, in float32, to float rounding until a bfloat16 rounding flips (in one of the four settings, at step
169), then to the bfloat16 level.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from learned_opt.evaluate import evaluate
from learned_opt.evaluate.batched import batchable, coordinatewise, evaluate_batched, slicewise
from learned_opt.optim import OPTIMIZERS, get_optimizer
from learned_opt.optim.baselines import Muon
from learned_opt.optim.muon import orthogonalize
from learned_opt.tasks.suite import suite_family

pytestmark = pytest.mark.skipif(not hasattr(torch.optim, "Muon"), reason="torch.optim.Muon needs torch >= 2.9")

STEPS = 200
MUON_KEYS = ("lr", "momentum", "nesterov", "weight_decay", "ns_steps", "adjust_lr_fn")
# (id, our hyper-parameters); the torch pair gets the same values (AdamW: adam_lr, betas, eps, adam_weight_decay)
SETTINGS = [
    ("defaults", dict(lr=0.02)),
    ("no_nesterov_no_wd", dict(lr=0.02, nesterov=False, weight_decay=0.0, adam_weight_decay=0.0)),
    ("wd_match_rms_adamw", dict(lr=0.05, weight_decay=0.3, momentum=0.9, adjust_lr_fn="match_rms_adamw",
                                adam_lr=3e-3, betas=(0.8, 0.99), eps=1e-6, adam_weight_decay=0.1)),
    ("original_3_steps_no_nesterov", dict(lr=0.01, ns_steps=3, adjust_lr_fn="original", nesterov=False,
                                          weight_decay=0.05)),
]
IDS = [s[0] for s in SETTINGS]
SHAPES = [(16, 6), (16,), (3, 16), (3,), (), (4, 2, 3, 2), (2,)]  # a 4-D kernel, seen as its (4, 12) matrix
MATRICES = (0, 2, 5)


class Problem:
    """A small tanh MLP with a scalar gain, a bias-like vector and a 4-D kernel, on a new minibatch each step."""

    def __init__(self, dtype, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.init = [(torch.randn(s, generator=g) * 0.5).to(dtype) for s in SHAPES]
        self.x = torch.randn(STEPS, 32, 6, generator=g).to(dtype)
        self.y = torch.randn(STEPS, 32, 3, generator=g).to(dtype)

    def loss(self, params, t):
        w1, b1, w2, b2, gain, kernel, kb = params
        h = torch.tanh(self.x[t] @ w1.T + b1)
        out = gain * (h @ w2.T + b2) + kernel.reshape(4, 12).sum(1)[:3] + kb.sum()
        return ((out - self.y[t]) ** 2).mean()


class Reference:
    """torch.optim.Muon on the matrices (the kernel as a (4, 12) leaf), torch.optim.AdamW on the rest."""

    def __init__(self, init, hp):
        self.leaves = [p.clone().reshape(4, 12) if i == 5 else p.clone() for i, p in enumerate(init)]
        for p in self.leaves:
            p.requires_grad_(True)
        mats = [self.leaves[i] for i in MATRICES]
        rest = [p for i, p in enumerate(self.leaves) if i not in MATRICES]
        self.muon = torch.optim.Muon(mats, **{k: v for k, v in hp.items() if k in MUON_KEYS})
        self.adamw = torch.optim.AdamW(rest, lr=hp.get("adam_lr", 1e-3), betas=hp.get("betas", (0.9, 0.999)),
                                       eps=hp.get("eps", 1e-8), weight_decay=hp.get("adam_weight_decay", 1e-2),
                                       foreach=False)

    def params(self):
        return [p.reshape(SHAPES[5]) if i == 5 else p for i, p in enumerate(self.leaves)]

    def step(self, loss_fn):
        self.muon.zero_grad()
        self.adamw.zero_grad()
        loss_fn(self.params()).backward()
        self.muon.step()
        self.adamw.step()


def _grads(prob, params, t):
    ps = [p.detach().requires_grad_(True) for p in params]
    return list(torch.autograd.grad(prob.loss(ps, t), ps))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("name,hp", SETTINGS, ids=IDS)
def test_every_step_along_torchs_trajectory_matches_torch(name, hp, dtype):
    """From torch's parameters at each of 200 steps, our step lands on torch's next parameters (to the remainder
    of p + (q - p)), with Muon's momentum buffers equal to torch's bit for bit."""
    prob = Problem(dtype, seed=sum(map(ord, name)))
    ref, ours = Reference(prob.init, hp), Muon(**hp)
    state = ours.init(prob.init)
    worst, tol = 0.0, dict(rtol=1e-6, atol=1e-9) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-15)
    for t in range(STEPS):
        before = [p.detach().clone() for p in ref.params()]
        grads = _grads(prob, before, t)
        ref.step(lambda ps: prob.loss(ps, t))
        with torch.no_grad():
            updates, state = ours.update(grads, state, before)
        for i, (p, u, q) in enumerate(zip(before, updates, ref.params())):
            err = float(((p + u) - q.detach()).abs().max())
            worst = max(worst, err / float(q.detach().abs().max()))
        for i in MATRICES:
            assert torch.equal(state.momentum[i], ref.muon.state[ref.leaves[i]]["momentum_buffer"].reshape(SHAPES[i]))
        rest = [i for i in range(len(SHAPES)) if i not in MATRICES]
        for m, v, p in zip([state.mu[i] for i in rest], [state.nu[i] for i in rest], [ref.leaves[i] for i in rest]):
            # our AdamW's own parity (tests/test_optim.py): not bitwise
            torch.testing.assert_close(m, ref.adamw.state[p]["exp_avg"], **tol)
            torch.testing.assert_close(v, ref.adamw.state[p]["exp_avg_sq"], **tol)
    # measured: up to 5e-8 (float32) and 2e-16 (float64) of the largest entry: the remainder of p + (q - p)
    assert worst < (1e-7 if dtype == torch.float32 else 1e-15), worst


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("name,hp", SETTINGS, ids=IDS)
def test_free_run_of_200_steps_matches_torch(name, hp, dtype):
    """Our own trajectory against torch's: tight in float64; in float32 as close as bfloat16 rounding allows."""
    prob = Problem(dtype, seed=sum(map(ord, name)))
    ref, ours = Reference(prob.init, hp), Muon(**hp)
    params = [p.clone() for p in prob.init]
    state = ours.init(params)
    first_part, worst = None, 0.0
    for t in range(STEPS):
        grads = _grads(prob, params, t)
        ref.step(lambda ps: prob.loss(ps, t))
        with torch.no_grad():
            updates, state = ours.update(grads, state, params)
            params = [p + u for p, u in zip(params, updates)]
        err = max(float((a - b.detach()).abs().max() / b.detach().abs().max())
                  for a, b in zip(params, ref.params()))
        worst = max(worst, err)
        if first_part is None and err > 1e-5:
            first_part = t
    moved = max(float((a - b).abs().max()) for a, b in zip(params, prob.init))
    assert moved > 0.1, "the trajectory barely moved: the comparison would be vacuous"
    if dtype == torch.float64:
        assert worst < 1e-12, worst  # measured: 2e-16 at most
    else:
        # measured: 1e-7 at most in three settings over all 200 steps; in the fourth a bfloat16 rounding flips at
        # step 169, and the parameters end 4e-4 apart (the loss 4e-5)
        assert first_part is None or first_part >= 100, first_part
        assert worst < 1e-2, worst


def test_registered_and_classified_for_batching():
    opt = get_optimizer("muon", lr=0.02)
    assert isinstance(opt, Muon) and OPTIMIZERS["muon"] is Muon
    assert Muon.per_tensor and not coordinatewise(opt) and slicewise(opt) and batchable(opt)
    assert not slicewise(get_optimizer("adam")) and batchable(get_optimizer("adam"))


def test_a_tensors_update_reads_that_tensor_only():
    """per_tensor: a list's update equals each tensor's update alone, so the adapter's one state per tensor is
    right."""
    prob = Problem(torch.float64)
    opt = Muon(lr=0.05, weight_decay=0.2, adam_weight_decay=0.1)
    state = opt.init(prob.init)
    alone = [opt.init([p]) for p in prob.init]
    params = prob.init
    for t in range(5):
        grads = _grads(prob, params, t)
        updates, state = opt.update(grads, state, params)
        for i, (g, p) in enumerate(zip(grads, params)):
            u, alone[i] = opt.update([g], alone[i], [p])
            assert torch.equal(u[0], updates[i])
        params = [p + u for p, u in zip(params, updates)]


def test_update_is_out_of_place_and_keeps_dtype():
    prob = Problem(torch.float32)
    opt = Muon(lr=0.05)
    state = opt.init(prob.init)
    grads = _grads(prob, prob.init, 0)
    copies = [t.clone() for t in prob.init + grads]
    for _ in range(2):
        old = [t.clone() for t in state.momentum + state.mu + state.nu]
        updates, new = opt.update(grads, state, prob.init)
        assert all(torch.equal(a, b) for a, b in zip(prob.init + grads, copies))
        assert all(torch.equal(a, b) for a, b in zip(state.momentum + state.mu + state.nu, old))
        assert all(u.dtype == torch.float32 and u.shape == p.shape for u, p in zip(updates, prob.init))
        assert all(not torch.equal(new.momentum[i], state.momentum[i]) for i in MATRICES)
        state = new


def test_leading_batch_dims_update_every_slice_as_its_own_problem():
    """With batch_dims=1, a stack of 5 problems (scaled very differently) steps as each problem alone: its own
    norm, its own iteration, vectors classified by their per-problem shape (AdamW), not as (5, n) matrices."""
    probs = [Problem(torch.float64, seed=s) for s in range(5)]
    scale = torch.tensor([1e-3, 1.0, 10.0, 0.3, 100.0], dtype=torch.float64)
    for ns_dtype, tol in ((None, 1e-13), ("bfloat16", 1e-2)):  # bfloat16: addmm and baddbmm round apart rarely
        one, many = Muon(lr=0.03, ns_dtype=ns_dtype), Muon(lr=0.03, ns_dtype=ns_dtype, batch_dims=1)
        params = [[p * s for p in pr.init] for pr, s in zip(probs, scale)]
        stacked = [torch.stack([ps[k] for ps in params]) for k in range(len(SHAPES))]
        states, state = [one.init(ps) for ps in params], many.init(stacked)
        assert [b.numel() > 0 for b in state.momentum] == [i in MATRICES for i in range(len(SHAPES))]
        for t in range(4):
            grads = [_grads(pr, ps, t) for pr, ps in zip(probs, params)]
            stacked_g = [torch.stack([gs[k] for gs in grads]) for k in range(len(SHAPES))]
            upd, state = many.update(stacked_g, state, stacked)
            for j in range(5):
                u, states[j] = one.update(grads[j], states[j], params[j])
                for k in range(len(SHAPES)):
                    torch.testing.assert_close(upd[k][j], u[k], rtol=tol, atol=tol * float(u[k].abs().max()))
                params[j] = [p + v for p, v in zip(params[j], u)]
            stacked = [torch.stack([ps[k] for ps in params]) for k in range(len(SHAPES))]


def test_orthogonalize_gives_singular_values_near_one():
    g = torch.randn(3, 20, 8, generator=torch.Generator().manual_seed(0))
    s = torch.linalg.svdvals(orthogonalize(g).float())
    assert s.shape == (3, 8) and float(s.min()) > 0.5 and float(s.max()) < 1.3


@pytest.mark.parametrize("kw,match", [(dict(lr=0.0), "lr"), (dict(momentum=1.0), "momentum"),
                                      (dict(weight_decay=-1.0), "weight_decay"), (dict(ns_steps=100), "ns_steps"),
                                      (dict(adjust_lr_fn="other"), "adjust_lr_fn"), (dict(adam_lr=-1.0), "lr"),
                                      (dict(betas=(0.9,)), "betas"), (dict(eps=0.0), "eps"),
                                      (dict(adam_weight_decay=-0.1), "weight_decay"),
                                      (dict(ns_dtype="int8"), "ns_dtype"), (dict(batch_dims=-1), "batch_dims")])
def test_bad_hyperparameters(kw, match):
    with pytest.raises(ValueError, match=match):
        Muon(**kw)


def test_adapter_steps_like_the_torch_pair():
    """ProtocolOptimizer(model.parameters(), Muon(...)) (one state per tensor) steps like torch's pair."""
    from learned_opt.optim import ProtocolOptimizer

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2)).double()
    twin = [p.detach().clone().requires_grad_(True) for p in model.parameters()]
    opt = ProtocolOptimizer(model.parameters(), Muon(lr=0.02))
    mats, rest = [p for p in twin if p.ndim == 2], [p for p in twin if p.ndim != 2]
    t_muon, t_adamw = torch.optim.Muon(mats, lr=0.02), torch.optim.AdamW(rest, foreach=False)
    x, y = torch.randn(16, 5, dtype=torch.float64), torch.randn(16, 2, dtype=torch.float64)
    for _ in range(10):
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        opt.step()
        t_muon.zero_grad()
        t_adamw.zero_grad()
        w1, b1, w2, b2 = twin
        (((torch.tanh(x @ w1.T + b1) @ w2.T + b2) - y) ** 2).mean().backward()
        t_muon.step()
        t_adamw.step()
    for a, b in zip(model.parameters(), twin):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------------------
# evaluate_batched: one run for the tasks of a family, Muon's tensors carrying a leading task dimension


def _both(opt, monkeypatch, **kw):
    from learned_opt.evaluate import batched

    sizes = []
    real = batched._run_group
    monkeypatch.setattr(batched, "_run_group", lambda tasks, *a: sizes.append(len(tasks)) or real(tasks, *a))
    fam = suite_family("digits_mlp_relu_deep")
    kw = dict(split="val", seed=3, stream="tune", num_tasks=5, steps=30, checkpoints=[0, 10], **kw)
    a, b = evaluate(fam, opt, None, **kw), evaluate_batched(fam, opt, **kw)
    assert sizes == [5]  # the five tasks ran as one batch
    assert a.seeds == b.seeds and a.curves.shape == b.curves.shape and np.isfinite(a.curves).all()
    assert float(a.curves[:, -1].mean()) < 0.8 * float(a.curves[:, 0].mean())  # it learned: not vacuous
    return a, b


def _rel(a, b):
    curves = float(np.max(np.abs(b.curves - a.curves) / np.abs(a.curves)))
    ends = max(float(np.max(np.abs(b.at[m][k] - a.at[m][k]) / np.abs(a.at[m][k])))
               for m in a.at for k in ("train_loss", "val_loss", "test_loss"))
    return max(curves, ends)


def test_batched_muon_in_the_parameter_dtype_matches_evaluate_to_float32_rounding(monkeypatch):
    """With the Newton–Schulz iteration in float32 there is no bfloat16 step function: the batched and the one-by-
    one runs agree to float32 rounding (the tolerance of tests/test_batched.py; measured: 2e-7)."""
    a, b = _both(Muon(lr=0.02, ns_dtype=None), monkeypatch)
    assert _rel(a, b) < 1e-4


@pytest.mark.parametrize("hp", [dict(lr=0.02), dict(lr=0.05, weight_decay=0.3, adjust_lr_fn="match_rms_adamw")],
                         ids=["default", "wd_match_rms_adamw"])
def test_batched_muon_in_bfloat16_matches_evaluate_to_bfloat16_rounding(monkeypatch, hp):
    """torch's bfloat16 iteration: float32 differences of the batched learner's gradients flip a bfloat16 rounding
    now and then; measured over 30 steps: 5e-5 (default) and 2e-3 (larger steps) relative."""
    a, b = _both(Muon(**hp), monkeypatch)
    assert _rel(a, b) < 1e-2


def test_batched_run_sets_the_batch_dimension_only_inside(monkeypatch):
    from learned_opt.evaluate import batched

    seen = []
    real = batched._run_group
    monkeypatch.setattr(batched, "_run_group", lambda tasks, gens, opt, *a: seen.append(opt) or
                        real(tasks, gens, opt, *a))
    opt = Muon(lr=0.02)
    evaluate_batched(suite_family("digits_mlp_relu_deep"), opt, num_tasks=4, steps=2, split="val")
    assert seen == [dataclasses.replace(opt, batch_dims=1)] and opt.batch_dims == 0


def test_batched_tuning_runs_muon_through_evaluate_batched(tmp_path, monkeypatch):
    import warnings

    from learned_opt.evaluate import Axis, tune_baseline, tuning

    used = []
    real = tuning.evaluate_batched
    monkeypatch.setattr(tuning, "evaluate_batched", lambda *a, **k: used.append(type(a[1])) or real(*a, **k))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fewer than 20 tuning tasks
        res = tune_baseline("muon", suite_family("digits_mlp_relu_deep"), horizons=[5], num_tasks=4,
                            lr_axis=Axis("lr", (1e-2, 3e-2), "log"), extra=(), cache_dir=str(tmp_path),
                            batched=True)
    assert used and set(used) == {Muon}
    assert res[(5, "train_loss")].edges["lr"] == "interior"
