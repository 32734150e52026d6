"""NormMLP(normalize="none"): the general optimizer's candidate robust base (issue #24): Adam's bias-corrected direction
plus a learned residual bounded to [-1, 1] per coordinate, not normalised per tensor, so the step keeps Adam's
scale. v1 networks (normalize="tensor") are unchanged: their config, and so their saved bytes, carry no new key."""
import math

import pytest
import torch

from learned_opt.meta import load_lopt, save_lopt
from learned_opt.optim.normmlp import NormMLP


def _grads(steps, shapes=((5, 3), (3,)), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=g) * (10.0 ** i) for i, s in enumerate(shapes)] for _ in range(steps)]


def _run(net, grads, params):
    state = net.init(params)
    out = []
    for gs in grads:
        u, state = net.update(gs, state, params)
        out.append(u)
    return out


def _adam(grads, lr, b1=0.9, b2=0.999, eps=1e-8):
    m = [torch.zeros_like(g) for g in grads[0]]
    v = [torch.zeros_like(g) for g in grads[0]]
    out = []
    for t, gs in enumerate(grads, 1):
        m = [b1 * a + (1 - b1) * g for a, g in zip(m, gs)]
        v = [b2 * a + (1 - b2) * g * g for a, g in zip(v, gs)]
        out.append([-lr * (a / (1 - b1 ** t)) / torch.sqrt(w / (1 - b2 ** t) + eps ** 2) for a, w in zip(m, v)])
    return out


def test_fresh_unnormalized_network_steps_like_adam_on_both_paths():
    torch.manual_seed(0)
    net = NormMLP(normalize="none", init_lr=1e-3)
    params = [torch.randn(5, 3), torch.randn(3)]
    grads = _grads(6)
    want = _adam(grads, 1e-3)
    with torch.no_grad():
        fast = _run(net, grads, params)  # no graph: the fast path
    ref = _run(net, grads, params)  # meta-weights require grad: the reference path
    for f, r, w in zip(fast, ref, want):
        for a, b, c in zip(f, r, w):
            assert torch.allclose(a, c, rtol=1e-5, atol=1e-9) and torch.allclose(b.detach(), c, rtol=1e-5, atol=1e-9)
    # Adam's scale, not a unit-RMS step: the tensor whose gradients are 10x larger gets the same-sized step here
    # (Adam is invariant to the gradient's scale), and a tensor's step is not renormalised to rms 1e-3
    rms = [float(u.pow(2).mean().sqrt()) for u in fast[-1]]
    v1 = NormMLP(init_lr=1e-3)
    with torch.no_grad():
        v1_rms = [float(u.pow(2).mean().sqrt()) for u in _run(v1, grads, params)[-1]]
    assert v1_rms == pytest.approx([1e-3, 1e-3], rel=1e-4) and not rms == pytest.approx([1e-3, 1e-3], rel=1e-3)


def test_residual_is_bounded_and_used():
    torch.manual_seed(0)
    net = NormMLP(normalize="none", init_lr=1.0)
    params = [torch.randn(5, 3), torch.randn(3)]
    grads = _grads(3)
    base = _adam(grads, 1.0)
    with torch.no_grad():
        net.out.bias.fill_(50.0)  # a huge residual saturates at +1 per coordinate
        for path in (True, False):
            net.fast_path = path
            u = _run(net, grads, params)[-1]
            for a, b in zip(u, base[-1]):
                assert torch.allclose(a - b, torch.ones_like(a), atol=1e-5), path


def test_option_round_trips_and_v1_config_is_unchanged(tmp_path):
    assert "normalize" not in NormMLP().config
    net = NormMLP(normalize="none")
    assert net.config["normalize"] == "none"
    save_lopt(str(tmp_path / "n.pt"), net)
    back = load_lopt(str(tmp_path / "n.pt"))
    assert back.normalize == "none" and back._wide_ok([200_000], 200_000, torch.zeros(1))  # wide learners too
    with pytest.raises(ValueError, match="normalize"):
        NormMLP(normalize="layer")
    assert math.isfinite(float(back.log_lr))


def test_lr_gain_reparametrises_the_base_rate_without_changing_the_step():
    """exp(lr_gain * log_lr): a fresh network with gain 10 steps exactly like one with gain 1 (same init rate), the
    base rate's derivative with respect to its one meta-weight is 10x larger (meta-training moves it 10x faster),
    the gain survives a save / load, and v1 configs carry no new key."""
    grads = _grads(4)
    params = [torch.zeros(5, 3), torch.zeros(3)]
    steps = {}
    for gain in (1.0, 10.0):
        torch.manual_seed(0)
        net = NormMLP(normalize="none", init_lr=3e-3, lr_gain=gain)
        assert math.exp(float(net.log_rate())) == pytest.approx(3e-3, rel=1e-6)
        steps[gain] = _run(net, grads, params)
        net.log_rate().backward()
        assert float(net.log_lr.grad) == pytest.approx(gain)
    for a, b in zip(steps[1.0], steps[10.0]):
        assert all(torch.allclose(x, y, rtol=1e-5, atol=0) for x, y in zip(a, b))
    assert "lr_gain" not in NormMLP().config and "lr_gain" not in NormMLP(normalize="none").config


def test_lr_gain_round_trips_and_sets_the_weight_decay_rate(tmp_path):
    from learned_opt.optim.adapter_state import decay_rate

    torch.manual_seed(0)
    net = NormMLP(normalize="none", init_lr=2e-3, lr_gain=10.0)
    with torch.no_grad():
        net.log_lr.add_(0.05)  # a meta-trained base rate: exp(10 * (log(2e-3) / 10 + 0.05))
    save_lopt(str(tmp_path / "w.pt"), net)
    back = load_lopt(str(tmp_path / "w.pt"))
    assert back.lr_gain == 10.0 and float(back.log_rate()) == pytest.approx(math.log(2e-3) + 0.5, rel=1e-6)
    assert float(decay_rate(back)) == pytest.approx(2e-3 * math.exp(0.5), rel=1e-6)
    with pytest.raises(ValueError, match="lr_gain"):
        NormMLP(lr_gain=0.0)
