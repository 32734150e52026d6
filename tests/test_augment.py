"""Tests for task augmentation by reparametrisation (``learned_opt.tasks.augment``)."""
from __future__ import annotations

import math

import pytest
import torch

from learned_opt.optim import get_optimizer
from learned_opt.tasks import DigitsFamily
from learned_opt.tasks.augment import ReparamFamily, Reparametrized
from learned_opt.tasks.base import generator
from learned_opt.unroll import unroll


def test_reparametrized_task_computes_the_same_function():
    task = DigitsFamily()(generator(0))
    scales = [0.5, 2.0, 3.0, 0.25]
    rt = Reparametrized(task, scales)
    w = task.init(generator(1))
    u = rt.init(generator(1))
    for c, wi, ui in zip(scales, w, u):
        torch.testing.assert_close(ui * c, wi)
    batch = task.sample_batch(generator(2))
    torch.testing.assert_close(rt.loss(u, batch), task.loss(w, batch))
    assert rt.accuracy(u) == task.accuracy(w)


def test_sgd_on_reparametrized_task_is_sgd_with_rate_times_scale_squared():
    # dL/du = c dL/dw, so an SGD step of lr on u moves w by lr * c^2 * dL/dw
    task = DigitsFamily()(generator(0))
    scales = [0.5, 2.0, 1.5, 0.8]
    rt = Reparametrized(task, scales)
    u = [p.requires_grad_() for p in rt.init(generator(1))]
    w = [p.requires_grad_() for p in task.init(generator(1))]
    batch = task.sample_batch(generator(2))
    gu = torch.autograd.grad(rt.loss(u, batch), u)
    gw = torch.autograd.grad(task.loss(w, batch), w)
    lr = 0.1
    for c, ui, gui, wi, gwi in zip(scales, u, gu, w, gw):
        torch.testing.assert_close(c * (ui - lr * gui), wi - lr * c * c * gwi)


def test_adam_steps_scale_with_the_reparametrisation():
    # Adam is invariant to gradient scale, so on u it moves every w-coordinate c times as far as on w (eps tiny:
    # otherwise it breaks the invariance for the near-zero gradients of always-blank pixels)
    task = DigitsFamily()(generator(0))
    scales = [3.0, 1.0, 1.0, 1.0 / 3.0]
    rt = Reparametrized(task, scales)
    r_plain = unroll(task, get_optimizer("adam", lr=1e-3, eps=1e-30), steps=1, generator=generator(5))
    r_aug = unroll(rt, get_optimizer("adam", lr=1e-3, eps=1e-30), steps=1, generator=generator(5))
    w0 = task.init(generator(5))
    for c, w_init, w_plain, u_aug in zip(scales, w0, r_plain.params, r_aug.params):
        torch.testing.assert_close(u_aug * c - w_init, c * (w_plain - w_init), rtol=1e-3, atol=1e-6)


def test_reparam_family_draws_log_uniform_scales_deterministically():
    fam = ReparamFamily(DigitsFamily(), max_scale=3.0)
    a, b = fam(generator(7)), fam(generator(7))
    assert a.scales == b.scales and len(a.scales) == 4
    all_scales = [c for s in range(30) for c in fam(generator(s)).scales]
    assert all(1 / 3.0 <= c <= 3.0 for c in all_scales)
    logs = [math.log(c) for c in all_scales]
    assert min(logs) < -0.6 and max(logs) > 0.6  # spread over the range, not stuck at 1
    assert ReparamFamily(DigitsFamily(), max_scale=1.0)(generator(0)).scales == [1.0] * 4


@pytest.mark.parametrize("bad", [0.5, math.inf, math.nan])
def test_reparam_family_rejects_bad_scale(bad):
    with pytest.raises(ValueError, match="max_scale"):
        ReparamFamily(DigitsFamily(), max_scale=bad)


def test_reparametrized_rejects_wrong_number_of_scales():
    task = DigitsFamily()(generator(0))
    with pytest.raises(ValueError, match="4 parameter tensors but 2 scales"):
        Reparametrized(task, [1.0, 2.0]).init(generator(0))
    with pytest.raises(ValueError, match="finite and > 0"):
        Reparametrized(task, [1.0, -2.0, 1.0, 1.0])


def test_shared_scale_moves_all_tensors_together():
    fam = ReparamFamily(DigitsFamily(), max_scale=1.0, shared_scale=4.0)
    draws = [fam(generator(s)).scales for s in range(20)]
    for scales in draws:  # one factor for every tensor
        assert max(scales) == pytest.approx(min(scales))
        assert 0.25 <= scales[0] <= 4.0
    assert min(d[0] for d in draws) < 0.6 and max(d[0] for d in draws) > 1.6
    both = [c for s in range(20) for c in ReparamFamily(DigitsFamily(), 2.0, 4.0)(generator(s)).scales]
    assert all(1 / 8.0 <= c <= 8.0 for c in both)
    with pytest.raises(ValueError, match="shared_scale"):
        ReparamFamily(DigitsFamily(), shared_scale=0.9)
