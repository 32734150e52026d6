"""Meta-training by truncated backpropagation through the unrolled inner loop.

Following Andrychowicz et al. (2016): a batch of sampled tasks per meta-iteration, horizon T cut into
truncations of K steps, one meta-update per truncation, the meta-loss summed over the truncation, second-order
terms through the learner's gradient off by default. Added for robustness: other meta-losses (mean log loss,
validation loss, the halting objective for the stop head), our own Adam as the meta-optimizer with global
gradient-norm clipping, guards against non-finite losses and meta-gradients, a per-task loss ceiling, a
curriculum over horizons (Chen et al. 2020), random truncation offsets, held-out validation keeping the best
meta-weights, atomic checkpoints with exact resume (periodic by default, and on SIGINT / SIGTERM), a lock file
that keeps a second process out of a run directory, and JSONL / W&B logs. With a
:class:`~learned_opt.distributed.DistContext` (``dist=``) every rank unrolls its own tasks and the meta-gradients
are averaged over the ranks every meta-step (see :mod:`learned_opt.distributed`).
"""
from __future__ import annotations

import contextlib
import copy
import errno
import json
import math
import os
import signal
import socket
import tempfile
import threading
import time
import warnings
from dataclasses import asdict, dataclass
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

from .distributed import DistContext, rank_seed
from .estimators import antithetic_noise, antithetic_sum, local_pairs
from .evaluate import evaluate, robust_mean, task_seed
from .log import Logger
from .optim.baselines import Adam, AdamState
from .optim.learned import build_learned, kind_of
from .tasks.base import check_positive_int, generator
from .unroll import UnrollResult, unroll

META_LOSSES = ("sum", "mean_log", "val", "halting")
ESTIMATORS = ("tbptt", "es", "pes")  # see learned_opt/estimators.py
CONTROLS = ("none", "learned")
VAL_METRICS = ("mean_final", "mean_log_final", "mean_log_curve", "val_at_stop")
# Inner steps per task at most (horizons, evaluation steps). The per-step records of an unroll and an
# evaluation's loss curves grow with the horizon, and a million steps of even the smallest task take hours on a
# CPU: a larger number is a typo (1e12 used to exhaust memory before the first step).
MAX_HORIZON = 1_000_000
# Settings a resumed run may change: they decide how long it runs and how often it saves, not what it learns.
RESUMABLE = ("iterations", "checkpoint_every", "checkpoint_seconds")
TRAINING_FORMAT = "learned_opt.meta/1"  # checkpoint.pt: everything a resumed run needs
LOPT_FORMAT = "learned_opt.lopt/1"  # lopt.pt: a trained meta-network alone


