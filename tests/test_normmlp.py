"""Tests for :class:`learned_opt.optim.normmlp.NormMLP`: a fresh network is per-tensor-normalised Adam, inputs and
decisions are invariant to the scale of a tensor and of its gradients, the scheduler reads the fraction of the run
only when the horizon is known, the state is at most 8 floats per parameter, any shape works, and the
meta-gradient through an unroll matches central finite differences."""
from __future__ import annotations

import math

import pytest
import torch

from learned_opt.control import Observation
from learned_opt.meta import load_lopt, save_lopt
from learned_opt.optim.learned import build_learned, flatten
from learned_opt.optim.normmlp import NormMLP, horizon_visible
from learned_opt.tasks import Digits
from learned_opt.tasks.base import generator
from learned_opt.unroll import unroll
from tests.helpers import DEVICES
from tests.helpers import randomize_ as _randomize

SHAPES = [(), (3,), (2, 3), (4, 2, 3, 3), (1,), (7, 5)]


def randomize_(net, scale=0.5, seed=0):
    """:func:`tests.helpers.randomize_` at this file's default scale."""
    return _randomize(net, scale, seed)


def grad_stream(shapes, steps, seed=0, dtype=torch.float64):
    """``steps`` lists of random gradients of ``shapes`` (a fixed stream)."""
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=g, dtype=dtype) for s in shapes] for _ in range(steps)]


def run_updates(net, params, grads_seq, scales=None, loss=1.0, horizon=0):
    """The updates and LR decisions of ``net`` over a gradient stream; ``scales[i]`` multiplies gradient ``i``."""
    state = net.init(params)
    ctrl = net.init_control()
    out = []
    for t, grads in enumerate(grads_seq):
        if scales is not None:
            grads = [c * g for c, g in zip(scales, grads)]
        ups, state = net.update(grads, state, params)
        gnorm = torch.linalg.vector_norm(flatten(grads))
        obs = Observation(t, horizon, torch.tensor(loss * (0.9 ** t), dtype=params[0].dtype), None, gnorm, state)
        decision, ctrl = net.decide(obs, ctrl)
        out.append((ups, float(decision.lr_scale.detach())))
    return out


def test_fresh_network_is_per_tensor_normalised_adam():
    net = NormMLP(init_lr=0.01).double()
    params = [torch.randn(s, dtype=torch.float64) for s in SHAPES]
    grads_seq = grad_stream(SHAPES, 6)
    # Adam's direction, by hand (beta1 0.9, beta2 0.999, bias-corrected), normalised to unit RMS per tensor
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    for t, (grads, (ups, scale)) in enumerate(zip(grads_seq, run_updates(net, params, grads_seq)), start=1):
        assert scale == pytest.approx(1.0)  # a fresh scheduler: multiplier 1
        for i, g in enumerate(grads):
            m[i] = 0.9 * m[i] + 0.1 * g
            v[i] = 0.999 * v[i] + 0.001 * g * g
            d = -(m[i] / (1 - 0.9 ** t)) / torch.sqrt(v[i] / (1 - 0.999 ** t))
            d = d / torch.sqrt((d * d).mean())
            torch.testing.assert_close(ups[i], 0.01 * d, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("factor", [1e-4, 1e3])
def test_rescaling_each_tensors_gradient_changes_no_update(factor):
    torch.manual_seed(0)
    net = randomize_(NormMLP(hidden=8).double())
    params = [torch.randn(s, dtype=torch.float64) for s in SHAPES]
    grads_seq = grad_stream(SHAPES, 8)
    ref = run_updates(net, params, grads_seq)
    # a different scale per tensor: the direction of every tensor is unchanged
    scales = [factor ** ((i % 3) - 1) for i in range(len(SHAPES))]
    got = run_updates(net, params, grads_seq, scales=scales)
    # eps (1e-8) inside sqrt(v_hat + eps^2) is the one scale in the inputs: at gradients ~1e-5 it moves them by ~1e-6
    for (u_ref, _), (u_got, _) in zip(ref, got):
        for a, b in zip(u_ref, u_got):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-10)
    # one scale for all gradients: the scheduler's decisions are unchanged too (it reads only ratios)
    same = run_updates(net, params, grads_seq, scales=[factor] * len(SHAPES))
    assert [s for _, s in same] == pytest.approx([s for _, s in ref], rel=1e-6)  # eps: ~1e-8
    assert len({round(s, 6) for _, s in ref}) > 1  # the randomised scheduler does move


