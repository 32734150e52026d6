"""NormMLP(hyper=True): the scheduler also reads, per tensor, the cosine between the gradient and each momentum before
it (the hypergradient signal of the step size, a version-3 candidate of issue #24). The cosines are what they say,
scale-free and zero on the first step; the three update paths agree with them on; they move the scheduler; the
meta-gradient through them matches finite differences; the drop-in carries them per tensor; and networks without
the option keep their config, so the shipped weights and every finished seed keep their identity."""
import math

import pytest
import torch

from learned_opt.control import Observation
from learned_opt.meta import load_lopt, save_lopt
from learned_opt.optim.learned import flatten
from learned_opt.optim.normmlp import NormMLP, grad_momentum_cosines
from tests.helpers import randomize_
from tests.test_normmlp import BIG_SHAPES, central_difference, digits_objective, use_path


def test_cosines_by_hand_scale_free_and_zero_before_any_momentum():
    g = torch.Generator().manual_seed(0)
    sizes = [6, 1, 12]
    grad = torch.randn(sum(sizes), generator=g, dtype=torch.float64)
    momenta = torch.randn(3, sum(sizes), generator=g, dtype=torch.float64)
    got = grad_momentum_cosines(grad, momenta, sizes)
    assert got.shape == (3, 3)
    start = 0
    for j, n in enumerate(sizes):
        gc = grad[start:start + n]
        for i in range(3):
            mc = momenta[i, start:start + n]
            assert float(got[j, i]) == pytest.approx(float(gc @ mc / (gc.norm() * mc.norm())), rel=1e-12)
        start += n
    assert got.abs().max() <= 1 + 1e-12
    # each tensor's gradient and momenta rescaled by its own factor: the same cosines
    scale = torch.tensor([1e-4] * 6 + [3.0] + [1e4] * 12, dtype=torch.float64)
    torch.testing.assert_close(grad_momentum_cosines(grad * scale, momenta * scale * 7, sizes), got)
    # zero momenta (the first step): zero cosines and a zero gradient, not NaN
    grad.requires_grad_(True)
    zero = grad_momentum_cosines(grad, torch.zeros_like(momenta), sizes)
    assert torch.equal(zero, torch.zeros_like(zero))
    (back,) = torch.autograd.grad(zero.sum(), grad)
    assert torch.isfinite(back).all()


def _decisions(net, grads_seq, params, path, monkeypatch):
    net = use_path(net, path, monkeypatch)
    state, ctrl, out = net.init(params), net.init_control(), []
    for t, grads in enumerate(grads_seq):
        with torch.no_grad():
            ups, state = net.update(grads, state, params)
            obs = Observation(t, 50, torch.tensor(1.0 / (t + 1), dtype=params[0].dtype), None, torch.tensor(2.0),
                              state)
            dec, ctrl = net.decide(obs, ctrl)
        out.append((ups, state.pooled.clone(), float(dec.lr_scale)))
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("path", ["fast", "wide"])
def test_the_no_graph_paths_equal_the_reference_with_the_cosines(path, dtype, monkeypatch):
    """The fast and the wide path give the reference path's updates, pooled rows (hidden units, then the k
    cosines) and decisions to float rounding; the wide path takes the cosines before it overwrites a donated state."""
    torch.manual_seed(0)
    net = randomize_(NormMLP(normalize="none", hyper=True).to(dtype), 0.5, 4)
    g = torch.Generator().manual_seed(5)
    params = [torch.randn(s, generator=g, dtype=dtype) for s in BIG_SHAPES]
    stream = [[torch.randn(s, generator=g, dtype=dtype) * 10.0 ** ((i % 3) - 1) for i, s in enumerate(BIG_SHAPES)]
              for _ in range(5)]
    net.fast_path = True
    fast = _decisions(net, stream, params, path, monkeypatch)
    net.fast_path = False
    ref = _decisions(net, stream, params, path, monkeypatch)
    k = len(net.momentum_decays)
    for t, ((ua, pa, sa), (ub, pb, sb)) in enumerate(zip(fast, ref)):
        assert pa.shape == (len(BIG_SHAPES), net.first.out_features + k)
        assert max(float((a - b).abs().max()) for a, b in zip(ua, ub)) <= 1e-6
        torch.testing.assert_close(pa, pb, rtol=1e-6, atol=1e-6)
        # float32: the paths' moments differ by rounding (lerp against b m + (1 - b) g), the cosines by ~1e-7, and
        # the randomised head amplifies that to ~2e-6 relative in the multiplier (measured); float64: 1e-6
        tol = 1e-6 if dtype == torch.float64 else 1e-5
        assert sa == pytest.approx(sb, rel=tol, abs=tol)
        if t == 0:
            assert torch.equal(pa[:, -k:], torch.zeros_like(pa[:, -k:]))  # no momentum yet
        else:
            assert pa[:, -k:].abs().max() > 0.05


