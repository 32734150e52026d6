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
import contextlib
import inspect
import json
import os
import sys
import warnings
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

from .distributed import DEFAULT_TIMEOUT_S, TIMEOUT_ENV, init_from_env, shutdown
from .evaluate import evaluate, lr_grid, tune_lr
from .flags import (add_dataclass_flags, at_most, coerce, coerce_kwargs, finite_float, parse_int, type_hints)
from .log import WANDB_MODES, Logger, provenance, read_records
from .meta import (CHECKPOINT, CONTROLS, ESTIMATORS, MAX_HORIZON, META_LOSSES, RESUMABLE, VAL_METRICS, Interrupted,
                   MetaConfig, MetaTrainer, RunLock, has_checkpoint, load_checkpoint, load_lopt, save_lopt)
from .optim import OPTIMIZERS, get_optimizer
from .optim.learned import LEARNED, build_learned, kind_of
from .tasks import FAMILIES, get_family
from .tasks.augment import ReparamFamily


class CLIError(Exception):
    """A user error: printed as one line, exit code 2."""


class RunFailed(Exception):
    """A run that went through but produced nothing usable: printed as one line, exit code 1."""


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
THREADS_HELP = ("torch intra-op threads (default: 1: the meta-networks' ops are tiny, and on a busy machine more "
                "threads make them slower, not faster; OMP_NUM_THREADS is not read)")


def flag_name(key: str) -> str:
    """The command-line flag of setting ``key``."""
    return KV_FLAGS.get(key, "--" + key.replace("_", "-"))


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


def task_dtype(family) -> torch.dtype:
    """The dtype of the family's learner parameters: the meta-network computes in it too."""
    g = torch.Generator().manual_seed(0)
    return family(g).init(g)[0].dtype


def _preflight(family, optimizer, controller, what: str) -> None:
    """One inner step on one task before anything is written: combinations that cannot run fail here, as bad
    input, instead of minutes later in the middle of a run."""
    from .unroll import unroll

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


def _write_json(path: str, obj: Any) -> None:
    """Write JSON atomically: a crash leaves the old file or the new one, never half of one."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


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


def plot_meta_loss(run_dir: str, out: Optional[str] = None) -> str:
    """Plot meta-loss (and validation score) against the meta-step from ``run_dir/metrics.jsonl``."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        raise CLIError(f"no metrics.jsonl in {run_dir}")
    try:
        records = read_records(path)
    except ValueError as e:
        raise CLIError(str(e))
    steps, losses, vsteps, vals = [], [], [], []
    for r in records:
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
    if args.out:
        _check_writable(args.out, "--out")
    print(f"wrote {plot_meta_loss(args.run_dir, args.out)}")
    return 0


class _Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one ``error: ...`` line (exit code 2), like every other error."""

    def error(self, message: str):
        """Print one line and exit with code 2."""
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


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
STEPS = at_most(MAX_HORIZON, "learned_opt.meta.MAX_HORIZON inner steps")
TASKS_HELP = f"task family: {', '.join(sorted(FAMILIES))}"


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``learned-opt``."""
    p = _Parser(prog="learned-opt", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    shared = _Parser(add_help=False)
    shared.add_argument("--threads", type=at_most(1024, "threads"), default=1, metavar="N", help=THREADS_HELP)

    def parser(name, fn):
        sp = sub.add_parser(name, help=fn.__doc__.split(";")[0], description=" ".join(fn.__doc__.split()),
                            parents=[shared])
        sp.set_defaults(fn=fn)
        return sp

    def learned_flags(sp, what):
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

    t = parser("meta-train", cmd_meta_train)
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

    e = parser("evaluate", cmd_evaluate)
    learned_flags(e, "evaluate")
    e.add_argument("--num-tasks", type=parse_int, default=8, metavar="N", help="test tasks (default: %(default)s)")
    e.add_argument("--val-every", type=parse_int, default=0, metavar="N",
                   help="inner steps between validation losses, for learned stopping (default: %(default)s)")
    e.add_argument("--out", metavar="FILE", help="where to write the result (default: eval.json in the run "
                   "directory; a --lopt outside one is only printed)")
    e.add_argument("--force", action="store_true", help="replace an existing evaluation file of other settings")

    c = parser("compare", cmd_compare)
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

    pl = parser("plot", cmd_plot)
    pl.add_argument("--run-dir", required=True, metavar="DIR", help="a meta-train run directory")
    pl.add_argument("--out", metavar="FILE", help="figure file (default: DIR/meta_loss.png)")
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


if __name__ == "__main__":
    sys.exit(main())