def test_rescaling_a_parameter_tensor_changes_no_update():
    net = randomize_(NormMLP(hidden=8).double(), seed=1)
    params = [torch.randn(s, dtype=torch.float64) for s in SHAPES]
    grads_seq = grad_stream(SHAPES, 5, seed=2)
    ref = run_updates(net, params, grads_seq)
    scaled = [p * (100.0 if i % 2 else 0.01) for i, p in enumerate(params)]
    got = run_updates(net, scaled, grads_seq)
    for (u_ref, _), (u_got, _) in zip(ref, got):
        for a, b in zip(u_ref, u_got):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-10)
    # the parameter is an input that matters: shifting it (not rescaling it) changes the updates
    shifted = run_updates(net, [p + 1.0 for p in params], grads_seq)
    assert any(not torch.allclose(a, b) for a, b in zip(ref[-1][0], shifted[-1][0]))


def test_every_tensor_takes_a_unit_rms_step_times_the_rate():
    net = randomize_(NormMLP(hidden=8, init_lr=0.003).double(), seed=3)
    params = [torch.randn(s, dtype=torch.float64) for s in SHAPES]
    for ups, _ in run_updates(net, params, grad_stream(SHAPES, 4)):
        for u in ups:
            rate = float(torch.exp(net.log_lr.detach()))
            assert float(torch.sqrt((u * u).mean())) == pytest.approx(rate, rel=1e-9)


def test_state_is_at_most_eight_floats_per_parameter_and_handles_every_shape():
    net = NormMLP()
    params = [torch.randn(s) for s in SHAPES]
    state = net.init(params)
    n = sum(p.numel() for p in params)
    per_coordinate = sum(t.numel() for t in (state.momenta, state.v)) / n
    assert per_coordinate == net.state_floats_per_param() == 4 <= 8
    ups, state = net.update([torch.randn(s) for s in SHAPES], state, params)
    assert [u.shape for u in ups] == [p.shape for p in params]
    assert all(torch.isfinite(u).all() for u in ups)
    # zero gradients (a dead unit): finite, zero-size steps in that tensor are not required, NaNs are forbidden
    ups, _ = net.update([torch.zeros(s) for s in SHAPES], state, params)
    assert all(torch.isfinite(u).all() for u in ups)


def test_scheduler_reads_the_fraction_done_only_when_the_horizon_is_known():
    net = NormMLP()
    state = net.heads.init()
    like = torch.zeros(())
    loss = torch.tensor(2.0)
    known = Observation(25, 100, loss, None, torch.tensor(1.0), None, False)
    unknown = Observation(25, 0, loss, None, torch.tensor(1.0), None, False)
    s = net.heads.observe(known, state)
    assert net.heads.features(known, s, like)[-2:].tolist() == [0.25, 1.0]
    assert net.heads.features(unknown, s, like)[-2:].tolist() == [0.0, 0.0]
    # in meta-training, about half of the tasks (chosen by their first loss, deterministically) hide it
    shown = []
    for i in range(400):
        st = state._replace(loss0=2.0 + i * 1e-3)
        obs = Observation(3, 100, loss, None, None, None, True)
        shown.append(horizon_visible(obs, st, 0.5))
        assert horizon_visible(obs, st, 0.5) == shown[-1]
        assert horizon_visible(Observation(3, 100, loss, None, None, None, False), st, 0.5)  # evaluation: shown
    assert 0.4 < sum(shown) / len(shown) < 0.6
    assert all(horizon_visible(Observation(3, 100, loss, None, None, None, True), state._replace(loss0=2.0 + i),
                               0.0) for i in range(10))
    # dropout 1: never told, in meta-training or in evaluation (a network that never saw the feature)
    hidden = NormMLP(horizon_dropout=1.0)
    for training in (True, False):
        obs = Observation(25, 100, loss, None, torch.tensor(1.0), None, training)
        assert not horizon_visible(obs, state, 1.0)
        assert hidden.heads.features(obs, hidden.heads.observe(obs, hidden.heads.init()), like)[-2:].tolist() == [0, 0]