def test_the_cosines_move_the_scheduler_and_a_fresh_network_steps_as_without_them():
    torch.manual_seed(0)
    shapes = [(5, 3), (3,)]
    params = [torch.randn(s) for s in shapes]
    fresh = {h: NormMLP(normalize="none", hyper=h) for h in (False, True)}
    stream = [[torch.randn(s) for s in shapes] for _ in range(4)]
    runs = {h: _decisions(net, stream, params, "fast", None) for h, net in fresh.items()}
    for (ua, _, sa), (ub, _, sb) in zip(runs[False], runs[True]):
        assert sa == sb == 1.0  # a fresh scheduler: multiplier 1 with or without the cosines
        assert all(torch.equal(a, b) for a, b in zip(ua, ub))
    net = randomize_(NormMLP(normalize="none", hyper=True), 0.5, 2)
    steady = [[g.clone() for g in stream[0]] for _ in range(4)]  # the same gradient: cosines near +1
    flip = [[g * (-1) ** t for g in stream[0]] for t in range(4)]  # alternating: cosines negative
    a, b = _decisions(net, steady, params, "fast", None), _decisions(net, flip, params, "fast", None)
    assert a[-1][1][:, -3:].min() > 0.99 and b[-1][1][:, -3:].max() < 0
    assert abs(math.log(a[-1][2] / b[-1][2])) > 1e-3  # the scheduler reads them (the rest of its input is alike)


def test_meta_gradient_through_the_cosines_matches_finite_differences():
    torch.manual_seed(0)
    net = randomize_(NormMLP(hidden=6, init_lr=0.05, hyper=True).double(), 0.3, 0)
    objective = digits_objective(net)
    with net.heads.record_features() as tape:
        loss = objective()
    # the LR head's first layer: its columns past the hidden units read the cosines
    hidden = net.first.out_features
    w = net.heads.lr[0].weight
    (grad,) = torch.autograd.grad(loss, [w])
    best = int(grad[:, hidden:hidden + 3].abs().argmax())
    idx = (best // 3, hidden + best % 3)
    analytic = grad[idx].item()
    assert abs(analytic) > 1e-7
    assert analytic == pytest.approx(central_difference(net, objective, tape, w, idx), rel=1e-5, abs=1e-9)


def test_config_round_trips_and_networks_without_it_keep_their_config(tmp_path):
    from learned_opt import pretrained

    net = randomize_(NormMLP(normalize="none", hyper=True), 0.1, 1)
    assert net.config["hyper"] is True
    save_lopt(str(tmp_path / "h.pt"), net)
    back = load_lopt(str(tmp_path / "h.pt"))
    assert back.hyper is True and back.config == net.config
    params = [torch.randn(s) for s in [(4, 3), (3,)]]
    grads = [[torch.randn(s) for s in [(4, 3), (3,)]] for _ in range(3)]
    for (ua, pa, sa), (ub, pb, sb) in zip(_decisions(net, grads, params, "fast", None),
                                          _decisions(back, grads, params, "fast", None)):
        assert sa == sb and torch.equal(pa, pb)
    assert "hyper" not in NormMLP(normalize="none").config  # a finished seed's identity (done.json) is unchanged
    shipped = pretrained.load("general")
    assert shipped.hyper is False and "hyper" not in shipped.config
    with pytest.raises(ValueError, match="hyper"):
        NormMLP(hyper=1)


def test_the_drop_in_trains_with_the_cosines_per_tensor():
    """LearnedOptimizer-style use (ProtocolOptimizer, two parameter groups): the per-tensor pooled rows carry the
    cosines, and a small regression model's loss falls."""
    from learned_opt.optim.adapter import ProtocolOptimizer

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    net = NormMLP(normalize="none", hyper=True, init_lr=1e-2)
    opt = ProtocolOptimizer([{"params": model[0].parameters()}, {"params": model[2].parameters()}], net,
                            total_steps=60)
    x = torch.randn(64, 8)
    y = x[:, :1] * 2 - x[:, 1:2]
    first = None
    for _ in range(60):
        loss = torch.nn.functional.mse_loss(model(x), y)
        first = float(loss.detach()) if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step(loss=loss)
    assert float(loss.detach()) < 0.5 * first
    assert flatten([p.detach() for p in model.parameters()]).isfinite().all()


def test_v3a_and_v3b_presets_add_the_cosines_only_and_build_such_a_network():
    """--preset v3a is an ablation arm of v2b (whose validation evaluation is results/general/dev/v2b), v3b one of the
    shipped v2d: the same recipe with hyper on and its own directory; the meta-network it trains reads the cosines."""
    import os
    import sys
    from dataclasses import asdict

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "experiments"))
    import general_train
    from common import parse_config

    v3a = parse_config(general_train.Config, general_train.PRESETS, ["--preset", "v3a"])
    arm = parse_config(general_train.Config, general_train.PRESETS,
                       ["--preset", "v2b", "--hyper", "true", "--out_dir", "results/general/train_v3a"])
    assert asdict(v3a) == asdict(arm) and v3a.hyper is True
    v3b = parse_config(general_train.Config, general_train.PRESETS, ["--preset", "v3b"])  # the same, on v2d
    assert asdict(v3b) == asdict(parse_config(general_train.Config, general_train.PRESETS, [
        "--preset", "v2d", "--hyper", "true", "--out_dir", "results/general/train_v3b"]))
    net = general_train.new_net(v3a, 0)
    assert net.hyper is True and net.heads.lr[0].in_features == general_train.new_net(
        parse_config(general_train.Config, general_train.PRESETS, ["--preset", "v2b"]), 0).heads.lr[0].in_features + 3
