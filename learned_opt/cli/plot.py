"""``learned-opt plot``: the meta-loss (and validation score) of a run against the meta-step, as a figure."""
from __future__ import annotations

import argparse
import os
from typing import Optional

from ..log import read_records
from .common import CLIError, _check_writable


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


def add_flags(pl: argparse.ArgumentParser) -> None:
    """The flags of ``plot``."""
    pl.add_argument("--run-dir", required=True, metavar="DIR", help="a meta-train run directory")
    pl.add_argument("--out", metavar="FILE", help="figure file (default: DIR/meta_loss.png)")