def digits_objective(net):
    """The mean log train loss of a 4-step differentiable unroll of ``net`` on a small digits MLP (float64)."""
    task = Digits(dtype=torch.float64, hidden=(6,))

    def objective():
        res = unroll(task, net, net.as_controller(), steps=4, generator=generator(1), differentiable=True,
                     second_order=True, horizon=10)
        return torch.log(torch.stack(res.train_losses[1:])).mean()
    return objective


def central_difference(net, objective, tape, w, idx, eps=1e-6) -> float:
    """The central finite difference of ``objective`` in ``w[idx]``, the decision features replayed from ``tape``."""
    values = []
    for sign in (1, -1):
        with torch.no_grad():
            orig = w[idx].item()
            w[idx] = orig + sign * eps
        with net.heads.replay_features(tape):
            values.append(objective().item())
        with torch.no_grad():
            w[idx] = orig
    return (values[0] - values[1]) / (2 * eps)


def test_meta_gradient_matches_finite_differences():
    torch.manual_seed(0)
    net = randomize_(NormMLP(hidden=6, init_lr=0.05).double(), scale=0.3)
    objective = digits_objective(net)
    with net.heads.record_features() as tape:
        loss = objective()
    named = dict(net.named_parameters())
    names = ["first.weight", "first_tensor.weight", "rest.0.weight", "out.weight", "out.bias", "log_lr",
             "heads.lr.0.weight", "heads.lr.2.bias"]
    grads = torch.autograd.grad(loss, [named[n] for n in names])
    for name, grad in zip(names, grads):
        idx = tuple(int(i) for i in torch.unravel_index(grad.abs().argmax(), grad.shape))
        analytic = grad[idx].item()
        assert abs(analytic) > 1e-6, (name, analytic)
        numeric = central_difference(net, objective, tape, named[name], idx)
        assert analytic == pytest.approx(numeric, rel=1e-5, abs=1e-9), (name, analytic, numeric)


def test_learns_digits_like_adam_and_saves_and_loads(tmp_path):
    net = build_learned("norm_mlp", init_lr=0.01)
    task = Digits()
    res = unroll(task, net, net.as_controller(), steps=100, generator=generator(0))
    assert res.records["train_loss"][-1] < 0.3 * res.records["train_loss"][0]
    randomize_(net, scale=0.1)
    save_lopt(str(tmp_path / "n.pt"), net)
    back = load_lopt(str(tmp_path / "n.pt"))
    assert isinstance(back, NormMLP) and back.config == net.config
    params = [torch.randn(s) for s in SHAPES]
    grads = grad_stream(SHAPES, 3, dtype=torch.float32)
    for (a, sa), (b, sb) in zip(run_updates(net, params, grads), run_updates(back, params, grads)):
        assert sa == sb
        for x, y in zip(a, b):
            assert torch.equal(x, y)


@pytest.mark.parametrize("kw, match", [(dict(hidden=0), "hidden"), (dict(momentum_decays=()), "momentum_decays"),
                                       (dict(rms_decay=1.0), "decays"), (dict(init_lr=0.0), "init_lr"),
                                       (dict(init_lr=math.inf), "init_lr"), (dict(horizon_dropout=1.5),
                                                                            "horizon_dropout"),
                                       (dict(eps=0.0), "eps")])
