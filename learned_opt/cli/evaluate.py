"""``learned-opt evaluate``: a saved meta-network on test tasks; the result is printed and written to ``--out``
or to eval.json in its run directory (never over another evaluation's file unless ``--force``)."""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

from ..evaluate import evaluate
from ..flags import parse_int
from .common import CLIError, _check_writable, _stats, _write_json, check_device, make_family
from .learned import _learned_pieces, _learned_source, _load_net, _task_and_control, learned_flags


def cmd_evaluate(args) -> int:
    """Evaluate a saved meta-network on test tasks (by default its run's task and control); print the result and
    write it to --out, or to eval.json in the run directory."""
    check_device(args.device)
    path, run_dir, saved = _learned_source(args)
    if path is None:
        raise CLIError("give --lopt PATH or --run-dir DIR")
    task, task_args, control = _task_and_control(args, saved)
    family = make_family(task, task_args, args.device)
    net = _load_net(path, args.device, family)
    optimizer, controller_fn, spec = _learned_pieces(net, control, args, saved)
    out = args.out or (os.path.join(run_dir, "eval.json") if run_dir else None)
    settings = {"lopt": os.path.abspath(path), "task": task, "task_args": task_args, "learned_control": control,
                **spec, "steps": args.steps, "num_tasks": args.num_tasks, "seed": args.seed,
                "val_every": args.val_every}
    if out is not None:
        _check_writable(out, "--out" if args.out else "evaluation file")
        if os.path.exists(out) and not args.force:
            try:
                with open(out) as f:
                    same = json.load(f).get("settings") == json.loads(json.dumps(settings))
            except (OSError, ValueError, AttributeError):
                same = False
            if not same:
                raise CLIError(f"{out} holds another evaluation; pass --out FILE to write elsewhere or --force to "
                               f"replace it")
    res = evaluate(family, optimizer, controller_fn, num_tasks=args.num_tasks, steps=args.steps, split="test",
                   seed=args.seed, val_every=args.val_every)
    result = {"lopt": path, "task": task, "steps": args.steps, **_stats(res.curves, args.steps),
              "mean_stop_step": float(np.mean(res.stop_steps)), "settings": settings}
    print(json.dumps(result))
    if out is not None:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        _write_json(out, result)
    else:
        print("(not saved: --lopt is outside a run directory; pass --out FILE to save it)", file=sys.stderr)
    return 0


def add_flags(e: argparse.ArgumentParser) -> None:
    """The flags of ``evaluate``."""
    learned_flags(e, "evaluate")
    e.add_argument("--num-tasks", type=parse_int, default=8, metavar="N", help="test tasks (default: %(default)s)")
    e.add_argument("--val-every", type=parse_int, default=0, metavar="N",
                   help="inner steps between validation losses, for learned stopping (default: %(default)s)")
    e.add_argument("--out", metavar="FILE", help="where to write the result (default: eval.json in the run "
                   "directory; a --lopt outside one is only printed)")
    e.add_argument("--force", action="store_true", help="replace an existing evaluation file of other settings")
