"""Helpers shared by the experiment scripts: the protocol settings every script has, argument parsing from a
dataclass, provenance, parallel runs, tables (figures: figures.py)."""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import signal
import sys
import threading
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence

import numpy as np

from learned_opt.evaluate import TEST_DRAW, paired, verdict  # noqa: F401  (re-exported for the scripts)
from learned_opt.evaluate import ledger
from learned_opt.evaluate.splits import evaluation_split
from learned_opt.flags import add_dataclass_flags
from learned_opt.log import git_state, provenance  # noqa: F401  (provenance re-exported for the scripts)
from learned_opt.meta import Interrupted

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository: its sources are hashed


@dataclass
class ProtocolConfig:
    """Settings every experiment shares (each a flag): where the reported numbers come from."""
    final: bool = False  # True: evaluate on the final-test split (only for the reported numbers); False:
    # development, on validation tasks of their own stream ("dev"), never a test task
    seeds: int = 5  # meta-training seeds (a final run needs at least 5: evaluate.MIN_FINAL_SEEDS)
    val_tasks: int = 20  # validation tasks every baseline is tuned on (the protocol's minimum is 20)
    workers: int = 1  # processes for independent runs (tuning of different baselines, meta-training seeds)
    force_test_read: bool = False  # read the final-test split of weights whose test split was read before (the
    # summary counts every read: protocol.test_reads)
    test_draw: int = TEST_DRAW  # the final-test draw: a script whose test results were seen before its final run
    # takes a new one (pre-registered; the ledger keys on it)
    check_run: bool = False  # a reproducibility check (experiments/reproduce_check.py): one seed may run final, in
    # its own out_dir; its numbers are checked against a committed interval, never reported as a result


def eval_split(cfg: ProtocolConfig) -> Dict[str, Any]:
    """Keyword arguments of :func:`learned_opt.evaluate.evaluate` for the evaluation tasks of this run."""
    return evaluation_split(cfg.final, cfg.test_draw)


def test_split_name(cfg: ProtocolConfig) -> str:
    """How the summary names the evaluation tasks."""
    return f"test (draw {cfg.test_draw})" if cfg.final else "val/dev (development run: no test task touched)"


def preregistered(cfg: ProtocolConfig, fields: Sequence[str], constants: Optional[Dict[str, Any]] = None) -> Dict:
    """The summary's ``preregistered`` block: the config ``fields`` (and module ``constants``) that decide verdicts,
    the test draw, and their hash; the hash is the same for a development and a final run of one setting, so a
    reader can check that nothing deciding a verdict moved between them (the ledger entry stores it too)."""
    block = {"fields": {f: getattr(cfg, f) for f in fields}, "constants": dict(constants or {}),
             "test_draw": cfg.test_draw}
    return {**block, "sha256": ledger.digest(block)}


def final_test_read(cfg: ProtocolConfig, prereg: Dict[str, Any], *, weights: Sequence[str] = (),
                    states: Sequence[Dict] = (), configs: Any = None):
    """Open the final-test read of ``weights`` (meta-trained files) or ``states`` (their state dicts in memory) or,
    without weights, of the tuned ``configs``:
    call it after meta-training and before the first test-split evaluation. A development run touches no ledger
    (0 reads); a second final read of the same key exits 2 with one line, writing nothing, unless
    ``--force_test_read true``. Returns the record :func:`record_test_read` puts into the summary."""
    if not cfg.final:
        return {"test_reads": 0, "ledger_key": None, "preregistered": prereg}
    git = git_state()
    code = {"git_commit": git["git_commit"], "git_dirty": git["git_dirty"],
            "sources_sha256": ledger.sources_digest(ROOT)}
    key = ledger.read_key(split="test", draw=cfg.test_draw, weights=weights, states=states, configs=configs)
    script = os.path.basename(getattr(sys.modules.get(type(cfg).__module__), "__file__", "") or "")
    try:
        read = ledger.open_test_read(os.path.join(cfg.out_dir, ledger.LEDGER_FILE), key, code=code,
                                     config_hash=ledger.config_digest(dataclasses.asdict(cfg)),
                                     preregistered_hash=prereg["sha256"], force=cfg.force_test_read,
                                     experiment=script)
    except ledger.TestReadRefused as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(ledger.REFUSED_EXIT)
    except ledger.LedgerError as e:
        sys.exit(f"error: {e}")
    return {**read, "preregistered": prereg}


