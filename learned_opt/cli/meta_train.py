"""``learned-opt meta-train``: meta-train a meta-network in a run directory (new, or resumed with ``--resume``),
under ``torchrun`` on every rank with rank 0 alone writing."""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from typing import Any, Dict

import torch

from ..distributed import DEFAULT_TIMEOUT_S, TIMEOUT_ENV, init_from_env, shutdown
from ..flags import add_dataclass_flags, coerce_kwargs, finite_float, parse_int
from ..log import WANDB_MODES, Logger, provenance
from ..meta import (CONTROLS, ESTIMATORS, MAX_HORIZON, META_LOSSES, VAL_METRICS, MetaConfig, MetaTrainer, RunLock,
                    has_checkpoint, save_lopt)
from ..optim import OPTIMIZERS
from ..optim.learned import LEARNED, build_learned
from ..tasks import FAMILIES
from .common import CLIError, RunFailed, _write_json, check_device, make_family, make_optimizer, task_dtype
from .plot import plot_meta_loss
from .settings import INT_LIST_FLAGS, META_DEFAULTS, RESUME_MAY_CHANGE, _jsonable, resolve_train_config

META_HELP = {
    "horizon": f"inner steps per task, at most {MAX_HORIZON}",
    "truncation": "inner steps per meta-update (truncated backpropagation through time)",
    "tasks_per_step": "tasks unrolled side by side per meta-update",
    "iterations": "meta-iterations, one batch of tasks each; raise it with --resume to continue a run",
    "meta_lr": "learning rate of the meta-optimizer (Adam)",
    "clip_norm": "global norm to which the meta-gradient is clipped",
    "meta_loss": "what each truncation minimises",
    "halting_lambda": "cost of one inner step in the halting meta-loss",
    "second_order": "differentiate through the learner's gradients too",
    "control": "learned: the meta-network's LR and stop heads drive the inner loop",
    "loss_ceiling": "inner losses are clipped at this multiple of the task's initial loss",
    "curriculum": "horizons, comma-separated, each for an equal share of the iterations",
    "sample_horizons": "horizons, comma-separated: each meta-iteration draws one at random (overrides --horizon "
                       "and --curriculum)",
    "random_offset": "a random length for each task's first truncation",
    "val_every": "meta-iterations between validations on held-out tasks (0: never)",
    "val_tasks": "tasks per validation",
    "val_horizon": "inner steps per validation task (0: the horizon)",
    "val_metric": "validation score (lower is better)",
    "keep_best": "end with the best validated meta-weights instead of the last",
    "checkpoint_every": "meta-iterations between checkpoints (0: off)",
    "checkpoint_seconds": "seconds of training between checkpoints (0: off)",
    "estimator": "meta-gradient estimator: tbptt (backprop through each truncation), es (antithetic evolution "
                 "strategies per truncation) or pes (persistent ES, unbiased across truncations)",
    "particles": "es / pes: perturbations per task and truncation (even: antithetic pairs)",
    "sigma": "es / pes: standard deviation of the perturbations of the meta-weights",
}


def _build_net(cfg: Dict[str, Any], family):
    """The meta-network of ``--net`` / ``--net-arg``, in the dtype of the family's tasks (``--task-arg dtype``)."""
    if cfg["net"] not in LEARNED:
        raise CLIError(f"unknown meta-network {cfg['net']!r}; known: {', '.join(LEARNED)}")
    try:
        kwargs = coerce_kwargs(LEARNED[cfg["net"]], cfg["net_args"] or {}, "--net-arg")
        # The seed fixes the initial meta-weights too (without touching the global RNG): two runs with the
        # same flags start alike, in a fresh process or not.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg["seed"])
            net = build_learned(cfg["net"], **kwargs)
    except (TypeError, ValueError) as e:
        raise CLIError(f"bad meta-network argument: {e}" if not str(e).startswith("--") else str(e))
    return net.to(device=cfg["device"], dtype=task_dtype(family))


def _preflight(family, optimizer, controller, what: str) -> None:
    """One inner step on one task before anything is written: combinations that cannot run fail here, as bad
    input, instead of minutes later in the middle of a run."""
    from ..unroll import unroll

    g = torch.Generator().manual_seed(0)
    try:
        unroll(family(g), optimizer, controller, steps=1, generator=g)
    except (TypeError, ValueError, RuntimeError) as e:
        raise CLIError(f"{what} cannot run: {str(e).splitlines()[0]}")