def test_bad_settings_are_refused_by_name(kw, match):
    with pytest.raises(ValueError, match=match):
        NormMLP(**kw)


# ------------------------------------------------------------------------------------------------- fast path
BIG_SHAPES = [(256, 200), (256,), (10, 256), (10,), (8, 3, 3, 3), (), (1,), (16, 8, 3, 3)]


# the two no-graph paths: ``_direction_fast`` (learners below WIDE_LEARNER coordinates) and ``_update_wide``
PATHS = {"fast": 10 ** 12, "wide": 0}  # wide_min_coordinates (and wide_min_mean_block) that selects each


def use_path(net, path, monkeypatch=None):
    """Force ``path`` on ``net``; the wide path with small blocks, so that one tensor spans many of them."""
    net.wide_min_coordinates = net.wide_min_mean_block = PATHS[path]
    if monkeypatch is not None and path == "wide":
        import learned_opt.optim.normmlp as N
        monkeypatch.setattr(N, "WIDE_BLOCK", 4096)  # the 51,200-coordinate matrix: 12 full blocks and a part
    return net


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layers", [1, 2, 3])
@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("normalize", ["tensor", "none"])
def test_fast_path_equals_the_reference_path(normalize, dtype, path, layers, device, monkeypatch):
    """Both no-graph paths give the reference's updates to 1e-6 (absolute, float32) and its decisions to 1e-6
    over several steps, on matrices, vectors, scalars and 4-d convolution kernels, with 1 to 3 layers, for both
    outputs (normalised per tensor, or ``tanh(mlp) - adam``); the pooled hidden units and the moments agree to
    float rounding."""
    torch.manual_seed(0)
    net = NormMLP(layers=layers, normalize=normalize).to(dtype)
    net = use_path(randomize_(net, scale=0.5, seed=4).to(device), path, monkeypatch)
    g = torch.Generator().manual_seed(5)
    params = [torch.randn(s, generator=g, dtype=dtype).to(device) for s in BIG_SHAPES]
    states = {True: net.init(params), False: net.init(params)}
    ctrls = {True: net.init_control(), False: net.init_control()}
    worst = 0.0
    calls = []
    for name in ("_update_wide", "_direction_fast"):
        real = getattr(net, name)
        setattr(net, name, lambda *a, _r=real, _n=name: calls.append(_n) or _r(*a))
    for t in range(6):
        grads = [(torch.randn(s, generator=g, dtype=dtype) * 10.0 ** ((i % 3) - 1)).to(device)
                 for i, s in enumerate(BIG_SHAPES)]
        out = {}
        for fast in (True, False):
            net.fast_path = fast
            with torch.no_grad():
                ups, states[fast] = net.update(grads, states[fast], params)
                obs = Observation(t, 50, torch.tensor(1.0 / (t + 1), dtype=dtype, device=device), None,
                                  torch.tensor(2.0, device=device), states[fast])
                dec, ctrls[fast] = net.decide(obs, ctrls[fast])
            out[fast] = (ups, float(dec.lr_scale))
        worst = max([worst] + [float((a - b).abs().max()) for a, b in zip(out[True][0], out[False][0])])
        # the pooled hidden units are O(1): a few float32 ulps apart where the wide path folds the feature scales
        # into the weights ((W c) x against W (c x))
        torch.testing.assert_close(states[True].pooled, states[False].pooled, rtol=1e-6, atol=1e-6)
        for key in ("momenta", "v"):
            torch.testing.assert_close(getattr(states[True], key), getattr(states[False], key))
        assert out[True][1] == pytest.approx(out[False][1], rel=1e-6, abs=1e-6)
    assert worst <= 1e-6
    assert calls == ["_update_wide" if path == "wide" else "_direction_fast"] * 6  # the path under test ran
    assert net.__dict__.get("fast_path") is False  # the instance flag switched the path (the class default is True)


