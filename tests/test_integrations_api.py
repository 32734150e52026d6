"""The loss hand-over API without any training framework installed: ``ProtocolOptimizer.set_loss`` and
:mod:`learned_opt.integrations` (``step_with_loss``, ``unwrap_optimizer``, lazy imports). The tests with the real
HF Trainer, accelerate, Lightning and timm are in tests/integrations/ (``make test-integrations``)."""
import subprocess
import sys
import types
import warnings

import pytest
import torch
from torch import nn

import learned_opt
from learned_opt import integrations


def record_losses(opt):
    """The loss each step() of ``opt`` hands its first group's controller (None: none), recorded in a list."""
    seen = []
    inner = opt._step_group

    def step_group(gi, group, idx, loss, val_loss):
        if gi == 0:
            seen.append(None if loss is None else float(loss))
        return inner(gi, group, idx, loss, val_loss)

    opt._step_group = step_group
    return seen


def _setup(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))
    x, y = torch.randn(64, 8), torch.randint(0, 3, (64,))
    return model, x, y


def _loss(model, x, y):
    return nn.functional.cross_entropy(model(x), y)


def test_set_loss_reaches_the_next_step_only_and_its_precedence():
    """set_loss hands the next step its loss (as step(loss=) would), is consumed by that step, wins over a
    closure's result (also when set inside the closure), and loses to an explicit loss=; None clears it."""
    model, x, y = _setup()
    opt = learned_opt.LearnedOptimizer(model.parameters(), total_steps=20)
    seen = record_losses(opt)

    def closure():
        opt.zero_grad()
        loss = _loss(model, x, y)
        loss.backward()
        return loss

    closure()
    opt.set_loss(2.5)
    opt.step()                      # set_loss's
    closure()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.step()                  # consumed: nothing this time, and the warning names the helpers
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "set_loss" in message and "feed_loss(trainer)" in message and "step_with_loss(" in message
    opt.set_loss(3.5)
    opt.step(closure)               # set_loss wins over the closure's result
    opt.set_loss(4.5)
    closure()
    opt.step(loss=5.5)              # an explicit loss= wins over set_loss ...
    closure()
    opt.step()                      # ... which is consumed all the same
    opt.set_loss(6.5)
    opt.set_loss(None)
    closure()
    opt.step()                      # None cleared it

    def setting_closure():
        loss = closure()
        opt.set_loss(7.5)           # as Lightning's callbacks do, inside optimizer.step
        return loss

    opt.step(setting_closure)
    result = opt.step(closure)      # no set_loss: the closure's own loss
    assert seen == [2.5, None, 3.5, 5.5, None, None, 7.5, float(result.detach())]


def test_set_loss_steps_bitwise_as_step_with_loss():
    """Ten steps with set_loss(loss); step() move the parameters bit for bit as step(loss=loss) does."""
    finals = []
    for use_set_loss in (False, True):
        model, x, y = _setup(1)
        opt = learned_opt.LearnedOptimizer(model.parameters(), total_steps=10)
        for _ in range(10):
            opt.zero_grad()
            loss = _loss(model, x, y)
            loss.backward()
            if use_set_loss:
                opt.set_loss(loss)
                opt.step()
            else:
                opt.step(loss=loss)
        finals.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*finals))


class _Wrapper:
    """An accelerate-like wrapper: ``.optimizer`` inside, steps only when ``gradient_state.sync_gradients``."""

    def __init__(self, optimizer):
        self.optimizer = optimizer
        self.gradient_state = types.SimpleNamespace(sync_gradients=True)

    def step(self, closure=None):
        if self.gradient_state.sync_gradients:
            return self.optimizer.step(closure)
        return None


def test_step_with_loss_reaches_through_wrappers_and_averages_accumulated_micro_batches():
    """Through a wrapper (two levels: ``.optimizer`` then ``._optimizer``) the learned optimizer gets the loss;
    under accumulation (sync_gradients false until the last micro-batch) the mean of the micro-batch losses."""
    model, x, y = _setup()
    opt = learned_opt.LearnedOptimizer(model.parameters(), total_steps=20)
    seen = record_losses(opt)
    outer = _Wrapper(types.SimpleNamespace(_optimizer=opt))
    outer.optimizer.step = opt.step
    assert integrations.unwrap_optimizer(outer) is opt and integrations.unwrap_optimizer(opt) is opt
    assert integrations.unwrap_optimizer(torch.optim.SGD(model.parameters(), lr=0.1)) is None
    _loss(model, x, y).backward()
    integrations.step_with_loss(outer, torch.tensor(1.25))
    for i, value in enumerate([1.0, 2.0, 4.5]):
        outer.gradient_state.sync_gradients = i == 2
        integrations.step_with_loss(outer, torch.tensor(value))
    assert seen == [1.25, 2.5]


def test_step_with_loss_steps_a_plain_optimizer():
    """An optimizer without a learned one inside just steps (the same loop runs with torch.optim.SGD)."""
    model, x, y = _setup()
    sgd = torch.optim.SGD(model.parameters(), lr=0.5)
    before = [p.detach().clone() for p in model.parameters()]
    loss = _loss(model, x, y)
    loss.backward()
    integrations.step_with_loss(sgd, loss)
    expected = [b - 0.5 * p.grad for b, p in zip(before, model.parameters())]
    assert all(torch.allclose(p, e) for p, e in zip(model.parameters(), expected))


def test_importing_the_package_and_integrations_imports_no_framework():
    """``import learned_opt.integrations`` (and a LearnedOptimizer step) pulls in none of the frameworks."""
    code = ("import sys, learned_opt, learned_opt.integrations, torch\n"
            "opt = learned_opt.LearnedOptimizer([torch.nn.Parameter(torch.ones(3))])\n"
            "bad = [m for m in ('transformers', 'accelerate', 'lightning', 'pytorch_lightning', 'timm') "
            "if m in sys.modules]\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_unknown_attribute_of_integrations_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        integrations.Nope
