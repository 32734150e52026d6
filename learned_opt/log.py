"""Run logging: a JSONL file always, Weights & Biases when asked (offline mode needs no account or network).

W&B is imported lazily and any W&B failure is reported once and then ignored: logging must never stop a run.
The step is logged as a key (``meta_step``), never as ``wandb.log(step=...)``, which drops earlier steps after a
resume.
"""
from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import sys
import warnings
from typing import Any, Dict, List, Optional

WANDB_MODES = ("off", "disabled", "offline", "online")
WANDB_ID_FILE = "wandb_run_id"


def _jsonable(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if hasattr(v, "item") and getattr(v, "numel", lambda: 0)() == 1:
        return _jsonable(v.item())
    return v


def _first_line(e: Exception) -> str:
    """An exception's first line (W&B's validation errors run to several)."""
    return (str(e).splitlines() or [""])[0]


def _new_run_id() -> str:
    """A W&B run id: 8 random characters of [a-z0-9], as W&B makes them (its helper moves between versions)."""
    import secrets
    import string

    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


def _check_mode(mode: str) -> None:
    if mode not in WANDB_MODES:
        raise ValueError(f"unknown wandb mode {mode!r}; known: {', '.join(WANDB_MODES)}")


class Logger:
    """Append metrics to ``path`` (JSONL) and, when ``wandb_mode`` is offline/online, to a W&B run."""

    def __init__(self, path: Optional[str], wandb_mode: str = "off", config: Optional[Dict] = None,
                 project: str = "learned_opt", run_dir: Optional[str] = None, name: Optional[str] = None,
                 resume: bool = False):
        _check_mode(wandb_mode)
        self.path = path
        self._lines: Optional[int] = None  # counted once, then kept: checkpoints ask for it often
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.wandb = None
        self.start_wandb(wandb_mode, config, project, run_dir, name, resume)

    def start_wandb(self, mode: str, config: Optional[Dict] = None, project: str = "learned_opt",
                    run_dir: Optional[str] = None, name: Optional[str] = None, resume: bool = False) -> None:
        """Open the W&B run when ``mode`` is offline/online; its id is kept in ``run_dir`` so that ``resume``
        continues the same W&B run instead of opening a new, unlinked one."""
        _check_mode(mode)
        if mode not in ("offline", "online"):
            return
        try:
            import wandb

            id_file = os.path.join(run_dir, WANDB_ID_FILE) if run_dir else None
            run_id = None
            if resume and id_file and os.path.exists(id_file):
                with open(id_file) as f:
                    run_id = f.read().strip() or None
            run_id = run_id or _new_run_id()
            self.wandb = wandb.init(project=project, mode=mode, config=config or {}, name=name,
                                    dir=run_dir or (os.path.dirname(os.path.abspath(self.path)) if self.path
                                                    else None),
                                    id=run_id, resume="allow", reinit=True)
            if id_file:
                with open(id_file, "w") as f:
                    f.write(run_id + "\n")
        except Exception as e:  # noqa: BLE001 - W&B must never stop a run
            warnings.warn(f"W&B disabled: {type(e).__name__}: {_first_line(e)}")
            self.wandb = None

    def truncate(self, lines: int) -> None:
        """Keep the first ``lines`` lines of the JSONL file (used on resume, so nothing is logged twice)."""
        if not self.path or not os.path.exists(self.path):
            return
        with open(self.path) as f:
            kept = f.readlines()[:lines]
        with open(self.path, "w") as f:
            f.writelines(kept)
        self._lines = len(kept)

    def lines(self) -> int:
        """Number of lines written so far."""
        if self._lines is None:
            if not self.path or not os.path.exists(self.path):
                return 0
            with open(self.path) as f:
                self._lines = sum(1 for _ in f)
        return self._lines

    def log(self, record: Dict[str, Any]) -> None:
        """Write one record."""
        clean = {k: _jsonable(v) for k, v in record.items()}
        if self.path:
            with open(self.path, "a") as f:
                f.write(json.dumps(clean) + "\n")
            if self._lines is not None:
                self._lines += 1
        self._wandb_call(lambda run: run.log({k: v for k, v in record.items()
                                              if isinstance(_jsonable(v), (int, float))}))

    def log_image(self, key: str, path: str) -> None:
        """Send a figure file to W&B (no-op without W&B)."""
        self._wandb_call(lambda run: run.log({key: __import__("wandb").Image(path)}))

    def log_table(self, key: str, columns, rows) -> None:
        """Send a result table to W&B (no-op without W&B)."""
        self._wandb_call(lambda run: run.log({key: __import__("wandb").Table(columns=list(columns),
                                                                           data=[list(r) for r in rows])}))

    def log_artifact(self, path: str, name: str, kind: str = "checkpoint") -> None:
        """Send a file to W&B as an artifact (no-op without W&B)."""
        def _send(run):
            import wandb
            art = wandb.Artifact(name, type=kind)
            art.add_file(path)
            run.log_artifact(art)
        self._wandb_call(_send)

    def _wandb_call(self, fn) -> None:
        if self.wandb is None:
            return
        try:
            fn(self.wandb)
        except Exception as e:  # noqa: BLE001 - W&B must never stop a run
            warnings.warn(f"W&B logging failed and is now off: {type(e).__name__}: {_first_line(e)}")
            self.wandb = None

    def close(self) -> None:
        """Finish the W&B run, if any."""
        self._wandb_call(lambda run: run.finish())
        self.wandb = None


def read_records(path: str) -> List[Dict[str, Any]]:
    """The records of a JSONL log. A half-written last line (a run killed mid-write) is skipped with a warning;
    a bad line before the end raises ``ValueError`` naming the file and line."""
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    records = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except ValueError:
            if i == len(lines):  # no newline after it: the write never finished
                warnings.warn(f"{path}:{i}: ignored a half-written last line")
                continue
            raise ValueError(f"{path}:{i} is not valid JSON") from None
    return records


CODE_PATHS = ("learned_opt", "experiments", "benchmarks")  # what a result depends on; results/ is not code
PACKAGES = ("torch", "numpy", "higher", "einops", "wandb", "scikit-learn", "scipy", "matplotlib")
NUMERICS_ENV = ("ATEN_CPU_CAPABILITY", "MKL_CBWR", "ONEDNN_MAX_CPU_ISA", "OMP_NUM_THREADS")


def _git(args, cwd: str) -> Optional[str]:
    """Stdout of ``git args`` run in ``cwd``, or None when git is missing or fails (not a repository)."""
    try:
        proc = subprocess.run(["git", *args], capture_output=True, text=True, cwd=cwd)
    except OSError:
        return None
    return proc.stdout if proc.returncode == 0 else None


def git_state(root: Optional[str] = None) -> Dict[str, Any]:
    """Commit of the repository holding ``root`` (default: this package) and the state of its code paths.

    Only :data:`CODE_PATHS` count as dirty: the scripts rewrite ``results/`` before they record provenance, so
    a whole-tree check would always say dirty. Untracked files there count too (an uncommitted module is code).
    """
    none = {"git_commit": None, "git_code_commit": None, "git_dirty": None, "git_diff": None,
            "git_untracked": None}
    top = _git(["rev-parse", "--show-toplevel"], root or os.path.dirname(os.path.abspath(__file__)))
    if top is None:
        return none
    top = top.strip()
    commit = (_git(["rev-parse", "HEAD"], top) or "").strip() or None
    if commit is None:  # a repository without commits
        return none
    paths = ["--", *CODE_PATHS]
    # HEAD can be a results-only commit; this is the newest commit that changed code
    code_commit = (_git(["log", "-1", "--format=%H", "HEAD", *paths], top) or "").strip() or None
    diff = _git(["diff", "--no-color", "--no-ext-diff", "HEAD", *paths], top)
    untracked = (_git(["ls-files", "--others", "--exclude-standard", *paths], top) or "").splitlines()
    if diff is None:
        return {**none, "git_commit": commit, "git_code_commit": code_commit}
    dirty = bool(diff) or bool(untracked)
    return {"git_commit": commit, "git_code_commit": code_commit, "git_dirty": dirty,
            "git_diff": diff if diff else None, "git_untracked": untracked}


def package_versions(names=PACKAGES) -> Dict[str, Optional[str]]:
    """Installed version of each distribution (None where missing); metadata, since not all set __version__."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in names:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def provenance(root: Optional[str] = None) -> Dict[str, Any]:
    """Git commit and code diff, package versions and machine facts of this run (``root``: repository to read)."""
    import torch

    from .repro import cpu_model, numerics_pinned

    return {**git_state(root), "packages": package_versions(),
            "python": sys.version.split()[0], "machine": platform.machine(), "cpus": os.cpu_count(),
            "cpu_model": cpu_model(), "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "numerics_env": {k: os.environ.get(k) for k in NUMERICS_ENV}, "numerics_pinned": numerics_pinned(),
            "torch_threads": torch.get_num_threads(),
            "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}
