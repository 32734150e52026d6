"""The "mean_log_val" meta-loss (issue #24): the whole truncation's train and validation losses on a log scale, weighed
alike, so that meta-training rewards generalisation and not only the last truncation's train loss."""
import pytest
import torch

from learned_opt.meta import MetaConfig
from learned_opt.meta.config import VAL_LOSSES
from learned_opt.meta.losses import new_run, truncation_loss
from learned_opt.optim import get_optimizer
from learned_opt.tasks.suite import suite_family
from learned_opt.unroll import unroll


def _truncation(val_every):
    opt = get_optimizer("adam", lr=1e-2)
    run = new_run(suite_family("wine_mlp"), 0, opt, None, horizon=10, loss_ceiling=10.0)
    res = unroll(run.task, opt, None, steps=5, generator=run.gen, params=run.params, opt_state=run.opt_state,
                 start_step=0, horizon=10, val_every=val_every)
    return res, run


def test_mean_log_val_weighs_train_and_validation_logs_alike():
    res, run = _truncation(1)
    got = truncation_loss("mean_log_val", res, run)
    rows = torch.stack([torch.minimum(r, run.ceiling) for r in res.problem_losses[1:]])
    vals = torch.stack([v for v in res.val_losses[1:] if v is not None])
    want = 0.5 * torch.log(rows.clamp_min(1e-6)).mean() + 0.5 * torch.log(vals.clamp_min(1e-6)).mean()
    assert float(got) == pytest.approx(float(want), rel=1e-6)
    assert float(got) != pytest.approx(float(truncation_loss("mean_log", res, run)), rel=1e-3)  # val enters


def test_mean_log_val_counts_losses_below_the_floor_as_the_floor():
    """Below META_LOSS_FLOOR (1e-6, the evaluation's verdict floor) a lower loss earns nothing and carries no
    gradient: a solved task cannot outweigh a diverging one."""
    from learned_opt.meta.losses import META_LOSS_FLOOR

    res, run = _truncation(1)
    tiny = [r.detach() * 0 + 1e-9 for r in res.problem_losses]
    tinier = [r.detach() * 0 + 1e-12 for r in res.problem_losses]
    vals = [None if v is None else v.detach() * 0 + 1e-9 for v in res.val_losses]
    a = truncation_loss("mean_log_val", type(res)(**{**vars(res), "problem_losses": tiny, "val_losses": vals}), run)
    b = truncation_loss("mean_log_val", type(res)(**{**vars(res), "problem_losses": tinier, "val_losses": vals}), run)
    assert META_LOSS_FLOOR == 1e-6 and float(a) == float(b) == pytest.approx(float(torch.log(torch.tensor(1e-6))))


def test_mean_log_val_needs_validation_losses_and_turns_them_on():
    res, run = _truncation(0)
    with pytest.raises(ValueError, match="mean_log_val"):
        truncation_loss("mean_log_val", res, run)
    assert "mean_log_val" in VAL_LOSSES  # the trainer runs its inner loops with val_every=1 for it
    MetaConfig(meta_loss="mean_log_val").validate()
