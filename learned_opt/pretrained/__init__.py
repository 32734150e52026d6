"""Pretrained learned optimizers shipped with the package: trained meta-networks by name.

Each is a ``lopt.pt`` written by :func:`learned_opt.meta.save_lopt` (format ``learned_opt.lopt/1``), copied from
the final run of one of the repository's experiments, plus an entry in ``manifest.json`` that says honestly what
it was meta-trained on, for which horizons, at what cost, with which command, and where it is known to fail (the
numbers are those of README.md's Results). They are research artefacts: each was meta-trained on one task family,
and none is a tuned-Adam replacement on other models.

    from learned_opt import pretrained
    pretrained.list_pretrained()           # ['digits_lstm', 'metanet_lstm', 'quadratic_lstm', ...]
    pretrained.info("digits_lstm")         # the manifest entry (plus 'name' and 'path')
    net = pretrained.load("digits_lstm")   # the meta-network, eval mode, weights frozen

:class:`learned_opt.LearnedOptimizer` wraps one as a ``torch.optim`` optimizer.

**manifest.json** is ``{"format": "learned_opt.pretrained/1", "optimizers": {name: entry}}``; an entry holds the
fields :data:`FIELDS`: ``file`` (in this folder), ``kind`` (the meta-network class key: ``lstm``, ``mlp``, ...),
``sha256`` (of the file; a file that does not match is refused as corrupt), ``description``, ``meta_trained_on``,
``horizons`` (the meta-training horizons, inner steps), ``budget`` (the meta-training compute), ``source_command``
(what produced it) and ``known_failures`` (a list of sentences). Files are at most :data:`MAX_BYTES` bytes.

**Adding one** (for example ``general``, which :func:`default_name`, and so ``LearnedOptimizer``, then picks up
as the default)::

    from learned_opt.pretrained import register_file
    register_file("general", "runs/general/lopt.pt", description="...", meta_trained_on="...",
                  horizons=[100, 1000], budget="...", source_command="python experiments/...",
                  known_failures=["..."])

copies the file here as ``general.pt`` (checking that it loads and is small enough) and writes its entry, kind and
sha256 included, into ``manifest.json``; commit both files. Setup.cfg ships every ``*.pt`` of this folder, and
``tests/test_pretrained.py`` runs its checks on every name in the manifest, the new one included.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from typing import Any, Dict, List, Optional, Union

import torch
from torch import nn

FORMAT = "learned_opt.pretrained/1"
MANIFEST = "manifest.json"
MAX_BYTES = 1_000_000  # a shipped meta-network is small: a larger file is a mistake (a training checkpoint)
PREFERRED_DEFAULT = "general"  # the default once it ships
FALLBACK_DEFAULT = "digits_lstm"
# The fields of a manifest entry that register_file takes from its caller, then those it derives from the file.
INFO_FIELDS = ("description", "meta_trained_on", "horizons", "budget", "source_command", "known_failures")
FIELDS = ("file", "kind", "sha256") + INFO_FIELDS
_NAME = re.compile(r"[a-z][a-z0-9_]*\Z")  # never looks like a path, so names and paths cannot be confused
PathLike = Union[str, "os.PathLike[str]"]


def _folder(directory: Optional[PathLike]) -> str:
    """The catalogue's folder: this package's by default."""
    return os.path.dirname(os.path.abspath(__file__)) if directory is None else os.fspath(directory)


def _read_manifest(directory: Optional[PathLike]) -> Dict[str, Dict[str, Any]]:
    """The manifest's entries by name; a missing or malformed manifest raises ``RuntimeError`` naming it."""
    path = os.path.join(_folder(directory), MANIFEST)
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except OSError as e:
        raise RuntimeError(f"pretrained manifest {path} is unreadable: {e.strerror or e}") from None
    except ValueError as e:
        raise RuntimeError(f"pretrained manifest {path} is not valid JSON: {e}") from None
    if not (isinstance(manifest, dict) and manifest.get("format") == FORMAT
            and isinstance(manifest.get("optimizers"), dict)):
        raise RuntimeError(f"pretrained manifest {path} is not a {FORMAT!r} manifest")
    return manifest["optimizers"]


