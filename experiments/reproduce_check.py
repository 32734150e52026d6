"""Statistical reproducibility (issue 23): one meta-training seed of each experiment re-run under another CPU kernel
path, each headline checked against the committed run's seed spread.

Meta-training is not bitwise reproducible across CPUs (README, "Determinism"; ``tools/numerics_trace.py`` names the
first op that departs between kernel paths): a re-run elsewhere is a new draw of the meta-training seed. So the
check is statistical. For every paired record of the committed summary that carries per-seed values (``ratio`` and
``per_seed_ratio``: the per-task ratios of :func:`learned_opt.evaluate.paired`, the family ratios of
:func:`learned_opt.evaluate.family_ratio`), the re-run's value for its one seed must lie in the 95% *prediction*
interval for one new seed, ``mean +- t(n-1) * sd * sqrt(1 + 1/n)`` over the committed seeds' values (the interval
of the mean is narrower than the spread of single seeds by sqrt(n): it is reported beside it, not used), on the log
scale for positive ratios (their seed spread is multiplicative). The
re-run runs each script with ``--final true --seeds 1 --check_run true`` into its own folder (its own test-read
ledger), under the kernel path's environment and ``LEARNED_OPT_NATIVE_NUMERICS=1`` (so the script does not re-pin
itself). ``general`` meta-trains one seed with ``general_train.py`` first.

Writes ``results/reproducibility/summary.json``: the kernel paths measured by ``tools/numerics_trace.py`` and whether
meta-training was bitwise across them, and per headline the re-run value, the committed interval and the verdict.

    make reproduce-check                                               # every experiment, about 1.5 hours
    python experiments/reproduce_check.py --experiments quadratic,metanet
"""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import numpy as np

from common import ROOT, parse_config, write_json

from learned_opt.evaluate import t_quantile
from learned_opt.repro import KERNEL_PATHS

# experiment -> (script, extra flags of the one-seed final run); general's seed comes from general_train.py
EXPERIMENTS: Dict[str, Tuple[str, Tuple[str, ...]]] = {
    "quadratic": ("quadratic.py", ()),
    "metanet": ("metanet.py", ()),
    "digits": ("digits.py", ()),
    "control": ("control.py", ()),
    "estimators/horizon": ("estimators_horizon.py", ()),
    # the committed run's horizon (README); the baselines' committed tuning scores are re-used (validation tasks only;
    # re-tuning them is CPU-hours and the check is about the meta-trained seed)
    "general": ("general.py", ("--horizon", "200", "--cache_dir", "results/general/tuning_cache")),
}


@dataclass
class Config:
    """Reproducibility check settings; every field is a command-line flag."""
    kernel_path: str = "native"  # a name of learned_opt.repro.KERNEL_PATHS ("native": this CPU's own kernels)
    experiments: Tuple[str, ...] = tuple(EXPERIMENTS)
    results_dir: str = "results"  # the committed summaries checked against
    out_dir: str = "runs/reproduce_check"  # the re-runs, in out_dir/<kernel_path>/<experiment> (never under results/)
    summary: str = "results/reproducibility/summary.json"
    kernel_paths_file: str = "results/reproducibility/kernel_paths.json"  # tools/numerics_trace.py's output
    script_preset: str = ""  # --preset passed on to every script ("smoke": seconds, for the tests)
    level: float = 0.95
    merge: bool = False  # keep the summary's headlines of experiments not re-run now (a check run in parts)
    collect: bool = False  # run nothing: check the re-runs already finished in out_dir (a check a session cut short)
    note: str = ""  # what a reader of the summary must know about this check (written to its config)

    def __post_init__(self):
        if self.kernel_path not in KERNEL_PATHS:
            raise ValueError(f"--kernel_path {self.kernel_path!r}: known {', '.join(KERNEL_PATHS)}")
        unknown = [e for e in self.experiments if e not in EXPERIMENTS]
        if unknown:
            raise ValueError(f"--experiments: unknown {', '.join(unknown)}; known: {', '.join(EXPERIMENTS)}")


def kernel_env(name: str) -> Dict[str, str]:
    """This process's environment with kernel path ``name`` in place of the pinned numerics."""
    env = {k: v for k, v in os.environ.items() if k not in ("ATEN_CPU_CAPABILITY", "MKL_CBWR", "ONEDNN_MAX_CPU_ISA")}
    env.update({"LEARNED_OPT_NATIVE_NUMERICS": "1", "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"})
    env.update(KERNEL_PATHS[name])
    return env


