"""The meta-learning rate's cosine decay (``MetaConfig.meta_lr_decay_iterations``): the schedule's values, the
meta-updates it scales, its resumption across a stop, the config checks; and the two v2b ablation arms: v2c (the
decay) and v2d (a lower step ceiling)."""
from __future__ import annotations

import math
import os
import sys

import pytest
import torch

from learned_opt.meta import MetaConfig, MetaTrainer
from learned_opt.meta.config import meta_lr_factor
from learned_opt.optim.learned import CoordMLP
from learned_opt.tasks import QuadraticFamily
from tests.helpers import quiet

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "experiments"))


def test_factor_is_a_cosine_from_one_to_the_floor_then_flat():
    cfg = MetaConfig(meta_lr_decay_iterations=8, meta_lr_min_ratio=0.2)
    assert meta_lr_factor(cfg, 0) == 1.0
    assert meta_lr_factor(cfg, 4) == pytest.approx(0.6)  # half-way: the mean of 1 and the floor
    assert meta_lr_factor(cfg, 2) == pytest.approx(0.2 + 0.8 * (1 + math.cos(math.pi / 4)) / 2)
    assert meta_lr_factor(cfg, 8) == pytest.approx(0.2) and meta_lr_factor(cfg, 100) == pytest.approx(0.2)
    values = [meta_lr_factor(cfg, i) for i in range(10)]
    assert all(a > b for a, b in zip(values[:8], values[1:9]))  # strictly decreasing until the floor
    assert all(meta_lr_factor(MetaConfig(), i) == 1.0 for i in (0, 5, 1000))  # default: constant


class Recording(MetaTrainer):
    """Records, per meta-step, the iteration, Adam's raw update and the change of the meta-weights."""

    def _apply(self, grads, gnorm, record):
        before = [p.detach().clone() for p in self.meta_params]
        raw, adam = [], self.meta_opt

        class Spy:
            def update(self, *args, **kwargs):
                out = adam.update(*args, **kwargs)
                raw.append([u.clone() for u in out[0]])
                return out

        self.meta_opt = Spy()
        try:
            super()._apply(grads, gnorm, record)
        finally:
            self.meta_opt = adam
        moved = [p.detach() - b for p, b in zip(self.meta_params, before)]
        self.steps.append((self.iteration, raw[0], moved, record["meta_lr"]))


def test_meta_updates_are_adams_scaled_by_the_iterations_factor():
    torch.manual_seed(0)
    cfg = MetaConfig(horizon=6, truncation=3, iterations=4, meta_lr=0.01, meta_lr_decay_iterations=3,
                     meta_lr_min_ratio=0.1, seed=0)
    trainer = Recording(CoordMLP(hidden=4), QuadraticFamily(dim=3, num_problems=4), cfg)
    trainer.steps = []
    quiet(trainer.run)
    assert len(trainer.steps) == 8 and {it for it, *_ in trainer.steps} == {0, 1, 2, 3}
    for it, raw, moved, logged in trainer.steps:
        scale = meta_lr_factor(cfg, it)
        assert logged == pytest.approx(0.01 * scale)
        for r, m in zip(raw, moved):
            torch.testing.assert_close(m, r * scale, rtol=1e-4, atol=1e-9)
    # the floor is reached: the last iteration's steps are a tenth of Adam's
    it, raw, moved, _ = trainer.steps[-1]
    assert it == 3 and meta_lr_factor(cfg, it) == pytest.approx(0.1)
    assert sum(float(r.abs().sum()) for r in raw) > 0


def test_a_stopped_and_resumed_decay_equals_the_straight_run(tmp_path):
    """The factor reads the trainer's iteration, which the checkpoint restores: stopping at a compute budget and
    resuming follows the one schedule (bitwise)."""
    family = QuadraticFamily(dim=3, num_problems=4)
    base = dict(horizon=6, truncation=3, meta_lr=0.01, meta_lr_decay_iterations=4, meta_lr_min_ratio=0.1, seed=1)

    def net():
        torch.manual_seed(0)
        return CoordMLP(hidden=4)

    straight = net()
    quiet(MetaTrainer(straight, family, MetaConfig(iterations=4, **base), run_dir=str(tmp_path / "a")).run)
    stopped = net()
    quiet(MetaTrainer(stopped, family, MetaConfig(iterations=2, **base), run_dir=str(tmp_path / "b")).run)
    resumed = CoordMLP(hidden=4)
    trainer = MetaTrainer(resumed, family, MetaConfig(iterations=4, **base), run_dir=str(tmp_path / "b"))
    assert trainer.resume() and trainer.iteration == 2
    quiet(trainer.run)
    for p, q in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("changes, message", [
    (dict(meta_lr_decay_iterations=-1), "meta_lr_decay_iterations"),
    (dict(meta_lr_decay_iterations=2.5), "meta_lr_decay_iterations"),
    (dict(meta_lr_decay_iterations=True), "meta_lr_decay_iterations"),
    (dict(meta_lr_min_ratio=1.5), "meta_lr_min_ratio"),
    (dict(meta_lr_min_ratio=-0.1), "meta_lr_min_ratio"),
    (dict(meta_lr_min_ratio=math.nan), "meta_lr_min_ratio"),
])
def test_schedule_settings_are_checked(changes, message):
    with pytest.raises(ValueError, match=message):
        MetaConfig(**changes).validate()


