"""The adapter's own cost (issue 25): ``LearnedOptimizer.step()`` against the bare update rule it drives.

    python benchmarks/adapter_overhead.py           # results/benchmarks/adapter_overhead.json (a few minutes)
    python benchmarks/adapter_overhead.py --quick   # seconds

For MLPs of about 200k and 5M parameters (gradients fixed, one thread): the median time of a full
``opt.step(loss=loss)`` of the shipped ``general`` optimizer, and the median time of exactly the work it wraps, the
update rule and its learned controller on the same tensors (``learned_opt.unroll.propose``) plus adding the
update, as :func:`learned_opt.unroll.unroll` does it. Their difference is the Python around the update rule
(per-parameter state bookkeeping, groups, dtype handling, weight decay); reported in ms and as a fraction of the
step. The two are timed in alternation, so that a load change on a shared machine hits both alike."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import learned_opt  # noqa: E402
from learned_opt.unroll import propose  # noqa: E402


def mlp(width: int, depth: int) -> nn.Module:
    torch.manual_seed(0)
    layers = [nn.Linear(784, width), nn.ReLU()]
    for _ in range(depth - 1):
        layers += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(width, 10))


def measure(model: nn.Module, reps: int) -> dict:
    params = list(model.parameters())
    g = torch.Generator().manual_seed(1)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g) * 1e-3
    loss = torch.tensor(2.0)
    opt = learned_opt.LearnedOptimizer(params, total_steps=10 ** 6)
    net = opt.opt
    ctrl = opt.controller
    raw_params = [p.detach().clone() for p in params]
    grads = [p.grad.detach() for p in params]
    state, cstate = net.init(raw_params), ctrl.init()

    def adapter_step():
        opt.step(loss=loss)

    def raw_step():
        nonlocal state, cstate, raw_params
        with torch.no_grad():
            updates, state, decision, cstate = propose(net, ctrl, grads, raw_params, state, cstate, step=1,
                                                       horizon=10 ** 6, loss=loss, grad_norm=torch.tensor(1.0))
            raw_params = list(torch._foreach_add(raw_params, [decision.lr_scale * u for u in updates]))

    adapter_step(), raw_step()  # warm-up
    times = {"adapter": [], "raw": []}
    for r in range(reps):
        for name, fn in ((("adapter", adapter_step), ("raw", raw_step)) if r % 2 == 0
                         else (("raw", raw_step), ("adapter", adapter_step))):
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    a, b = float(np.median(times["adapter"])), float(np.median(times["raw"]))
    return {"params": sum(p.numel() for p in params), "tensors": len(params), "adapter_step_ms": 1e3 * a,
            "update_rule_ms": 1e3 * b, "overhead_ms": 1e3 * (a - b), "overhead_fraction_of_step": (a - b) / a,
            "reps": reps}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small models, few repetitions (seconds)")
    p.add_argument("--out", default=os.path.join(ROOT, "results", "benchmarks", "adapter_overhead.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    sizes = {"200k": (256, 1), "5M": (1408, 3)} if not args.quick else {"20k": (24, 1)}
    reps = 3 if args.quick else 15
    rows = {k: measure(mlp(*wd), reps) for k, wd in sizes.items()}
    for k, r in rows.items():
        print(f"{k} ({r['params']:,} parameters, {r['tensors']} tensors): step {r['adapter_step_ms']:.1f} ms, update "
              f"rule {r['update_rule_ms']:.1f} ms, overhead {r['overhead_ms']:.2f} ms "
              f"({100 * r['overhead_fraction_of_step']:.1f}% of the step)")
    out = {"rows": rows, "threads": 1, "load_average_1min": os.getloadavg()[0],
           "command": "python benchmarks/adapter_overhead.py" + (" --quick" if args.quick else "")}
    if not args.quick:
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(out, f, indent=2)
    return out


if __name__ == "__main__":
    main()
