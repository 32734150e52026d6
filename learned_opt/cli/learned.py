"""The saved meta-network that ``evaluate`` and ``compare`` run: its flags, where it comes from (``--lopt`` or a
run directory), the task and control it runs with (its run's own unless flags say otherwise), and the pieces
(optimizer, controller) that run it."""
from __future__ import annotations

import argparse
import os
from typing import Any, Dict, Optional, Tuple

from ..flags import parse_int
from ..meta import MAX_HORIZON, has_checkpoint, load_lopt
from ..optim import OPTIMIZERS
from ..optim.learned import kind_of
from ..tasks import FAMILIES
from .common import STEPS, CLIError, _kv, make_optimizer, task_dtype
from .settings import run_config


def learned_flags(sp: argparse.ArgumentParser, what: str) -> None:
    """The flags that name a saved meta-network and what it runs on (``what``: the verb, in the help texts)."""
    sp.add_argument("--lopt", metavar="FILE", help=f"a saved meta-network (lopt.pt) to {what}")
    sp.add_argument("--run-dir", metavar="DIR", help=f"a meta-train run directory: {what} its lopt.pt with "
                    "the run's task, task arguments and control")
    sp.add_argument("--task", metavar="{" + ",".join(sorted(FAMILIES)) + "}",
                    help="task family (default: the run's task, else quadratic)")
    sp.add_argument("--task-arg", action="append", metavar="KEY=VALUE",
                    help="task family argument, repeatable (default: the run's, when --task is its task)")
    sp.add_argument("--learned-control", action=argparse.BooleanOptionalAction, default=None,
                    help="run the meta-network's learned LR and stop heads (default: as the run was trained)")
    sp.add_argument("--optimizer", metavar="{" + ",".join(OPTIMIZERS) + "}",
                    help="for a learned controller: the optimizer it controls (default: its run's)")
    sp.add_argument("--optimizer-arg", action="append", metavar="KEY=VALUE",
                    help="for a learned controller: an argument of --optimizer, repeatable")
    sp.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default: %(default)s)")
    sp.add_argument("--seed", type=parse_int, default=0, help="seed of the test tasks (default: %(default)s)")
    sp.add_argument("--steps", type=STEPS, default=100, metavar="N",
                    help=f"inner steps per task, at most {MAX_HORIZON} (default: %(default)s)")


def _learned_source(args) -> Tuple[Optional[str], Optional[str], Optional[Dict[str, Any]]]:
    """``(lopt path, run directory, run settings)`` of ``--lopt`` / ``--run-dir``; a run directory is one that a
    ``meta-train`` wrote (a ``--lopt`` file inside one belongs to it)."""
    if not (args.lopt or args.run_dir):
        return None, None, None
    path = args.lopt or os.path.join(args.run_dir, "lopt.pt")
    if args.run_dir and not os.path.isdir(args.run_dir):
        raise CLIError(f"--run-dir: there is no run directory {args.run_dir}")
    if not os.path.exists(path):
        hint = ""
        if args.run_dir and has_checkpoint(args.run_dir):
            hint = f" (the run has not finished: continue it with meta-train --run-dir {args.run_dir} --resume)"
        raise CLIError(f"no saved meta-network at {path}{hint}")
    run_dir = args.run_dir or os.path.dirname(os.path.abspath(path))
    saved = run_config(run_dir)
    return path, (run_dir if saved is not None else None), saved


def _load_net(path: str, device: str, family):
    try:
        return load_lopt(path).to(device=device, dtype=task_dtype(family))
    except (RuntimeError, ValueError) as e:
        raise CLIError(str(e))


def _task_and_control(args, saved: Optional[Dict[str, Any]]):
    """The evaluation task family and whether the learned LR / stop heads run: the run's own unless flags say."""
    saved = saved or {}
    task = args.task or saved.get("task") or "quadratic"
    given = _kv(args.task_arg, "--task-arg")
    if given or task != saved.get("task"):
        task_args = given
    else:  # the run's arguments, but evaluated where --device says
        task_args = {k: v for k, v in (saved.get("task_args") or {}).items() if k != "device"}
    control = args.learned_control
    if control is None:
        control = saved.get("control") == "learned"
    return task, task_args, control


def _learned_pieces(net, control: bool, args, saved: Optional[Dict[str, Any]]):
    """``(optimizer, controller factory, optimizer spec)`` that run a loaded meta-network."""
    if kind_of(net) == "controller":
        name = args.optimizer or (saved or {}).get("optimizer")
        opt_args = _kv(args.optimizer_arg, "--optimizer-arg") if args.optimizer else \
            dict((saved or {}).get("optimizer_args") or {})
        if not name:
            raise CLIError("a learned controller needs the optimizer it controls: give --optimizer NAME "
                           "[--optimizer-arg KEY=VALUE] (its run directory would say)")
        return make_optimizer(name, opt_args), (lambda: net), {"optimizer": name, "optimizer_args": opt_args}
    if args.optimizer:
        raise CLIError(f"--optimizer is for learned controllers; {kind_of(net)} computes its own updates")
    return net, (net.as_controller if control else None), {}
