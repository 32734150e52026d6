"""The settings of a ``meta-train`` run: defaults < ``--config`` file < flags for a new run, and for ``--resume``
the run's saved settings, of which only a few may change (a conflicting flag is refused, naming both values)."""
from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import os
import warnings
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Dict, Optional, Tuple

import torch

from ..flags import coerce, coerce_kwargs, parse_int, type_hints
from ..meta import CHECKPOINT, RESUMABLE, MetaConfig, has_checkpoint, load_checkpoint
from ..optim import OPTIMIZERS
from ..optim.learned import LEARNED
from ..tasks import FAMILIES
from .common import CLIError, _kv


@dataclass
class RunSettings:
    """What ``meta-train`` needs besides :class:`MetaConfig`: the task, the meta-network, where and how to log."""
    task: str = "quadratic"
    task_args: Dict[str, Any] = field(default_factory=dict)
    net: str = "lstm"
    net_args: Dict[str, Any] = field(default_factory=dict)
    optimizer: Optional[str] = None  # --net controller: the hand-coded optimizer whose LR and stop it learns
    optimizer_args: Dict[str, Any] = field(default_factory=dict)
    run_dir: Optional[str] = None
    wandb: str = "off"
    device: str = "cpu"
    augment: float = 1.0


META_DEFAULTS = {f.name: f.default for f in fields(MetaConfig)}
INT_LIST_FLAGS = ("curriculum", "sample_horizons")  # comma-separated integers on the command line
TRAIN_DEFAULTS = {**asdict(RunSettings()), **META_DEFAULTS}
TRAIN_TYPES = {**type_hints(RunSettings), **type_hints(MetaConfig)}
# Settings that a resumed run may change besides RESUMABLE: where it logs and computes, not what it learns.
RESUME_MAY_CHANGE = (*RESUMABLE, "wandb", "device", "run_dir")
KV_FLAGS = {"task_args": "--task-arg", "net_args": "--net-arg", "optimizer_args": "--optimizer-arg"}


def flag_name(key: str) -> str:
    """The command-line flag of setting ``key``."""
    return KV_FLAGS.get(key, "--" + key.replace("_", "-"))


def _load_config(path: Optional[str]) -> Dict[str, Any]:
    """The settings of a ``--config`` file, each checked against its type."""
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
    data = {k.replace("-", "_"): v for k, v in data.items()}
    unknown = set(data) - set(TRAIN_DEFAULTS)
    if unknown:
        raise CLIError(f"unknown key(s) in config file {path}: {', '.join(sorted(unknown))}")
    try:
        return {k: _jsonable(coerce(v, TRAIN_TYPES[k], f"config file {path}: {k}")) for k, v in data.items()}
    except ValueError as e:
        raise CLIError(str(e))


def _jsonable(v: Any) -> Any:
    return list(v) if isinstance(v, tuple) else v


def _given_flags(args) -> Dict[str, Any]:
    """The meta-train settings given as flags (a flag not given is absent)."""
    given = {k: getattr(args, k) for k in TRAIN_DEFAULTS
             if k not in KV_FLAGS and getattr(args, k, None) is not None}
    for key, flag in KV_FLAGS.items():
        pairs = getattr(args, key.replace("_args", "_arg"), None)
        if pairs:
            given[key] = _kv(pairs, flag)
    for key in INT_LIST_FLAGS:
        if key in given:
            try:
                given[key] = [parse_int(x) for x in given[key].split(",") if x]
            except argparse.ArgumentTypeError:
                raise CLIError(f"--{key.replace('_', '-')} expects comma-separated integers, got {given[key]!r}")
    return given


def _canonical(key: str, value: Any, cfg: Dict[str, Any]) -> Any:
    """A setting in a form where equal meanings compare equal (``hidden=8`` and ``hidden=[8]``, dtype names)."""
    cls = _arg_classes(cfg).get(key)
    if cls is not None and isinstance(value, dict):
        with contextlib.suppress(ValueError):
            value = coerce_kwargs(cls, value, flag_name(key))
    if isinstance(value, (list, tuple)):
        return [_canonical("", v, cfg) for v in value]
    if isinstance(value, dict):
        return {k: _canonical("", v, cfg) for k, v in sorted(value.items())}
    if isinstance(value, torch.dtype):
        return str(value).replace("torch.", "")
    return value