def test_the_wide_path_is_the_default_only_on_wide_learners():
    """Learners of at least WIDE_LEARNER coordinates take the wide path, smaller ones ``_direction_fast``: every
    reported result of this network ran on learners of at most 4,810 coordinates and stays bitwise reproducible.
    So do large learners made of many small tensors (one block per tensor at least: the other path is faster)."""
    from learned_opt.optim.normmlp import WIDE_LEARNER
    assert NormMLP.wide_min_coordinates == WIDE_LEARNER > 4810
    net = randomize_(NormMLP(), seed=8)
    calls = []
    real = net._update_wide
    net._update_wide = lambda *a: calls.append(1) or real(*a)
    for shapes, wide in (([(4810,)], False), ([(WIDE_LEARNER - 1,)], False), ([(WIDE_LEARNER,)], True),
                         ([(400, 250), (250,)], True), ([(4000,), (16,)] * 30, False)):  # many small tensors
        params = [torch.randn(s) for s in shapes]
        calls.clear()
        with torch.no_grad():
            net.update([torch.randn(s) for s in shapes], net.init(params), params)
        assert bool(calls) == wide, shapes
        calls.clear()
        net.update([torch.randn(s) for s in shapes], net.init(params), params)  # a graph wanted: the reference
        assert not calls


def test_fast_path_runs_only_without_a_graph_and_the_meta_gradient_still_flows():
    net = NormMLP(hidden=4)
    params = [torch.randn(s) for s in SHAPES]
    g, p = flatten(params), flatten(params)
    m = torch.zeros(3, g.shape[0])
    # meta-weights require grad, grad mode on: meta-training, the reference
    assert not net._fast_ok(g.shape[0], g, p, m)
    with torch.no_grad():
        assert net._fast_ok(g.shape[0], g, p, m)
    net.fast_path = False
    with torch.no_grad():
        assert not net._fast_ok(g.shape[0], g, p, m)
    net.fast_path = True
    # a differentiable step keeps its graph to the meta-weights
    ups, _ = net.update([torch.randn(s) for s in SHAPES], net.init(params), params)
    sum(u.sum() for u in ups).backward()
    assert net.log_lr.grad is not None and net.first.weight.grad is not None


@pytest.mark.parametrize("path", list(PATHS))
def test_fast_path_is_the_default_of_the_drop_in_and_keeps_scale_invariance(path, monkeypatch):
    net = use_path(randomize_(NormMLP(hidden=8), seed=6), path, monkeypatch)
    params = [torch.randn(s) for s in BIG_SHAPES]
    stream = grad_stream(BIG_SHAPES, 4, dtype=torch.float32)
    with torch.no_grad():
        calls = []
        name = "_update_wide" if path == "wide" else "_direction_fast"
        real = getattr(net, name)
        setattr(net, name, lambda *a: calls.append(1) or real(*a))
        ref = run_updates(net, params, stream)
        got = run_updates(net, params, stream, scales=[1e3 if i % 2 else 1e-3 for i in range(len(BIG_SHAPES))])
    assert len(calls) == 8
    for (a, _), (b, _) in zip(ref, got):
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5)  # float32; the updates have RMS ~1e-3


