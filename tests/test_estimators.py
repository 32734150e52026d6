"""ES / PES / TBPTT meta-gradient estimators (learned_opt/estimators.py) on small unrolled systems."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from learned_opt.estimators import ES, PES, InfluenceBalancing, PESState, tbptt_estimate

D = torch.float64


def _full_unroll_grad(system, theta: float, K: int, truncations: int) -> float:
    """The exact derivative of the summed truncation losses of one unroll (autograd through every step)."""
    th = torch.tensor([theta], dtype=D, requires_grad=True)
    s, total = system.init()[None], 0.0
    for _ in range(truncations):
        loss, s = system.unroll(th[None], s, K)
        total = total + loss.sum()
    (g,) = torch.autograd.grad(total, th)
    return float(g)


def _pes_sum(system, theta: float, K: int, truncations: int, particles: int, seed: int) -> float:
    """One PES estimate of the whole unroll's gradient: the sum of its per-truncation estimates."""
    pes = PES(particles, sigma=0.1, generator=torch.Generator().manual_seed(seed))
    th = torch.tensor([theta], dtype=D)
    state, total = pes.init(system.init(), 1), 0.0
    for _ in range(truncations):
        est, state = pes.estimate(th, system.unroll, state, K)
        total += float(est.grad)
    return total


def test_pes_is_unbiased_across_truncations_where_tbptt_is_biased():
    # Influence balancing is linear in theta with a quadratic loss: the Gaussian-smoothed gradient equals the
    # exact one, so the mean of PES estimates must match autograd through the whole unroll
    system, theta, K, T = InfluenceBalancing(), 0.5, 1, 40
    exact = _full_unroll_grad(system, theta, K, T)
    samples = np.array([_pes_sum(system, theta, K, T, particles=200, seed=s) for s in range(40)])
    mean, se = samples.mean(), samples.std(ddof=1) / np.sqrt(len(samples))
    assert abs(mean - exact) < 4 * se, (mean, exact, se)
    # TBPTT with one-step truncations: the sum of its estimates over the same unroll
    th, s, tb = torch.tensor([theta], dtype=D), system.init(), 0.0
    for _ in range(T):
        est, s = tbptt_estimate(th, system.unroll, s, K)
        tb += float(est.grad)
    assert abs(tb - exact) > 20 * se  # measurably biased


def _tanh_loss(theta: torch.Tensor, T: int = 8) -> torch.Tensor:
    """A nonlinear full unroll: s' = tanh(1.5 s + theta), loss (s_T - 0.3)^2, for a batch of thetas (P, 1)."""
    s = torch.full((theta.shape[0],), -0.5, dtype=D)
    for _ in range(T):
        s = torch.tanh(1.5 * s + theta[:, 0])
    return (s - 0.3) ** 2


def test_es_matches_finite_differences_of_the_smoothed_objective():
    sigma, theta = 0.4, 0.2
    # E[f(theta + sigma Z)] by the trapezoid rule on a dense grid (the map is bistable: the loss jumps near
    # theta = 0.15, where Gauss-Hermite quadrature is inaccurate)
    z = np.linspace(-9.0, 9.0, 200001)
    phi = np.exp(-z ** 2 / 2) / np.sqrt(2 * np.pi)

    def smoothed(t: float) -> float:
        vals = _tanh_loss(torch.tensor(t + sigma * z, dtype=D)[:, None]).numpy()
        return float(np.trapezoid(phi * vals, z))

    h = 1e-3
    fd = (smoothed(theta + h) - smoothed(theta - h)) / (2 * h)
    unroll = lambda thetas, inner, K: (_tanh_loss(thetas), inner)  # noqa: E731  (a full unroll, no state)
    es = ES(400, sigma, torch.Generator().manual_seed(0))
    th = torch.tensor([theta], dtype=D)
    samples = np.array([float(es.estimate(th, unroll, torch.zeros(1, dtype=D), 1)[0].grad) for _ in range(60)])
    mean, se = samples.mean(), samples.std(ddof=1) / np.sqrt(len(samples))
    assert abs(mean - fd) < 4 * se, (mean, fd, se)
    # ... and the smoothing matters here: the plain derivative is far from it
    t = th.clone().requires_grad_(True)
    (plain,) = torch.autograd.grad(_tanh_loss(t[None]).sum(), t)
    assert abs(float(plain) - fd) > 20 * se