def record_test_read(summary: Dict[str, Any], read: Dict[str, Any]) -> Dict[str, Any]:
    """Write a :func:`final_test_read` record into ``summary``: ``protocol.test_reads`` / ``ledger_key`` and the
    ``preregistered`` block; returns ``summary``."""
    summary.setdefault("protocol", {}).update(
        test_reads=read["test_reads"], ledger_key=read["ledger_key"],
        forced_test_reads=read.get("forced_reads", 0))
    if read["ledger_key"] is not None:  # a final run: the draw it read (a script may take a new one)
        summary["protocol"]["test_draw"] = read["preregistered"]["test_draw"]
    summary["preregistered"] = read["preregistered"]
    return summary


def open_run(out_dir: str) -> Dict[str, Any]:
    """Record provenance before any output is written (its dirty flag describes the code, not our outputs), then
    create ``out_dir``; returns the provenance."""
    prov = provenance()
    os.makedirs(out_dir, exist_ok=True)
    return prov


def require_device(device: str) -> None:
    """Exit with a message when ``device`` asks for CUDA on a machine without it."""
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("error: --device cuda requested but CUDA is not available")


def run_main(main: Callable[[], Any]) -> None:
    """Entry point of a script: pin portable numerics (re-executing the process once), then run ``main``."""
    from learned_opt.repro import ensure_portable_numerics

    ensure_portable_numerics()
    try:
        main()
    except (Interrupted, JobInterrupted) as e:  # a meta-training run stopped by its signal, its checkpoint saved
        print(f"error: {e}; rerun the same command to continue from it", file=sys.stderr)
        raise SystemExit(128 + e.signum) from None


_STOP = None  # in a pool worker: the pool's shared stop event (set by a failed or interrupted job, or the parent)


class PoolStopped(Exception):
    """A queued job that was not started because the pool is stopping."""


class JobInterrupted(Exception):
    """A job stopped by its signal (a meta-training run's ``Interrupted``: its checkpoint saved), in a form that
    crosses process boundaries."""

    def __init__(self, signum: int, message: str):
        super().__init__(signum, message)
        self.signum, self.message = signum, message

    def __str__(self) -> str:
        return self.message


def _worker_init(stop) -> None:
    global _STOP
    _STOP = stop


def _call(job):
    if _STOP is not None and _STOP.is_set():
        raise PoolStopped("not started: the pool is stopping")
    fn, args = job
    try:
        return fn(*args)
    except BaseException as e:
        if _STOP is not None:
            _STOP.set()  # no worker starts another job after this one failed or was interrupted
        if isinstance(e, Interrupted):  # its constructor's arguments are not its pickled ones
            raise JobInterrupted(e.signum, str(e)) from None
        raise


def _failures(futures) -> list:
    """The exceptions of the finished futures, in submission order."""
    return [f.exception() for f in futures if f.done() and not f.cancelled() and f.exception() is not None]


class _Signalled(BaseException):
    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