def test_resume_refuses_another_schedule(tmp_path):
    family = QuadraticFamily(dim=3, num_problems=4)
    base = dict(horizon=6, truncation=3, iterations=1, meta_lr=0.01, seed=1)
    quiet(MetaTrainer(CoordMLP(hidden=4), family, MetaConfig(meta_lr_decay_iterations=4, **base),
                      run_dir=str(tmp_path)).run)
    other = MetaTrainer(CoordMLP(hidden=4), family, MetaConfig(meta_lr_decay_iterations=8, **base),
                        run_dir=str(tmp_path))
    with pytest.raises(ValueError, match="meta_lr_decay_iterations"):
        other.resume()


def test_v2c_preset_is_v2b_with_the_decay_only():
    """--preset v2c is an ablation arm of v2b: the same recipe with the meta-learning rate decayed over its
    iterations, written to its own directory whose checkpoints pass .gitignore (a seed resumes across sessions)."""
    import subprocess
    from dataclasses import asdict

    import general_train
    from common import parse_config

    v2c = parse_config(general_train.Config, general_train.PRESETS, ["--preset", "v2c"])
    arm = parse_config(general_train.Config, general_train.PRESETS,
                       ["--preset", "v2b", "--meta_lr_decay_iterations", "250", "--meta_lr_min_ratio", "0.1",
                        "--out_dir", "results/general/train_v2c"])
    assert asdict(v2c) == asdict(arm)
    meta = general_train.meta_config(v2c, 0)
    assert (meta.meta_lr_decay_iterations, meta.meta_lr_min_ratio) == (v2c.iterations, 0.1)
    root = os.path.join(os.path.dirname(__file__), "..")
    ignored = subprocess.run(["git", "check-ignore", "-q", "results/general/train_v2c/seed0/checkpoint.pt"],
                             cwd=root).returncode
    assert ignored == 1  # 1: not ignored


def test_v2d_preset_is_v2b_with_a_lower_step_ceiling_only():
    """--preset v2d is the other ablation arm: v2b with base rate 1e-3 and multiplier bound 3 (the largest step
    3e-3 in Adam's units), in its own committed directory."""
    import subprocess
    from dataclasses import asdict

    import general_train
    from common import parse_config

    v2d = parse_config(general_train.Config, general_train.PRESETS, ["--preset", "v2d"])
    arm = parse_config(general_train.Config, general_train.PRESETS,
                       ["--preset", "v2b", "--init_lr", "1e-3", "--lr_bound", "3", "--out_dir",
                        "results/general/train_v2d"])
    assert asdict(v2d) == asdict(arm)
    net = general_train.new_net(v2d, 0)
    assert net.config["lr_bound"] == 3.0 and net.config["init_lr"] == 1e-3
    root = os.path.join(os.path.dirname(__file__), "..")
    ignored = subprocess.run(["git", "check-ignore", "-q", "results/general/train_v2d/seed0/checkpoint.pt"],
                             cwd=root).returncode
    assert ignored == 1  # 1: not ignored


def test_v2e_preset_is_the_shipped_v2d_with_the_decay_only():
    """--preset v2e is a candidate against the shipped v2d: v2d plus v2c's decayed meta-learning rate."""
    from dataclasses import asdict

    import general_train
    from common import parse_config

    v2e = parse_config(general_train.Config, general_train.PRESETS, ["--preset", "v2e"])
    arm = parse_config(general_train.Config, general_train.PRESETS,
                       ["--preset", "v2d", "--meta_lr_decay_iterations", "250", "--meta_lr_min_ratio", "0.1",
                        "--out_dir", "results/general/train_v2e"])
    assert asdict(v2e) == asdict(arm)
