"""The guarded meta-update of one truncation, the half of :class:`~learned_opt.meta.trainer.MetaTrainer` that
runs every meta-step: one truncation of every inner run, the estimator's meta-gradient
(:mod:`learned_opt.meta.estimator`), the all-reduce over ranks, global-norm clipping and our own Adam on the
meta-weights, with guards that skip (and count) a step whose loss, meta-gradient or update is not finite.
"""
from __future__ import annotations

import warnings
from typing import Any, Dict, List, Optional, Sequence

import torch
from torch import Tensor

from ..unroll import UnrollResult, unroll
from .config import VAL_LOSSES, meta_lr_factor
from .losses import InnerRun, advance


def _grad_norm(grads: Sequence[Tensor]) -> Tensor:
    """Global L2 norm of the meta-gradient, accumulated in float64."""
    return torch.sqrt(sum((g.double() ** 2).sum() for g in grads))


def _diagnostics(results: Sequence[UnrollResult]) -> Dict[str, float]:
    """The step's inner diagnostics: mean LR multiplier and stop probability, mean final train loss."""
    lr = [r.records["lr_scale"] for r in results]
    sp = [r.records["stop_prob"] for r in results]
    return {"lr_scale_mean": float(sum(map(sum, lr)) / max(1, sum(map(len, lr)))),
            "stop_prob_mean": float(sum(map(sum, sp)) / max(1, sum(map(len, sp)))),
            "inner_loss": float(sum(r.records["train_loss"][-1] for r in results) / len(results))}


