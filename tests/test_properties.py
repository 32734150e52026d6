"""Property tests (hypothesis) over random learner shapes and values: finite inputs give finite updates for every
hand-coded optimizer in ``OPTIMIZERS`` and for both meta-networks; the meta-networks' learning-rate decisions stay
in ``[1/lr_bound, lr_bound]``, their stop probabilities in ``[0, 1]``, and the L2L LSTM's update within
``output_scale * (sum |W_out| + |b_out|)`` (its last hidden state lies in ``[-1, 1]``)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from learned_opt.control import Observation
from learned_opt.optim import OPTIMIZERS
from learned_opt.optim.learned import CoordLSTM, CoordMLP

SETTINGS = settings(max_examples=100, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
# Magnitudes from subnormal to 2^50 (~1e15) (squares stay below float32's overflow), zeros and signed zeros included.
VALUES = st.floats(-2.0**50, 2.0**50, allow_nan=False, allow_infinity=False, width=32)
SHAPES = st.lists(st.lists(st.integers(1, 4), min_size=0, max_size=3).map(tuple), min_size=1, max_size=4)
STEPS = 3


@st.composite
def problem(draw):
    """Random shapes, parameters, and ``STEPS`` gradient lists and losses, all finite float32."""
    shapes = draw(SHAPES)

    def tensors():
        return [torch.from_numpy(draw(hnp.arrays(np.float32, s, elements=VALUES))) for s in shapes]

    params = tensors()
    grads = [tensors() for _ in range(STEPS)]
    losses = [torch.tensor(draw(st.floats(0, 2.0**100, width=32))) for _ in range(STEPS)]
    return params, grads, losses


def _finite(ts):
    return all(bool(torch.isfinite(t).all()) for t in ts)


def _run(opt, params, grads, losses, check=None):
    state = opt.init(params)
    for t, (g, loss) in enumerate(zip(grads, losses)):
        updates, state = opt.update(g, state, params, loss=loss)
        assert [u.shape for u in updates] == [p.shape for p in params]
        assert _finite(updates), (type(opt).__name__, t)
        if check is not None:
            check(t, updates, state, loss)
        params = [p + u for p, u in zip(params, updates)]
        params = [torch.nan_to_num(p, posinf=2.0**50, neginf=-2.0**50) for p in params]  # keep the inputs finite
    return params


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
@SETTINGS
@given(data=problem(), lr=st.floats(1e-6, 1.0))
def test_hand_coded_optimizers_finite_in_finite_out(name, data, lr):
    params, grads, losses = data
    with torch.no_grad():
        _run(OPTIMIZERS[name](lr=lr), params, grads, losses)


def _randomize(net, scale, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return net


@pytest.mark.parametrize("cls", [CoordLSTM, CoordMLP])
@SETTINGS
@given(data=problem(), scale=st.floats(0.0, 3.0), seed=st.integers(0, 2**31 - 1),
       lr_mode=st.sampled_from(["global", "per_tensor"]), lr_bound=st.floats(1.5, 100.0),
       with_val=st.booleans())
def test_meta_networks_finite_updates_bounded_decisions(cls, data, scale, seed, lr_mode, lr_bound, with_val):
    params, grads, losses = data
    net = _randomize(cls(hidden=6, init_zero=False, lr_mode=lr_mode, lr_bound=lr_bound), scale, seed)
    ctrl = [net.init_control()]
    if cls is CoordLSTM:
        bound = net.output_scale * float(net.out.weight.detach().abs().sum() + net.out.bias.detach().abs().sum())
    tol = 1 + 1e-6  # exp(log(b) * tanh(z)) rounds at tanh(z) = +-1

    def check(t, updates, state, loss):
        if cls is CoordLSTM:
            assert max(float(u.abs().max()) for u in updates) <= bound * tol
        gnorm = torch.linalg.vector_norm(torch.cat([g.reshape(-1) for g in grads[t]]))
        obs = Observation(t, 10, loss, loss * 0.5 if with_val else None, gnorm, state, False)
        decision, ctrl[0] = net.decide(obs, ctrl[0])
        scales = decision.lr_scale if lr_mode == "per_tensor" else [decision.lr_scale]
        assert len(scales) == (len(params) if lr_mode == "per_tensor" else 1)
        for s in scales:
            s = float(s)
            assert 1 / lr_bound / tol <= s <= lr_bound * tol, (s, lr_bound)
        p = float(decision.stop_prob)
        assert 0.0 <= p <= 1.0, p

    with torch.no_grad():
        _run(net, params, grads, losses, check)
