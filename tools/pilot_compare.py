"""A quick look at meta-trained weights during development, on validation tasks only (stream ``pilot``): the final
whole-split train and validation losses of each given weights file and of Adam at 1e-3, per held-out family, at one
or more horizons, with the LR multiplier's median and its fraction of steps near the upper bound. Nothing here is
a result (a few tasks, untuned baselines, no interval): it tells whether a run in progress is worth its CPU-hours.

    python tools/pilot_compare.py results/general/train/seed1/lopt.pt results/general/train_v2/seed0/lopt_it125.pt \\
        --horizons 200,2000 --tasks 3
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from learned_opt.evaluate import task_seed  # noqa: E402
from learned_opt.evaluate.run import checkpoint_metrics  # noqa: E402
from learned_opt.meta import load_lopt  # noqa: E402
from learned_opt.optim import get_optimizer  # noqa: E402
from learned_opt.tasks.base import generator  # noqa: E402
from learned_opt.tasks.suite import heldout_families, suite_family  # noqa: E402
from learned_opt.unroll import unroll  # noqa: E402


def run(opt, ctrl, family, i: int, steps: int):
    """Final whole-split train / val loss of one validation task, and the LR multipliers the controller chose."""
    g = generator(task_seed("val", i, 0, stream="pilot"))
    task = family(g)
    res = unroll(task, opt, ctrl, steps=steps, generator=g, horizon=steps)
    m = checkpoint_metrics(task, res.params)
    scales = res.records.get("lr_scale", []) if ctrl is not None else []
    return float(np.mean(m["train_loss"])), float(np.mean(m["val_loss"])), np.asarray(scales, float)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("weights", nargs="+")
    p.add_argument("--horizons", default="200,2000")
    p.add_argument("--tasks", type=int, default=3)
    p.add_argument("--families", default=",".join(heldout_families()))
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    nets = {os.path.relpath(w, ROOT): load_lopt(w) for w in a.weights}
    for steps in [int(h) for h in a.horizons.split(",")]:
        print(f"\n## {steps} steps, {a.tasks} validation tasks per family (stream 'pilot'): final train / val loss "
              "as the geometric mean ratio to Adam at 1e-3; LR multiplier median, fraction near its bound")
        for fam in a.families.split(","):
            family = suite_family(fam)
            t0 = time.perf_counter()
            adam = [run(get_optimizer("adam", lr=1e-3), None, family, i, steps) for i in range(a.tasks)]
            cells = []
            for name, net in nets.items():
                out = [run(net, net.as_controller(), family, i, steps) for i in range(a.tasks)]
                ratio = [np.exp(np.mean(np.log(np.maximum([o[k] for o in out], 1e-8))
                                        - np.log(np.maximum([r[k] for r in adam], 1e-8)))) for k in (0, 1)]
                s = np.concatenate([o[2] for o in out])
                hi = float(getattr(net.heads, "lr_max", None) or net.heads.lr_bound)
                cells.append(f"{os.path.basename(os.path.dirname(name))}/{os.path.basename(name)}: "
                             f"{ratio[0]:.3g} / {ratio[1]:.3g}, lr x{np.median(s):.3g} ({np.mean(s >= 0.9 * hi):.0%})")
            print(f"{fam} ({time.perf_counter() - t0:.0f}s): " + "; ".join(cells), flush=True)


if __name__ == "__main__":
    main()