def test_one_rank_with_2n_particles_equals_two_ranks_with_n_each():
    system, K = InfluenceBalancing(), 3
    th = torch.tensor([0.3], dtype=D)
    whole = PES(16, 0.1, torch.Generator().manual_seed(7))
    ranks = [PES(16, 0.1, torch.Generator().manual_seed(7), rank=r, world_size=2) for r in range(2)]
    sw = whole.init(system.init(), 1)
    sr = [p.init(system.init(), 1) for p in ranks]
    for _ in range(4):
        ew, sw = whole.estimate(th, system.unroll, sw, K)
        outs = [p.estimate(th, system.unroll, s, K) for p, s in zip(ranks, sr)]
        sr = [o[1] for o in outs]
        total = sum(o[0].total for o in outs)  # what one all-reduce of (total, count) gives
        count = sum(o[0].count for o in outs)
        assert count == ew.count == 8
        assert torch.allclose(total / count, ew.grad, rtol=1e-12, atol=1e-15)
    assert ranks[0].local == ranks[1].local == 8


def test_es_split_across_ranks_matches_one_rank():
    th = torch.tensor([0.1], dtype=D)
    unroll = lambda thetas, inner, K: (_tanh_loss(thetas), inner)  # noqa: E731
    one = ES(12, 0.3, torch.Generator().manual_seed(3)).estimate(th, unroll, torch.zeros(1, dtype=D), 1)[0]
    parts = [ES(12, 0.3, torch.Generator().manual_seed(3), rank=r, world_size=3).estimate(
        th, unroll, torch.zeros(1, dtype=D), 1)[0] for r in range(3)]
    assert torch.allclose(sum(p.total for p in parts) / sum(p.count for p in parts), one.grad, rtol=1e-12)


def test_pes_resume_from_its_state_is_bit_identical():
    system, th, K = InfluenceBalancing(), torch.tensor([0.4], dtype=D), 2
    gen = torch.Generator().manual_seed(11)
    pes = PES(10, 0.1, gen)
    state = pes.init(system.init(), 1)
    for _ in range(3):
        _, state = pes.estimate(th, system.unroll, state, K)
    saved, gen_state = state.state_dict(), gen.get_state()
    straight = []
    for _ in range(3):
        est, state = pes.estimate(th, system.unroll, state, K)
        straight.append(est.grad.clone())
    gen2 = torch.Generator()
    gen2.set_state(gen_state)
    pes2, state2 = PES(10, 0.1, gen2), PESState.from_state_dict(saved)
    for g in straight:
        est, state2 = pes2.estimate(th, system.unroll, state2, K)
        assert torch.equal(est.grad, g)
    assert torch.equal(state2.accumulated, state.accumulated) and state2.steps == state.steps == 12


def test_non_finite_pairs_are_dropped_counted_and_restarted():
    system, th = InfluenceBalancing(), torch.tensor([0.2], dtype=D)

    def unroll(thetas, inner, K):
        loss, s = system.unroll(thetas, inner, K)
        loss = loss.clone()
        if loss.shape[0] > 1:
            loss[1] = float("nan")  # particle 1 (pair 1) of a population blows up
        return loss, s

    pes = PES(8, 0.1, torch.Generator().manual_seed(0))
    state = pes.init(system.init(), 1)
    est, new = pes.estimate(th, unroll, state, 3, reset_state=system.init())
    assert est.dropped == 2 and est.count == 3 and torch.isfinite(est.grad).all()
    assert torch.equal(new.accumulated[1], torch.zeros(1, dtype=D)) and torch.equal(new.accumulated[5],
                                                                                     torch.zeros(1, dtype=D))
    assert torch.equal(new.inner[1], system.init()) and new.accumulated[0].abs().item() > 0
    es = ES(8, 0.1, torch.Generator().manual_seed(0))
    e, _ = es.estimate(th, unroll, system.init(), 3)
    assert e.dropped == 2 and e.count == 3 and torch.isfinite(e.grad).all()


@pytest.mark.parametrize("bad", [dict(num_particles=3), dict(num_particles=0), dict(sigma=0.0),
                                 dict(rank=2, world_size=2), dict(num_particles=4, world_size=3)])
def test_bad_settings_are_refused(bad):
    kw = {**dict(num_particles=8, sigma=0.1, generator=torch.Generator()), **bad}
    with pytest.raises(ValueError):
        PES(**kw)
    with pytest.raises(ValueError):
        ES(**kw)