@dataclass
class MetaConfig:
    """Meta-training settings (the experiment scripts expose these as flags)."""
    horizon: int = 100
    truncation: int = 20
    tasks_per_step: int = 1
    iterations: int = 100
    meta_lr: float = 1e-3
    clip_norm: float = 1.0
    meta_loss: str = "sum"
    halting_lambda: float = 0.0
    second_order: bool = False
    control: str = "none"  # "none": update only; "learned": the LR and stop heads drive the unroll
    loss_ceiling: float = 10.0  # inner losses clipped at this multiple of the task's initial loss
    curriculum: Tuple[int, ...] = ()  # horizons, each used for an equal share of the iterations
    # horizons to draw from, uniformly and independently per meta-iteration (overrides horizon and curriculum):
    # a task mixture meta-trained at one horizon learns one schedule; drawn horizons make it read the time features
    sample_horizons: Tuple[int, ...] = ()
    random_offset: bool = False
    val_every: int = 0  # meta-iterations between validations on held-out tasks (0: never)
    val_tasks: int = 8
    val_horizon: int = 0  # inner steps of each validation run (0: the meta-training horizon)
    val_metric: str = "mean_final"  # or "mean_log_final", "mean_log_curve" (every step), "val_at_stop"
    keep_best: bool = True
    # With a run_dir, a checkpoint every checkpoint_every meta-iterations or checkpoint_seconds of training,
    # whichever comes first (0 turns either off; with both 0, only at the end): a killed run loses little.
    checkpoint_every: int = 10
    checkpoint_seconds: float = 60.0
    # The meta-gradient estimator: "tbptt" (backprop through each truncation, through higher / torch.func),
    # "es" (antithetic evolution strategies on each truncation, from the unperturbed state) or "pes" (persistent
    # ES: each particle keeps its own inner state across the truncations of a task and the sum of its
    # perturbations; unbiased across truncations). ES / PES use ``particles`` perturbations of scale ``sigma``
    # per task and truncation and run the inner loop without a graph.
    estimator: str = "tbptt"
    particles: int = 8
    sigma: float = 0.01
    seed: int = 0

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad setting."""
        check_positive_int("horizon", self.horizon)
        check_at_most("horizon", self.horizon, MAX_HORIZON)
        check_positive_int("truncation", self.truncation)
        check_positive_int("tasks_per_step", self.tasks_per_step)
        check_positive_int("iterations", self.iterations)
        if self.truncation > self.horizon:
            raise ValueError(f"truncation {self.truncation} is longer than the horizon {self.horizon}")
        for h in self.curriculum:
            check_positive_int("curriculum horizon", h)
            check_at_most("curriculum horizon", h, MAX_HORIZON)
        for h in self.sample_horizons:
            check_positive_int("sampled horizon", h)
            check_at_most("sampled horizon", h, MAX_HORIZON)
        if not (self.meta_lr > 0 and math.isfinite(self.meta_lr)):
            raise ValueError(f"meta_lr must be a finite number > 0, got {self.meta_lr!r}")
        if not self.clip_norm > 0:
            raise ValueError(f"clip_norm must be > 0, got {self.clip_norm!r}")
        if self.meta_loss not in META_LOSSES:
            raise ValueError(f"unknown meta-loss {self.meta_loss!r}; known: {', '.join(META_LOSSES)}")
        if self.control not in CONTROLS:
            raise ValueError(f"control must be 'none' or 'learned', got {self.control!r}")
        if self.meta_loss == "halting" and self.control != "learned":
            raise ValueError("the halting meta-loss trains the stop head: it needs control='learned'")
        if not self.loss_ceiling > 1:
            raise ValueError(f"loss_ceiling must be > 1, got {self.loss_ceiling!r}")
        if self.val_metric not in VAL_METRICS:
            raise ValueError(f"unknown val_metric {self.val_metric!r}")
        # Negative intervals used to pass and then act as "every iteration" (i % -1 == 0); zero validation
        # tasks failed only at the first validation, mid-run.
        for name in ("val_every", "checkpoint_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
        check_positive_int("val_tasks", self.val_tasks)
        if isinstance(self.val_horizon, bool) or not isinstance(self.val_horizon, int) or self.val_horizon < 0:
            raise ValueError(f"val_horizon must be an integer >= 0 (0: the horizon), got {self.val_horizon!r}")
        check_at_most("val_horizon", self.val_horizon, MAX_HORIZON)
        if isinstance(self.checkpoint_seconds, bool) or not (isinstance(self.checkpoint_seconds, (int, float))
                                                            and 0 <= self.checkpoint_seconds < math.inf):
            raise ValueError(f"checkpoint_seconds must be a finite number >= 0, got {self.checkpoint_seconds!r}")
        if not (self.halting_lambda >= 0 and math.isfinite(self.halting_lambda)):
            raise ValueError(f"halting_lambda must be a finite number >= 0, got {self.halting_lambda!r}")
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"unknown estimator {self.estimator!r}; known: {', '.join(ESTIMATORS)}")
        check_positive_int("particles", self.particles)
        if self.particles % 2:
            raise ValueError(f"particles must be an even integer >= 2 (antithetic pairs), got {self.particles!r}")
        if isinstance(self.sigma, bool) or not (isinstance(self.sigma, (int, float)) and 0 < self.sigma < math.inf):
            raise ValueError(f"sigma must be a finite number > 0, got {self.sigma!r}")
        if self.estimator != "tbptt" and self.meta_loss == "halting":
            raise ValueError("the halting meta-loss needs estimator='tbptt' (its survival state is not carried per "
                             "ES / PES particle)")


def _plain(x: Any) -> Any:
    """Tuples as lists, recursively: a setting read back from JSON compares equal to the one it was."""
    if isinstance(x, (tuple, list)):
        return [_plain(v) for v in x]
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    return x


def check_at_most(name: str, value: int, limit: int) -> None:
    """Raise ``ValueError`` naming ``name`` when ``value`` exceeds ``limit`` (:data:`MAX_HORIZON` says why)."""
    if value > limit:
        raise ValueError(f"{name} {value} exceeds the maximum of {limit} inner steps")


def tree_detach(x: Any) -> Any:
    """Detach every tensor in a nested structure of tuples, lists, dicts and NamedTuples."""
    if isinstance(x, Tensor):
        return x.detach()
    if isinstance(x, tuple) and hasattr(x, "_fields"):
        return type(x)(*(tree_detach(v) for v in x))
    if isinstance(x, (tuple, list)):
        return type(x)(tree_detach(v) for v in x)
    if isinstance(x, dict):
        return {k: tree_detach(v) for k, v in x.items()}
    return x


def tree_finite(x: Any) -> bool:
    """True when every floating tensor in a nested structure is finite."""
    if isinstance(x, Tensor):
        return not x.is_floating_point() or bool(torch.isfinite(x).all())
    if isinstance(x, (tuple, list)):
        return all(tree_finite(v) for v in x)
    if isinstance(x, dict):
        return all(tree_finite(v) for v in x.values())
    return True


@dataclass
class InnerRun:
    """One task's inner training in progress across truncations."""
    task: Any
    gen: torch.Generator
    params: List[Tensor]
    opt_state: Any
    ctrl_state: Any
    step: int
    horizon: int
    ceiling: Tensor  # per-problem loss ceiling
    survival: float = 1.0  # halting: probability of not having stopped before ``step``
    best_val: float = math.inf  # halting with restore_best: lowest validation loss seen before ``step``


