"""Which version-2 ingredient helps? (issue #24, item 1: "measure, don't guess")

Each variant is the v1 recipe of ``general_train.py`` with some of the version-2 ingredients switched on
(``normalize="none"``: Adam's scale; ``estimator="pes"`` over horizons up to 2000; ``meta_loss="mean_log_val"``;
every meta-training family of the suite; the whole-run selection metric ``mean_log_train_val``).
Every variant is meta-trained for ``seeds`` seeds (``general_train.py``, resumable, finished seeds kept) and
evaluated by ``general.py`` on **validation tasks only** (``--final false``: stream ``dev``; no test task is
touched, so the choice of the shipped recipe can rest on it), against the same baselines, whose tuning scores
are shared through ``--cache_dir``. Writes ``{out_dir}/ablation.json``: per variant its settings and the
held-out headline ratios with their intervals.

    python experiments/general_ablation.py --variants v1,none,pes,val,families,select,v2   # CPU-hours each
    python experiments/general_ablation.py --preset smoke                       # a minute
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict, dataclass

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import ROOT, parse_config, write_json  # noqa: E402

from learned_opt.tasks.suite import meta_families  # noqa: E402

PES = ["--estimator", "pes", "--sample_horizons", "250,500,1000,2000", "--truncation", "50"]
VARIANTS = {  # name -> general_train.py flags on top of the v1 recipe
    "v1": [],
    "none": ["--normalize", "none", "--lr_bound", "10", "--init_lr", "0.001"],
    "pes": PES,
    "val": ["--meta_loss", "mean_log_val"],
    "families": ["--families", ",".join(meta_families())],  # + the CNN, RNN and transformer on synthetic data
    "select": ["--val_metric", "mean_log_train_val", "--val_horizon", "2000", "--ship_horizon", "2000"],
    "v2": ["--preset", "v2"],
}
HEADLINES = ("train_vs_tuned_adam_1x", "train_vs_tuned_adam_10x", "test_vs_tuned_adam",
             "train_vs_best_single_adam_lr_1x")


@dataclass
class Config:
    """The ablation's settings; every field is a command-line flag."""
    variants: tuple = tuple(VARIANTS)
    seeds: int = 3
    iterations: int = 500
    train_flags: tuple = ()  # more general_train.py flags for every variant
    eval_flags: tuple = ("--horizon", "200")  # general.py flags for every evaluation
    cache_dir: str = "results/general/tuning_cache"  # the baselines' tuning scores, shared
    # variant=folder: meta-train (resume, or reuse finished seeds of the same settings) in that folder instead of
    # out_dir/variant/train; the full v2 recipe shares the seeds of the main v2 run
    train_dirs: tuple = ("v2=results/general/train_v2",)
    workers: int = 2
    out_dir: str = "runs/general_ablation"


PRESETS = {"smoke": dict(variants=("v1", "none"), seeds=1, train_flags=("--preset", "smoke"),
                         eval_flags=("--preset", "smoke", "--families", "wine_mlp", "--stress_tasks", "0",
                                     "--baselines", "adam"),
                         cache_dir="", workers=1, train_dirs=(), out_dir="runs/general_ablation_smoke")}


def run(script: str, flags: list) -> None:
    """One script, its failure ending the ablation with its last lines."""
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", script), *flags], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"error: {script} {' '.join(flags)} failed:\n{proc.stderr[-2000:]}")


def main(argv=None) -> dict:
    """Meta-train and evaluate every variant on validation tasks; ``ablation.json``."""
    cfg = parse_config(Config, PRESETS, argv)
    unknown = [v for v in cfg.variants if v not in VARIANTS]
    if unknown:
        sys.exit(f"error: --variants: unknown {unknown[0]!r}; known: {', '.join(VARIANTS)}")
    dirs = dict(d.split("=", 1) for d in cfg.train_dirs if "=" in d)
    if len(dirs) != len(cfg.train_dirs) or set(dirs) - set(VARIANTS):
        sys.exit(f"error: --train_dirs: entries must be variant=folder with a known variant, got "
                 f"{','.join(cfg.train_dirs)}")
    out = {"config": asdict(cfg), "split": "val (stream 'dev'): no test task", "variants": {}}
    for name in cfg.variants:
        train_dir = dirs.get(name, os.path.join(cfg.out_dir, name, "train"))
        flags = VARIANTS[name] + list(cfg.train_flags)
        run("general_train.py", flags + ["--seeds", str(cfg.seeds), "--workers", str(cfg.workers), "--out_dir",
                                         train_dir] + ([] if "smoke" in flags else ["--iterations",
                                                                                    str(cfg.iterations)]))
        eval_dir = os.path.join(cfg.out_dir, name, "eval")
        run("general.py", list(cfg.eval_flags) + ["--final", "false", "--seeds", str(cfg.seeds), "--train_dir",
                                                  train_dir, "--out_dir", eval_dir, "--workers", str(cfg.workers)]
            + (["--cache_dir", cfg.cache_dir] if cfg.cache_dir else []))
        with open(os.path.join(eval_dir, "summary.json")) as f:
            s = json.load(f)
        out["variants"][name] = {"train_flags": flags, "headlines": {k: {q: s[k][q] for q in ("ratio", "ci_low",
                                                                                             "ci_high")}
                                                                    for k in HEADLINES if k in s},
                                 "divergences": s["divergences"]["count"], "late_spikes": s["late_spikes"]["count"]}
        print(f"{name}: " + ", ".join(f"{k} {v['ratio']:.3g} [{v['ci_low']:.3g}, {v['ci_high']:.3g}]"
                                      for k, v in out["variants"][name]["headlines"].items()), flush=True)
        write_json(os.path.join(cfg.out_dir, "ablation.json"), out)
    return out


if __name__ == "__main__":
    main()
