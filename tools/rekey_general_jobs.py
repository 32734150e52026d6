"""Give the committed general final run's baseline evaluation runs the cache keys of the current code (one-off
migration, issue #24), so that a later final run on the same draw (another version's weights, a reproducibility
check) re-uses them instead of re-running about 1.6 CPU-hours.

Until commit 0afa7d7 every job was keyed on the digest of every source file; baseline runs are now keyed on
:data:`general_runs.BASELINE_SOURCES` only. A baseline run computed at ``--old_commit`` is valid today when those
files compute the same thing: this script refuses unless ``git diff OLD`` (the working tree) over them shows only the
files named in ``REVIEWED`` (changes read by hand and found not to touch a baseline run's computation). It
recomputes each baseline job's old key from the old commit's sources (extracted with ``git archive``) and copies the
job file to its new key; the old files stay. Stage 1 (tuning, single rate) is re-read from the tuning caches.

    python tools/rekey_general_jobs.py --old_commit 6321a34 --out_dir results/general
"""
from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import replace

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "experiments"))

import general  # noqa: E402
import general_jobs as gj  # noqa: E402
from common import parse_config  # noqa: E402
from general_runs import BASELINE_SOURCES  # noqa: E402

from learned_opt.evaluate import ledger  # noqa: E402

# changed since 6321a34 and read: the evaluation run moved out of general_jobs.run_job unchanged (general_runs),
# the split rule moved from common.eval_split unchanged (splits); none changes what a baseline evaluation run computes
REVIEWED = ("experiments/general_runs.py", "learned_opt/evaluate/splits.py")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--old_commit", required=True)
    ap.add_argument("--out_dir", default="results/general")
    ap.add_argument("--dry_run", action="store_true")
    args = ap.parse_args(argv)
    changed = subprocess.run(["git", "diff", "--name-only", args.old_commit, "--", *BASELINE_SOURCES],
                             cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    unread = sorted(set(changed) - set(REVIEWED))
    if unread:
        sys.exit(f"error: --old_commit: {', '.join(unread)} changed since {args.old_commit} and were not reviewed")
    with open(os.path.join(args.out_dir, "summary.json")) as f:
        summary = json.load(f)
    flags = [f"--{k}={','.join(map(str, v)) if isinstance(v, list) else v}" for k, v in summary["config"].items()
             if k in general.Config.__dataclass_fields__ and k not in ("families",)]
    cfg = parse_config(general.Config, general.PRESETS, flags + ["--out_dir", args.out_dir, "--workers", "1"])
    fams = general.family_names(cfg)
    with tempfile.TemporaryDirectory() as old:
        archive = subprocess.run(["git", "archive", args.old_commit, *ledger.SOURCE_FOLDERS], cwd=ROOT,
                                 capture_output=True, check=True).stdout
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            tar.extractall(old, filter="data")
        old_sources = ledger.sources_digest(old)
    # stage 1 from the tuning caches (validation tasks only; no evaluation run), in a scratch job dir
    scratch = tempfile.mkdtemp()
    stage1 = gj.run_jobs(replace(cfg, jobs_dir=scratch), gj.tuning_specs(cfg, fams), {})
    shutil.rmtree(scratch)
    tuned, single = gj.tuned_settings(cfg, stage1)
    runs = gj.Runs(cfg, [], tuned, single, {})
    h1, h10, h30 = gj.horizons(cfg)
    specs = {runs.spec(f, m, h, metric) for f in fams for m in (*cfg.baselines, gj.DEFAULT_NAME, gj.SINGLE_NAME)
             for h in (h1, h10) for metric in gj.ROWS}
    specs |= {runs.spec(f, "adam", h30, "train_loss") for f in fams} if cfg.stress_tasks else set()
    cache = gj.JobCache(cfg, {})
    found = copied = 0
    for spec in sorted(specs, key=repr):
        old_key = ledger.digest({"config": gj.computing_fields(cfg), "sources": old_sources,
                                 "spec": repr(spec)})[:24]
        src = os.path.join(cache.dir, f"{old_key}.pkl")
        if not os.path.exists(src):
            continue
        found += 1
        if not os.path.exists(cache.path(spec)) and not args.dry_run:
            shutil.copyfile(src, cache.path(spec))
            copied += 1
    print(f"{len(specs)} baseline runs, {found} found under their old keys, {copied} copied to new keys")
    return 0 if found == len(specs) else 1


if __name__ == "__main__":
    sys.exit(main())