def _copy_run(run: InnerRun) -> InnerRun:
    """An independent copy of an inner run's state (its own data generator at the same position)."""
    gen = torch.Generator(device=run.gen.device)
    gen.set_state(run.gen.get_state())
    return InnerRun(run.task, gen, [p.detach().clone() for p in run.params], tree_detach(run.opt_state),
                    tree_detach(run.ctrl_state), run.step, run.horizon, run.ceiling, run.survival, run.best_val)


def _set_flat(params: Sequence[Tensor], flat: Tensor) -> None:
    """Copy a flat vector into the parameters in place (no grad; the parameters keep their own storage)."""
    offset = 0
    for p in params:
        p.copy_(flat[offset:offset + p.numel()].view_as(p))
        offset += p.numel()


def _advance(run: InnerRun, res: UnrollResult) -> None:
    """Carry a run's state past the truncation ``res`` (without a graph)."""
    run.params = [p.detach() for p in res.params]
    run.opt_state = tree_detach(res.opt_state)
    run.ctrl_state = tree_detach(res.ctrl_state)
    run.step = res.step


def _clip(per_problem: Tensor, ceiling: Tensor) -> Tensor:
    # min(loss, ceiling) keeps the gradient below the ceiling and cuts it above: a diverging unroll
    # contributes a bounded constant instead of dominating the meta-gradient.
    return torch.minimum(per_problem, ceiling)


def truncation_loss(kind: str, res: UnrollResult, run: InnerRun, lam: float = 0.0,
                    restore_best: bool = False) -> Tensor:
    """The meta-loss of one truncation (rows after the first: the losses that depend on this truncation)."""
    rows = res.problem_losses[1:]
    if kind in ("sum", "mean_log"):
        if not rows:
            return res.train_losses[0] * 0
        stacked = torch.stack([_clip(r, run.ceiling) for r in rows])  # (steps, problems)
        if kind == "sum":
            return stacked.mean(-1).sum()
        return torch.log(stacked + 1e-12).mean()
    vals = [v for v in res.val_losses[1:] if v is not None]
    if kind == "val":
        if not vals:
            raise ValueError("the 'val' meta-loss needs validation losses (val_every=1)")
        return torch.stack(vals).mean()
    return halting_loss(res, run, lam, restore_best)


def halting_loss(res: UnrollResult, run: InnerRun, lam: float, restore_best: bool = False) -> Tensor:
    """Truncated halting objective ``sum_t q_t (L_val(t) + lam t)``, ``q_t = p_t prod_{s<t} (1 - p_s)``.

    The survival probability is carried (detached) across truncations; the mass left at the horizon is
    charged to the last validation loss there. Before the horizon, the mass that survives the truncation is
    charged, *for the gradient only*, to the validation loss at the truncation's end (a bootstrap of the cost
    of continuing): without it, truncated backpropagation sees stopping cost ``L_val(t)`` and continuing cost
    nothing, and drives every stop probability to zero. The term has value zero, so the logged objective
    summed over truncations still equals the one-piece objective. With ``restore_best`` (the controller
    returns the best parameters seen, as patience-based early stopping does) stopping at ``t`` costs the
    lowest validation loss up to ``t`` instead of ``L_val(t)``.
    """
    best = torch.as_tensor(run.best_val, dtype=res.train_losses[0].dtype)

    def cost(val):
        nonlocal best
        if not restore_best:
            return val
        best = torch.minimum(best, val)
        return best

    survival = torch.as_tensor(run.survival, dtype=res.train_losses[0].dtype)
    total = res.train_losses[0].new_zeros(())
    steps = res.records["step"]
    for i, p in enumerate(res.stop_probs):
        t = steps[i]
        val = cost(res.val_losses[i])
        total = total + survival * p * (val + lam * t)
        survival = survival * (1 - p)
    last = len(res.stop_probs)
    if last < len(res.val_losses) and res.val_losses[last] is not None:
        tail = survival * (cost(res.val_losses[last]) + lam * steps[last])
        total = total + (tail if res.step >= run.horizon else tail - tail.detach())
    run.survival = float(survival.detach())
    if restore_best:
        run.best_val = float(best.detach())
    return total


def halting_distribution(stop_probs: Tensor) -> Tensor:
    """``q`` over steps ``0..T``: ``q_t = p_t prod_{s<t} (1 - p_s)`` for ``t < T``, the rest at ``T``."""
    survival = torch.cumprod(torch.cat([stop_probs.new_ones(1), 1 - stop_probs]), 0)
    return torch.cat([stop_probs * survival[:-1], survival[-1:]])


def _opt_state_to_dict(s: AdamState) -> Dict[str, Any]:
    return {"mu": list(s.mu), "nu": list(s.nu), "nu_max": list(s.nu_max), "count": s.count}


def _opt_state_from_dict(d: Dict[str, Any]) -> AdamState:
    return AdamState(tuple(d["mu"]), tuple(d["nu"]), tuple(d["nu_max"]), int(d["count"]))


