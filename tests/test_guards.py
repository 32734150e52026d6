"""Guards on meta-training invariants that no single module's tests see.

Truncated backpropagation (Andrychowicz et al. 2016) cuts the *graph* at every truncation boundary, never the
inner run: the learner's parameters, the optimizer's state (LSTM state, moments, step count), the controller's
state and the step counter all carry over. So with the meta-update made a no-op, meta-training over truncations
of 2 and 3 steps must follow exactly the forward trajectory of one truncation of 5. Each test also resets one
piece of state at the boundary and checks that the trajectory then differs, so the guard proves it can fail.

Both a deterministic quadratic and a minibatch task (digits) are checked: the evaluation that closes a
truncation only peeks at the run's data stream, so the next truncation's first step draws the same batch.
"""
from __future__ import annotations

import pytest
import torch

import learned_opt.meta.update as meta
from learned_opt.meta import MetaConfig, MetaTrainer
from learned_opt.optim.learned import CoordLSTM
from learned_opt.tasks import DigitsFamily, QuadraticFamily

HORIZON = 5
FAMILIES = {"quadratic": QuadraticFamily(dim=3, num_problems=2),
            "digits (minibatches)": DigitsFamily(hidden=(8,), batch_size=16)}


class NoMetaUpdate:
    """A meta-optimizer whose updates are all zero: the meta-weights stay as they are."""

    def update(self, grads, state, params):
        """Zero updates, unchanged state."""
        return [torch.zeros_like(p) for p in params], state


def make_net():
    """An Adam-based LSTM with non-zero updates and an LR head off zero, so every carried state shows."""
    torch.manual_seed(0)
    net = CoordLSTM(hidden=8, base="adam", base_lr=0.05, output_scale=0.3, init_zero=False)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in net.heads.lr.parameters():  # the last layer starts at zero: the LR would ignore its features
            p.add_(0.5 * torch.randn(p.shape, generator=g))
    return net


# Corruptions applied to every run at every truncation boundary (the negative checks).
RESETS = {
    "opt_state": lambda trainer, run: setattr(run, "opt_state", trainer.net.init([p.detach() for p in run.params])),
    "ctrl_state": lambda trainer, run: setattr(run, "ctrl_state", trainer.net.as_controller().init()),
    "step": lambda trainer, run: setattr(run, "step", 0),
}


def trajectories(monkeypatch, net, lengths=None, truncation=HORIZON, reset=None, family=FAMILIES["quadratic"]):
    """Per-run inner train losses at steps 0..HORIZON of one meta-iteration, with no-op meta-updates.

    ``lengths`` drives ``meta_step_on`` over those truncations (as ``MetaTrainer.run`` does); without it,
    ``MetaTrainer.run`` itself runs one iteration with ``truncation``. ``reset(trainer, run)`` corrupts each run
    between truncations. Also returns the truncation lengths used and the unrolls' step labels."""
    cfg = MetaConfig(horizon=HORIZON, truncation=truncation, iterations=1, tasks_per_step=2, control="learned",
                     seed=3)
    trainer = MetaTrainer(net, family, cfg)
    trainer.meta_opt = NoMetaUpdate()
    before = [p.detach().clone() for p in net.parameters()]
    calls = []  # (task, start_step, step labels, losses) per unroll
    real_unroll = meta.unroll

    def spy(task, *args, **kwargs):
        res = real_unroll(task, *args, **kwargs)
        calls.append((task, kwargs["start_step"], list(res.records["step"]), list(res.records["train_loss"])))
        return res

    monkeypatch.setattr(meta, "unroll", spy)
    if lengths is None:
        trainer.run()
        used = list(trainer.history)
    else:
        runs = [trainer._new_run(HORIZON) for _ in range(cfg.tasks_per_step)]
        used = []
        for i, length in enumerate(lengths):
            if i and reset is not None:
                for run in runs:
                    reset(trainer, run)
            used.append(trainer.meta_step_on(runs, length))
    monkeypatch.setattr(meta, "unroll", real_unroll)
    assert all(r["skipped"] == 0 and r["meta_grad_norm"] > 0 for r in used)  # real meta-steps were taken
    for p, b in zip(net.parameters(), before):
        assert torch.equal(p.detach(), b)  # ... and changed nothing
    tasks = list(dict.fromkeys(task for task, *_ in calls))
    losses, labels, starts = [], [], []
    for task in tasks:
        mine = [c for c in calls if c[0] is task]
        starts.append([c[1] for c in mine])
        # each truncation's last row (the loss after its last update) is the next truncation's first row
        for a, b in zip(mine, mine[1:]):
            assert a[3][-1] == b[3][0], "the state handed to the next truncation is not the state reached"
        losses.append(sum((c[3][:-1] for c in mine), []) + mine[-1][3][-1:])
        labels.append(sum((c[2][:-1] for c in mine), []) + mine[-1][2][-1:])
    return torch.tensor(losses, dtype=torch.float64), labels, starts


@pytest.mark.parametrize("family", list(FAMILIES))
def test_truncations_of_2_and_3_follow_the_trajectory_of_one_truncation_of_5(monkeypatch, family):
    net = make_net()
    fam = FAMILIES[family]
    whole, labels, starts = trajectories(monkeypatch, net, lengths=[HORIZON], family=fam)
    assert labels == [list(range(HORIZON + 1))] * 2 and starts == [[0]] * 2
    assert bool((whole[:, -1] < whole[:, 0]).all())  # the learner is being trained, not sitting still
    split, labels, starts = trajectories(monkeypatch, net, lengths=[2, 3], family=fam)
    assert labels == [list(range(HORIZON + 1))] * 2 and starts == [[0, 2]] * 2
    torch.testing.assert_close(split, whole, rtol=1e-6, atol=0)
    # The guard can fail: resetting any carried state at the boundary changes the steps after it (and only those).
    for name, reset in RESETS.items():
        broken, _, _ = trajectories(monkeypatch, net, lengths=[2, 3], reset=reset, family=fam)
        assert torch.equal(broken[:, :3], split[:, :3]), name
        gap = ((broken[:, 3:] - whole[:, 3:]).abs() / whole[:, 3:].abs()).max().item()
        assert gap > 1e-3, (name, gap)


def test_meta_trainer_run_carries_every_state_across_its_truncation_schedule(monkeypatch):
    # MetaTrainer.run end to end: its own schedule for truncation 2 ([2, 2, 1]) against one truncation of 5.
    net = make_net()
    whole, _, starts = trajectories(monkeypatch, net, truncation=HORIZON)
    assert starts == [[0]] * 2
    split, labels, starts = trajectories(monkeypatch, net, truncation=2)
    assert starts == [[0, 2, 4]] * 2 and labels == [list(range(HORIZON + 1))] * 2
    torch.testing.assert_close(split, whole, rtol=1e-6, atol=0)
