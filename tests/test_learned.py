"""Tests for the learned optimizers (``learned_opt.optim.learned``): fresh-network behaviour, any learner shape,
bounded decisions under extreme inputs, the L2L gradient preprocessing, and meta-gradients checked against
central finite differences (the unrolled update path, the LR head on digits with its global features frozen, and
the halting distribution)."""
from __future__ import annotations

import math

import pytest
import torch

from learned_opt.control import Observation
from learned_opt.meta import halting_distribution
from learned_opt.optim.learned import CoordLSTM, CoordMLP, DecisionHeads, preprocess_gradient
from learned_opt.tasks import Digits, QuadraticFamily
from learned_opt.tasks.base import generator
from learned_opt.unroll import unroll
from tests.helpers import randomize_

NETS = [CoordLSTM, CoordMLP]

# Scalars, vectors, matrices, a 4-d conv kernel and a single coordinate, mixed in one list.
MIXED_SHAPES = [(), (3,), (2, 3), (2, 1, 3, 3), (1,)]


def small(cls, **kw):
    """A small network of ``cls`` (fast, same code paths as the defaults)."""
    return cls(hidden=8, **kw)


def obs_for(state, step=0, loss=1.0, val=None, gnorm=1.0, dtype=torch.float32):
    """A controller observation carrying the network's own optimizer state."""
    as_t = lambda v: None if v is None else torch.tensor(v, dtype=dtype)  # noqa: E731
    return Observation(step, 100, as_t(loss), as_t(val), as_t(gnorm), state, False)


