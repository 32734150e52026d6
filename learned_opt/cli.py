"""``learned-opt``: meta-train, evaluate, compare and plot from the command line.

Settings come from an optional JSON config file (``--config``) overridden by flags. Every run directory holds
the resolved config, provenance (git commit, package versions), JSONL metrics and checkpoints. Bad input ends
with one ``error: ...`` line on stderr and exit code 2, and never overwrites an existing run.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import fields
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from .distributed import init_from_env, shutdown
from .evaluate import evaluate, lr_grid, tune_lr
from .flags import add_dataclass_flags
from .log import WANDB_MODES, Logger, provenance
from .meta import MetaConfig, MetaTrainer, load_lopt, save_lopt
from .optim import OPTIMIZERS, get_optimizer
from .optim.learned import LEARNED, build_learned
from .tasks import FAMILIES, get_family
from .tasks.augment import ReparamFamily


class CLIError(Exception):
    """A user error: printed as one line, exit code 2."""


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        pass
    if text.strip().lower() in ("nan", "inf", "+inf", "-inf", "infinity", "-infinity"):
        return float(text)  # so that a NaN hyper-parameter is reported as one, not as a type error on a string
    return text


def _kv(pairs: Optional[List[str]], what: str) -> Dict[str, Any]:
    out = {}
    for item in pairs or []:
        if "=" not in item:
            raise CLIError(f"{what} expects key=value, got {item!r}")
        k, v = item.split("=", 1)
        v = _parse_value(v)
        out[k] = tuple(v) if isinstance(v, list) else v
    return out


def _load_config(path: Optional[str]) -> Dict[str, Any]:
    if not path:
        return {}
    if not os.path.exists(path):
        raise CLIError(f"config file {path} does not exist")
    try:
        with open(path) as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CLIError(f"config file {path} is not valid JSON: {e}")
    if not isinstance(data, dict):
        raise CLIError(f"config file {path} must hold a JSON object, got {type(data).__name__}")
    return {k.replace("-", "_"): v for k, v in data.items()}


def _resolve(args: argparse.Namespace, defaults: Dict[str, Any]) -> Dict[str, Any]:
    """Defaults < config file < flags actually given."""
    resolved = dict(defaults)
    file_cfg = _load_config(getattr(args, "config", None))
    unknown = set(file_cfg) - set(defaults)
    if unknown:
        raise CLIError(f"unknown key(s) in config file: {', '.join(sorted(unknown))}")
    resolved.update(file_cfg)
    for k in defaults:
        v = getattr(args, k, None)
        if v is not None:
            resolved[k] = v
    return resolved


def _family(cfg: Dict[str, Any]):
    task_args = dict(cfg.get("task_args") or {})
    if cfg.get("device"):
        task_args.setdefault("device", cfg["device"])
    if cfg["task"] not in FAMILIES:
        raise CLIError(f"unknown task {cfg['task']!r}; known: {', '.join(sorted(FAMILIES))}")
    if "hidden" in task_args and isinstance(task_args["hidden"], (list, int)):
        h = task_args["hidden"]
        task_args["hidden"] = tuple(h) if isinstance(h, list) else (h,)
    try:
        return get_family(cfg["task"], **task_args)
    except TypeError as e:
        raise CLIError(f"bad task argument for {cfg['task']}: {e}")


def _check_device(device: str) -> None:
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise CLIError("--device cuda requested but CUDA is not available")
    if not (device == "cpu" or device.startswith("cuda")):
        raise CLIError(f"unknown device {device!r}; use cpu or cuda[:N]")


META_DEFAULTS = {f.name: f.default for f in fields(MetaConfig)}
TRAIN_DEFAULTS = dict(task="quadratic", task_args={}, net="lstm", net_args={}, run_dir=None, wandb="off",
                      device="cpu", augment=1.0, **META_DEFAULTS)


def cmd_meta_train(args) -> int:
    """Meta-train a meta-network; write run_dir/{config.json, metrics.jsonl, checkpoint.pt, lopt.pt}."""
    args.task_args = _kv(args.task_arg, "--task-arg") or None
    args.net_args = _kv(args.net_arg, "--net-arg") or None
    if args.curriculum is not None:
        try:
            args.curriculum = tuple(int(x) for x in args.curriculum.split(",") if x)
        except ValueError:
            raise CLIError(f"--curriculum expects comma-separated integers, got {args.curriculum!r}")
    cfg = _resolve(args, TRAIN_DEFAULTS)
    if not cfg["run_dir"]:
        raise CLIError("--run-dir is required")
    _check_device(cfg["device"])
    if cfg["wandb"] not in WANDB_MODES:
        raise CLIError(f"unknown --wandb mode {cfg['wandb']!r}; known: {', '.join(WANDB_MODES)}")
    if cfg["net"] not in LEARNED:
        raise CLIError(f"unknown meta-network {cfg['net']!r}; known: {', '.join(LEARNED)}")
    meta_kwargs = {k: cfg[k] for k in META_DEFAULTS}
    meta_kwargs["curriculum"] = tuple(meta_kwargs["curriculum"] or ())
    meta = MetaConfig(**meta_kwargs)
    meta.validate()
    family = _family(cfg)
    if cfg["augment"] != 1.0:  # meta-train on reparametrised tasks (learned_opt.tasks.augment)
        try:
            family = ReparamFamily(family, float(cfg["augment"]))
        except (TypeError, ValueError) as e:
            raise CLIError(f"--augment: {e}")
    family(torch.Generator().manual_seed(0))  # build one task now: bad task arguments fail before any write
    try:
        # The seed fixes the initial meta-weights too (without touching the global RNG): two runs with the
        # same flags start alike, in a fresh process or not.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg["seed"])
            net = build_learned(cfg["net"], **(cfg["net_args"] or {})).to(cfg["device"])
    except TypeError as e:
        raise CLIError(f"bad meta-network argument: {e}")
    run_dir = cfg["run_dir"]
    ckpt = os.path.join(run_dir, "checkpoint.pt")
    exists = os.path.exists(ckpt) or os.path.exists(ckpt + ".prev")
    if exists and not args.resume:
        raise CLIError(f"{run_dir} already holds a run; pass --resume to continue it or choose another --run-dir")
    # Under torchrun (WORLD_SIZE > 1) join the process group: every rank trains, rank 0 alone writes.
    dist_ctx = init_from_env(cfg["device"])
    try:
        if dist_ctx is not None:
            net = net.to(dist_ctx.device)  # NCCL: this rank's GPU (cuda:LOCAL_RANK), not cuda:0
        main_rank = dist_ctx is None or dist_ctx.is_main
        record = {"command": "meta-train", "config": {k: (list(v) if isinstance(v, tuple) else v)
                                                      for k, v in cfg.items()}, "provenance": provenance()}
        if dist_ctx is not None:
            record["world_size"] = dist_ctx.world_size
        logger = Logger(None)  # ranks other than 0 log nowhere
        if main_rank:
            os.makedirs(run_dir, exist_ok=True)
            logger = Logger(os.path.join(run_dir, "metrics.jsonl"), cfg["wandb"], record["config"],
                            run_dir=run_dir)
        trainer = MetaTrainer(net, family, meta, run_dir=run_dir, logger=logger, progress=sys.stderr.isatty(),
                              dist=dist_ctx)
        if exists:  # before config.json is rewritten: a checkpoint that does not fit leaves the run untouched
            trainer.resume()
        if main_rank:
            with open(os.path.join(run_dir, "config.json"), "w") as f:
                json.dump(record, f, indent=2)
        trainer.run()
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
            logger.close()
            print(f"meta-trained {cfg['net']} on {cfg['task']}: {trainer.meta_step} meta-steps, {trainer.skipped} "
                  f"skipped, {trainer.train_seconds:.1f} s; saved {path}")
    finally:
        shutdown(dist_ctx)
    return 0


def _lopt_path(args) -> str:
    path = args.lopt or (os.path.join(args.run_dir, "lopt.pt") if args.run_dir else None)
    if not path:
        raise CLIError("give --lopt PATH or --run-dir DIR")
    if not os.path.exists(path):
        raise CLIError(f"no saved meta-network at {path}")
    return path


def _stats(curves: np.ndarray, step: int) -> Dict[str, float]:
    x = curves[:, step]
    return {"mean": float(np.mean(x)), "median": float(np.median(x))}


def cmd_evaluate(args) -> int:
    """Evaluate a saved meta-network on test tasks; print and write eval.json next to it."""
    _check_device(args.device)
    path = _lopt_path(args)
    try:
        net = load_lopt(path).to(args.device)
    except RuntimeError as e:
        raise CLIError(str(e))
    family = _family({"task": args.task, "task_args": _kv(args.task_arg, "--task-arg"), "device": args.device})
    ctrl = net.as_controller if args.learned_control else None
    res = evaluate(family, net, ctrl, num_tasks=args.num_tasks, steps=args.steps, split="test", seed=args.seed,
                   val_every=args.val_every)
    out = {"lopt": path, "task": args.task, "steps": args.steps, **_stats(res.curves, args.steps),
           "mean_stop_step": float(np.mean(res.stop_steps))}
    print(json.dumps(out))
    with open(os.path.join(os.path.dirname(os.path.abspath(path)), "eval.json"), "w") as f:
        json.dump(out, f, indent=2)
    return 0


def cmd_compare(args) -> int:
    """Tune baselines on validation tasks, evaluate them and (optionally) a meta-network on test tasks."""
    _check_device(args.device)
    names = [n.strip().lower() for n in args.optimizers.split(",") if n.strip()]
    for n in names:
        if n not in OPTIMIZERS:
            raise CLIError(f"unknown optimizer {n!r}; known: {', '.join(sorted(OPTIMIZERS))}")
    family = _family({"task": args.task, "task_args": _kv(args.task_arg, "--task-arg"), "device": args.device})
    grid = lr_grid(args.grid_low, args.grid_high, args.grid_points)
    rows = {}
    for n in names:
        t = tune_lr(lambda lr, n=n: get_optimizer(n, lr=lr), family, grid=grid, steps=args.steps,
                    num_tasks=args.num_tasks, seed=args.seed, name=n)
        res = evaluate(family, get_optimizer(n, lr=t.best_lr), num_tasks=args.num_tasks, steps=args.steps,
                       split="test", seed=args.seed)
        rows[n] = dict(_stats(res.curves, args.steps), lr=t.best_lr, lr_at_grid_edge=t.at_edge)
    if args.lopt or args.run_dir:
        net = load_lopt(_lopt_path(args)).to(args.device)
        res = evaluate(family, net, num_tasks=args.num_tasks, steps=args.steps, split="test", seed=args.seed)
        rows["learned"] = _stats(res.curves, args.steps)
    lines = ["| optimizer | mean loss | median loss | lr |", "|---|---|---|---|"]
    for n, r in rows.items():
        lr = f"{r['lr']:.3g}" if "lr" in r else "-"
        lines.append(f"| {n} | {r['mean']:.4g} | {r['median']:.4g} | {lr} |")
    table = "\n".join(lines)
    print(table)
    if args.wandb not in ("off", "disabled"):
        logger = Logger(None, args.wandb, {"task": args.task, "steps": args.steps}, name="compare")
        logger.log_table("compare", ["optimizer", "mean", "median", "lr"],
                         [[n, r["mean"], r["median"], r.get("lr")] for n, r in rows.items()])
        logger.close()
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "compare.json"), "w") as f:
            json.dump({"task": args.task, "steps": args.steps, "results": rows, "provenance": provenance()},
                      f, indent=2)
        with open(os.path.join(args.out, "table.md"), "w") as f:
            f.write(table + "\n")
    return 0


def plot_meta_loss(run_dir: str, out: Optional[str] = None) -> str:
    """Plot meta-loss (and validation score) against the meta-step from ``run_dir/metrics.jsonl``."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        raise CLIError(f"no metrics.jsonl in {run_dir}")
    steps, losses, vsteps, vals = [], [], [], []
    with open(path) as f:
        for i, line in enumerate(f, 1):
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                raise CLIError(f"{path}:{i} is not valid JSON")
            if "meta_loss" in r:
                steps.append(r["meta_step"])
                losses.append(float(r["meta_loss"]))
            if "val_score" in r:
                vsteps.append(r["meta_step"])
                vals.append(float(r["val_score"]))
    if not steps:
        raise CLIError(f"{path} holds no meta-loss records")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, losses, lw=0.8, label="meta-loss (train)")
    if vals:
        ax.plot(vsteps, vals, "o-", label="validation score")
    if all(v > 0 for v in losses + vals):
        ax.set_yscale("log")
    ax.set_xlabel("meta-step")
    ax.legend()
    fig.tight_layout()
    out = out or os.path.join(run_dir, "meta_loss.png")
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def cmd_plot(args) -> int:
    """Plot meta-loss (and validation score) against the meta-step from a run's metrics.jsonl."""
    print(f"wrote {plot_meta_loss(args.run_dir, args.out)}")
    return 0