@contextlib.contextmanager
def _signals_raise():
    """In the main thread, SIGTERM and SIGINT raise :class:`_Signalled` (the parent then cancels the queue and
    waits for its workers, which save on their own signal); elsewhere nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise _Signalled(signum)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def parallel_map(fn: Callable, arg_tuples: Iterable[tuple], workers: int = 1, context: str = "fork") -> List[Any]:
    """``[fn(*a) for a in arg_tuples]``, in ``workers`` processes when ``workers > 1`` (each one thread).

    ``fn`` must be a module-level function; results come back in order. Runs are deterministic either way.
    The pool stops as a whole: after a job fails or SIGTERM / SIGINT arrives, no queued job starts; the running
    ones end on their own signal (a meta-training run saves its checkpoint), and a signal exits 128 + its number.
    ``context``: how workers start; ``"spawn"`` for long jobs (a forked worker once hung at 0% CPU on this
    machine, a lock copied from the parent held forever).
    """
    jobs = [(fn, tuple(a)) for a in arg_tuples]
    if workers <= 1 or len(jobs) <= 1:
        return [_call(j) for j in jobs]
    import multiprocessing as mp
    from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait

    sys.stdout.flush()
    sys.stderr.flush()
    ctx = mp.get_context(context)
    stop = ctx.Event()
    ex = ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=ctx, initializer=_worker_init,
                             initargs=(stop,))
    futures = []
    try:
        with _signals_raise():
            futures = [ex.submit(_call, j) for j in jobs]
            wait(futures, return_when=FIRST_EXCEPTION)
            failed = _failures(futures)
            if failed:
                raise failed[0]
            return [f.result() for f in futures]
    except BaseException as e:
        # a failed job, or a signal: no queued job starts (items already handed to the pool are refused by the
        # shared event), and the running ones end on their own (a meta-training run saves on its signal)
        stop.set()
        why = signal.Signals(e.signum).name if isinstance(e, _Signalled) else f"a job stopped: {e}"
        print(f"stopping ({why}): queued jobs cancelled, waiting for the running ones"
              + ("; signal the whole process group to stop them now" if isinstance(e, _Signalled) else ""),
              file=sys.stderr, flush=True)
        ex.shutdown(wait=True, cancel_futures=True)
        causes = [x for x in _failures(futures) if not isinstance(x, PoolStopped)]
        if not isinstance(e, _Signalled):
            raise (causes[0] if causes and isinstance(e, PoolStopped) else e)  # the cause, not a refusal
        for x in causes:  # what each stopped job says (a meta-training run: where it saved)
            print(f"{type(x).__name__}: {x}", file=sys.stderr)
        print("error: stopped; rerun the same command to continue", file=sys.stderr, flush=True)
        raise SystemExit(128 + e.signum) from None
    finally:
        ex.shutdown(wait=True)


LOSS_FLOOR = 1e-6  # losses below it count as it in ratios: below it a ratio measures float32 rounding


def floored(x, floor: float = LOSS_FLOOR) -> np.ndarray:
    """Finite values below ``floor`` raised to it (non-finite ones stay: an infinite ratio)."""
    x = np.asarray(x, float)
    return np.where(np.isfinite(x), np.maximum(x, floor), x)


def fmt_paired(p: Dict[str, Any]) -> str:
    """``0.812 [0.771, 0.856], p=1e-05, wins 87%`` for a :func:`paired` record; a Wilcoxon p that cannot reach
    0.05 with this few tasks says so (``p=0.062 (no claim: floor 0.062)``)."""
    floor = "" if p.get("wilcoxon_claim", True) else f" (no claim: floor {p['wilcoxon_floor']:.2g})"
    return (f"{p['ratio']:.3f} [{p['ci_low']:.3f}, {p['ci_high']:.3f}], p={p['wilcoxon_p']:.2g}{floor}, "
            f"wins {100 * p['win_rate']:.0f}%")


def _scalar(text: str):
    """``'20' -> 20``, ``'0.5' -> 0.5``, anything else stays a string."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def parse_config(cls, presets: Dict[str, Dict[str, Any]], argv=None):
    """Build ``cls`` from ``--preset NAME`` and one ``--field value`` flag per dataclass field."""
    parser = argparse.ArgumentParser(description=cls.__doc__)
    parser.add_argument("--preset", choices=sorted(presets), default=None)
    add_dataclass_flags(parser, cls)
    args = parser.parse_args(argv)
    values = dict(presets.get(args.preset, {})) if args.preset else {}
    for f in dataclasses.fields(cls):
        v = getattr(args, f.name)
        if v is None:
            continue
        if isinstance(f.default, tuple):
            v = tuple(_scalar(x) for x in v.split(",") if x)
        values[f.name] = v
    try:
        return cls(**values)
    except (TypeError, ValueError) as e:
        parser.error(str(e))


def configure(cls, presets: Dict[str, Dict[str, Any]], argv=None, check: Optional[Callable] = None):
    """The config of a script from its command line: parsed, the thread count pinned, the device checked, then
    ``check(cfg)`` (a ``ValueError`` from it exits naming the bad setting) before any work starts."""
    import torch

    cfg = parse_config(cls, presets, argv)
    torch.set_num_threads(getattr(cfg, "threads", 1))  # scripts without a --threads flag run on one thread
    require_device(getattr(cfg, "device", "cpu"))
    if check is not None:
        try:
            check(cfg)
        except ValueError as e:
            sys.exit(f"error: {e}")
    return cfg


