"""Files of a meta-training run: atomic checkpoints with a fallback to the previous one, saved meta-networks
(``lopt.pt``), the check that a checkpoint can continue a run, and the lock that keeps a second process out of a
run directory.

Checkpoints hold tensors, dicts, lists and numbers only, so that ``torch.load(weights_only=True)`` reads them.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import tempfile
import warnings
from dataclasses import asdict
from typing import Any, Dict, Optional

import torch

from ..optim.baselines import AdamState
from ..optim.learned import build_learned, kind_of
from .config import RESUMABLE

TRAINING_FORMAT = "learned_opt.meta/1"  # checkpoint.pt: everything a resumed run needs
LOPT_FORMAT = "learned_opt.lopt/1"  # lopt.pt: a trained meta-network alone
LOCK_NAME = "run.lock"
CHECKPOINT = "checkpoint.pt"


def has_checkpoint(run_dir: str) -> bool:
    """Whether ``run_dir`` holds a training checkpoint (the latest or the previous one) to resume from."""
    path = os.path.join(run_dir, CHECKPOINT)
    return os.path.exists(path) or os.path.exists(path + ".prev")


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


# What each format is called, and what to say when a file of the other format is given in its place.
_FORMATS = {
    TRAINING_FORMAT: ("a training checkpoint", "is a saved meta-network (what lopt.pt holds), not a training "
                      "checkpoint: it has no meta-optimizer state to resume from"),
    LOPT_FORMAT: ("a saved meta-network", "is a training checkpoint, not a saved meta-network: load the lopt.pt "
                  "that its run wrote next to it"),
}


def load_format(path: str, fmt: str) -> Dict[str, Any]:
    """:func:`load_checkpoint`, then ``ValueError`` unless the file holds ``fmt`` (:data:`TRAINING_FORMAT` or
    :data:`LOPT_FORMAT`)."""
    payload = load_checkpoint(path)
    name, mixup = _FORMATS[fmt]
    other = LOPT_FORMAT if fmt == TRAINING_FORMAT else TRAINING_FORMAT
    if payload.get("format") == other:
        raise ValueError(f"{path} {mixup}")
    if payload.get("format") != fmt:
        raise ValueError(f"{path} is not {name} (format {payload.get('format')!r})")
    return payload


def load_weights(net, state_dict: Dict[str, Any], what: str) -> None:
    """``net.load_state_dict``; weights of another shape raise ``ValueError`` led by ``what``."""
    try:
        net.load_state_dict(state_dict)
    except RuntimeError as e:
        raise ValueError(f"{what}: {str(e).splitlines()[0]}")


def save_lopt(path: str, net) -> None:
    """Save a trained meta-network (kind, constructor config and weights) for :func:`load_lopt`."""
    save_checkpoint(path, {"format": LOPT_FORMAT, "kind": kind_of(net), "config": net.config,
                           "state_dict": net.state_dict()})


def load_lopt(path: str):
    """Load a meta-network saved by :func:`save_lopt`."""
    payload = load_format(path, LOPT_FORMAT)
    net = build_learned(payload["kind"], **payload["config"])
    load_weights(net, payload["state_dict"], f"{path}: weights do not fit a {payload['kind']} network")
    return net


def opt_state_to_dict(s: AdamState) -> Dict[str, Any]:
    """The meta-optimizer's state as a checkpoint holds it (tensors in lists, a count)."""
    return {"mu": list(s.mu), "nu": list(s.nu), "nu_max": list(s.nu_max), "count": s.count}


def opt_state_from_dict(d: Dict[str, Any]) -> AdamState:
    """Inverse of :func:`opt_state_to_dict`."""
    return AdamState(tuple(d["mu"]), tuple(d["nu"]), tuple(d["nu_max"]), int(d["count"]))


def _plain(x: Any) -> Any:
    """Tuples as lists, recursively: a setting read back from JSON compares equal to the one it was."""
    if isinstance(x, (tuple, list)):
        return [_plain(v) for v in x]
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    return x


def check_resumable(ck: Dict[str, Any], path: str, net, cfg, world_size: int) -> None:
    """Raise ``ValueError`` unless training checkpoint ``ck`` (read from ``path``) can continue a run of ``net``
    under ``cfg`` on ``world_size`` ranks (only :data:`~learned_opt.meta.config.RESUMABLE` settings may change)."""
    if ck.get("world_size", 1) != world_size:
        raise ValueError(f"checkpoint {path} was written by {ck.get('world_size', 1)} rank(s); this run has "
                         f"{world_size}: resume with the same number of processes")
    if ck.get("kind") != kind_of(net):
        raise ValueError(f"checkpoint {path} is for a {ck.get('kind')} network, not {kind_of(net)}")
    if ck.get("net_config") != net.config:
        saved, here = ck.get("net_config") or {}, net.config
        diff = ", ".join(f"{k}={saved.get(k)!r} there, {here.get(k)!r} here"
                         for k in sorted(set(saved) | set(here)) if saved.get(k) != here.get(k))
        raise ValueError(f"checkpoint {path} is for a {ck.get('kind')} network of another configuration "
                         f"({diff})")
    saved, here = ck.get("config") or {}, asdict(cfg)
    for k in here:  # keys that older checkpoints lack are not compared
        if k in saved and k not in RESUMABLE and _plain(saved[k]) != _plain(here[k]):
            raise ValueError(f"checkpoint {path} was written with {k}={saved[k]!r}, this run has "
                             f"{k}={here[k]!r}: a resumed run keeps its settings")
    if ck["iteration"] > cfg.iterations:
        raise ValueError(f"checkpoint {path} is at iteration {ck['iteration']}, past iterations="
                         f"{cfg.iterations}: give at least {ck['iteration']} to continue")


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