class ShapesTask:
    """One problem whose parameters have the given shapes; loss ``sum_i ||w_i * p_i - t_i||^2``."""
    num_problems = 1

    def __init__(self, shapes, dtype=torch.float32, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.shapes = [tuple(s) for s in shapes]
        self.targets = [torch.randn(s, generator=g, dtype=dtype) for s in self.shapes]
        self.weights = [torch.rand(s, generator=g, dtype=dtype) + 0.5 for s in self.shapes]
        self.dtype = dtype

    def init(self, g):
        return [torch.randn(s, generator=g, dtype=self.dtype) for s in self.shapes]

    def sample_batch(self, g=None, split="train"):
        return None

    def losses(self, params, batch=None):
        total = sum(((w * p - t) ** 2).sum() for p, w, t in zip(params, self.weights, self.targets))
        return total.reshape(1)

    def loss(self, params, batch=None):
        return self.losses(params).sum()


# --------------------------------------------------------------------------------------------- fresh networks
@pytest.mark.parametrize("cls", NETS)
@pytest.mark.parametrize("lr_mode", ["global", "per_tensor"])
def test_fresh_network_zero_update_unit_lr_small_stop(cls, lr_mode):
    torch.manual_seed(0)
    net = cls(lr_mode=lr_mode)  # init_zero=True is the default
    params = [torch.randn(s) for s in MIXED_SHAPES]
    grads = [torch.randn(s) for s in MIXED_SHAPES]
    state = net.init(params)
    updates, state = net.update(grads, state, params, loss=torch.tensor(2.0))
    assert [u.shape for u in updates] == [p.shape for p in params]
    for u in updates:
        assert torch.equal(u, torch.zeros_like(u))

    decision, _ = net.decide(obs_for(state), net.init_control())
    expected_stop = torch.sigmoid(torch.tensor(net.heads.stop_bias)).item()
    assert expected_stop < 0.01
    assert float(decision.stop_prob.detach()) == pytest.approx(expected_stop, rel=1e-6)
    assert decision.stop is False
    if lr_mode == "global":
        assert isinstance(decision.lr_scale, torch.Tensor) and decision.lr_scale.dim() == 0
        assert decision.lr_scale.item() == 1.0
    else:
        assert isinstance(decision.lr_scale, list) and len(decision.lr_scale) == len(params)
        assert all(s.dim() == 0 and s.item() == 1.0 for s in decision.lr_scale)


@pytest.mark.parametrize("cls", NETS)
def test_fresh_network_leaves_params_unchanged_in_unroll(cls):
    net = small(cls)
    task = ShapesTask(MIXED_SHAPES)
    g = generator(1)
    p0 = task.init(generator(1))
    res = unroll(task, net, net.as_controller(), steps=3, generator=g)
    for a, b in zip(p0, res.params):
        assert torch.equal(a, b)
    assert res.records["update_norm"][:3] == [0.0, 0.0, 0.0]
    assert res.records["lr_scale"][:3] == [1.0, 1.0, 1.0]
    assert all(0 < p < 0.01 for p in res.records["stop_prob"][:3])


# --------------------------------------------------------------------------------------------- any shape
@pytest.mark.parametrize("cls", NETS)
@pytest.mark.parametrize("lr_mode", ["global", "per_tensor"])
@pytest.mark.parametrize("shapes", [MIXED_SHAPES, [()], [(1,)], [(5,)], [(4, 3)], [(2, 3, 3, 3)]],
                         ids=["mixed", "scalar", "one-coordinate", "vector", "matrix", "conv4d"])
def test_any_learner_shape_through_unroll(cls, lr_mode, shapes):
    net = randomize_(small(cls, init_zero=False, lr_mode=lr_mode), scale=0.1)
    task = ShapesTask(shapes)
    p0 = task.init(generator(3))
    res = unroll(task, net, net.as_controller(), steps=4, generator=generator(3))
    assert not res.stopped and res.step == 4
    assert [p.shape for p in res.params] == [torch.Size(s) for s in shapes]
    assert all(torch.isfinite(p).all() for p in res.params)
    # a non-zero output layer moves every tensor
    assert all(not torch.equal(a, b) for a, b in zip(p0, res.params))
    assert all(u > 0 and math.isfinite(u) for u in res.records["update_norm"][:4])

    # the raw protocol: update shapes equal parameter shapes
    params = task.init(generator(4))
    state = net.init(params)
    grads = [torch.randn(s) for s in shapes]
    updates, state = net.update(grads, state, params, loss=torch.tensor(1.0))
    assert [u.shape for u in updates] == [p.shape for p in params]
    decision, _ = net.decide(obs_for(state), None)
    if lr_mode == "per_tensor":
        assert len(decision.lr_scale) == len(shapes)


@pytest.mark.parametrize("cls", NETS)
def test_updates_are_local_to_each_tensor(cls):
    """Coordinatewise (LSTM) and per-tensor-normalised (MLP) updates: a tensor's update does not depend on the
    gradients of the other tensors, however large."""
    net = randomize_(small(cls, init_zero=False), scale=0.3)
    torch.manual_seed(0)
    params = [torch.randn(4, 3), torch.randn(5)]
    ga = [torch.randn(4, 3) for _ in range(3)]
    gb = [torch.randn(5) for _ in range(3)]

    def run(scale_b):
        state, out = net.init(params), []
        for a, b in zip(ga, gb):
            updates, state = net.update([a, b * scale_b], state, params, loss=torch.tensor(1.0))
            out.append(updates[0])
        return out

    for u, v in zip(run(1.0), run(1e4)):
        torch.testing.assert_close(u, v, rtol=1e-5, atol=1e-8)


def test_mlp_update_is_invariant_to_gradient_scale():
    """CoordMLP's features are normalised (per tensor and Adam-like), so scaling the gradients up or down leaves
    the update unchanged (down to where Adam's 1e-8 in ``g / (rms + 1e-8)`` starts to count)."""
    net = randomize_(small(CoordMLP, init_zero=False), scale=0.3)
    torch.manual_seed(1)
    params = [torch.randn(4, 3), torch.randn(5)]
    grads = [[torch.randn(4, 3), torch.randn(5)] for _ in range(3)]

    def run(scale):
        state, out = net.init(params), []
        for gs in grads:
            updates, state = net.update([g * scale for g in gs], state, params)
            out.append(updates)
        return out

    reference = run(1.0)
    for scale in (1e-3, 1e-2, 10.0, 1e3):
        for us, vs in zip(reference, run(scale)):
            for u, v in zip(us, vs):
                torch.testing.assert_close(u, v, rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("cls", NETS)
def test_update_rejects_mismatched_gradients(cls):
    net = small(cls)
    params = [torch.zeros(3), torch.zeros(2, 2)]
    state = net.init(params)
    with pytest.raises(ValueError, match="shape"):
        net.update([torch.zeros(3), torch.zeros(4)], state, params)
    with pytest.raises(ValueError):
        net.init([])


@pytest.mark.parametrize("cls", NETS)
def test_float64_network_on_float64_learner(cls):
    net = randomize_(small(cls, init_zero=False), scale=0.1).double()
    task = ShapesTask(MIXED_SHAPES, dtype=torch.float64)
    res = unroll(task, net, net.as_controller(), steps=3, generator=generator(0))
    assert all(p.dtype == torch.float64 and torch.isfinite(p).all() for p in res.params)


# --------------------------------------------------------------------------------------------- bounds
EXTREME_GRADS = [1e30, -1e30, 1e-30, -1e-30, 0.0, 3e38]
EXTREME_LOSSES = [1e30, 1e-30, 0.0, 3e38, math.inf]


@pytest.mark.parametrize("cls", NETS)
@pytest.mark.parametrize("lr_mode", ["global", "per_tensor"])
def test_decisions_bounded_and_updates_finite_for_extreme_inputs(cls, lr_mode):
    lr_bound = 10.0
    # Large random meta-weights saturate every nonlinearity: the bounds must hold anyway.
    net = randomize_(small(cls, init_zero=False, lr_mode=lr_mode, lr_bound=lr_bound), scale=3.0, seed=1)
    shapes = [(), (4, 3), (2, 1, 2, 2)]
    seen_lr = []
    for gval in EXTREME_GRADS:
        for lval in EXTREME_LOSSES:
            params = [torch.full(s, 0.5) for s in shapes]
            state, cstate = net.init(params), net.init_control()
            for t in range(3):
                # mixed magnitudes within the list too: one tensor extreme, one ordinary, one zero
                grads = [torch.full(shapes[0], gval), torch.full(shapes[1], gval),
                         torch.zeros(shapes[2]) if t % 2 else torch.full(shapes[2], gval)]
                loss = torch.tensor(lval)
                updates, state = net.update(grads, state, params, loss=loss)
                assert all(torch.isfinite(u).all() for u in updates), (gval, lval, t)
                obs = Observation(t, 10, loss, loss if t % 2 else None,
                                  torch.tensor(abs(gval)), state, False)
                decision, cstate = net.decide(obs, cstate)
                scales = decision.lr_scale if lr_mode == "per_tensor" else [decision.lr_scale]
                for s in scales:
                    s = float(s.detach())
                    seen_lr.append(s)
                    # 1e-6: exp(log(b) * tanh(z)) rounds at tanh(z) = +-1
                    assert 1 / lr_bound * (1 - 1e-6) <= s <= lr_bound * (1 + 1e-6), (gval, lval, t, s)
                p = float(decision.stop_prob.detach())
                assert 0.0 <= p <= 1.0, (gval, lval, t, p)
                params = [q + u for q, u in zip(params, updates)]
    # the heads really were driven away from 1 (otherwise the bound check is vacuous)
    assert max(abs(math.log(s)) for s in seen_lr) > 0.5


@pytest.mark.parametrize("loss", [math.inf, 3e38, 1e30, 0.0, 1e-45, math.nan])
def test_lstm_loss_input_stays_finite(loss):
    """The optional log-loss input is bounded, so an infinite loss cannot turn ``0 * inf`` into NaN."""
    net = randomize_(CoordLSTM(hidden=8, init_zero=False, extra_inputs=("param", "momentum", "loss")), 0.3)
    with torch.no_grad():
        net.cells[0].weight_ih[:, -1] = 0.0  # a zero weight on the loss input (e.g. pruned, or never trained)
    params = [torch.full((3,), 0.5), torch.ones(2, 2)]
    state = net.init(params)
    for _ in range(2):
        updates, state = net.update([torch.ones(3), torch.ones(2, 2)], state, params, loss=torch.tensor(loss))
        assert all(torch.isfinite(u).all() for u in updates)
    # and the input really is used: a different finite loss gives a different update
    net2 = randomize_(CoordLSTM(hidden=8, init_zero=False, extra_inputs=("loss",)), 0.3)
    a, _ = net2.update([torch.ones(3)], net2.init([torch.ones(3)]), [torch.ones(3)], loss=torch.tensor(1.0))
    b, _ = net2.update([torch.ones(3)], net2.init([torch.ones(3)]), [torch.ones(3)], loss=torch.tensor(1e6))
    assert not torch.equal(a[0], b[0])


def test_decision_heads_reject_bad_settings():
    with pytest.raises(ValueError, match="lr_bound"):
        DecisionHeads(4, lr_bound=1.0)
    with pytest.raises(ValueError, match="stop_max"):
        DecisionHeads(4, stop_max=0.0)
    with pytest.raises(ValueError, match="lr_mode"):
        CoordLSTM(lr_mode="per_coordinate")
    with pytest.raises(ValueError, match="extra input"):
        CoordLSTM(extra_inputs=("hessian",))


# --------------------------------------------------------------------------------------------- preprocessing
def test_preprocess_gradient_matches_l2l_formula():
    p = 10.0
    thresh = math.exp(-p)  # 4.54e-5
    g = torch.tensor([1.0, -1.0, math.e ** -5, -100.0, 1e-5, -2e-5, 0.0, 2 * thresh, 0.5 * thresh],
                     dtype=torch.float64)
    expected = torch.tensor([
        [0.0, 1.0],                       # log(1)/10, sign
        [0.0, -1.0],
        [-0.5, 1.0],                      # log(e^-5)/10
        [math.log(100.0) / 10, -1.0],
        [-1.0, 1e-5 * math.exp(10)],      # |g| < e^-p: (-1, e^p g)
        [-1.0, -2e-5 * math.exp(10)],
        [-1.0, 0.0],
        [math.log(2 * thresh) / 10, 1.0],
        [-1.0, 0.5],
    ], dtype=torch.float64)
    out = preprocess_gradient(g, p)
    assert out.shape == (9, 2)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    # another p
    out3 = preprocess_gradient(torch.tensor([0.01, 0.1], dtype=torch.float64), 3.0)
    # e^-3 = 0.0498: 0.01 is below it, 0.1 above
    torch.testing.assert_close(out3, torch.tensor([[-1.0, 0.01 * math.exp(3)], [math.log(0.1) / 3, 1.0]],
                                                  dtype=torch.float64))
    # continuity of the first feature at the threshold, and finite everywhere
    assert torch.isfinite(preprocess_gradient(torch.tensor([0.0, 1e-45, 3e38]))).all()


# --------------------------------------------------------------------------------------------- meta-gradients
def _unroll_objective(net, steps=3):
    """Sum of the per-step losses after each of ``steps`` differentiable inner steps (float64)."""
    family = QuadraticFamily(dim=3, num_problems=2, dtype=torch.float64)
    g = generator(5)
    task = family(g)
    res = unroll(task, net, None, steps=steps, generator=g, differentiable=True, second_order=True)
    return torch.stack(res.train_losses[1:]).sum()


def _weights_to_check(net):
    """(name, tensor, index) triples: the output layer and weights deep inside the body."""
    if isinstance(net, CoordLSTM):
        return [("out.weight", net.out.weight, (0, 1)), ("out.bias", net.out.bias, (0,)),
                ("cells.0.weight_ih", net.cells[0].weight_ih, (3, 0)),
                ("cells.0.weight_ih", net.cells[0].weight_ih, (45, 1)),
                ("cells.1.weight_hh", net.cells[1].weight_hh, (10, 2)),
                ("cells.1.bias_hh", net.cells[1].bias_hh, (70,))]
    return [("out.weight", net.out.weight, (0, 1)), ("out.weight", net.out.weight, (1, 3)),
            ("out.bias", net.out.bias, (0,)), ("body.0.weight", net.body[0].weight, (2, 0)),
            ("body.0.weight", net.body[0].weight, (5, 6)), ("body.2.bias", net.body[2].bias, (4,))]


@pytest.mark.parametrize("cls", NETS)
def test_meta_gradient_matches_finite_differences(cls):
    torch.manual_seed(0)
    # Steps large enough that the learner's gradients move with the meta-weights: the second-order terms
    # then change the meta-gradient by ~1e-4 (LSTM) to ~1e-2 (MLP), far above the tolerance below.
    kw = dict(output_scale=1.0) if cls is CoordLSTM else dict(step_mult=1.0)
    net = cls(hidden=20, init_zero=False, **kw).double()
    checks = _weights_to_check(net)
    loss = _unroll_objective(net)
    grads = torch.autograd.grad(loss, [w for _, w, _ in checks])
    eps = 1e-6
    nontrivial = 0
    for (name, w, idx), grad in zip(checks, grads):
        analytic = grad[idx].item()
        with torch.no_grad():
            orig = w[idx].item()
            w[idx] = orig + eps
            plus = _unroll_objective(net).item()
            w[idx] = orig - eps
            minus = _unroll_objective(net).item()
            w[idx] = orig
        numeric = (plus - minus) / (2 * eps)
        assert analytic == pytest.approx(numeric, rel=1e-6, abs=1e-8), (name, idx, analytic, numeric)
        nontrivial += abs(analytic) > 1e-6
    assert nontrivial >= len(checks) - 1  # the check is not vacuous


@pytest.mark.parametrize("cls", NETS)
def test_meta_gradient_reaches_every_head_with_learned_control(cls):
    # zero updates would make the LR scale irrelevant (scale * 0), so the update layer starts non-zero
    net = small(cls, init_zero=False)
    family = QuadraticFamily(dim=3, num_problems=2)
    g = generator(2)
    res = unroll(family(g), net, net.as_controller(), steps=3, generator=g, differentiable=True)
    objective = torch.stack(res.train_losses[1:]).sum() + torch.stack(res.stop_probs).sum()
    objective.backward()
    # the zero-initialised last layers of the update and both decision heads all receive gradient
    for name in ("out.weight", "heads.lr.2.weight", "heads.stop.2.weight"):
        grad = dict(net.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name


def _digits_lstm_with_lr_head():
    """The digits experiment's meta-network (float64) with its LR head moved off zero, so that it matters."""
    torch.manual_seed(0)
    net = CoordLSTM(base="adam", base_lr=0.1, output_scale=0.1, lr_max=1.0, base_lr_range=1.0,
                    init_zero=False).double()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in net.heads.lr.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
        # z < 0 at every step: with lr_max = 1 a positive z gives a multiplier of exactly 1 and no gradient
        net.heads.lr[2].bias.fill_(-1.0)
    return net


def _digits_objective(net, task, steps=4):
    """Mean log train loss after each of ``steps`` second-order differentiable steps, the LR head on."""
    res = unroll(task, net, net.as_controller(), steps=steps, generator=generator(1), differentiable=True,
                 second_order=True)
    return torch.log(torch.stack(res.train_losses[1:])).mean(), res


@pytest.fixture
def one_thread():
    """Pin torch to one intra-op thread for the test (small ops on 2 shared cores: ~5x faster), then restore."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_meta_gradient_with_lr_head_matches_finite_differences_with_features_frozen(one_thread):
    # The heads' global features (loss and gradient-norm ratios, time) are built from Python floats: constants in
    # the meta-graph, by design. So the meta-gradient equals finite differences only with those features frozen
    # to the unperturbed run's (replayed); computed afresh, they differ by 2-10% here (measured).
    net = _digits_lstm_with_lr_head()
    task = Digits(dtype=torch.float64)
    with net.heads.record_features() as tape:
        objective, res = _digits_objective(net, task)
    assert len(tape) == 4
    assert all(0.1 < s < 0.9 for s in res.records["lr_scale"][:4])  # the head lowers the rate at every step
    named = dict(net.named_parameters())
    names = ["cells.0.weight_ih", "cells.0.bias_hh", "cells.1.weight_hh", "out.weight", "out.bias", "log_base_lr",
             "heads.lr.0.weight", "heads.lr.2.weight", "heads.lr.2.bias"]
    grads = torch.autograd.grad(objective, [named[n] for n in names])
    eps, rel = 1e-6, 1e-5
    worst_frozen, worst_free = 0.0, 0.0
    for name, grad in zip(names, grads):
        # each tensor's largest entry: far above the finite differences' rounding error (~1e-10)
        idx = tuple(int(i) for i in torch.unravel_index(grad.abs().argmax(), grad.shape))
        analytic = grad[idx].item()
        assert abs(analytic) > 1e-5, (name, idx, analytic)
        w = named[name]
        numeric = {}
        for frozen in (True, False):
            values = []
            for sign in (1, -1):
                with torch.no_grad():
                    orig = w[idx].item()
                    w[idx] = orig + sign * eps
                try:
                    if frozen:
                        with net.heads.replay_features(tape):
                            values.append(_digits_objective(net, task)[0].item())
                    else:
                        values.append(_digits_objective(net, task)[0].item())
                finally:
                    with torch.no_grad():
                        w[idx] = orig
            numeric[frozen] = (values[0] - values[1]) / (2 * eps)
        assert analytic == pytest.approx(numeric[True], rel=rel), (name, idx, analytic, numeric[True])
        worst_frozen = max(worst_frozen, abs(analytic - numeric[True]) / abs(analytic))
        worst_free = max(worst_free, abs(analytic - numeric[False]) / abs(analytic))
    # measured: worst_frozen ~3e-7, worst_free ~0.1; the second documents that the features are constants
    assert worst_free > 100 * rel, (worst_frozen, worst_free)


def test_feature_replay_refuses_a_run_out_of_step():
    net = _digits_lstm_with_lr_head()
    task = Digits(dtype=torch.float64)
    with net.heads.record_features() as tape:
        _digits_objective(net, task, steps=2)
    assert [step for step, _ in tape] == [0, 1]
    with pytest.raises(RuntimeError, match="out of step"):
        with net.heads.replay_features(tape):
            _digits_objective(net, task, steps=3)
    with pytest.raises(RuntimeError, match="used 1 of 2"):
        with net.heads.replay_features(tape):
            _digits_objective(net, task, steps=1)
    assert net.heads._feature_override is None  # off again after each block


# --------------------------------------------------------------------------------------------- halting
def test_halting_distribution_sums_to_one_and_matches_formula():
    p = torch.tensor([0.1, 0.5, 0.0, 0.9, 0.3], dtype=torch.float64)
    q = halting_distribution(p)
    assert q.shape == (6,)
    assert q.sum().item() == pytest.approx(1.0, abs=1e-15)
    expected, survive = [], 1.0
    for pt in p.tolist():
        expected.append(pt * survive)
        survive *= 1 - pt
    expected.append(survive)
    torch.testing.assert_close(q, torch.tensor(expected, dtype=torch.float64))
    assert (q >= 0).all()
    # a certain stop at step 0 puts all the mass there
    torch.testing.assert_close(halting_distribution(torch.tensor([1.0, 0.4])), torch.tensor([1.0, 0.0, 0.0]))
    for seed in range(5):
        r = torch.rand(7, generator=torch.Generator().manual_seed(seed))
        assert halting_distribution(r).sum().item() == pytest.approx(1.0, abs=1e-6)


def test_halting_distribution_gradient_matches_finite_differences():
    g = torch.Generator().manual_seed(0)
    p = (0.05 + 0.9 * torch.rand(6, generator=g, dtype=torch.float64)).requires_grad_()
    cost = torch.randn(7, generator=g, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: halting_distribution(x), (p,))
    objective = lambda x: (halting_distribution(x) * cost).sum()  # noqa: E731
    assert torch.autograd.gradcheck(objective, (p,))
    # and explicitly, one coordinate by hand
    (grad,) = torch.autograd.grad(objective(p), p)
    eps = 1e-6
    for i in range(6):
        e = torch.zeros_like(p)
        e[i] = eps
        numeric = (objective(p.detach() + e) - objective(p.detach() - e)).item() / (2 * eps)
        assert grad[i].item() == pytest.approx(numeric, rel=1e-6, abs=1e-10)


# --------------------------------------------------------------------------------------------- Adam base
def test_fresh_adam_based_lstm_is_exactly_torch_adam():
    torch.manual_seed(0)
    net = CoordLSTM(hidden=8, base="adam", base_lr=0.05).double()
    lr = net.log_base_lr.detach().exp().item()  # the float32 log-rate, as the network holds it
    g = torch.Generator().manual_seed(1)
    params = [torch.randn(3, 4, generator=g, dtype=torch.float64), torch.randn(5, generator=g, dtype=torch.float64)]
    ref = [p.clone().requires_grad_() for p in params]
    topt = torch.optim.Adam(ref, lr=lr)
    state, cur = net.init(params), [p.clone() for p in params]
    for i in range(25):
        grads = [torch.randn(p.shape, generator=g, dtype=torch.float64) for p in params]
        if i in (0, 7):
            grads[1][0] = 0.0  # an exactly-zero gradient coordinate, also at the first step
        updates, state = net.update(grads, state, cur)
        cur = [c + u for c, u in zip(cur, updates)]
        for r, gr in zip(ref, grads):
            r.grad = gr.clone()
        topt.step()
    for c, r in zip(cur, ref):
        torch.testing.assert_close(c, r.detach(), rtol=0, atol=1e-12)


def test_adam_based_lstm_meta_gradient_is_finite_with_zero_gradients():
    # sqrt(v) at v = 0 has an infinite derivative; the clamp keeps the meta-gradient finite (no 0 * inf = NaN)
    net = randomize_(CoordLSTM(hidden=8, base="adam", init_zero=False), scale=0.1)
    params = [torch.zeros(6, requires_grad=True)]
    state = net.init(params)
    total = 0
    for i in range(3):
        grad = torch.tensor([0.0, 0.0, 1.0, -2.0, 0.0, 3.0]) * (params[0] + 1)
        updates, state = net.update([grad], state, params)
        params = [params[0] + updates[0]]
        total = total + (params[0] ** 2).sum()
    meta_grads = torch.autograd.grad(total, list(net.parameters()), allow_unused=True)
    assert all(torch.isfinite(mg).all() for mg in meta_grads if mg is not None)
    assert sum(float(mg.abs().sum()) for mg in meta_grads if mg is not None) > 0


def test_adam_based_lstm_update_is_invariant_to_gradient_scale():
    # every input but the L2L log-magnitude is scale-free, and the output is in units of Adam's step: with the
    # log-magnitude input's weights zeroed, scaling all gradients by 1000 leaves the updates unchanged
    net = randomize_(CoordLSTM(hidden=8, base="adam", init_zero=False), scale=0.3)
    with torch.no_grad():
        net.cells[0].weight_ih[:, 0] = 0.0  # log|g| / p
    g = torch.Generator().manual_seed(3)
    params = [torch.randn(4, 3, generator=g)]
    grads = [[torch.randn(4, 3, generator=g)] for _ in range(4)]
    outs = []
    for scale in (1.0, 1000.0):
        state, ups = net.init(params), []
        for gr in grads:
            u, state = net.update([gr[0] * scale], state, params)
            ups.append(u[0])
        outs.append(torch.stack(ups))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("kw, match", [(dict(base_beta2=1.0), "base_beta2"), (dict(base_eps=0.0), "base_eps"),
                                       (dict(base="adamw"), "unknown base")])
def test_adam_base_rejects_bad_settings(kw, match):
    with pytest.raises(ValueError, match=match):
        CoordLSTM(**{"base": "adam", **kw})


def test_agreement_input_is_the_cosine_between_gradient_and_last_update():
    net = randomize_(CoordLSTM(hidden=4, base="adam", extra_inputs=["agreement"], init_zero=False), scale=0.2)
    g = torch.Generator().manual_seed(0)
    params = [torch.randn(3, 2, generator=g), torch.randn(4, generator=g)]
    state = net.init(params)
    g1 = [torch.randn(p.shape, generator=g) for p in params]
    u1, state = net.update(g1, state, params)
    assert torch.equal(state.pooled[:, -1], torch.zeros(2))  # no last update at the first step
    # the new gradient roughly along -u1: the descent direction still agrees with the last step
    g2 = [-u.detach() * 2 + 0.1 * u.detach().abs().mean() * torch.randn(u.shape, generator=g) for u in u1]
    _, state = net.update(g2, state, params)
    expected = torch.stack([-torch.nn.functional.cosine_similarity(a.reshape(-1), b.reshape(-1), dim=0)
                            for a, b in zip(g2, u1)])
    torch.testing.assert_close(state.pooled[:, -1], expected)
    assert bool((expected > 0.9).all())  # agreement ~ +1; an overshooting step would give ~ -1


def test_agreement_meta_gradient_is_finite_at_the_first_step_and_with_zero_gradients():
    net = randomize_(CoordLSTM(hidden=4, base="adam", extra_inputs=["agreement"], init_zero=False), scale=0.2)
    params = [torch.ones(5, requires_grad=True), torch.ones(3, requires_grad=True)]
    state, total = net.init(params), 0
    for _ in range(3):
        grads = [2 * params[0], params[1] * 0]  # the second tensor's gradient is exactly zero throughout
        updates, state = net.update(grads, state, params)
        params = [p + u for p, u in zip(params, updates)]
        total = total + sum((p ** 2).sum() for p in params)
    meta_grads = torch.autograd.grad(total, list(net.parameters()), allow_unused=True)
    assert all(torch.isfinite(mg).all() for mg in meta_grads if mg is not None)


@pytest.mark.parametrize("lr_max", [1.0, 2.0])
def test_lr_max_bounds_the_multiplier_from_above_and_a_fresh_head_still_learns(lr_max):
    heads = DecisionHeads(4, lr_bound=10.0, lr_max=lr_max)
    z = torch.linspace(-30, 30, 61)
    scale = torch.exp(heads._log_lr(z))
    assert float(scale.min()) >= 0.1 * (1 - 1e-6) and float(scale.max()) <= lr_max * (1 + 1e-6)
    assert float(scale.min()) < 0.11 and float(scale.max()) > lr_max * 0.99  # both ends are reachable
    # a fresh head (zero last layer) outputs exactly 1 and its last layer gets a non-zero gradient
    pooled = torch.randn(2, 4)
    g = torch.randn(heads.lr[0].in_features - 4)  # the global features
    lr_scale, _ = heads.heads(pooled, g, per_tensor=False)
    assert lr_scale.item() == 1.0
    lr_scale.backward()
    assert float(heads.lr[2].bias.grad.abs()) > 0
    with pytest.raises(ValueError, match="lr_max"):
        DecisionHeads(4, lr_max=0.5)
    with pytest.raises(ValueError, match="lr_max"):
        CoordLSTM(lr_max=math.inf)
