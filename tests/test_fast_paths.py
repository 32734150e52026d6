"""Fast paths of CoordLSTM and CoordMLP (issue 14): the same numbers as the reference path, used only where no
graph is wanted, falling back where a configuration has none, never aliasing what they return, and giving ES / PES
meta-training the same meta-gradients. (NormMLP's fast path: tests/test_normmlp.py.)"""
import pickle

import pytest
import torch

from helpers import DEVICES, randomize_
from learned_opt.control import Observation
from learned_opt.meta import MetaConfig, MetaTrainer
from learned_opt.optim.learned import FAST_BLOCK, CoordLSTM, CoordMLP, blocks
from learned_opt.tasks import DigitsFamily

# matrices (one wider than a fast-path block), vectors, a scalar, a 1-element tensor, 4-d convolution kernels
SHAPES = [(160, 120), (160,), (10, 160), (10,), (8, 3, 3, 3), (), (1,), (16, 8, 3, 3)]
NETS = {
    "mlp": lambda: CoordMLP(),
    "mlp_small": lambda: CoordMLP(hidden=8, layers=3, momentum_decays=(0.9,)),
    "lstm": lambda: CoordLSTM(),
    "lstm_sgd": lambda: CoordLSTM(base="sgd"),
    "lstm_momentum": lambda: CoordLSTM(base="momentum", layers=1),
    "lstm_adam_extras": lambda: CoordLSTM(base="adam", extra_inputs=("param", "momentum", "loss")),
}


def _grads(g, dtype, scale_shift=0):
    out = [torch.randn(s, generator=g, dtype=dtype) * 10.0 ** ((i + scale_shift) % 3 - 1)
           for i, s in enumerate(SHAPES)]
    out[0][0, :5] = 0.0  # exact zeros and gradients below e^-p exercise the L2L preprocessing's two branches
    out[2][0, :3] = 1e-6
    return out


def _state_tensors(state):
    out = []
    for v in state:
        if isinstance(v, torch.Tensor):
            out.append(v)
        elif isinstance(v, tuple) and v and isinstance(v[0], torch.Tensor):
            out.extend(v)
    return out




@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", list(NETS))
def test_fast_path_equals_the_reference(name, dtype, device, monkeypatch):
    """Updates to 1e-6 absolute in float32 (and float64), the whole state and the decisions, over several steps;
    the two paths also take turns on one state (the fast path's transposed-view state feeds the reference and
    back). A small block size makes the blocked loop cross many blocks inside one tensor."""
    import learned_opt.optim.features as L
    monkeypatch.setattr(L, "FAST_BLOCK", 5000)
    torch.manual_seed(0)
    net = randomize_(NETS[name]().to(dtype), scale=0.5, seed=4).to(device)
    g = torch.Generator().manual_seed(5)
    params = [torch.randn(s, generator=g, dtype=dtype).to(device) for s in SHAPES]
    used = []
    real = type(net)._update_fast

    def spy(self, *a, **k):
        used.append(True)
        return real(self, *a, **k)

    monkeypatch.setattr(type(net), "_update_fast", spy)
    states = {"fast": net.init(params), "ref": net.init(params), "mixed": net.init(params)}
    ctrls = {k: net.init_control() for k in states}
    worst = 0.0
    for t in range(6):
        grads = [x.to(device) for x in _grads(g, dtype, t)]
        loss = torch.tensor(0.5 / (t + 1), dtype=dtype, device=device)
        out = {}
        for key in states:
            net.fast_path = key == "fast" or (key == "mixed" and t % 2 == 0)
            with torch.no_grad():
                ups, states[key] = net.update(grads, states[key], params, loss=loss)
                obs = Observation(t, 50, loss, None, torch.tensor(2.0, device=device), states[key])
                dec, ctrls[key] = net.decide(obs, ctrls[key])
            out[key] = (ups, float(dec.lr_scale), float(dec.stop_prob))
        for key in ("fast", "mixed"):
            worst = max([worst] + [float((a - b).abs().max()) for a, b in zip(out[key][0], out["ref"][0])])
            assert out[key][1] == pytest.approx(out["ref"][1], rel=1e-5)  # heads read the pooled state
            assert out[key][2] == pytest.approx(out["ref"][2], rel=1e-5, abs=1e-9)
            for a, b in zip(_state_tensors(states[key]), _state_tensors(states["ref"])):
                assert a.shape == b.shape
                assert float((a - b).abs().max()) <= 1e-6 * max(1.0, float(b.abs().max()))
    assert worst <= 1e-6
    assert len(used) == 6 + 3  # the fast path ran on every "fast" step and every other "mixed" one


