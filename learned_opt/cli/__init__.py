"""``learned-opt``: meta-train, evaluate, compare and plot from the command line.

Settings come from an optional JSON config file (``--config``) overridden by flags; the file's keys are the flag
names with underscores (``task_args``, ``net_args``, ``optimizer_args`` and ``curriculum`` hold a JSON object or
list) and every value is type-checked. Every run directory holds the resolved config, provenance (git commit,
package versions), JSONL metrics and checkpoints, and a lock file while a process trains in it. ``--resume``
continues a run with its own saved settings. Bad input ends with one ``error: ...`` line on stderr and exit code
2, writes nothing and never overwrites an existing run; a run that fails (every meta-step skipped) exits 1, and
one stopped by SIGINT / SIGTERM saves a checkpoint and exits 128 + the signal number.
"""
from __future__ import annotations

import argparse
import sys
import warnings
from typing import List, Optional

import torch

from ..flags import at_most
from ..meta import Interrupted
from . import compare, evaluate, meta_train, plot
from .common import THREADS_HELP, CLIError, RunFailed, _Parser, check_device, make_family, make_optimizer, task_dtype
from .compare import cmd_compare
from .evaluate import cmd_evaluate
from .meta_train import cmd_meta_train
from .plot import cmd_plot, plot_meta_loss
from .settings import RunSettings, flag_name, resolve_train_config, run_config

__all__ = ["CLIError", "RunFailed", "RunSettings", "VERBS", "build_parser", "check_device", "cmd_compare",
           "cmd_evaluate", "cmd_meta_train", "cmd_plot", "flag_name", "main", "make_family", "make_optimizer",
           "plot_meta_loss", "resolve_train_config", "run_config", "task_dtype"]

# The verbs in the order ``--help`` lists them: (name, function, what adds its flags).
VERBS = (("meta-train", cmd_meta_train, meta_train.add_flags), ("evaluate", cmd_evaluate, evaluate.add_flags),
         ("compare", cmd_compare, compare.add_flags), ("plot", cmd_plot, plot.add_flags))


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``learned-opt``."""
    p = _Parser(prog="learned-opt", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    shared = _Parser(add_help=False)
    shared.add_argument("--threads", type=at_most(1024, "threads"), default=1, metavar="N", help=THREADS_HELP)
    for name, fn, add_flags in VERBS:
        sp = sub.add_parser(name, help=fn.__doc__.split(";")[0], description=" ".join(fn.__doc__.split()),
                            parents=[shared])
        sp.set_defaults(fn=fn)
        add_flags(sp)
    return p


def _one_line_warning(message, category, filename, lineno, file=None, line=None):
    """Warnings as one ``warning: ...`` line (Python's default adds the source line: two lines each)."""
    print(f"warning: {message}", file=file or sys.stderr)


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point: run a subcommand; user errors become one line on stderr and exit code 2."""
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    with warnings.catch_warnings():
        warnings.showwarning = _one_line_warning
        try:
            return args.fn(args)
        except Interrupted as e:
            print(f"error: {e}; continue with --resume", file=sys.stderr)
            return 128 + e.signum
        except RunFailed as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        except (CLIError, ValueError, RuntimeError, TypeError, OSError) as e:
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            print(f"error: {msg}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("error: interrupted", file=sys.stderr)
            return 130
