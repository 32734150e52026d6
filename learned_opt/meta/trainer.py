"""Meta-training (Andrychowicz et al. 2016): a batch of sampled tasks per meta-iteration, horizon T cut into
truncations of K steps, one meta-update per truncation from the configured gradient estimator (TBPTT, ES or PES:
:mod:`learned_opt.meta.estimator`).

Added for robustness: our own Adam as the meta-optimizer with global gradient-norm clipping, guards against
non-finite losses and meta-gradients, a per-task loss ceiling, a curriculum over horizons (Chen et al. 2020),
random truncation offsets, held-out validation keeping the best meta-weights, atomic checkpoints with exact resume
(periodic by default, and on SIGINT / SIGTERM), a lock file that keeps a second process out of a run directory,
and JSONL / W&B logs. With a :class:`~learned_opt.distributed.DistContext` (``dist=``) every rank unrolls its own
tasks and the meta-gradients are averaged over the ranks every meta-step (see :mod:`learned_opt.distributed`).
"""
from __future__ import annotations

import contextlib
import copy
import math
import os
import signal
import threading
import time
from dataclasses import asdict
from typing import Any, Dict, Iterator, List, Optional

import numpy as np
import torch

from ..distributed import DistContext, rank_seed
from ..evaluate import evaluate, robust_mean, task_seed
from ..log import Logger
from ..optim.baselines import Adam
from ..optim.learned import kind_of
from ..tasks.base import generator
from .checkpoint import (CHECKPOINT, TRAINING_FORMAT, RunLock, opt_state_from_dict, opt_state_to_dict,
                         check_resumable, has_checkpoint, load_format, load_weights, save_checkpoint)
from .config import TRAIN_VAL_MARKS, VAL_LOSSES, MetaConfig
from .estimator import ESTIMATOR_TYPES
from .losses import InnerRun, new_run
from .update import MetaUpdate


class Interrupted(Exception):
    """Meta-training stopped by SIGINT or SIGTERM after writing a checkpoint; ``signum`` says which signal."""

    def __init__(self, signum: int, iteration: int, path: Optional[str]):
        self.signum = signum
        where = f"checkpoint of iteration {iteration} saved in {path}" if path else "no run directory to save in"
        super().__init__(f"interrupted by {signal.Signals(signum).name}; {where}")


@contextlib.contextmanager
def _signals_saved(trainer: "MetaTrainer") -> Iterator[bool]:
    """While inside, SIGINT and SIGTERM only set ``trainer.signal`` (a second one stops at once, unsaved).

    Yields whether the handlers are in place: only in the main thread, and only with a run directory to save
    in; elsewhere signals keep their usual effect.
    """
    if not trainer.checkpoint_path or threading.current_thread() is not threading.main_thread():
        yield False
        return

    def handler(signum, frame):
        if trainer.signal is not None:
            raise KeyboardInterrupt
        trainer.signal = signum

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield True
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def train_val_marks(horizon: int) -> tuple:
    """The evenly spaced checkpoints (``TRAIN_VAL_MARKS`` of them, the last at ``horizon``) of the
    ``mean_log_train_val`` selection metric."""
    return tuple(sorted({max(1, round(horizon * (i + 1) / TRAIN_VAL_MARKS)) for i in range(TRAIN_VAL_MARKS)}))


def validation_score(cfg: MetaConfig, family, optimizer, ctrl_fn, *, seed: Optional[int] = None,
                     stream: str = "select") -> float:
    """The score of ``optimizer`` (with the controllers ``ctrl_fn`` makes) on ``cfg.val_tasks`` held-out validation
    tasks of ``stream`` (drawn with ``seed``, default ``cfg.seed``), by ``cfg.val_metric`` (lower is better)."""
    horizon = cfg.val_horizon or cfg.horizon
    marks = train_val_marks(horizon) if cfg.val_metric == "mean_log_train_val" else ()
    # checkpoint selection has a validation stream of its own: the tasks that choose the meta-weights are
    # never the ones that tune the baselines or check a configuration
    res = evaluate(family, optimizer, ctrl_fn, num_tasks=cfg.val_tasks, steps=horizon,
                   split="val", seed=cfg.seed if seed is None else seed, stream=stream,
                   val_every=1 if cfg.meta_loss in VAL_LOSSES else 0, checkpoints=marks)
    if cfg.val_metric == "mean_log_train_val":  # the whole run, train and held-out loss alike
        with np.errstate(divide="ignore", invalid="ignore"):
            per = np.mean([0.5 * np.log(res.at[m]["train_loss"] + 1e-12) + 0.5 * np.log(res.at[m]["val_loss"] + 1e-12)
                           for m in marks], axis=0)
        return robust_mean(per)
    if cfg.val_metric == "val_at_stop":
        return robust_mean(res.val_at_stop)
    if cfg.val_metric == "mean_log_curve":  # every horizon up to val_horizon counts, not only the last
        with np.errstate(divide="ignore", invalid="ignore"):
            return robust_mean(np.log(res.curves[:, 1:] + 1e-12).mean(1))
    final = res.final()
    if cfg.val_metric == "mean_log_final":
        return robust_mean(torch.log(torch.as_tensor(final) + 1e-12).numpy())
    return robust_mean(final)