@pytest.mark.parametrize("cls", [CoordMLP, CoordLSTM])
def test_small_learners_keep_the_reference(cls, monkeypatch):
    """Up to SMALL_LEARNER coordinates (every learner of the reported CoordLSTM / CoordMLP results) the reference
    runs, so those results stay bitwise reproducible; ``fast_min_coordinates = 0`` opts in."""
    from learned_opt.optim.learned import SMALL_LEARNER
    assert cls.fast_min_coordinates == SMALL_LEARNER >= 4810  # the widest digits MLP of the suite
    calls = []
    real = cls._update_fast
    monkeypatch.setattr(cls, "_update_fast", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    net = cls()
    params = [torch.randn(40, 64), torch.randn(40), torch.randn(10, 40), torch.randn(10)]  # 3,010 coordinates
    with torch.no_grad():
        net.update([torch.randn_like(p) for p in params], net.init(params), params)
        assert not calls
        net.fast_min_coordinates = 0
        net.update([torch.randn_like(p) for p in params], net.init(params), params)
        assert calls == [1]


@pytest.mark.parametrize("extra", ["pooled", "agreement"])
def test_inputs_without_a_fast_path_fall_back_to_the_reference(extra, monkeypatch):
    net = randomize_(CoordLSTM(extra_inputs=(extra,)), scale=0.3, seed=1)
    monkeypatch.setattr(CoordLSTM, "_update_fast", lambda *a, **k: pytest.fail("fast path used"))
    params = [torch.randn(s) for s in SHAPES]
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        state = net.init(params)
        for t in range(3):
            ups, state = net.update(_grads(g, torch.float32, t), state, params)
    assert all(torch.isfinite(u).all() for u in ups)


@pytest.mark.parametrize("name", ["mlp", "lstm_adam_extras"])
def test_fast_path_only_without_a_graph_and_the_meta_gradient_still_flows(name, monkeypatch):
    net = randomize_(NETS[name](), scale=0.3, seed=1)
    calls = []
    real = type(net)._update_fast
    monkeypatch.setattr(type(net), "_update_fast", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    params = [torch.randn(s) for s in SHAPES]
    grads = _grads(torch.Generator().manual_seed(3), torch.float32)
    ups, _ = net.update(grads, net.init(params), params)  # grad mode on, meta-weights require grad: reference
    assert not calls
    sum(u.sum() for u in ups).backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())
    with torch.no_grad():
        net.update(grads, net.init(params), params)
    assert calls == [1]
    net.fast_path = False
    with torch.no_grad():
        net.update(grads, net.init(params), params)
    assert calls == [1]


@pytest.mark.parametrize("name", ["mlp", "lstm_adam_extras"])
def test_scratch_buffers_never_alias_what_the_fast_path_returns(name):
    net = randomize_(NETS[name](), seed=7)
    params = [torch.randn(s) for s in SHAPES]
    g = torch.Generator().manual_seed(8)
    stream = [_grads(g, torch.float32, t) for t in range(3)]
    with torch.no_grad():
        state = net.init(params)
        first, state1 = net.update(stream[0], state, params)
        kept = [u.clone() for u in first] + [t.clone() for t in _state_tensors(state1)]
        net.update(stream[1], state1, params)
        other = [torch.randn(5, 3), torch.randn(3)]
        net.update([torch.randn(5, 3), torch.randn(3)], net.init(other), other)  # another size
        net.update(stream[2], state1, params)
    for a, b in zip(kept, [*first, *_state_tensors(state1)]):
        assert torch.equal(a, b)
    assert net.__dict__.get("_ws")
    back = pickle.loads(pickle.dumps(net))
    assert "_ws" not in back.__dict__
    with torch.no_grad():
        again, _ = back.update(stream[1], state1, params)
        ref, _ = net.update(stream[1], state1, params)
    assert all(torch.equal(a, b) for a, b in zip(again, ref))


def test_blocks_cover_every_coordinate_once_within_tensors():
    sizes = [3, 40000, 1, 16385]
    spans = list(blocks(sizes, 16384))
    assert spans[0] == (0, 0, 3) and spans[-1] == (3, 40004 + 16384, 40004 + 16385)
    covered = torch.zeros(sum(sizes), dtype=torch.int64)
    starts = [0, 3, 40003, 40004]
    for j, s, e in spans:
        assert e - s <= 16384 and starts[j] <= s < e <= starts[j] + sizes[j]
        covered[s:e] += 1
    assert bool((covered == 1).all())
    assert FAST_BLOCK >= 1024


@pytest.mark.parametrize("name", ["mlp", "lstm"])
def test_pes_meta_gradient_is_the_same_with_the_fast_path(name):
    """PES particles run without a graph, so meta-training with PES goes through the fast path: its meta-gradient
    equals the reference path's (float rounding of the inner runs, divided by sigma, is all that differs)."""
    grads = {}
    for fast in (True, False):
        torch.manual_seed(0)
        net = randomize_(NETS[name](), scale=0.1, seed=3)
        net.fast_path = fast
        net.fast_min_coordinates = 0  # the digits learner is below the fast paths' default threshold
        cfg = MetaConfig(horizon=10, truncation=5, iterations=1, estimator="pes", particles=4, sigma=0.1,
                         meta_loss="mean_log", checkpoint_every=0, checkpoint_seconds=0, seed=0)
        trainer = MetaTrainer(net, DigitsFamily(pool="meta"), cfg, progress=False)
        runs = [trainer._new_run(cfg.horizon)]
        g, *_ = trainer.estimator.gradient(runs, cfg.truncation, trainer._controller(), trainer.meta_step)
        g2, *_ = trainer.estimator.gradient(runs, cfg.truncation, trainer._controller(), trainer.meta_step)  # 2nd
        grads[fast] = torch.cat([x.flatten() for x in g + g2])
    a, b = grads[True], grads[False]
    assert float(b.norm()) > 0
    assert float((a - b).norm()) <= 1e-3 * float(b.norm())