def _umask() -> int:
    """The process's file-creation mask (reading it means setting it; it is set back at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def save_checkpoint(path: str, payload: Dict[str, Any]) -> None:
    """Write atomically (temporary file, fsync, rename) and keep the previous file as ``<path>.prev``.

    The temporary file's name is unique to the call, so two writers never write into one file. A failure while
    writing (full disk, no permission) raises ``RuntimeError`` and leaves the earlier checkpoints untouched.
    """
    tmp = None
    try:
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=folder)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; a saved file gets the usual permissions
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        with contextlib.suppress(FileNotFoundError):  # another writer may have just moved it
            os.replace(path, f"{path}.prev")
        os.replace(tmp, path)
    except OSError as e:
        try:
            if tmp is not None and os.path.exists(tmp):
                os.remove(tmp)
        except OSError:
            pass
        raise RuntimeError(f"could not save checkpoint {path}: {e.strerror or e}") from e


def _why_unreadable(e: Exception) -> str:
    """A short reason a file did not load (torch's own messages run to hundreds of characters of advice)."""
    text = str(e)
    if isinstance(e, ValueError) and "learned_opt" in text:
        return text
    if isinstance(e, EOFError) or "truncated" in text or "central directory" in text or "EOF" in text:
        return "truncated or empty file"
    if isinstance(e, OSError) and e.errno == errno.EINVAL:  # torch 2.13: a zip cut short by a few bytes
        return "truncated or corrupt file"
    if "Unsupported global" in text:  # a pickle of arbitrary objects, which we never write
        return "holds objects other than tensors, dicts, lists and numbers (not a learned_opt file)"
    if isinstance(e, OSError):
        return e.strerror or type(e).__name__
    return "not a torch file (corrupt or another format)"


def load_checkpoint(path: str) -> Dict[str, Any]:
    """Load ``path``; if it is missing, truncated or corrupt, warn and fall back to ``<path>.prev``."""
    errors = []
    for candidate in (path, f"{path}.prev"):
        if not os.path.exists(candidate):
            errors.append(f"{candidate}: missing")
            continue
        try:
            payload = torch.load(candidate, map_location="cpu", weights_only=True)
            if not isinstance(payload, dict) or "format" not in payload:
                raise ValueError("not a learned_opt checkpoint")
            if candidate != path:
                warnings.warn(f"checkpoint {path} is unreadable ({errors[-1]}); resumed from {candidate}")
            return payload
        except Exception as e:  # noqa: BLE001 - any unreadable file falls back
            errors.append(f"{candidate}: {_why_unreadable(e)}")
    raise RuntimeError("no usable checkpoint: " + "; ".join(errors))


def save_lopt(path: str, net) -> None:
    """Save a trained meta-network (kind, constructor config and weights) for :func:`load_lopt`."""
    save_checkpoint(path, {"format": LOPT_FORMAT, "kind": kind_of(net), "config": net.config,
                           "state_dict": net.state_dict()})


def load_lopt(path: str):
    """Load a meta-network saved by :func:`save_lopt`."""
    payload = load_checkpoint(path)
    if payload.get("format") == TRAINING_FORMAT:
        raise ValueError(f"{path} is a training checkpoint, not a saved meta-network: load the lopt.pt that its "
                         f"run wrote next to it")
    if payload.get("format") != LOPT_FORMAT:
        raise ValueError(f"{path} is not a saved meta-network (format {payload.get('format')!r})")
    net = build_learned(payload["kind"], **payload["config"])
    try:
        net.load_state_dict(payload["state_dict"])
    except RuntimeError as e:
        raise ValueError(f"{path}: weights do not fit a {payload['kind']} network: {str(e).splitlines()[0]}")
    return net


def _grad_norm(grads: Sequence[Tensor]) -> Tensor:
    """Global L2 norm of the meta-gradient, accumulated in float64."""
    return torch.sqrt(sum((g.double() ** 2).sum() for g in grads))


LOCK_NAME = "run.lock"
CHECKPOINT = "checkpoint.pt"


def has_checkpoint(run_dir: str) -> bool:
    """Whether ``run_dir`` holds a training checkpoint (the latest or the previous one) to resume from."""
    path = os.path.join(run_dir, CHECKPOINT)
    return os.path.exists(path) or os.path.exists(path + ".prev")


class RunDirBusy(RuntimeError):
    """Another live process holds the run directory's lock."""


class RunLock:
    """An exclusive lock on a run directory: ``<dir>/run.lock``, ``flock``-ed while held, names its owner's pid.

    The kernel drops an ``flock`` when its process dies (even by SIGKILL), so a lock file left behind by a dead
    process is stale by construction: the next run takes it over with a warning that names the dead pid. Taking
    the lock again in the process that holds it is a no-op, so the CLI and :meth:`MetaTrainer.run` can both ask.
    """

    def __init__(self, run_dir: str):
        self.run_dir, self.path = run_dir, os.path.join(run_dir, LOCK_NAME)
        self.fd: Optional[int] = None

    @staticmethod
    def _owner(fd: int) -> Dict[str, Any]:
        try:
            return json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        except (OSError, ValueError):
            return {}

    def acquire(self) -> "RunLock":
        """Take the lock, or raise :class:`RunDirBusy` naming the process that holds it."""
        import fcntl  # POSIX only, like the rest of the tooling (make, venv paths)

        os.makedirs(self.run_dir, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname()}
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                owner = self._owner(fd)
                os.close(fd)
                if owner == me:  # this process holds it already
                    return self
                raise RunDirBusy(f"run directory {self.run_dir} is in use by pid {owner.get('pid', '?')} on "
                                 f"{owner.get('host', '?')} (lock file {self.path}); wait for that run to end "
                                 f"or choose another --run-dir") from None
            try:  # a holder that was releasing may have unlinked the file we opened: lock the current one
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            owner = self._owner(fd)
            if owner.get("pid") is not None and owner != me:
                warnings.warn(f"took over the stale lock of {self.run_dir} left by pid {owner['pid']} on "
                              f"{owner.get('host', '?')}, which no longer runs")
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(me).encode(), 0)
            self.fd = fd
            return self

    def release(self) -> None:
        """Give the lock up and remove the lock file (no-op when this object did not take it)."""
        if self.fd is None:
            return
        try:
            os.remove(self.path)  # while still locked, so no other process can have taken it meanwhile
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


