"""Mutation record runner (issue 23): every protocol guard must fail under the bug it guards against.

Each ``tests/mutations/<letter>*_*.py`` holds one ``MUTATION = dict(file, old, new, caught_by)``: a realistic
protocol bug written as an exact snippet replacement, and the pytest node that must catch it. This script exports
the committed tree (``git archive``, default ``HEAD``) into a temporary folder, overlays the working tree's guard
file and this folder (so uncommitted guards are what is checked), and there:

1. refuses a *stale* mutation (``old`` not found exactly once in its file);
2. runs every ``caught_by`` node on the unmutated copy: each must pass;
3. for each mutation, applies it, runs its ``caught_by`` node (``PYTHONPATH`` = the copy) and restores the file:
   the node must fail on an assertion (pytest exit status 1, an ``assert`` line); an exception the mutation
   raises elsewhere, a collection error or a timeout does not count as caught.

It prints ``mutation | caught_by | result`` and exits non-zero if any mutation is stale or survives, or any guard
fails unmutated. The working tree is never written.

    python tests/mutations/run.py                 # every mutation
    python tests/mutations/run.py --only b_ d2_   # the mutations whose file names start so
"""
from __future__ import annotations

import argparse
import datetime
import glob
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
GUARDS = "tests/test_guards_protocol.py"
OVERLAY = (GUARDS, "tests/mutations")


def load_mutations(only=()) -> dict:
    """``{name: MUTATION}`` of every mutation file here (``only``: name prefixes to keep)."""
    out = {}
    for path in sorted(glob.glob(os.path.join(HERE, "[a-z]*_*.py"))):
        name = os.path.basename(path)[:-3]
        if only and not name.startswith(tuple(only)):
            continue
        spec = importlib.util.spec_from_file_location(f"mutation_{name}", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        m = getattr(mod, "MUTATION", None)
        if not isinstance(m, dict) or set(m) != {"file", "old", "new", "caught_by"}:
            sys.exit(f"error: {path}: MUTATION must be a dict with keys file, old, new, caught_by")
        out[name] = m
    if not out:
        sys.exit(f"error: no mutation in {HERE} matches {list(only)}")
    return out


def export(ref: str, dest: str) -> None:
    """The tree of ``ref`` into ``dest``, then the working tree's guard file and mutation folder over it."""
    archive = subprocess.run(["git", "-C", ROOT, "archive", ref], capture_output=True)
    if archive.returncode != 0:
        sys.exit(f"error: git archive {ref}: {archive.stderr.decode().strip()}")
    subprocess.run(["tar", "-x", "-C", dest], input=archive.stdout, check=True)
    for rel in OVERLAY:
        src, dst = os.path.join(ROOT, rel), os.path.join(dest, rel)
        if os.path.isdir(src):
            shutil.rmtree(dst, ignore_errors=True)
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, dst)


def env_for(copy: str) -> dict:
    """The environment of a run in ``copy``: its package first on the path, one thread, W&B off."""
    return dict(os.environ, PYTHONPATH=copy, OMP_NUM_THREADS="1", WANDB_MODE="disabled")


def check_imports_copy(copy: str) -> None:
    """Exit unless ``learned_opt`` imports from ``copy`` there (not the editable install of the working tree)."""
    proc = subprocess.run([sys.executable, "-c", "import learned_opt; print(learned_opt.__file__)"], cwd=copy,
                          env=env_for(copy), capture_output=True, text=True)
    where = proc.stdout.strip()
    if proc.returncode != 0 or not os.path.realpath(where).startswith(os.path.realpath(copy)):
        sys.exit(f"error: learned_opt imports from {where or proc.stderr.strip()!r}, not from the copy {copy}")


def pytest(copy: str, nodes, timeout: int) -> tuple:
    """Run pytest on ``nodes`` in ``copy``: ``(exit status, first failure line)``; 124 on timeout."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-W", "ignore::UserWarning",
           *nodes]
    try:
        proc = subprocess.run(cmd, cwd=copy, env=env_for(copy), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return 124, "timeout"
    failure = next((ln[1:].strip() for ln in proc.stdout.splitlines() if ln.startswith("E ")), "")
    return proc.returncode, failure


def verdict(rc: int, failure: str) -> str:
    """caught only for a failed assertion; an exception the mutation raised elsewhere is an ERROR, not a catch."""
    if rc == 0:
        return "SURVIVED"
    if rc == 1 and failure.startswith(("assert", "AssertionError")):
        return "caught"
    return f"ERROR (exit {rc}: {failure[:80]})"


def run_all(mutations: dict, copy: str, timeout: int) -> list:
    """``[(name, caught_by, result, failure)]``; results: caught, SURVIVED, STALE (n matches), ERROR."""
    rows = []
    for name, m in mutations.items():
        path = os.path.join(copy, m["file"])
        text = open(path).read() if os.path.isfile(path) else ""
        n = text.count(m["old"])
        if n != 1:
            rows.append((name, m["caught_by"], f"STALE ({n} matches in {m['file']})", ""))
            continue
        with open(path, "w") as f:
            f.write(text.replace(m["old"], m["new"]))
        try:
            rc, failure = pytest(copy, [m["caught_by"]], timeout)
        finally:
            with open(path, "w") as f:
                f.write(text)
        rows.append((name, m["caught_by"], verdict(rc, failure), failure))
        print(f"  {name}: {rows[-1][2]}", flush=True)
    return rows


def main(argv=None) -> int:
    """Export, check the guards unmutated, run every mutation, print the table; 0 when every mutation is caught."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ref", default="HEAD", help="the commit to export (default HEAD)")
    ap.add_argument("--only", nargs="*", default=(), help="mutation name prefixes to run")
    ap.add_argument("--timeout", type=int, default=600, help="seconds per pytest run")
    args = ap.parse_args(argv)
    mutations = load_mutations(args.only)
    commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", args.ref], capture_output=True,
                            text=True).stdout.strip()
    if not commit:
        sys.exit(f"error: --ref {args.ref!r} names no commit")
    with tempfile.TemporaryDirectory(prefix="mutations-") as copy:
        export(commit, copy)
        check_imports_copy(copy)
        nodes = sorted({m["caught_by"] for m in mutations.values()})
        print(f"{len(mutations)} mutations of {args.ref} ({commit}); guards unmutated ...", flush=True)
        rc, failure = pytest(copy, nodes, args.timeout)
        if rc != 0:
            print(f"error: the guards fail on the unmutated copy (pytest exit {rc}: {failure}); nothing to compare "
                  "against")
            return 1
        rows = run_all(mutations, copy, args.timeout)
    print(f"\nmutation record, {datetime.date.today()} (commit {commit}, guards pass unmutated)\n")
    print("| mutation | caught_by | result | first failed assertion |\n|---|---|---|---|")
    for name, node, result, failure in rows:
        print(f"| {name} | `{node.split('::', 1)[1]}` | {result} | `{failure[:100].replace('|', '/')}` |")
    bad = [r for r in rows if r[2] != "caught"]
    print(f"\n{len(rows) - len(bad)} of {len(rows)} mutations caught")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
