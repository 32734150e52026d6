"""The figures the experiment scripts draw (matplotlib, imported lazily, Agg backend): loss curves, the speedup
envelope, the stopping Pareto plot, learning-rate schedules, per-family panels and curves past the horizon."""
from __future__ import annotations

import math
import os
from typing import Dict

import numpy as np


def _pyplot():
    """``matplotlib.pyplot`` on the file-only Agg backend (the scripts run without a display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(path: str, curves: Dict[str, np.ndarray], title: str, ylabel: str = "loss") -> None:
    """Mean loss per step (log y-axis) with the 25-75% band over problems, one line per optimizer."""
    plt = _pyplot()
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


def speedup_plot(path, sp, max_h):
    """Speedup over Adam tuned for each horizon against the learned optimizer's steps; where no tuned Adam reaches
    the learned optimizer's loss within ``max_h`` steps the speedup is only bounded below (open triangles)."""
    plt = _pyplot()
    finite = [(int(k), v["speedup"]) for k, v in sp.items() if v["bound"] is None]
    bounds = [(int(k), v["speedup"]) for k, v in sp.items() if v["bound"] == "lower"]
    uppers = [(int(k), v["speedup"]) for k, v in sp.items() if v["bound"] == "upper"]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    if finite:
        ax.plot(*zip(*finite), "o-", label="measured (envelope of Adam tuned per horizon)")
    if bounds:
        ax.plot(*zip(*bounds), "^", mfc="none", ms=9, label=f"lower bound (no tuned Adam got there in {max_h} steps)")
    if uppers:
        ax.plot(*zip(*uppers), "v", mfc="none", ms=9, label="upper bound (tuned Adam got there sooner)")
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("learned optimizer's steps")
    ax.set_ylabel("speedup over tuned Adam")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def pareto_plot(path, selection_points, eval_points, chosen_sel, chosen_eval, split_name, reference: int):
    """Steps against loss at the stop, per rule: left, the selection tasks (validation loss; every lambda and
    threshold, mean over seeds); right, the evaluation tasks (test-split loss; the chosen setting only). The
    y-axis is logarithmic so that the crowded region near the reference patience stays readable."""
    plt = _pyplot()
    from matplotlib.ticker import FormatStrFormatter

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for ax, points, chosen, ylabel, title in (
            (axes[0], selection_points, chosen_sel, "validation loss at the stop",
             "selection tasks (validation stream 'stopsel')"),
            (axes[1], eval_points, chosen_eval, "test-split loss at the stop", f"evaluation tasks: {split_name}")):
        ref = points.get(f"patience {reference}")
        patience_colors = iter(["tab:green", "tab:olive", "tab:brown", "tab:pink", "tab:cyan"])
        learned_labelled = False
        for name, (steps, loss) in points.items():
            if name == chosen:
                ax.scatter(steps, loss, marker="*", s=160, color="tab:red", zorder=4, label=f"chosen: {name}")
            elif name.startswith("learned"):
                ax.scatter(steps, loss, marker="*", s=60, color="tab:blue", zorder=3, alpha=0.6,
                           label=None if learned_labelled else "other lambda / threshold")
                learned_labelled = True
            elif name.startswith("patience"):
                ax.scatter(steps, loss, marker="s", s=40, color=next(patience_colors, "tab:gray"), zorder=2,
                           label=name)
            else:  # fixed budgets, labelled by their number
                ax.scatter(steps, loss, marker="o", s=30, color="tab:gray", zorder=2)
                ax.annotate(name.replace("budget ", "B"), (steps, loss), fontsize=7, xytext=(3, 3),
                            textcoords="offset points")
        if ref is not None:
            ax.axhline(1.01 * ref[1], color="tab:green", lw=0.8, ls="--")
            ax.axvline(0.7 * ref[0], color="tab:orange", lw=0.8, ls="--")
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FormatStrFormatter("%.2f"))
        ax.yaxis.set_minor_formatter(FormatStrFormatter("%.2f"))
        ax.tick_params(axis="y", which="minor", labelsize=7)
        ax.set_xlabel("inner steps used (mean over tasks; B: fixed budget)")
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7, loc="upper right")
    fig.suptitle(f"learned stopping against early stopping and fixed budgets; target: left of the orange line "
                 f"(30% fewer steps than patience {reference}), below the green one (1.01x its loss)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def lr_schedule_plot(path, traces, horizon):
    """Learning rate relative to the tuned constant rate: the learned controllers (one validation task, every
    seed) and every schedule as tuned for the meta-training horizon (solid) and twice it (dashed)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(traces), figsize=(6 * len(traces), 4), squeeze=False)
    for ax, (base, tr) in zip(axes[0], traces.items()):
        colors = {}
        for name, values in tr.items():
            kind = name.split(" ")[0]
            learned = kind == "learned"
            color = colors.setdefault(kind, None if learned else f"C{len(colors)}")
            ls = "--" if name.endswith(f"@{2 * horizon})") else "-"
            ax.plot(values, label=name, lw=2 if learned else 1, ls=ls, color="black" if learned else color,
                            alpha=0.8)
        ax.axvline(horizon, color="gray", lw=0.8, ls=":")
        ax.set_yscale("log")
        ax.set_ylim(bottom=1e-2)  # cosine decays to 0: below this only its last steps would show
        ax.set_title(f"{base}: learning rate / tuned constant rate at {horizon} steps")
        ax.set_xlabel("inner step")
        ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_families(path: str, curves: dict, roles: dict, title: str) -> None:
    """One panel per family: mean train loss per step (log y), one line per method."""
    plt = _pyplot()
    n = len(curves)
    cols = min(4, n)
    rows = int(math.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
    for ax, (f, cs) in zip(axes.flat, curves.items()):
        for name, c in cs.items():
            c = np.where(np.isfinite(c) & (c > 0), c, np.nan)
            ax.plot(np.arange(len(c)), c, label=name, lw=2 if name == "learned" else 1)
        ax.set_yscale("log")
        ax.set_title(f"{f} ({roles[f]})", fontsize=9)
        ax.set_xlabel("step", fontsize=8)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def horizon_plot(path, horizon, learned, jobs, adam, steps) -> None:
    """Geometric-mean minibatch loss per inner step (log-log) of every TBPTT and PES seed and of Adam tuned for the
    longest horizon; the dotted line marks the meta-training horizon."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colours = {"tbptt": "tab:blue", "pes": "tab:red"}
    for (e, s), r in zip(jobs, learned):
        c = r["curve"]
        ax.plot(np.asarray(c["step"]) + 1, np.exp(c["mean_log_loss"]), color=colours[e], alpha=0.7,
                label=f"{e.upper()} (seeds)" if s == 0 else None)
    c = adam[-1]["curve"]
    ax.plot(np.asarray(c["step"]) + 1, np.exp(c["mean_log_loss"]), color="k", ls="--",
            label=f"Adam tuned for {steps[-1]} steps")
    ax.axvline(horizon, color="grey", lw=1, ls=":")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("inner step (dotted: the meta-training horizon)")
    ax.set_ylabel("minibatch loss (geometric mean over tasks)")
    ax.set_title("digits MLP: TBPTT- vs PES-meta-trained NormMLP past the horizon")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
