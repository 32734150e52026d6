"""Helpers shared by the experiment scripts: argument parsing from a dataclass, provenance, tables, figures."""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
from typing import Any, Dict, Sequence

import numpy as np

from learned_opt.flags import add_dataclass_flags
from learned_opt.log import provenance  # noqa: F401  (re-exported for the scripts)


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


def plot_curves(path: str, curves: Dict[str, np.ndarray], title: str, ylabel: str = "loss") -> None:
    """Mean loss per step (log y-axis) with the 25-75% band over problems, one line per optimizer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, c in curves.items():
        c = np.where(np.isfinite(c), c, np.nan)
        steps = np.arange(c.shape[1])
        ax.plot(steps, np.nanmean(c, 0), label=name, lw=2 if name.startswith("learned") else 1.2)
        lo, hi = np.nanpercentile(c, 25, 0), np.nanpercentile(c, 75, 0)
        ax.fill_between(steps, lo, hi, alpha=0.15)
    ax.set_yscale("log")
    ax.set_xlabel("inner step")
    ax.set_ylabel(ylabel + " (mean; band: 25-75% over problems)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