def run_kind(cfg: ProtocolConfig) -> str:
    """The first words of a report: whether its numbers come from the final-test split."""
    return "FINAL-TEST" if cfg.final else "DEVELOPMENT (validation tasks, stream dev; no test task touched)"


def fmt_hp(hp: Dict[str, float]) -> str:
    """``lr=0.0316, momentum=0.9`` (momenta and betas in full: 0.9999999 is not 1)."""
    return ", ".join(f"{k}={v:.3g}" if k == "lr" else f"{k}={v}" for k, v in hp.items())


def weights_files(out_dir: str, seeds: Iterable[int]) -> List[str]:
    """The ``lopt.pt`` file :func:`meta_train_seed` writes for each seed (what a final-test read is keyed on)."""
    return [os.path.join(out_dir, "run", f"seed{s}", "lopt.pt") for s in seeds]


def meta_train_seed(net, family, mcfg, out_dir: str, seed: int, *, progress: bool = False,
                    show_skipped: bool = False):
    """Meta-train ``net`` in ``out_dir/run/seed{seed}`` (best checkpoint kept, saved as ``lopt.pt`` there) and
    print one line; returns the net and its record (seconds, meta-steps, skipped steps, selection score)."""
    import time

    from learned_opt.meta import MetaTrainer, save_lopt

    path = weights_files(out_dir, [seed])[0]
    trainer = MetaTrainer(net, family, mcfg, run_dir=os.path.dirname(path), progress=progress)
    t0 = time.perf_counter()
    trainer.run()
    seconds = time.perf_counter() - t0
    save_lopt(path, net)
    print(f"meta-training seed {seed}: {seconds:.1f} s, {trainer.meta_step} meta-steps"
          + (f", {trainer.skipped} skipped" if show_skipped else ""), flush=True)
    return net, {"seed": seed, "seconds": seconds, "meta_steps": trainer.meta_step, "skipped": trainer.skipped,
                 "select_score": trainer.best_score}


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table."""
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write_json(path: str, obj: Any) -> None:
    """Write JSON atomically."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, default=float)
    os.replace(tmp, path)


def save_report(out_dir: str, text: str, summary: Dict[str, Any]) -> None:
    """Print the report, write it to ``out_dir/table.md`` and the summary to ``out_dir/summary.json``."""
    print(text)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "table.md"), "w") as f:
        f.write(text + "\n")
    write_json(os.path.join(out_dir, "summary.json"), summary)


# ------------------------------------------------------------------ finished meta-training seeds
DONE = "done.json"  # beside a seed's lopt.pt: what it was meta-trained with, its weights' SHA-256 and its record


def _sha256(path: str) -> str:
    import hashlib

    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def seed_ident(mcfg, net, family) -> Dict[str, Any]:
    """What decides a seed's meta-training: its MetaConfig (the seed included), the meta-network's configuration
    and the task family (its repr holds every setting). Two runs with the same ident train the same weights, as
    long as the code is the same: the ident does not hash the sources, so after a change to a task family's or the
    trainer's code, delete the seeds' ``done.json`` to re-train them."""
    return json.loads(json.dumps({"meta_config": dataclasses.asdict(mcfg), "net": dict(net.config),
                                  "family": repr(family)}, default=repr))


def finished_seed(lopt_path: str, ident: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """The record of a seed that finished meta-training into ``lopt_path`` with this ``ident``, or None (no
    ``done.json``, another ident, or weights that are no longer the ones it recorded: then it trains again).
    Checkpoints are not kept in git, the weights and this marker are: a finished seed is not re-trained."""
    done = os.path.join(os.path.dirname(lopt_path), DONE)
    if not (os.path.exists(done) and os.path.exists(lopt_path)):
        return None
    with open(done) as f:
        rec = json.load(f)
    if rec.get("ident") != ident or rec.get("sha256") != _sha256(lopt_path):
        return None
    return {**rec["record"], "reused": True}


def mark_finished(lopt_path: str, ident: Dict[str, Any], record: Dict[str, Any], **note: Any) -> None:
    """Write ``done.json`` beside ``lopt_path`` once its seed has finished (see :func:`finished_seed`)."""
    write_json(os.path.join(os.path.dirname(lopt_path), DONE),
               {"ident": ident, "sha256": _sha256(lopt_path), "record": record, **note})