class _Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one ``error: ...`` line (exit code 2), like every other error."""

    def error(self, message: str):
        """Print one line and exit with code 2."""
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``learned-opt``."""
    p = _Parser(prog="learned-opt", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp, task=True):
        sp.add_argument("--device", default="cpu")
        sp.add_argument("--seed", type=int, default=0)
        if task:
            sp.add_argument("--task", default="quadratic")
            sp.add_argument("--task-arg", action="append", metavar="KEY=VALUE")

    t = sub.add_parser("meta-train", help=cmd_meta_train.__doc__)
    t.add_argument("--config")
    t.add_argument("--task")
    t.add_argument("--task-arg", action="append", metavar="KEY=VALUE")
    t.add_argument("--net")
    t.add_argument("--net-arg", action="append", metavar="KEY=VALUE")
    t.add_argument("--run-dir")
    t.add_argument("--augment", type=float, metavar="MAX_SCALE",
                   help="meta-train on tasks reparametrised per tensor, scales in [1/MAX_SCALE, MAX_SCALE]")
    t.add_argument("--resume", action="store_true")
    t.add_argument("--wandb")
    t.add_argument("--device")
    t.add_argument("--seed", type=int)
    add_dataclass_flags(t, MetaConfig, skip={"seed"}, dashes=True)
    t.set_defaults(fn=cmd_meta_train)

    e = sub.add_parser("evaluate", help=cmd_evaluate.__doc__)
    common(e)
    e.add_argument("--lopt")
    e.add_argument("--run-dir")
    e.add_argument("--steps", type=int, default=100)
    e.add_argument("--num-tasks", type=int, default=8)
    e.add_argument("--val-every", type=int, default=0)
    e.add_argument("--learned-control", action="store_true")
    e.set_defaults(fn=cmd_evaluate)

    c = sub.add_parser("compare", help=cmd_compare.__doc__)
    common(c)
    c.add_argument("--optimizers", default="sgd,momentum,nesterov,adam,rmsprop")
    c.add_argument("--lopt")
    c.add_argument("--run-dir")
    c.add_argument("--steps", type=int, default=100)
    c.add_argument("--num-tasks", type=int, default=4)
    c.add_argument("--grid-low", type=float, default=1e-4)
    c.add_argument("--grid-high", type=float, default=1.0)
    c.add_argument("--grid-points", type=int, default=9)
    c.add_argument("--out")
    c.add_argument("--wandb", default="off", choices=WANDB_MODES)
    c.set_defaults(fn=cmd_compare)

    pl = sub.add_parser("plot", help=cmd_plot.__doc__)
    pl.add_argument("--run-dir", required=True)
    pl.add_argument("--out")
    pl.set_defaults(fn=cmd_plot)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point: run a subcommand; user errors become one line on stderr and exit code 2."""
    args = build_parser().parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1") or 1))
    try:
        return args.fn(args)
    except (CLIError, ValueError, RuntimeError, TypeError, OSError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