def run_script(cfg: Config, script: str, flags: List[str]) -> None:
    """One script under the kernel path; a failure ends the check with the script's last lines."""
    preset = ["--preset", cfg.script_preset] if cfg.script_preset else []
    cmd = [sys.executable, os.path.join(ROOT, "experiments", script), *preset, *flags]
    proc = subprocess.run(cmd, env=kernel_env(cfg.kernel_path), cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"error: {script} failed under kernel path {cfg.kernel_path}:\n{proc.stderr[-2000:]}")


def rerun(cfg: Config, name: str) -> str:
    """The one-seed final re-run of experiment ``name``; returns its summary's path."""
    script, extra = EXPERIMENTS[name]
    out = os.path.join(cfg.out_dir, cfg.kernel_path, name)
    # always a fresh re-run: weights left by an earlier check (its done.json) would be reused, not re-trained
    for old in (out, os.path.join(cfg.out_dir, cfg.kernel_path, "general_train")):
        shutil.rmtree(old, ignore_errors=True)
    one_seed = ["--final", "true", "--seeds", "1", "--check_run", "true", *extra]
    if name == "general":
        train = os.path.join(cfg.out_dir, cfg.kernel_path, "general_train")
        run_script(cfg, "general_train.py", ["--seeds", "1", "--out_dir", train])
        one_seed += ["--train_dir", train]
    run_script(cfg, script, one_seed + ["--out_dir", out])
    return os.path.join(out, "summary.json")


def finished_rerun(cfg: Config, name: str) -> str:
    """``--collect``: the summary of a re-run that finished in ``out_dir`` (it is written last, when the script is
    done), or exit naming the missing one."""
    path = os.path.join(cfg.out_dir, cfg.kernel_path, name, "summary.json")
    if not os.path.exists(path):
        sys.exit(f"error: --collect: no finished re-run of {name} in {os.path.dirname(path)}")
    return path


def _records(obj: Any, keep: Callable[[Dict[str, Any]], bool], path: str = "") -> Iterator[Tuple[str, Dict[str, Any]]]:
    """Every dict of a summary that ``keep`` accepts, with its path (``a/b/c``)."""
    if isinstance(obj, dict):
        if keep(obj):
            yield path, obj
        for k, v in obj.items():
            yield from _records(v, keep, f"{path}/{k}" if path else str(k))


def seed_records(obj: Any) -> Iterator[Tuple[str, Dict[str, Any]]]:
    """Every record with a ``ratio`` and per-seed values in a summary, with its path (``a/b/c``)."""
    return _records(obj, lambda r: "ratio" in r and isinstance(r.get("per_seed_ratio"), list))


def ratio_records(obj: Any) -> Iterator[Tuple[str, Dict[str, Any]]]:
    """Every record with a numeric ``ratio`` in a summary, with its path (``a/b/c``)."""
    return _records(obj, lambda r: isinstance(r.get("ratio"), (int, float)))


def prediction_interval(values: List[float], level: float) -> Tuple[float, float]:
    """The ``level`` interval for one new draw from the distribution the ``values`` came from (t, n-1 dof)."""
    x = np.asarray(values, float)
    if x.size < 2 or not np.all(np.isfinite(x)):
        return -math.inf, math.inf
    half = t_quantile(level, x.size - 1) * float(x.std(ddof=1)) * math.sqrt(1 + 1 / x.size)
    return float(x.mean() - half), float(x.mean() + half)


def check(committed: Dict[str, Any], rerun_summary: Dict[str, Any], level: float) -> Dict[str, Dict[str, Any]]:
    """Per record found in both: the re-run's one-seed value against the committed seeds' prediction interval."""
    again = dict(seed_records(rerun_summary))
    if rerun_summary.get("config", {}).get("seeds") == 1:
        # a one-seed re-run's ratio is its seed's value (summaries written before one-seed runs kept per-seed
        # values, as the general re-run of 2026-12-07, carry only the ratio)
        again = {**dict(ratio_records(rerun_summary)), **again}
    out = {}
    for path, rec in seed_records(committed):
        if path not in again:
            continue
        value = float(again[path]["per_seed_ratio"][0] if "per_seed_ratio" in again[path] else again[path]["ratio"])
        seeds = np.asarray(rec["per_seed_ratio"], float)
        # ratios are compared on the log scale (a ratio's seed spread is multiplicative: on the linear scale the
        # interval of a heavy-tailed record reaches below 0 and says nothing); non-positive values stay linear
        log = bool(np.all(seeds > 0) and value > 0)
        lo, hi = prediction_interval(np.log(seeds).tolist() if log else seeds.tolist(), level)
        lo, hi = (math.exp(lo), math.exp(hi)) if log else (lo, hi)
        out[path] = {"rerun_value": value, "committed_ratio": rec["ratio"],
                     "committed_interval": [rec.get("ci_low"), rec.get("ci_high")],
                     "committed_per_seed": rec["per_seed_ratio"], "prediction_interval": [lo, hi],
                     "scale": "log" if log else "linear",
                     "within": bool(lo <= value <= hi)}
    return out


