"""The learned optimizer's LR multiplier ``lr`` on the demo's off-suite models, on their validation splits only
(issue #24, item 3: does the default fit real models, and if not, by how much is it off?).

For every set of weights (``--weights label=name-or-path``) and every ``lr`` of ``--lrs``, one run of
``LearnedOptimizer(model.parameters(), name, lr, total_steps=N)`` on each of ``--models`` (the demo's small
transformer LM on Python source and its ViT on 8x8 digits, random init; ``experiments/demo.py``), scored on the
model's **validation** split, beside AdamW tuned on the same split (the demo's grid, widened at an edge). Reported:
each run's validation loss over tuned AdamW's, and the learned LR multiplier's median in each fifth of the run.
A design tool: the held-out splits, on which ``demo.py --models text,vit`` measures ``default_lr_offsuite``, are
never read here, so a choice made from this table (a default, a rule) is still checked by that run. One seed per
run: a demonstration, not a statistical result.

    python experiments/general_offsuite.py --weights v1=general,v2b=results/general/train_v2b/seed0/lopt.pt
    python experiments/general_offsuite.py --preset smoke     # seconds; used by the tests

Writes ``{out_dir}/{table.md, summary.json}``.
"""
from __future__ import annotations

import math
import os
import sys
from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Tuple

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import demo  # noqa: E402
from common import configure, markdown_table, open_run, parallel_map, run_main, save_report  # noqa: E402


@dataclass
class Config:
    """Settings; every field is a command-line flag."""
    weights: tuple = ("shipped=general",)  # label=name (a pretrained name) or label=path (a lopt.pt file)
    lrs: tuple = (1.0, 0.3, 0.1, 0.03, 0.01)  # LearnedOptimizer's lr: a multiplier on every learned update
    models: tuple = ("text", "vit")
    smoke: bool = False  # the demo's smoke models and step counts (seconds; for the tests)
    workers: int = 2
    out_dir: str = "results/general/offsuite_val"


PRESETS = {"smoke": dict(lrs=(1.0, 0.1), smoke=True, workers=1, out_dir="runs/general_offsuite_smoke")}


def parse_weights(cfg: Config) -> List[Tuple[str, str]]:
    """``--weights`` as (label, name-or-path) pairs; a ``ValueError`` naming the flag for a malformed or missing
    entry."""
    from learned_opt import pretrained

    pairs = []
    for item in cfg.weights:
        label, sep, where = str(item).partition("=")
        if not (sep and label and where):
            raise ValueError(f"--weights entries are label=name-or-path, got {item!r}")
        if where not in pretrained.list_pretrained() and not os.path.isfile(where):
            raise ValueError(f"--weights {label}: {where!r} is neither a pretrained optimizer "
                             f"({', '.join(pretrained.list_pretrained())}) nor a file")
        pairs.append((label, where))
    if len({label for label, _ in pairs}) != len(pairs):
        raise ValueError(f"--weights labels must differ, got {', '.join(label for label, _ in pairs)}")
    return pairs


def check(cfg: Config) -> None:
    parse_weights(cfg)
    if not cfg.lrs or not all(isinstance(x, (int, float)) and 0 < x < math.inf for x in cfg.lrs):
        raise ValueError(f"--lrs must hold positive numbers, got {cfg.lrs}")
    demo.check(demo_config(cfg))


def demo_config(cfg: Config) -> "demo.Config":
    """The demo's settings for ``cfg.models`` (its smoke preset with ``--smoke``)."""
    base = demo.PRESETS["smoke"] if cfg.smoke else {}
    return demo.Config(**{**base, "models": tuple(cfg.models), "workers": cfg.workers})


def fifths(values: List[float]) -> List[float]:
    """The median of each fifth of ``values`` (fewer parts for fewer than five values)."""
    parts = np.array_split(np.asarray(values, float), min(5, len(values)))
    return [float(np.median(p)) for p in parts if len(p)]


def runs_table(rows: List[Dict[str, Any]]) -> str:
    """One row per model, weights and lr: the validation loss, its ratio to tuned AdamW's, the multiplier."""
    return markdown_table(
        ["model", "weights", "lr", "validation loss", "over tuned AdamW", "multiplier median by fifth of the run"],
        [[r["model"], r["weights"], f"{r['lr']:g}", r["val_loss"], r["over_tuned_adamw"],
          ", ".join(f"{x:.3g}" for x in r["lr_scale_fifths"])] for r in rows])


def main(argv=None) -> Dict[str, Any]:
    cfg = configure(Config, PRESETS, argv, check=check)
    dcfg = demo_config(cfg)
    prov = open_run(cfg.out_dir)
    weights = parse_weights(cfg)
    specs = [(k, {"optimizer": "general", "role": label, "name": where, "lr": float(lr)})
             for k in cfg.models for label, where in weights for lr in cfg.lrs]
    grid = [(k, demo.adamw("grid", lr)) for k in cfg.models for lr in dcfg.lr_grid]
    done = parallel_map(demo.train_run, [(dcfg, k, spec, "val") for k, spec in specs + grid], cfg.workers)
    learned, grid_done = done[:len(specs)], done[len(specs):]
    tuning = demo.tune(dcfg, {k: [r for r in grid_done if r["kind"] == k] for k in cfg.models})  # validation only
    rows = []
    for (k, spec), run in zip(specs, learned):
        best = tuning[k]["val_loss"][tuning[k]["chosen_lr"]]
        rows.append({"model": k, "weights": spec["role"], "lr": spec["lr"], "val_loss": run["eval"]["loss"],
                     "over_tuned_adamw": run["eval"]["loss"] / best, "lr_scale_fifths": fifths(run["lr_scale"]),
                     "steps": run["steps"]})
    summary = {"config": asdict(cfg), "provenance": prov, "split": "val", "weights": dict(weights), "runs": rows,
               "adamw_tuning": {k: {"val_loss": t["val_loss"], "chosen_lr": t["chosen_lr"],
                                    "chosen_at_edge": t["chosen_at_edge"]} for k, t in tuning.items()}}
    text = "\n".join([
        "Validation splits only (the demo's held-out splits are not read): each set of weights at each lr, one run "
        "per model from the demo's seeded init and minibatch order, against AdamW tuned on the same split.", "",
        runs_table(rows), "",
        *[f"- {k}: tuned AdamW lr {t['chosen_lr']:g}" + (" (at the grid's edge)" if t["chosen_at_edge"] else "")
          + ", validation loss by lr: " + ", ".join(f"{lr:g}: {v:.4g}" for lr, v in sorted(t["val_loss"].items()))
          for k, t in tuning.items()]])
    save_report(cfg.out_dir, text, summary)
    return summary


if __name__ == "__main__":
    run_main(main)