class MetaTrainer(MetaUpdate):
    """Meta-trains ``net`` on tasks from ``family``; ``run()`` returns the log of the run."""

    def __init__(self, net, family, config: MetaConfig, *, run_dir: Optional[str] = None,
                 logger: Optional[Logger] = None, progress: bool = False, dist: Optional[DistContext] = None,
                 optimizer=None, run_config: Optional[Dict[str, Any]] = None):
        config.validate()
        if optimizer is not None and config.control != "learned":
            raise ValueError("meta-training a controller for a fixed optimizer needs control='learned'")
        self.net, self.family, self.cfg = net, family, config
        # With ``optimizer`` (e.g. hand-coded Adam) the updates are fixed and ``net`` is a learned controller.
        self.optimizer = optimizer
        self.dist, self.run_dir = dist, run_dir
        self.is_main = dist is None or dist.is_main
        # Only rank 0 writes the log and the checkpoints; the other ranks log nowhere.
        self.logger = logger or Logger(os.path.join(run_dir, "metrics.jsonl") if run_dir and self.is_main
                                       else None)
        self.progress = progress and self.is_main
        self.meta_params = [p for p in net.parameters()]
        if dist is not None:  # every rank starts from rank 0's meta-weights
            dist.broadcast_parameters(self.meta_params)
        self.meta_opt = Adam(lr=config.meta_lr)
        self.meta_state = self.meta_opt.init([p.detach() for p in self.meta_params])
        # The truncation schedule is rank 0's, broadcast, so every rank makes the same number of meta-steps.
        # TBPTT: every rank draws its own tasks. ES / PES: every rank draws the same tasks (rank 0's, those of a
        # single process) and holds its share of the particles, so the population, not the number of ranks,
        # decides the result.
        kind = ESTIMATOR_TYPES[config.estimator]
        self.gen = generator(rank_seed(config.seed, dist.rank if dist is not None and not kind.population else 0))
        # the estimator of every meta-gradient (ES / PES with ranks: every rank holds a pair, or ValueError)
        self.estimator = kind(config, self.meta_params, self._unroll_run, dist)
        self.iteration = 0
        self.meta_step = 0
        self.skipped = 0
        self.best_score = math.inf
        self.best_state = copy.deepcopy(net.state_dict())
        self.train_seconds = 0.0  # wall seconds of meta-steps (validation excluded), summed over resumed parts
        self.train_cpu_seconds = 0.0  # their CPU seconds (what a loaded machine does not inflate); NaN: unrecorded
        self.history: List[Dict[str, Any]] = []  # this process's records only; metrics.jsonl holds the whole run
        # The caller's whole configuration (the CLI's task, meta-network, ...), kept in every checkpoint so that
        # a run can be resumed with its own settings even without its config.json.
        self.run_config = run_config
        self.signal: Optional[int] = None  # SIGINT / SIGTERM received during run()
        self._stop = False  # every rank agrees to stop at this meta-step

    # ------------------------------------------------------------------ checkpoints
    @property
    def checkpoint_path(self) -> Optional[str]:
        """Where the latest checkpoint lives (``None`` without a run directory)."""
        return os.path.join(self.run_dir, CHECKPOINT) if self.run_dir else None

    @property
    def world_size(self) -> int:
        """Number of ranks (1 without a process group)."""
        return self.dist.world_size if self.dist is not None else 1

    def state_dict(self) -> Dict[str, Any]:
        """Everything needed to resume exactly."""
        out = {"format": TRAINING_FORMAT, "kind": kind_of(self.net), "net_config": self.net.config,
               "config": asdict(self.cfg), "net": self.net.state_dict(),
               "meta_opt": opt_state_to_dict(self.meta_state), "generator": self.gen.get_state(),
               "iteration": self.iteration, "meta_step": self.meta_step, "skipped": self.skipped,
               "best_score": self.best_score, "best_state": self.best_state,
               "train_seconds": self.train_seconds, "train_cpu_seconds": self.train_cpu_seconds,
               "log_lines": self.logger.lines()}
        if self.dist is not None:
            out["world_size"] = self.world_size
        if self.run_config is not None:
            out["run_config"] = self.run_config
        return out

    def save(self, state: Optional[Dict[str, Any]] = None) -> None:
        """Write a checkpoint of ``state`` (default: now) atomically (no-op without a run directory).

        Distributed: a collective. Every rank sends its task generator to the checkpoint, rank 0 writes, and all
        ranks learn whether the write worked, so a failed save stops every rank with the same error.
        """
        if not self.checkpoint_path:
            return
        state = state if state is not None else self.state_dict()
        self._last_save = time.monotonic()
        if self.dist is None:
            save_checkpoint(self.checkpoint_path, state)
            return
        states = self.dist.gather_states(state["generator"])
        error = None
        if self.is_main:
            try:
                save_checkpoint(self.checkpoint_path, {**state, "generators": states})
            except RuntimeError as e:
                error = e
        if not self.dist.all_ok(error is None):
            raise error or RuntimeError(f"could not save checkpoint {self.checkpoint_path} (rank 0 failed)")

    def resume(self) -> bool:
        """Restore from the run directory's checkpoint if one exists; returns whether it did.

        Raises ``ValueError`` (and changes nothing) when the checkpoint was written by another kind of network,
        another configuration of it, another number of ranks, or with other settings than ``self.cfg`` (only
        :data:`RESUMABLE` settings may change), or when it is already past ``cfg.iterations``.
        """
        path = self.checkpoint_path
        if not path or not has_checkpoint(self.run_dir):
            return False
        ck = load_format(path, TRAINING_FORMAT)
        check_resumable(ck, path, self.net, self.cfg, self.world_size)
        load_weights(self.net, ck["net"], f"checkpoint {path} does not fit this network")
        self.meta_state = opt_state_from_dict(ck["meta_opt"])
        self.gen.set_state(ck["generators"][self.dist.rank] if self.dist is not None else ck["generator"])
        self.iteration, self.meta_step, self.skipped = ck["iteration"], ck["meta_step"], ck["skipped"]
        self.best_score, self.best_state = ck["best_score"], ck["best_state"]
        self.train_seconds = ck["train_seconds"]
        self.train_cpu_seconds = float(ck.get("train_cpu_seconds", math.nan))
        self.logger.truncate(ck["log_lines"])
        return True

    def _resume_point(self) -> Dict[str, Any]:
        """A checkpoint of now that later steps do not change (the meta-weights are updated in place)."""
        state = self.state_dict()
        state["net"] = {k: v.clone() for k, v in state["net"].items()}
        return state

    # ------------------------------------------------------------------ training
    def _draw_horizon(self) -> int:
        """This meta-iteration's horizon: drawn from ``sample_horizons`` (rank 0's draw under ``dist``, so that
        every rank makes the same meta-steps), else :meth:`horizon_at`."""
        choices = self.cfg.sample_horizons
        if not choices:
            return self.horizon_at(self.iteration)
        pick = int(torch.randint(0, len(choices), (1,), generator=self.gen).item())
        if self.dist is not None:
            pick = self.dist.broadcast_int(pick)
        return int(choices[pick])

    def horizon_at(self, iteration: int) -> int:
        """The inner horizon of meta-iteration ``iteration`` (curriculum stage or the fixed horizon)."""
        stages = self.cfg.curriculum
        if not stages:
            return self.cfg.horizon
        stage = min(len(stages) - 1, iteration * len(stages) // self.cfg.iterations)
        return stages[stage]

    def _new_run(self, horizon: int) -> InnerRun:
        """The inner run of a new meta-training task drawn from :attr:`gen`."""
        # a meta-training task: its seed lies in the train split by construction (never a val or test task)
        index = int(torch.randint(0, 2**62, (1,), generator=self.gen).item())
        return new_run(self.family, task_seed("train", index, self.cfg.seed), self._inner_optimizer(),
                       self._controller(), horizon, self.cfg.loss_ceiling)

    def _truncation_lengths(self, horizon: int) -> List[int]:
        k = min(self.cfg.truncation, horizon)
        first = k
        if self.cfg.random_offset:
            first = int(torch.randint(1, k + 1, (1,), generator=self.gen).item())
        if self.dist is not None:  # unconditional: every rank follows rank 0's schedule
            first = self.dist.broadcast_int(first)
        lengths, left = [], horizon
        while left > 0:
            n = min(first if not lengths else k, left)
            lengths.append(n)
            left -= n
        return lengths

    def validate(self) -> float:
        """Score the current meta-weights on held-out validation tasks (lower is better)."""
        ctrl_fn = self._controller if self.cfg.control == "learned" else None
        return validation_score(self.cfg, self.family, self._inner_optimizer(), ctrl_fn)

    def run(self) -> "MetaTrainer":
        """Meta-train for the configured iterations (continuing after :meth:`resume`).

        With a run directory: holds its :class:`RunLock`, writes a checkpoint every ``checkpoint_every``
        iterations or ``checkpoint_seconds`` seconds and at the end, and on SIGINT / SIGTERM (main thread only)
        stops after the meta-step in progress, writes the checkpoint of the iteration's start and raises
        :class:`Interrupted`.
        """
        lock = RunLock(self.run_dir) if self.run_dir and self.is_main else contextlib.nullcontext()
        with lock, _signals_saved(self) as handling:
            self._train(handling)
        return self

    def _train(self, handling: bool) -> None:
        cfg = self.cfg
        if self.iteration == 0 and self.meta_step == 0 and self.is_main:
            # a fresh run (not resumed) in a directory that held an earlier run: its log starts empty instead
            # of being appended to the old one (the CLI refuses such a directory without --resume)
            self.logger.truncate(0)
        self._last_save = time.monotonic()
        if cfg.val_at_start and cfg.val_every and self.iteration == 0 and self.meta_step == 0:
            self._select()
        bar = None
        if self.progress:
            from tqdm import tqdm
            bar = tqdm(total=cfg.iterations, initial=self.iteration, desc="meta-train", leave=False)
        while self.iteration < cfg.iterations:
            # a stop mid-iteration saves the state of the iteration's start: resuming from it is exact
            resume_point = self._resume_point() if handling else None
            start, cpu_start = time.perf_counter(), time.process_time()
            horizon = self._draw_horizon()
            runs = [self._new_run(horizon) for _ in range(cfg.tasks_per_step)]
            self.estimator.reset()  # e.g. PES particles belong to one batch of tasks
            for length in self._truncation_lengths(horizon):
                record = self.meta_step_on(runs, length)
                self.logger.log(record)
                self.history.append(record)
                if self._stop:
                    self.save(resume_point)
                    if bar is not None:
                        bar.close()
                    raise Interrupted(self.signal or signal.SIGTERM,
                                      resume_point["iteration"] if resume_point else self.iteration,
                                      self.checkpoint_path)
            self.iteration += 1
            self.train_seconds += time.perf_counter() - start
            self.train_cpu_seconds += time.process_time() - cpu_start
            if cfg.val_every and self.iteration % cfg.val_every == 0:
                self._select()
            if self._checkpoint_due():
                self.save()
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        # Save before restoring the best weights: the checkpoint must hold the *training* state (the last
        # weights), or a run resumed with more iterations would continue from the best ones and diverge from
        # a run that never stopped. The best weights travel in the checkpoint as ``best_state``.
        self.save()
        if cfg.keep_best and cfg.val_every and math.isfinite(self.best_score):
            self.net.load_state_dict(self.best_state)

    def _select(self) -> None:
        """Score the current meta-weights on the selection stream; keep them if they are the best so far."""
        score = self.validate()
        if score < self.best_score:
            self.best_score = score
            self.best_state = copy.deepcopy(self.net.state_dict())
        self.logger.log({"meta_step": self.meta_step, "iteration": self.iteration,
                         "val_score": score, "val_best": self.best_score})

    def _checkpoint_due(self) -> bool:
        """Whether to save after this iteration (distributed: rank 0's clock decides for every rank)."""
        cfg = self.cfg
        if not self.checkpoint_path:
            return False
        due = bool(cfg.checkpoint_every) and self.iteration % cfg.checkpoint_every == 0
        if cfg.checkpoint_seconds:
            due = due or time.monotonic() - self._last_save >= cfg.checkpoint_seconds
            if self.dist is not None:  # clocks differ between ranks; the save is a collective
                due = bool(self.dist.broadcast_int(int(due)))
        return due