class Interrupted(Exception):
    """Meta-training stopped by SIGINT or SIGTERM after writing a checkpoint; ``signum`` says which signal."""

    def __init__(self, signum: int, iteration: int, path: Optional[str]):
        self.signum = signum
        where = f"checkpoint of iteration {iteration} saved in {path}" if path else "no run directory to save in"
        super().__init__(f"interrupted by {signal.Signals(signum).name}; {where}")


class MetaTrainer:
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
        self.dist = dist
        self.is_main = dist is None or dist.is_main
        self.run_dir = run_dir
        # Only rank 0 writes the log and the checkpoints; the other ranks log nowhere.
        self.logger = logger or Logger(os.path.join(run_dir, "metrics.jsonl") if run_dir and self.is_main
                                       else None)
        self.progress = progress and self.is_main
        self.meta_params = [p for p in net.parameters()]
        if dist is not None:  # every rank starts from rank 0's meta-weights
            dist.broadcast_parameters(self.meta_params)
        self.meta_opt = Adam(lr=config.meta_lr)
        self.meta_state = self.meta_opt.init([p.detach() for p in self.meta_params])
        # Each rank draws its own tasks (rank 0 those of a single-process run); the truncation schedule is
        # rank 0's, broadcast, so every rank makes the same number of meta-steps.
        # TBPTT: every rank draws its own tasks. ES / PES: every rank draws the same tasks (rank 0's, those of a
        # single process) and holds its share of the particles, so the population, not the number of ranks,
        # decides the result.
        population = config.estimator != "tbptt"
        self.gen = generator(rank_seed(config.seed, dist.rank if dist is not None and not population else 0))
        if population and dist is not None:
            local_pairs(config.particles, dist.rank, dist.world_size)  # every rank holds a pair, or ValueError
        self.iteration = 0
        self.meta_step = 0
        self.skipped = 0
        self.best_score = math.inf
        self.best_state = copy.deepcopy(net.state_dict())
        self.train_seconds = 0.0
        self.history: List[Dict[str, Any]] = []  # this process's records only; metrics.jsonl holds the whole run
        # The caller's whole configuration (the CLI's task, meta-network, ...), kept in every checkpoint so that
        # a run can be resumed with its own settings even without its config.json.
        self.run_config = run_config
        self.signal: Optional[int] = None  # SIGINT / SIGTERM received during run()
        self._stop = False  # every rank agrees to stop at this meta-step
        self._particles: Optional[List[List[InnerRun]]] = None  # PES: per task, its particles' inner runs
        self._accumulated: List[Tensor] = []  # PES: per task, each particle's summed perturbations

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
               "meta_opt": _opt_state_to_dict(self.meta_state), "generator": self.gen.get_state(),
               "iteration": self.iteration, "meta_step": self.meta_step, "skipped": self.skipped,
               "best_score": self.best_score, "best_state": self.best_state,
               "train_seconds": self.train_seconds, "log_lines": self.logger.lines()}
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
        ck = load_checkpoint(path)
        if ck.get("format") == LOPT_FORMAT:
            raise ValueError(f"{path} is a saved meta-network (what lopt.pt holds), not a training checkpoint: it "
                             f"has no meta-optimizer state to resume from")
        if ck.get("format") != TRAINING_FORMAT:
            raise ValueError(f"{path} is not a training checkpoint (format {ck.get('format')!r})")
        if ck.get("world_size", 1) != self.world_size:
            raise ValueError(f"checkpoint {path} was written by {ck.get('world_size', 1)} rank(s); this run has "
                             f"{self.world_size}: resume with the same number of processes")
        if ck.get("kind") != kind_of(self.net):
            raise ValueError(f"checkpoint {path} is for a {ck.get('kind')} network, not {kind_of(self.net)}")
        if ck.get("net_config") != self.net.config:
            saved, here = ck.get("net_config") or {}, self.net.config
            diff = ", ".join(f"{k}={saved.get(k)!r} there, {here.get(k)!r} here"
                             for k in sorted(set(saved) | set(here)) if saved.get(k) != here.get(k))
            raise ValueError(f"checkpoint {path} is for a {ck.get('kind')} network of another configuration "
                             f"({diff})")
        saved, here = ck.get("config") or {}, asdict(self.cfg)
        for k in here:  # keys that older checkpoints lack are not compared
            if k in saved and k not in RESUMABLE and _plain(saved[k]) != _plain(here[k]):
                raise ValueError(f"checkpoint {path} was written with {k}={saved[k]!r}, this run has "
                                 f"{k}={here[k]!r}: a resumed run keeps its settings")
        if ck["iteration"] > self.cfg.iterations:
            raise ValueError(f"checkpoint {path} is at iteration {ck['iteration']}, past iterations="
                             f"{self.cfg.iterations}: give at least {ck['iteration']} to continue")
        try:
            self.net.load_state_dict(ck["net"])
        except RuntimeError as e:
            raise ValueError(f"checkpoint {path} does not fit this network: {str(e).splitlines()[0]}")
        self.meta_state = _opt_state_from_dict(ck["meta_opt"])
        self.gen.set_state(ck["generators"][self.dist.rank] if self.dist is not None else ck["generator"])
        self.iteration, self.meta_step, self.skipped = ck["iteration"], ck["meta_step"], ck["skipped"]
        self.best_score, self.best_state = ck["best_score"], ck["best_state"]
        self.train_seconds = ck["train_seconds"]
        self.logger.truncate(ck["log_lines"])
        return True

    def _resume_point(self) -> Dict[str, Any]:
        """A checkpoint of now that later steps do not change (the meta-weights are updated in place)."""
        state = self.state_dict()
        state["net"] = {k: v.clone() for k, v in state["net"].items()}
        return state

    @contextlib.contextmanager
    def _signals_saved(self) -> Iterator[bool]:
        """While inside, SIGINT and SIGTERM only set :attr:`signal` (a second one stops at once, unsaved).

        Yields whether the handlers are in place: only in the main thread, and only with a run directory to save
        in; elsewhere signals keep their usual effect.
        """
        if not self.checkpoint_path or threading.current_thread() is not threading.main_thread():
            yield False
            return

        def handler(signum, frame):
            if self.signal is not None:
                raise KeyboardInterrupt
            self.signal = signum

        previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield True
        finally:
            for s, h in previous.items():
                signal.signal(s, h)

    def _warn_skipped(self, why: str) -> None:
        # at 1, 2, 4, 8, ... skipped steps: a run of non-finite steps warns a handful of times, not every step
        n = self.skipped
        if n & (n - 1) == 0:
            warnings.warn(f"meta-step {self.meta_step}: {why}; update skipped ({n} skipped so far; next warning "
                          f"at {2 * n})")

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

    def _controller(self):
        if self.optimizer is not None:
            return self.net
        return self.net.as_controller() if self.cfg.control == "learned" else None

    def _inner_optimizer(self):
        return self.net if self.optimizer is None else self.optimizer

    def _new_run(self, horizon: int) -> InnerRun:
        # a meta-training task: its seed lies in the train split by construction (never a val or test task)
        index = int(torch.randint(0, 2**62, (1,), generator=self.gen).item())
        task_gen = generator(task_seed("train", index, self.cfg.seed))
        task = self.family(task_gen)
        params = task.init(task_gen)
        with torch.no_grad():
            initial = task.losses(params, task.sample_batch(task_gen, "train"))
        ctrl = self._controller()
        return InnerRun(task, task_gen, params, self._inner_optimizer().init([p.detach() for p in params]),
                        ctrl.init() if ctrl is not None else None, 0, horizon,
                        initial.detach().abs() * self.cfg.loss_ceiling + 1e-8)

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

    def _unroll_run(self, run: InnerRun, length: int, ctrl, differentiable: bool) -> UnrollResult:
        """One truncation of ``run`` under the current meta-weights (the run itself is not changed)."""
        cfg = self.cfg
        return unroll(run.task, self._inner_optimizer(), ctrl, steps=length, generator=run.gen, params=run.params,
                      opt_state=run.opt_state, ctrl_state=run.ctrl_state, start_step=run.step,
                      horizon=run.horizon, differentiable=differentiable, second_order=cfg.second_order,
                      val_every=1 if cfg.meta_loss in ("val", "halting") else 0)

    def _population_gradient(self, runs: List[InnerRun], length: int, ctrl):
        """ES / PES meta-gradient of one truncation (see :mod:`learned_opt.estimators` for the estimators).

        For every task, ``particles`` antithetic perturbations ``e`` of the flattened meta-weights each run the
        truncation without a graph: ES from the task's current state, PES from the particle's own state (kept
        across the task's truncations, with the sum of its perturbations). The data order is the task's for every
        particle (common random numbers). The estimate is ``sum_pairs (L+ - L-) w / (2 sigma^2)`` over finite
        pairs, ``w`` the perturbation (ES) or its running sum (PES), averaged over pairs and tasks. The task
        then advances under the unperturbed weights. The noise of meta-step ``k`` is drawn from a generator
        seeded by (seed, k), the same on every rank, so resuming at an iteration boundary (where every checkpoint
        is written, and where PES particles start afresh with the new tasks) is exact. Returns (the gradient as
        a list shaped like the meta-parameters, *summed* over this rank's finite pairs; their number; the
        advanced runs' unroll results; log entries). With ranks, pair ``j`` of the population lives on rank
        ``j % world_size``.
        """
        cfg = self.cfg
        pes = cfg.estimator == "pes"
        theta = torch.nn.utils.parameters_to_vector([p.detach() for p in self.meta_params]).clone()
        rank, world = (self.dist.rank, self.dist.world_size) if self.dist is not None else (0, 1)
        noise = generator(task_seed("train", self.meta_step, cfg.seed, stream="es-noise"))
        half = len(local_pairs(cfg.particles, rank, world))  # this rank's pairs: rank, rank + world, ...
        restore_best = getattr(ctrl, "restore_best", False)
        if pes and self._particles is None:
            self._particles = [[_copy_run(run) for _ in range(2 * half)] for run in runs]
            self._accumulated = [theta.new_zeros(2 * half, theta.numel()) for _ in runs]
        total, pairs, dropped, losses_seen = torch.zeros_like(theta), 0, 0, []
        try:
            for r, run in enumerate(runs):
                eps = antithetic_noise(cfg.particles, theta.numel(), cfg.sigma, noise, theta.dtype, rank, world)
                losses = theta.new_full((2 * half,), math.nan)
                for i in range(2 * half):
                    particle = self._particles[r][i] if pes else _copy_run(run)
                    with torch.no_grad():
                        _set_flat(self.meta_params, theta + eps[i])
                        res = self._unroll_run(particle, length, ctrl, differentiable=False)
                        loss = truncation_loss(cfg.meta_loss, res, particle, cfg.halting_lambda, restore_best)
                    losses[i] = float(loss)
                    if pes:
                        _advance(particle, res)
                weights = eps
                if pes:
                    self._accumulated[r] = self._accumulated[r] + eps
                    weights = self._accumulated[r]
                part, ok = antithetic_sum(losses, weights, cfg.sigma)
                total = total + part
                pairs += int(ok.sum()) // 2
                dropped += int((~ok).sum())
                losses_seen.append(losses[ok])
                if pes and not ok.all():  # a pair that blew up restarts from the task's state, its sum cleared
                    for i in torch.nonzero(~ok).flatten().tolist():
                        self._particles[r][i] = _copy_run(run)
                        self._accumulated[r][i] = 0
        finally:
            with torch.no_grad():
                _set_flat(self.meta_params, theta)
        with torch.no_grad():
            results = [self._unroll_run(run, length, ctrl, differentiable=False) for run in runs]
        seen = torch.cat(losses_seen)
        extra = {"meta_loss": float(seen.mean()) if seen.numel() else math.nan, "particles_dropped": dropped}
        grads, offset = [], 0
        for p in self.meta_params:
            grads.append(total[offset:offset + p.numel()].view_as(p).to(p.dtype))
            offset += p.numel()
        return grads, pairs, results, extra

    def meta_step_on(self, runs: List[InnerRun], length: int) -> Dict[str, Any]:
        """One truncation on every run, one guarded meta-update; returns the step's log record."""
        cfg = self.cfg
        ctrl = self._controller()
        record: Dict[str, Any] = {"meta_step": self.meta_step, "iteration": self.iteration, "skipped": 0}
        if cfg.estimator == "tbptt":
            losses, results = [], []
            for run in runs:
                res = self._unroll_run(run, length, ctrl, differentiable=True)
                losses.append(truncation_loss(cfg.meta_loss, res, run, cfg.halting_lambda,
                                              getattr(ctrl, "restore_best", False)))
                results.append(res)
            meta_loss = torch.stack(losses).mean()
            record["meta_loss"] = float(meta_loss.detach())
            inner_finite = all(torch.isfinite(torch.stack([r.sum() for r in res.problem_losses])).all()
                               for res in results)
            grads = None
            if torch.isfinite(meta_loss) and inner_finite:
                grads = torch.autograd.grad(meta_loss, self.meta_params, allow_unused=True)
                grads = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, self.meta_params)]
        else:
            grads, pairs, results, extra = self._population_gradient(runs, length, ctrl)
            record.update(extra)
            if self.dist is None:  # with ranks, the sums are divided after the all-reduce
                grads = [g / pairs for g in grads] if pairs else None
        if grads is not None:
            gnorm = _grad_norm(grads)
            record["meta_grad_norm"] = float(gnorm)
            if not torch.isfinite(gnorm):
                grads = None
        lr = [r.records["lr_scale"] for r in results]
        sp = [r.records["stop_prob"] for r in results]
        diagnostics = {"lr_scale_mean": float(sum(map(sum, lr)) / max(1, sum(map(len, lr)))),
                       "stop_prob_mean": float(sum(map(sum, sp)) / max(1, sum(map(len, sp)))),
                       "inner_loss": float(sum(r.records["train_loss"][-1] for r in results) / len(results))}
        record.update(diagnostics)
        if self.dist is None:
            self._stop = self.signal is not None
        else:
            # Always reached, on every rank: the one collective of the step is never behind a condition. It also
            # carries whether any rank received a signal, so that all ranks stop at the same meta-step.
            if grads is None:
                self._dropped = getattr(self, "_dropped", 0) + 1
                if self._dropped & (self._dropped - 1) == 0:  # rate-limited, as in _warn_skipped
                    warnings.warn(f"meta-step {self.meta_step}, rank {self.dist.rank}: non-finite inner loss or "
                                  f"meta-gradient; this rank's contribution is dropped ({self._dropped} times "
                                  f"so far)")
            population = cfg.estimator != "tbptt"
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
            if grads is not None:
                gnorm = _grad_norm(grads)
                record["meta_grad_norm"] = float(gnorm)
        if grads is None:
            self.skipped += 1
            record.update(skipped=1, skipped_total=self.skipped)
            self._warn_skipped("non-finite inner loss or meta-gradient")
        else:
            factor = min(1.0, cfg.clip_norm / (float(gnorm) + 1e-12))
            grads = [g * factor for g in grads]
            updates, new_state = self.meta_opt.update(grads, self.meta_state,
                                                      [p.detach() for p in self.meta_params])
            if all(torch.isfinite(u).all() for u in updates):
                with torch.no_grad():
                    for p, u in zip(self.meta_params, updates):
                        p.add_(u)
                self.meta_state = new_state
            else:  # never let the meta-weights become non-finite
                self.skipped += 1
                record.update(skipped=1, skipped_total=self.skipped)
                self._warn_skipped("non-finite meta-update")
        for run, res in zip(runs, results):
            _advance(run, res)
        self.meta_step += 1
        return record

    def validate(self) -> float:
        """Score the current meta-weights on held-out validation tasks (lower is better)."""
        cfg = self.cfg
        horizon = cfg.val_horizon or cfg.horizon
        ctrl_fn = self._controller if cfg.control == "learned" else None
        # checkpoint selection has a validation stream of its own: the tasks that choose the meta-weights are
        # never the ones that tune the baselines or check a configuration
        res = evaluate(self.family, self._inner_optimizer(), ctrl_fn, num_tasks=cfg.val_tasks, steps=horizon,
                       split="val", seed=cfg.seed, stream="select",
                       val_every=1 if cfg.meta_loss in ("val", "halting") else 0)
        if cfg.val_metric == "val_at_stop":
            return robust_mean(res.val_at_stop)
        if cfg.val_metric == "mean_log_curve":  # every horizon up to val_horizon counts, not only the last
            with np.errstate(divide="ignore", invalid="ignore"):
                return robust_mean(np.log(res.curves[:, 1:] + 1e-12).mean(1))
        final = res.final()
        if cfg.val_metric == "mean_log_final":
            return robust_mean(torch.log(torch.as_tensor(final) + 1e-12).numpy())
        return robust_mean(final)

    def run(self) -> "MetaTrainer":
        """Meta-train for the configured iterations (continuing after :meth:`resume`).

        With a run directory: holds its :class:`RunLock`, writes a checkpoint every ``checkpoint_every``
        iterations or ``checkpoint_seconds`` seconds and at the end, and on SIGINT / SIGTERM (main thread only)
        stops after the meta-step in progress, writes the checkpoint of the iteration's start and raises
        :class:`Interrupted`.
        """
        lock = RunLock(self.run_dir) if self.run_dir and self.is_main else contextlib.nullcontext()
        with lock, self._signals_saved() as handling:
            self._train(handling)
        return self

    def _train(self, handling: bool) -> None:
        cfg = self.cfg
        if self.iteration == 0 and self.meta_step == 0 and self.is_main:
            # a fresh run (not resumed) in a directory that held an earlier run: its log starts empty instead
            # of being appended to the old one (the CLI refuses such a directory without --resume)
            self.logger.truncate(0)
        self._last_save = time.monotonic()
        bar = None
        if self.progress:
            from tqdm import tqdm
            bar = tqdm(total=cfg.iterations, initial=self.iteration, desc="meta-train", leave=False)
        while self.iteration < cfg.iterations:
            # a stop mid-iteration saves the state of the iteration's start: resuming from it is exact
            resume_point = self._resume_point() if handling else None
            start = time.perf_counter()
            horizon = self._draw_horizon()
            runs = [self._new_run(horizon) for _ in range(cfg.tasks_per_step)]
            self._particles = None  # PES particles belong to one batch of tasks
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
            if cfg.val_every and self.iteration % cfg.val_every == 0:
                score = self.validate()
                improved = score < self.best_score
                if improved:
                    self.best_score = score
                    self.best_state = copy.deepcopy(self.net.state_dict())
                self.logger.log({"meta_step": self.meta_step, "iteration": self.iteration,
                                 "val_score": score, "val_best": self.best_score})
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