def outside_counts(headlines: Dict[str, Dict[str, Any]], level: float) -> Dict[str, Any]:
    """How many records were checked and fell outside, per experiment and split into the summary's top-level
    records and the nested ones (per family, per horizon...), beside the number a ``level`` interval lets through
    by chance were the records independent (they are not: one re-run seed moves them together)."""
    def count(keys):
        keys = list(keys)
        return {"checked": len(keys), "outside": sum(not headlines[k]["within"] for k in keys),
                "expected_outside_if_independent": round((1 - level) * len(keys), 2)}

    out = {"all": count(headlines)}
    for name in sorted({k.split(":", 1)[0] for k in headlines}):
        mine = [k for k in headlines if k.split(":", 1)[0] == name]
        out[name] = {"top_level": count(k for k in mine if "/" not in k.split(":", 1)[1]),
                     "nested": count(k for k in mine if "/" in k.split(":", 1)[1])}
    return out


def kernel_paths_record(path: str) -> Dict[str, Any]:
    """What tools/numerics_trace.py measured: the paths and whether meta-training was bitwise across them."""
    if not os.path.exists(path):
        return {"kernel_paths": [], "bitwise_across_kernel_paths": None, "kernel_paths_source": None}
    with open(path) as f:
        kp = json.load(f)
    pairs = kp.get("pairs", {})
    return {"kernel_paths": [kp["reference_path"], *pairs], "kernel_paths_source": os.path.relpath(path, ROOT),
            "bitwise_across_kernel_paths": all(p["bitwise"] for p in pairs.values()) if pairs else None,
            "bitwise_pairs": {n: p["bitwise"] for n, p in pairs.items()}}


def kept_headlines(cfg: Config) -> Dict[str, Dict[str, Any]]:
    """With ``--merge``: the existing summary's headlines of the experiments not re-run now (same kernel path)."""
    if not (cfg.merge and os.path.exists(cfg.summary)):
        return {}
    with open(cfg.summary) as f:
        old = json.load(f)
    if list(old.get("rerun_kernel_path", {})) != [cfg.kernel_path]:
        sys.exit(f"error: --merge: {cfg.summary} was checked under kernel path {list(old.get('rerun_kernel_path', {}))}, "
                 f"not {cfg.kernel_path}")
    return {k: v for k, v in old.get("headlines", {}).items() if k.split(":", 1)[0] not in cfg.experiments}


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    """Re-run every experiment's seed 0 under the kernel path, check its headlines, write the summary."""
    cfg = parse_config(Config, {"smoke": dict(script_preset="smoke", experiments=("quadratic", "metanet"))}, argv)
    headlines: Dict[str, Dict[str, Any]] = {}
    for name in cfg.experiments:
        with open(os.path.join(cfg.results_dir, name, "summary.json")) as f:
            committed = json.load(f)
        with open(finished_rerun(cfg, name) if cfg.collect else rerun(cfg, name)) as f:
            again = json.load(f)
        checked = check(committed, again, cfg.level)
        if not checked:  # a re-run whose summary carries no per-seed values would pass by checking nothing
            sys.exit(f"error: {name}: no headline of the re-run matches a committed record with per-seed values "
                     f"(records with 'ratio' and 'per_seed_ratio'); nothing was checked")
        for path, rec in checked.items():
            headlines[f"{name}:{path}"] = rec
            print(f"{name} {path}: re-run {rec['rerun_value']:.4g}, committed seeds' {100 * cfg.level:.0f}% "
                  f"prediction interval [{rec['prediction_interval'][0]:.4g}, {rec['prediction_interval'][1]:.4g}]: "
                  f"{'inside' if rec['within'] else 'OUTSIDE'}")
    headlines = {**kept_headlines(cfg), **headlines}
    summary = {"config": asdict(cfg), "rerun_kernel_path": {cfg.kernel_path: KERNEL_PATHS[cfg.kernel_path]},
               **kernel_paths_record(cfg.kernel_paths_file),
               "check": "one meta-training seed per experiment re-run under rerun_kernel_path; each record with "
                        "per-seed values must fall in the committed seeds' prediction interval for one new seed",
               "headlines_within_interval": bool(headlines) and all(h["within"] for h in headlines.values()),
               "headlines_outside": sorted(k for k, h in headlines.items() if not h["within"]),
               "counts": outside_counts(headlines, cfg.level),
               "headlines": headlines}
    write_json(cfg.summary, summary)
    return summary


if __name__ == "__main__":
    main()