def _arg_classes(cfg: Dict[str, Any]) -> Dict[str, Any]:
    """The class whose keyword arguments each ``*_args`` setting holds, under the settings ``cfg``."""
    return {"task_args": FAMILIES.get(str(cfg.get("task"))), "net_args": LEARNED.get(str(cfg.get("net"))),
            "optimizer_args": OPTIMIZERS.get(str(cfg.get("optimizer")).lower())}


def _conflict(key: str, value: Any, cfg: Dict[str, Any]) -> Optional[Tuple[str, str]]:
    """``(asked, saved)`` texts when setting ``key`` = ``value`` contradicts the saved ``cfg``, else None.

    For ``*_args`` only the keys given are compared (an argument the run did not set has its default)."""
    if key not in KV_FLAGS or not isinstance(value, dict) or not isinstance(cfg.get(key), dict):
        if _canonical(key, value, cfg) == _canonical(key, cfg[key], cfg):
            return None
        shown = json.dumps(value) if isinstance(value, (dict, list)) else value
        return str(shown), f"{key}={cfg[key]!r}"
    cls, saved = _arg_classes(cfg).get(key), cfg[key]
    defaults = {n: p.default for n, p in inspect.signature(cls).parameters.items()} if cls else {}
    for k, v in value.items():
        if k in saved:
            before, text = saved[k], f"{k}={json.dumps(saved[k])}"
        else:
            before = defaults.get(k, inspect.Parameter.empty)
            text = f"{k} not set, so {before!r}"
        if _canonical(key, {k: v}, cfg) != _canonical(key, {k: before}, cfg):
            return f"{k}={json.dumps(v)}", text
    return None


def run_config(run_dir: str) -> Optional[Dict[str, Any]]:
    """The saved settings of the meta-training run in ``run_dir`` (its config.json, else its checkpoint)."""
    try:
        with open(os.path.join(run_dir, "config.json")) as f:
            record = json.load(f)
        if isinstance(record, dict) and record.get("command") == "meta-train" and isinstance(record.get("config"),
                                                                                              dict):
            return {**TRAIN_DEFAULTS, **record["config"]}
    except (OSError, ValueError):
        pass
    if has_checkpoint(run_dir):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                saved = load_checkpoint(os.path.join(run_dir, CHECKPOINT)).get("run_config")
            except (RuntimeError, ValueError):
                saved = None
        if isinstance(saved, dict):
            return {**TRAIN_DEFAULTS, **saved}
    return None


def resolve_train_config(args) -> Dict[str, Any]:
    """Defaults < config file < flags for a new run; the run's saved settings (plus allowed changes) on resume."""
    given = _given_flags(args)
    file_cfg = _load_config(getattr(args, "config", None))
    if not args.resume:
        cfg = {**TRAIN_DEFAULTS, **file_cfg, **given}
        for key, cls in _arg_classes(cfg).items():  # arguments from the file are reported as the file's
            if key in file_cfg and key not in given and cls is not None:
                try:
                    coerce_kwargs(cls, cfg[key], f"config file {args.config}: {key}")
                except ValueError as e:
                    raise CLIError(str(e))
        if cfg["net"] == "controller" and "control" not in file_cfg and "control" not in given:
            cfg["control"] = "learned"  # a learned controller makes LR and stop decisions: that is its job
        if not cfg["run_dir"]:
            raise CLIError("--run-dir is required")
        return cfg
    run_dir = given.get("run_dir") or file_cfg.get("run_dir")
    if not run_dir:
        raise CLIError("--resume needs --run-dir DIR (the run to continue)")
    if not os.path.isdir(run_dir):
        raise CLIError(f"--resume: there is no run directory {run_dir}")
    if not has_checkpoint(run_dir):
        raise CLIError(f"--resume: {run_dir} holds no checkpoint.pt to resume from; start it without --resume")
    cfg = run_config(run_dir)
    if cfg is None:
        raise CLIError(f"--resume: {run_dir} has no readable config.json and its checkpoint holds no run settings")
    where = os.path.join(run_dir, "config.json")
    for source, values in ((f"config file {args.config}: ", file_cfg), ("", given)):
        for k, v in values.items():
            if k in RESUME_MAY_CHANGE:
                cfg[k] = v
                continue
            clash = _conflict(k, v, cfg)
            if clash is not None:
                asked, saved = clash
                what = f"{source}{k}" if source else flag_name(k)
                raise CLIError(f"{what} {asked} conflicts with the run being resumed ({saved} in {where}): a "
                               f"resumed run keeps its settings; drop it, or start a new run in another --run-dir")
    cfg["run_dir"] = run_dir
    return cfg
