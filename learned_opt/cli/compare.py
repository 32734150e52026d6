"""``learned-opt compare``: hand-coded optimizers with learning rates tuned on validation tasks, and optionally a
saved meta-network, evaluated on the same test tasks; a markdown table, compare.json and a W&B table."""
from __future__ import annotations

import argparse
import os

from ..evaluate import evaluate, lr_grid, tune_lr
from ..flags import finite_float, parse_int
from ..log import WANDB_MODES, Logger, provenance
from ..optim import OPTIMIZERS, get_optimizer
from .common import CLIError, _check_writable, _stats, _write_json, check_device, make_family
from .learned import _learned_pieces, _learned_source, _load_net, _task_and_control, learned_flags


def cmd_compare(args) -> int:
    """Tune baselines on validation tasks, evaluate them and (optionally) a meta-network on test tasks."""
    check_device(args.device)
    names = [n.strip().lower() for n in args.optimizers.split(",") if n.strip()]
    if not names:
        raise CLIError(f"--optimizers names no optimizer (got {args.optimizers!r}); known: "
                       f"{', '.join(sorted(OPTIMIZERS))}")
    for n in names:
        if n not in OPTIMIZERS:
            raise CLIError(f"unknown optimizer {n!r} in --optimizers; known: {', '.join(sorted(OPTIMIZERS))}")
    if args.out:  # all the checks of the output before the tuning, which takes minutes
        if os.path.exists(args.out) and not os.path.isdir(args.out):
            raise CLIError(f"--out {args.out} is a file; give a directory")
        _check_writable(os.path.join(args.out, "compare.json"), "--out")
        taken = [n for n in ("compare.json", "table.md") if os.path.exists(os.path.join(args.out, n))]
        if taken and not args.force:
            raise CLIError(f"--out {args.out} already holds {', '.join(taken)}; pass --force to replace them or "
                           f"choose another --out")
    try:
        grid = lr_grid(args.grid_low, args.grid_high, args.grid_points)
    except ValueError as e:
        raise CLIError(f"--grid-low / --grid-high / --grid-points: {e}")
    path, _, saved = _learned_source(args)
    task, task_args, control = _task_and_control(args, saved)
    family = make_family(task, task_args, args.device)
    learned = None
    if path is not None:
        net = _load_net(path, args.device, family)
        learned = _learned_pieces(net, control, args, saved)[:2]
    rows = {}
    for n in names:
        t = tune_lr(lambda lr, n=n: get_optimizer(n, lr=lr), family, grid=grid, steps=args.steps,
                    num_tasks=args.num_tasks, seed=args.seed, name=n)
        res = evaluate(family, get_optimizer(n, lr=t.best_lr), num_tasks=args.num_tasks, steps=args.steps,
                       split="test", seed=args.seed)
        rows[n] = dict(_stats(res.curves, args.steps), lr=t.best_lr, lr_at_grid_edge=t.at_edge)
    if learned is not None:
        res = evaluate(family, learned[0], learned[1], num_tasks=args.num_tasks, steps=args.steps, split="test",
                       seed=args.seed)
        rows["learned"] = dict(_stats(res.curves, args.steps), learned_control=control)
    lines = ["| optimizer | mean loss | median loss | lr |", "|---|---|---|---|"]
    for n, r in rows.items():
        lr = f"{r['lr']:.3g}" if "lr" in r else "-"
        lines.append(f"| {n} | {r['mean']:.4g} | {r['median']:.4g} | {lr} |")
    table = "\n".join(lines)
    print(table)
    if args.wandb not in ("off", "disabled"):
        logger = Logger(None, args.wandb, {"task": task, "steps": args.steps}, name="compare")
        logger.log_table("compare", ["optimizer", "mean", "median", "lr"],
                         [[n, r["mean"], r["median"], r.get("lr")] for n, r in rows.items()])
        logger.close()
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        _write_json(os.path.join(args.out, "compare.json"),
                    {"task": task, "task_args": task_args, "steps": args.steps, "results": rows,
                     "provenance": provenance()})
        with open(os.path.join(args.out, "table.md"), "w") as f:
            f.write(table + "\n")
    return 0


def add_flags(c: argparse.ArgumentParser) -> None:
    """The flags of ``compare``."""
    learned_flags(c, "add")
    c.add_argument("--optimizers", default="sgd,momentum,nesterov,adam,rmsprop",
                   help=f"comma-separated, from {', '.join(OPTIMIZERS)} (default: %(default)s)")
    c.add_argument("--num-tasks", type=parse_int, default=4, metavar="N",
                   help="validation and test tasks (default: %(default)s)")
    c.add_argument("--grid-low", type=finite_float, default=1e-4, help="lowest learning rate (default: %(default)s)")
    c.add_argument("--grid-high", type=finite_float, default=1.0, help="highest learning rate (default: %(default)s)")
    c.add_argument("--grid-points", type=parse_int, default=9, metavar="N",
                   help="learning rates, log-spaced (default: %(default)s)")
    c.add_argument("--out", metavar="DIR", help="write compare.json and table.md there (default: print only)")
    c.add_argument("--force", action="store_true", help="replace compare.json and table.md in --out")
    c.add_argument("--wandb", default="off", choices=WANDB_MODES, help="W&B table (default: %(default)s)")
