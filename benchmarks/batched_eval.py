"""Batched tuning evaluation against the one-task-at-a-time evaluation it replaces in tuning (issue 23).

    python benchmarks/batched_eval.py            # results/benchmarks/batched_eval.json (about a minute)
    python benchmarks/batched_eval.py --quick    # seconds

For each family and optimizer: ``evaluate`` and ``evaluate_batched`` on the same validation tasks (one thread),
repeated in alternation so that a load change hits both alike; reports the ratio of the medians (the speed-up) and
the largest relative difference of the minibatch losses over the first 50 steps (rounding level) and over the
whole run (a long run may drift further where the trajectory is chaotic)."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from learned_opt.evaluate import evaluate, evaluate_batched  # noqa: E402
from learned_opt.optim import get_optimizer  # noqa: E402
from learned_opt.tasks.suite import suite_family  # noqa: E402

CASES = (("digits_mlp_sigmoid", "adam", dict(lr=1e-2)), ("digits_mlp_relu_deep", "momentum", dict(lr=0.05)),
         ("linear_regression", "adam", dict(lr=1e-2)), ("logistic_regression", "adamw", dict(lr=1e-2)))


def measure(family_name: str, opt_name: str, hp: dict, tasks: int, steps: int, reps: int) -> dict:
    fam, opt = suite_family(family_name), get_optimizer(opt_name, **hp)
    kw = dict(num_tasks=tasks, steps=steps, split="val", seed=0, stream="tune")
    evaluate(fam, opt, None, **{**kw, "steps": 2}), evaluate_batched(fam, opt, **{**kw, "steps": 2})  # warm-up
    times = {"evaluate": [], "batched": []}
    for r in range(reps):
        for name in (("evaluate", "batched") if r % 2 == 0 else ("batched", "evaluate")):
            t = time.perf_counter()
            res = evaluate(fam, opt, None, **kw) if name == "evaluate" else evaluate_batched(fam, opt, **kw)
            times[name].append(time.perf_counter() - t)
            if name == "evaluate":
                a = res.curves
            else:
                b = res.curves
    fin = np.isfinite(a) & np.isfinite(b)
    rel = np.where(fin, np.abs(a - b) / np.maximum(np.abs(a), 1e-30), 0.0)
    return {"family": family_name, "optimizer": opt_name, "hparams": hp, "tasks": tasks, "steps": steps,
            "evaluate_s": float(np.median(times["evaluate"])), "batched_s": float(np.median(times["batched"])),
            "speedup": float(np.median(times["evaluate"]) / np.median(times["batched"])),
            "max_rel_diff_first_50_steps": float(rel[:, :51].max()), "max_rel_diff_whole_run": float(rel.max())}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes (seconds)")
    p.add_argument("--out", default=os.path.join(ROOT, "results", "benchmarks", "batched_eval.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    tasks, steps, reps = (3, 20, 1) if args.quick else (20, 300, 3)
    rows = [measure(f, o, hp, tasks, steps, reps) for f, o, hp in CASES]
    out = {"rows": rows, "load_average_1min": os.getloadavg()[0], "threads": 1,
           "command": "python benchmarks/batched_eval.py" + (" --quick" if args.quick else "")}
    for r in rows:
        print(f"{r['family']:24s} {r['optimizer']:9s} {r['tasks']} tasks x {r['steps']} steps: "
              f"{r['speedup']:.2f}x faster; max rel diff {r['max_rel_diff_first_50_steps']:.1e} (50 steps), "
              f"{r['max_rel_diff_whole_run']:.1e} (whole run)")
    if not args.quick:
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(out, f, indent=2)
    return out


if __name__ == "__main__":
    main()
