"""The test-read ledger: the final-test split of one set of weights is read once, and every read is counted.

A held-out test split stays an unbiased estimate only while no choice depends on it (Cawley & Talbot 2010, "On
over-fitting in model selection"; the "test set reuse" of Dwork et al. 2015). The ledger is a JSON file kept with
the results (``<out_dir>/test_reads.json``, committed with them) holding one entry per read, under a key that names
*what* was read: the bytes of the meta-trained weights (or, for an experiment without weights, its tuned
configurations), the split and its task draw. Each read records the code (git commit, dirty flag, a hash of the
package and experiment sources), the config hash (paths and worker counts left out), the pre-registered fields'
hash, the date and whether it was forced. :func:`open_test_read` refuses a second read of a key unless forced.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import os
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence

LEDGER_FILE = "test_reads.json"
FORMAT = "learned_opt test-read ledger v1"
REFUSED_EXIT = 2  # exit status of a refused second read (1 stays for bad input)
# Config fields that say where or how fast a run goes, not what it computes: left out of the config hash.
UNHASHED_FIELDS = ("out_dir", "workers", "threads", "device", "force_test_read", "progress", "estimators_summary")
SOURCE_FOLDERS = ("learned_opt", "experiments")


class LedgerError(ValueError):
    """A ledger file that cannot be read or is not a ledger (never silently replaced by a fresh one)."""


class TestReadRefused(RuntimeError):
    """A second read of the same weights' final-test split, without ``force``."""

    __test__ = False  # a name starting with "Test" that pytest must not collect


def digest(obj: Any) -> str:
    """SHA-256 of ``obj`` as canonical JSON (sorted keys, tuples as lists)."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=repr)
    return hashlib.sha256(text.encode()).hexdigest()


def files_digest(paths: Iterable[str]) -> str:
    """SHA-256 over the bytes of ``paths``, in order (their names and folders do not enter it)."""
    h = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            data = f.read()
        h.update(len(data).to_bytes(8, "little"))  # lengths keep a b / ab apart
        h.update(data)
    return h.hexdigest()


def states_digest(states: Iterable[Mapping[str, Any]]) -> str:
    """SHA-256 over in-memory weights (state dicts of tensors), in order: names, dtypes, shapes and bytes."""
    h = hashlib.sha256()
    for state in states:
        for name, t in sorted(state.items()):
            a = t.detach().cpu().contiguous().numpy()
            h.update(f"{name}|{a.dtype}|{tuple(a.shape)}".encode() + b"\0")
            h.update(a.tobytes())
        h.update(b"\1")  # where one network ends
    return h.hexdigest()


def sources_digest(root: str, folders: Sequence[str] = SOURCE_FOLDERS) -> str:
    """SHA-256 over every ``.py`` file under ``root/<folder>`` (relative path and bytes, sorted by path); an entry
    of ``folders`` that is a file enters as itself (a missing one is an error, not an empty digest)."""
    h = hashlib.sha256()
    for folder in folders:
        top = os.path.join(root, folder)
        if os.path.isfile(top):
            paths = [top]
        elif os.path.isdir(top):
            paths = []
            for here, dirs, files in os.walk(top):
                dirs[:] = sorted(d for d in dirs if not d.startswith((".", "__")))
                paths += [os.path.join(here, f) for f in sorted(files) if f.endswith(".py")]
        else:
            raise FileNotFoundError(f"sources_digest: {top} does not exist")
        for path in paths:
            h.update(os.path.relpath(path, root).replace(os.sep, "/").encode() + b"\0")
            with open(path, "rb") as f:
                h.update(hashlib.sha256(f.read()).digest())
    return h.hexdigest()


def config_digest(config: Mapping[str, Any], unhashed: Sequence[str] = UNHASHED_FIELDS) -> str:
    """SHA-256 of an experiment's config without the fields that only say where or how fast it runs."""
    return digest({k: v for k, v in config.items() if k not in unhashed and not k.endswith("_dir")})


def read_key(*, split: str, draw: Optional[int], weights: Sequence[str] = (), states: Sequence[Mapping] = (),
             configs: Any = None) -> str:
    """The ledger key of one read: the weights files' bytes or in-memory ``states`` (or, with no weights, the
    tuned ``configs``), the split and its task draw."""
    if weights:
        what = {"weights_sha256": files_digest(weights)}
    elif states:
        what = {"weights_sha256": states_digest(states)}
    elif configs is not None:
        what = {"configs_sha256": digest(configs)}
    else:
        raise ValueError("a test read needs the weights files or, for an experiment without weights, its configs")
    return digest({**what, "split": split, "draw": draw})


def load_ledger(path: str) -> Dict[str, Any]:
    """The ledger at ``path`` (an empty one when the file does not exist); :class:`LedgerError` when it is not a
    readable ledger."""
    if not os.path.exists(path):
        return {"format": FORMAT, "reads": {}}
    try:
        with open(path) as f:
            ledger = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LedgerError(f"test-read ledger {path} is unreadable ({e}); restore it from git, or move it away "
                          "only if no final-test read it records may be forgotten") from None
    if not isinstance(ledger, dict) or ledger.get("format") != FORMAT or not isinstance(ledger.get("reads"), dict):
        raise LedgerError(f"test-read ledger {path} is not a ledger of format {FORMAT!r}; restore it from git")
    return ledger


def _write(path: str, ledger: Dict[str, Any]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(ledger, f, indent=2, sort_keys=True)
    os.replace(tmp, path)  # atomic: a crash leaves the old ledger, never half of one


def refusal(previous: Mapping[str, Any], reads: int) -> str:
    """The one line that refuses read number ``reads`` of a key first read as ``previous``."""
    commit = (previous.get("code") or {}).get("git_commit") or "unknown"
    return (f"the final-test split of these weights was already read on {previous.get('date')} (commit "
            f"{commit[:12]}); rerun with --force_test_read true to read it again: the summary will count "
            f"{reads} reads")


def open_test_read(path: str, key: str, *, code: Mapping[str, Any], config_hash: str,
                   preregistered_hash: Optional[str] = None, force: bool = False, experiment: str = "",
                   now: Optional[str] = None) -> Dict[str, Any]:
    """Record a read of ``key`` in the ledger at ``path`` and return ``{"test_reads", "ledger_key", ...}``.

    A second read without ``force`` raises :class:`TestReadRefused` and writes nothing; with ``force`` it is
    recorded and counted.
    """
    ledger = load_ledger(path)
    entries: List[Dict[str, Any]] = ledger["reads"].setdefault(key, [])
    if entries and not force:
        raise TestReadRefused(refusal(entries[0], len(entries) + 1))
    date = now or datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    entries.append({"date": date, "code": dict(code), "config_hash": config_hash,
                    "preregistered_hash": preregistered_hash, "forced": bool(force), "experiment": experiment})
    _write(path, ledger)
    return {"test_reads": len(entries), "ledger_key": key, "ledger": os.path.basename(path),
            "forced_reads": sum(e["forced"] for e in entries)}