class MetaUpdate:
    """The meta-step of :class:`~learned_opt.meta.trainer.MetaTrainer`, which sets the state it works on: ``cfg``,
    ``net``, ``optimizer``, ``dist``, ``estimator``, ``meta_params``, ``meta_opt``, ``meta_state``, ``signal``,
    ``skipped``, ``meta_step`` and ``iteration``."""

    def _controller(self):
        """The controller of the inner runs: ``net`` itself (a learned controller beside a fixed optimizer), its
        decision heads (``control='learned'``) or none."""
        if self.optimizer is not None:
            return self.net
        return self.net.as_controller() if self.cfg.control == "learned" else None

    def _inner_optimizer(self):
        """The optimizer of the inner runs: ``net``, or the fixed one whose controller ``net`` is."""
        return self.net if self.optimizer is None else self.optimizer

    def _unroll_run(self, run: InnerRun, length: int, ctrl, differentiable: bool) -> UnrollResult:
        """One truncation of ``run`` under the current meta-weights (the run itself is not changed)."""
        cfg = self.cfg
        return unroll(run.task, self._inner_optimizer(), ctrl, steps=length, generator=run.gen, params=run.params,
                      opt_state=run.opt_state, ctrl_state=run.ctrl_state, start_step=run.step,
                      horizon=run.horizon, differentiable=differentiable, second_order=cfg.second_order,
                      val_every=1 if cfg.meta_loss in VAL_LOSSES else 0)

    def meta_step_on(self, runs: List[InnerRun], length: int) -> Dict[str, Any]:
        """One truncation on every run, one guarded meta-update; returns the step's log record."""
        ctrl = self._controller()
        record: Dict[str, Any] = {"meta_step": self.meta_step, "iteration": self.iteration, "skipped": 0}
        grads, pairs, results, extra = self.estimator.gradient(runs, length, ctrl, self.meta_step)
        record.update(extra)
        if self.estimator.population and self.dist is None:  # with ranks, the sums are divided after the all-reduce
            grads = [g / pairs for g in grads] if pairs else None
        if grads is not None:
            gnorm = _grad_norm(grads)
            record["meta_grad_norm"] = float(gnorm)
            if not torch.isfinite(gnorm):
                grads = None
        diagnostics = _diagnostics(results)
        record.update(diagnostics)
        if self.dist is None:
            self._stop = self.signal is not None
        else:
            grads = self._reduce_over_ranks(grads, pairs, record, diagnostics)
            if grads is not None:
                gnorm = _grad_norm(grads)
                record["meta_grad_norm"] = float(gnorm)
        if grads is None:
            self._skip(record, "non-finite inner loss or meta-gradient")
        else:
            self._apply(grads, gnorm, record)
        for run, res in zip(runs, results):
            advance(run, res)
        self.meta_step += 1
        return record

    def _apply(self, grads: List[Tensor], gnorm: Tensor, record: Dict[str, Any]) -> None:
        """Clip the meta-gradient to ``clip_norm`` and update the meta-weights at the iteration's meta-learning rate
        (:func:`~learned_opt.meta.config.meta_lr_factor`; Adam's update is linear in its rate), unless the update is
        non-finite."""
        factor = min(1.0, self.cfg.clip_norm / (float(gnorm) + 1e-12))
        grads = [g * factor for g in grads]
        updates, new_state = self.meta_opt.update(grads, self.meta_state, [p.detach() for p in self.meta_params])
        scale = meta_lr_factor(self.cfg, self.iteration)
        record["meta_lr"] = self.cfg.meta_lr * scale
        if scale != 1.0:
            updates = [u * scale for u in updates]
        if all(torch.isfinite(u).all() for u in updates):
            with torch.no_grad():
                for p, u in zip(self.meta_params, updates):
                    p.add_(u)
            self.meta_state = new_state
        else:  # never let the meta-weights become non-finite
            self._skip(record, "non-finite meta-update")

    def _reduce_over_ranks(self, grads: Optional[List[Tensor]], pairs: int, record: Dict[str, Any],
                           diagnostics: Dict[str, float]) -> Optional[List[Tensor]]:
        """The step's one all-reduce: the meta-gradient over the ranks (``None`` unless usable), the loss and the
        diagnostics as means over the ranks (into ``record``), and whether any rank received a signal."""
        # Always reached, on every rank: the one collective of the step is never behind a condition. It also
        # carries whether any rank received a signal, so that all ranks stop at the same meta-step.
        if grads is None:
            self._dropped = getattr(self, "_dropped", 0) + 1
            if self._dropped & (self._dropped - 1) == 0:  # rate-limited, as in _warn_skipped
                warnings.warn(f"meta-step {self.meta_step}, rank {self.dist.rank}: non-finite inner loss or "
                              f"meta-gradient; this rank's contribution is dropped ({self._dropped} times "
                              f"so far)")
        population = self.estimator.population
        grads, mean_loss, finite, means = self.dist.reduce_meta_gradient(
            grads, record["meta_loss"], self.meta_params,
            extras=[*diagnostics.values(), float(self.signal is not None),
                    *([float(pairs)] if population else [])])
        k = len(diagnostics)
        self._stop = means[k] > 0
        if population and grads is not None:
            # the mean over ranks of the summed estimates over the mean number of pairs: the estimate of the
            # whole population when every rank's sums are finite (a rank with a non-finite sum is left out)
            mean_pairs = means[k + 1] * self.dist.world_size / max(finite, 1)
            grads = [g / mean_pairs for g in grads] if mean_pairs > 0 and finite == self.dist.world_size \
                else None
        record.update(meta_loss=mean_loss, finite_ranks=finite, inner_loss_rank=diagnostics["inner_loss"])
        record.update(zip(diagnostics, means[:k]))  # the diagnostics too are means over the ranks
        return grads

    def _skip(self, record: Dict[str, Any], why: str) -> None:
        """Count a meta-step whose update is not applied, in ``record`` and in a rate-limited warning."""
        self.skipped += 1
        record.update(skipped=1, skipped_total=self.skipped)
        self._warn_skipped(why)

    def _warn_skipped(self, why: str) -> None:
        # at 1, 2, 4, 8, ... skipped steps: a run of non-finite steps warns a handful of times, not every step
        n = self.skipped
        if n & (n - 1) == 0:
            warnings.warn(f"meta-step {self.meta_step}: {why}; update skipped ({n} skipped so far; next warning "
                          f"at {2 * n})")