def _check_net_and_optimizer(cfg: Dict[str, Any]):
    """The hand-coded optimizer a ``controller`` meta-trains on, or None; refuses combinations that cannot run."""
    if cfg["net"] == "controller":
        if not cfg["optimizer"]:
            raise CLIError("--net controller learns LR and stop decisions for a hand-coded optimizer: name it with "
                           "--optimizer NAME (e.g. --optimizer adam --optimizer-arg lr=0.03)")
        if cfg["control"] != "learned":
            raise CLIError("--net controller makes the LR and stop decisions: it needs --control learned")
        return make_optimizer(cfg["optimizer"], cfg["optimizer_args"])
    if cfg["optimizer"] or cfg["optimizer_args"]:
        raise CLIError(f"--optimizer is for --net controller only (--net {cfg['net']} computes its own updates)")
    return None


def _config_record(cfg: Dict[str, Any], run_dir: str, resumed: bool, dist_ctx, iteration: int) -> Dict[str, Any]:
    """config.json: the run's settings as first resolved; a resume adds what it changed, never rewrites the rest."""
    config = {k: _jsonable(v) for k, v in cfg.items()}
    path = os.path.join(run_dir, "config.json")
    if resumed and os.path.exists(path):
        try:
            with open(path) as f:
                record = json.load(f)
        except (OSError, ValueError):
            record = None
        if isinstance(record, dict) and isinstance(record.get("config"), dict):
            changed = {k: config[k] for k in RESUME_MAY_CHANGE if record["config"].get(k) != config.get(k)}
            record["config"].update(changed)
            record.setdefault("resumed", []).append({"at_iteration": iteration, "changed": changed,
                                                      "git_commit": provenance().get("git_commit")})
            return record
    record = {"command": "meta-train", "config": config, "provenance": provenance()}
    if dist_ctx is not None:
        record["world_size"] = dist_ctx.world_size
    return record


def cmd_meta_train(args) -> int:
    """Meta-train a meta-network; write run_dir/{config.json, metrics.jsonl, checkpoint.pt, lopt.pt}."""
    cfg = resolve_train_config(args)
    check_device(cfg["device"])
    if cfg["wandb"] not in WANDB_MODES:
        raise CLIError(f"unknown --wandb mode {cfg['wandb']!r}; known: {', '.join(WANDB_MODES)}")
    if cfg["net"] not in LEARNED:
        raise CLIError(f"unknown meta-network {cfg['net']!r}; known: {', '.join(LEARNED)}")
    meta = MetaConfig(**{k: tuple(cfg[k] or ()) if k in INT_LIST_FLAGS else cfg[k] for k in META_DEFAULTS})
    meta.validate()
    optimizer = _check_net_and_optimizer(cfg)
    family = make_family(cfg["task"], cfg["task_args"], cfg["device"], cfg["augment"])
    net = _build_net(cfg, family)
    _preflight(family, optimizer or net, net if optimizer is not None else
               (net.as_controller() if meta.control == "learned" else None),
               f"--net {cfg['net']} on --task {cfg['task']} with --task-arg {json.dumps(cfg['task_args'] or {})}")
    run_dir = cfg["run_dir"]
    # Under torchrun (WORLD_SIZE > 1) join the process group: every rank trains, rank 0 alone writes.
    dist_ctx = init_from_env(cfg["device"], timeout_s=args.dist_timeout)
    main_rank = dist_ctx is None or dist_ctx.is_main
    lock, created, logger = RunLock(run_dir), not os.path.exists(run_dir), Logger(None)
    started = False
    try:
        if dist_ctx is not None:
            net = net.to(dist_ctx.device)  # NCCL: this rank's GPU (cuda:LOCAL_RANK), not cuda:0
        error = None
        if main_rank:
            try:
                lock.acquire()  # before anything is written: a second run in this directory stops here
                if not args.resume and has_checkpoint(run_dir):
                    raise CLIError(f"{run_dir} already holds a run; pass --resume to continue it or choose "
                                   f"another --run-dir")
            except Exception as e:  # noqa: BLE001 - re-raised below, after every rank knows
                error = e
        if dist_ctx is not None and not dist_ctx.all_ok(error is None):
            error = error or CLIError("rank 0 could not take the run directory")
        if error is not None:
            raise error
        if main_rank:  # ranks other than 0 log nowhere
            logger = Logger(os.path.join(run_dir, "metrics.jsonl"))
        trainer = MetaTrainer(net, family, meta, run_dir=run_dir, logger=logger, progress=sys.stderr.isatty(),
                              dist=dist_ctx, optimizer=optimizer,
                              run_config={k: _jsonable(v) for k, v in cfg.items()})
        if args.resume:  # before config.json is written: a checkpoint that does not fit leaves the run untouched
            trainer.resume()
        started = True
        if main_rank:
            _write_json(os.path.join(run_dir, "config.json"),
                        _config_record(cfg, run_dir, args.resume, dist_ctx, trainer.iteration))
            logger.start_wandb(cfg["wandb"], {k: _jsonable(v) for k, v in cfg.items()}, run_dir=run_dir,
                               resume=args.resume)
        trainer.run()
        if trainer.meta_step and trainer.skipped == trainer.meta_step:
            raise RunFailed(f"all {trainer.meta_step} meta-steps were skipped (non-finite inner losses or "
                            f"meta-gradients): the meta-network was never updated, so no lopt.pt was written; "
                            f"see {os.path.join(run_dir, 'metrics.jsonl')}")
        if main_rank:
            path = os.path.join(run_dir, "lopt.pt")
            save_lopt(path, net)
            if logger.wandb is not None:
                logger.log_image("meta_loss_curve", plot_meta_loss(run_dir))
                logger.log_table("result", ["meta_steps", "skipped", "train_seconds", "best_val_score"],
                                 [[trainer.meta_step, trainer.skipped, trainer.train_seconds,
                                   trainer.best_score]])
                logger.log_artifact(path, "lopt", kind="model")
                logger.log_artifact(trainer.checkpoint_path, "checkpoint")
            print(f"meta-trained {cfg['net']} on {cfg['task']}: {trainer.meta_step} meta-steps, {trainer.skipped} "
                  f"skipped, {trainer.train_seconds:.1f} s; saved {path}")
    finally:
        logger.close()
        lock.release()
        if main_rank and created and not started:  # bad input found after the directory was made: leave nothing
            with contextlib.suppress(OSError):
                os.rmdir(run_dir)
        shutdown(dist_ctx)
    return 0