@pytest.mark.parametrize("path", list(PATHS))
def test_fast_path_scratch_buffers_never_alias_what_it_returns_and_are_not_pickled(path, monkeypatch):
    """The fast paths reuse scratch tensors between steps: the updates and state they returned earlier must stay
    untouched by later steps (also for another model size), and a pickled optimizer leaves the scratch out."""
    import pickle

    net = use_path(randomize_(NormMLP(hidden=8), seed=7), path, monkeypatch)
    params = [torch.randn(s) for s in BIG_SHAPES]
    stream = grad_stream(BIG_SHAPES, 3, dtype=torch.float32)
    with torch.no_grad():
        state = net.init(params)
        first, state1 = net.update(stream[0], state, params)
        kept = [u.clone() for u in first] + [state1.momenta.clone(), state1.v.clone(), state1.pooled.clone()]
        net.update(stream[1], state1, params)
        other = [torch.randn(5, 3), torch.randn(3)]
        net.update([torch.randn(5, 3), torch.randn(3)], net.init(other), other)  # another size
        net.update(stream[2], state1, params)
    for a, b in zip(kept, [*first, state1.momenta, state1.v, state1.pooled]):
        assert torch.equal(a, b)
    assert net.__dict__.get("_ws")  # the scratch exists ...
    back = pickle.loads(pickle.dumps(net))
    assert "_ws" not in back.__dict__  # ... and does not travel
    with torch.no_grad():
        again, _ = back.update(stream[1], state1, params)
        ref, _ = net.update(stream[1], state1, params)
    assert all(torch.equal(a, b) for a, b in zip(again, ref))


@pytest.mark.parametrize("normalize", ["tensor", "none"])
def test_a_donated_state_is_overwritten_and_gives_the_same_numbers(normalize, monkeypatch):
    """Inside ``donated_state`` (the drop-in) the wide path writes the new moments over the state it was given and
    returns the updates in a reused buffer; the numbers are bitwise those of the allocating path, and outside it
    (evaluation, ES / PES particles) the given state is never changed. The flag does not outlive the block, even
    when the update raises, and is not pickled."""
    import pickle

    from learned_opt.optim.network import donated_state

    net = use_path(randomize_(NormMLP(hidden=8, normalize=normalize), seed=9), "wide", monkeypatch)
    params = [torch.randn(s) for s in BIG_SHAPES]
    stream = grad_stream(BIG_SHAPES, 4, dtype=torch.float32)
    with torch.no_grad():
        plain = donated = net.init(params)
        for grads in stream:
            before = plain.momenta.clone()
            ref, plain_next = net.update(grads, plain, params)
            assert torch.equal(plain.momenta, before)  # not donated: the input state is left as it was
            plain = plain_next
            given = donated
            with donated_state(net):
                assert pickle.loads(pickle.dumps(net))._donated() is False
                got, donated = net.update(grads, donated, params)
            assert donated.momenta is given.momenta and donated.v is given.v  # overwritten in place
            for a, b in zip(ref, got):
                assert torch.equal(a, b)
            for key in ("momenta", "v", "pooled"):
                assert torch.equal(getattr(plain, key), getattr(donated, key))
    assert net._donated() is False
    with pytest.raises(RuntimeError):
        with donated_state(net):
            raise RuntimeError("a failing step")
    assert net._donated() is False


def test_the_drop_in_trains_wide_learners_bitwise_as_without_donation(monkeypatch):
    """ProtocolOptimizer donates its state: the same parameters after several steps as with the allocating path."""
    import learned_opt.optim.adapter as A
    from learned_opt.optim.adapter import ProtocolOptimizer

    def train(donate: bool):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.Tanh(), torch.nn.Linear(96, 8))
        net = use_path(randomize_(NormMLP(hidden=8, normalize="none"), seed=3), "wide", monkeypatch)
        calls = []
        real = net._update_wide
        net._update_wide = lambda *a: calls.append(net._donated()) or real(*a)
        if not donate:
            monkeypatch.setattr(A, "donated_state", lambda opt: __import__("contextlib").nullcontext())
        opt = ProtocolOptimizer(model.parameters(), net, total_steps=10)
        x, y = torch.randn(32, 64), torch.randn(32, 8)
        for _ in range(5):
            opt.zero_grad()
            loss = ((model(x) - y) ** 2).mean()
            loss.backward()
            opt.step(loss=loss)
        monkeypatch.undo()
        return [p.detach().clone() for p in model.parameters()], calls

    donated, calls_d = train(True)
    plain, calls_p = train(False)
    assert calls_d == [True] * 5 and calls_p == [False] * 5  # the wide path ran, with and without donation
    for a, b in zip(donated, plain):
        assert torch.equal(a, b)
