"""What every ``learned-opt`` verb shares: the one-line errors, the argument parser that reports usage errors as
one line, ``KEY=VALUE`` flag values, and the builders of the task family, the hand-coded optimizer and the
output files from flags (each refusing bad input before anything is written)."""
from __future__ import annotations

import argparse
import json
import os
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from ..flags import at_most, coerce_kwargs
from ..meta import MAX_HORIZON
from ..optim import OPTIMIZERS, get_optimizer
from ..tasks import FAMILIES, get_family
from ..tasks.augment import ReparamFamily


class CLIError(Exception):
    """A user error: printed as one line, exit code 2."""


class RunFailed(Exception):
    """A run that went through but produced nothing usable: printed as one line, exit code 1."""


class _Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one ``error: ...`` line (exit code 2), like every other error."""

    def error(self, message: str):
        """Print one line and exit with code 2."""
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


THREADS_HELP = ("torch intra-op threads (default: 1: the meta-networks' ops are tiny, and on a busy machine more "
                "threads make them slower, not faster; OMP_NUM_THREADS is not read)")
STEPS = at_most(MAX_HORIZON, "learned_opt.meta.MAX_HORIZON inner steps")


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
        out[k] = _parse_value(v)
    return out


def check_device(device: Any, what: str = "--device") -> None:
    """Refuse a device that is not ``cpu`` or an available ``cuda[:N]``, naming the flag ``what``."""
    device = str(device)
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise CLIError(f"{what} {device} requested but CUDA is not available")
        index = device.partition(":")[2]
        if index and (not index.isdigit() or int(index) >= torch.cuda.device_count()):
            raise CLIError(f"{what} {device}: no such CUDA device ({torch.cuda.device_count()} available)")
    elif device != "cpu":
        raise CLIError(f"unknown device {device!r} for {what}; use cpu or cuda[:N]")


def make_family(task: Optional[str], task_args: Dict[str, Any], device: str, augment: float = 1.0):
    """The task family of ``--task`` / ``--task-arg`` (one task is built, so bad arguments fail before any write)."""
    if task not in FAMILIES:
        raise CLIError(f"unknown task {task!r}; known: {', '.join(sorted(FAMILIES))}")
    try:
        kwargs = coerce_kwargs(FAMILIES[task], task_args or {}, "--task-arg")
    except ValueError as e:
        raise CLIError(str(e))
    kwargs.setdefault("device", device)
    check_device(kwargs["device"], "--task-arg device" if "device" in (task_args or {}) else "--device")
    try:
        family = get_family(task, **kwargs)
        if augment != 1.0:  # meta-train on reparametrised tasks (learned_opt.tasks.augment)
            family = ReparamFamily(family, float(augment))
    except (TypeError, ValueError) as e:
        raise CLIError(f"{'--augment' if augment != 1.0 else '--task-arg'}: {e}")
    try:
        family(torch.Generator().manual_seed(0))
    except (TypeError, ValueError, RuntimeError) as e:
        raise CLIError(f"--task {task} with --task-arg {json.dumps(task_args or {})}: {str(e).splitlines()[0]}")
    return family


def make_optimizer(name: Optional[str], optimizer_args: Dict[str, Any]):
    """The hand-coded optimizer of ``--optimizer`` / ``--optimizer-arg``."""
    if str(name).lower() not in OPTIMIZERS:
        raise CLIError(f"unknown optimizer {name!r} for --optimizer; known: {', '.join(sorted(OPTIMIZERS))}")
    try:
        return get_optimizer(name, **coerce_kwargs(OPTIMIZERS[name.lower()], optimizer_args or {}, "--optimizer-arg"))
    except (TypeError, ValueError) as e:
        raise CLIError(f"--optimizer-arg: {e}" if not str(e).startswith("--") else str(e))


def task_dtype(family) -> torch.dtype:
    """The dtype of the family's learner parameters: the meta-network computes in it too."""
    g = torch.Generator().manual_seed(0)
    return family(g).init(g)[0].dtype


def _write_json(path: str, obj: Any) -> None:
    """Write JSON atomically: a crash leaves the old file or the new one, never half of one."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def _check_writable(path: str, what: str) -> None:
    """Refuse, before any work, an output path whose folder cannot be created or written."""
    folder = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(folder):
        folder = os.path.dirname(folder)
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK | os.X_OK):
        raise CLIError(f"{what} {path}: cannot write in {folder}")


def _stats(curves: np.ndarray, step: int) -> Dict[str, float]:
    x = curves[:, step]
    return {"mean": float(np.mean(x)), "median": float(np.median(x))}