def add_flags(t: argparse.ArgumentParser) -> None:
    """The flags of ``meta-train``."""
    t.add_argument("--config", metavar="FILE", help="JSON object of settings (keys: the flag names with "
                   "underscores; task_args, net_args, optimizer_args: objects); flags override it")
    t.add_argument("--task", metavar="{" + ",".join(sorted(FAMILIES)) + "}", help="task family (default: quadratic)")
    t.add_argument("--task-arg", action="append", metavar="KEY=VALUE", help="task family argument, repeatable")
    t.add_argument("--net", metavar="{" + ",".join(LEARNED) + "}", help="meta-network; controller: learned LR "
                   "and stop decisions on top of --optimizer (default: lstm)")
    t.add_argument("--net-arg", action="append", metavar="KEY=VALUE", help="meta-network argument, repeatable")
    t.add_argument("--optimizer", metavar="{" + ",".join(OPTIMIZERS) + "}",
                   help="with --net controller: the hand-coded optimizer it controls")
    t.add_argument("--optimizer-arg", action="append", metavar="KEY=VALUE",
                   help="argument of --optimizer, repeatable (e.g. lr=0.03)")
    t.add_argument("--run-dir", metavar="DIR", help="where the run's files go (required)")
    t.add_argument("--augment", type=float, metavar="MAX_SCALE",
                   help="meta-train on tasks reparametrised per tensor, scales in [1/MAX_SCALE, MAX_SCALE] "
                        "(default: 1, off)")
    t.add_argument("--resume", action="store_true",
                   help="continue the run in --run-dir with its saved settings (only --iterations, "
                        "--checkpoint-every, --checkpoint-seconds, --wandb and --device may change)")
    t.add_argument("--wandb", metavar="{" + ",".join(WANDB_MODES) + "}",
                   help="W&B logging; offline needs no account (default: off)")
    t.add_argument("--device", help="cpu or cuda[:N] (default: cpu)")
    t.add_argument("--seed", type=parse_int, help="seed of the meta-weights and the tasks (default: 0)")
    t.add_argument("--dist-timeout", type=finite_float, metavar="SECONDS",
                   help=f"under torchrun: how long a rank waits for a stalled peer before failing (default: "
                        f"${TIMEOUT_ENV}, else {DEFAULT_TIMEOUT_S:g})")
    add_dataclass_flags(t, MetaConfig, skip={"seed"}, dashes=True,
                        choices={"meta_loss": META_LOSSES, "control": CONTROLS, "val_metric": VAL_METRICS,
                                 "estimator": ESTIMATORS},
                        help=META_HELP)