def list_pretrained(directory: Optional[PathLike] = None) -> List[str]:
    """The names of the shipped pretrained optimizers, sorted."""
    return sorted(_read_manifest(directory))


def default_name(directory: Optional[PathLike] = None) -> str:
    """``'general'`` once it is in the catalogue, else ``'digits_lstm'`` (read afresh at every call)."""
    return PREFERRED_DEFAULT if PREFERRED_DEFAULT in _read_manifest(directory) else FALLBACK_DEFAULT


def _entry(name: Any, directory: Optional[PathLike]) -> Dict[str, Any]:
    """The manifest entry of ``name``; an unknown name raises ``ValueError`` listing the known ones."""
    entries = _read_manifest(directory)
    if not isinstance(name, str) or name not in entries:
        raise ValueError(f"name {name!r} is not a pretrained optimizer; known: {', '.join(sorted(entries))}")
    return entries[name]


def info(name: str, directory: Optional[PathLike] = None) -> Dict[str, Any]:
    """The manifest entry of ``name`` (see :data:`FIELDS`), plus its ``name`` and the file's absolute ``path``."""
    entry = dict(_entry(name, directory))
    entry.update(name=name, path=os.path.join(_folder(directory), str(entry.get("file"))))
    return entry


def _device(device: Any) -> torch.device:
    """``device`` as a ``torch.device``; anything else raises ``ValueError`` naming the argument."""
    try:
        return torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"device must be a torch.device or a string such as 'cpu' or 'cuda:0', "
                         f"got {device!r}") from None


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def load_file(path: PathLike, device: Any = "cpu") -> nn.Module:
    """A meta-network saved by ``save_lopt`` (a ``lopt.pt``), in eval mode, weights frozen, on ``device``.

    A missing file raises ``FileNotFoundError``, an unreadable one ``RuntimeError``, both naming the file.
    """
    # Imported here: `import learned_opt.pretrained` stays light (the catalogue is plain JSON).
    from ..meta import LOPT_FORMAT, _why_unreadable, load_lopt

    dev = _device(device)
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"learned optimizer file {path} does not exist")
    # Read it once here for a one-line reason: load_lopt would fall back to <path>.prev, as a run directory does.
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - every unreadable file gets the same one-line error
        raise RuntimeError(f"learned optimizer file {path} is unreadable: {_why_unreadable(e)}") from None
    if not (isinstance(payload, dict) and payload.get("format") == LOPT_FORMAT):
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise RuntimeError(f"learned optimizer file {path} is not a saved meta-network (format {found!r}, "
                           f"expected {LOPT_FORMAT!r})")
    try:
        net = load_lopt(path)
    except (RuntimeError, ValueError) as e:  # an unknown kind, weights that do not fit it
        raise RuntimeError(f"learned optimizer file {path} does not load: {e}") from None
    net.eval()
    net.requires_grad_(False)
    return net.to(dev)


def load(name: str, device: Any = "cpu", directory: Optional[PathLike] = None) -> nn.Module:
    """The pretrained meta-network ``name`` (a protocol optimizer), in eval mode, weights frozen, on ``device``.

    An unknown name raises ``ValueError`` listing the known ones; a missing file ``FileNotFoundError``, and a
    corrupt one (its sha256 differs from the manifest's, or it does not load) ``RuntimeError``, naming the file.
    """
    entry = _entry(name, directory)
    _device(device)  # a bad device fails before any file is read
    path = os.path.join(_folder(directory), str(entry.get("file")))
    if not os.path.isfile(path):
        raise FileNotFoundError(f"pretrained optimizer {name!r}: file {path} is missing (reinstall learned_opt)")
    if _sha256(path) != entry.get("sha256"):
        raise RuntimeError(f"pretrained optimizer {name!r}: file {path} is corrupt (its sha256 differs from "
                           f"{MANIFEST}'s; reinstall learned_opt or register it again)")
    return load_file(path, device)


def _check_info(info: Dict[str, Any]) -> None:
    """Raise ``ValueError`` naming the field unless ``info`` holds exactly :data:`INFO_FIELDS`, well typed."""
    unknown = sorted(set(info) - set(INFO_FIELDS))
    if unknown:
        raise ValueError(f"unknown manifest field(s) {', '.join(unknown)}; allowed: {', '.join(INFO_FIELDS)}")
    missing = [k for k in INFO_FIELDS if k not in info]
    if missing:
        raise ValueError(f"missing manifest field(s): {', '.join(missing)}")
    for key in ("description", "meta_trained_on", "budget", "source_command"):
        if not (isinstance(info[key], str) and info[key].strip()):
            raise ValueError(f"{key} must be a non-empty string, got {info[key]!r}")
    horizons = info["horizons"]
    if not (isinstance(horizons, (list, tuple)) and horizons
            and all(isinstance(h, int) and not isinstance(h, bool) and h >= 1 for h in horizons)):
        raise ValueError(f"horizons must be a non-empty list of integers >= 1, got {horizons!r}")
    failures = info["known_failures"]
    if not (isinstance(failures, (list, tuple)) and all(isinstance(s, str) and s.strip() for s in failures)):
        raise ValueError(f"known_failures must be a list of non-empty strings, got {failures!r}")


def _write_atomic(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file, so that a reader never sees half a file."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def register_file(name: str, path: PathLike, *, directory: Optional[PathLike] = None, overwrite: bool = False,
                  **info: Any) -> Dict[str, Any]:
    """Copy the ``lopt.pt`` at ``path`` into the catalogue as ``<name>.pt`` and write its manifest entry.

    ``info`` gives the fields :data:`INFO_FIELDS` (all required); ``file``, ``kind`` and ``sha256`` come from the
    file, which must load and be at most :data:`MAX_BYTES` bytes. ``directory`` defaults to this package's
    folder; ``overwrite=True`` replaces an existing entry. Returns the entry written.
    """
    if not (isinstance(name, str) and _NAME.match(name)):
        raise ValueError(f"name must be lower-case letters, digits and '_', starting with a letter, got {name!r}")
    _check_info(info)
    folder = _folder(directory)
    manifest_path = os.path.join(folder, MANIFEST)
    entries = _read_manifest(folder) if os.path.exists(manifest_path) else {}
    if name in entries and not overwrite:
        raise ValueError(f"name {name!r} is already registered in {manifest_path}; pass overwrite=True to replace it")
    src = os.fspath(path)
    if not os.path.isfile(src):
        raise FileNotFoundError(f"path {src} does not exist")
    size = os.path.getsize(src)
    if size > MAX_BYTES:
        raise ValueError(f"path {src} is {size} bytes, more than the {MAX_BYTES} a shipped optimizer may take "
                         f"(a training checkpoint? ship the run's lopt.pt)")
    from ..optim.learned import kind_of

    net = load_file(src)
    if not hasattr(net, "update"):  # a stand-alone LearnedController decides, it does not optimise
        raise ValueError(f"path {src} holds a {type(net).__name__}, not an optimizer (no update())")
    kind = kind_of(net)
    with open(src, "rb") as f:
        data = f.read()
    os.makedirs(folder, exist_ok=True)
    file = f"{name}.pt"
    _write_atomic(os.path.join(folder, file), data)
    entry = {"file": file, "kind": kind, "sha256": hashlib.sha256(data).hexdigest()}
    entry.update({k: list(info[k]) if k in ("horizons", "known_failures") else info[k] for k in INFO_FIELDS})
    entries = dict(entries)
    entries[name] = entry
    text = json.dumps({"format": FORMAT, "optimizers": dict(sorted(entries.items()))}, indent=2) + "\n"
    _write_atomic(manifest_path, text.encode("utf-8"))
    return dict(entry)


__all__ = ["FIELDS", "INFO_FIELDS", "MAX_BYTES", "default_name", "info", "list_pretrained", "load", "load_file",
           "register_file"]
