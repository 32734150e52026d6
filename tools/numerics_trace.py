"""Where do two kernel paths depart? Trace every ATen op of a short meta-training and find the first that differs.

A result that is bitwise the same under two CPU kernel paths (ATen's dispatch level, MKL's conditional numerical
reproducibility branch, oneDNN's instruction set, the number of threads) is bitwise the same across the CPUs those
paths stand for. This runs a small digits meta-training (CoordLSTM, truncated BPTT, the reference learner of the
digits experiment at a tiny size) once per kernel path, each in a fresh process with its environment set before
torch starts, and records for every ATen call (forward and backward, through ``TorchDispatchMode``) the op and a
hash of its inputs' and outputs' bytes. Comparing two traces, the first op whose inputs hash the same but whose
output does not is the kernel that departs; the meta-weights after each iteration are compared too.

    python tools/numerics_trace.py --out results/reproducibility/kernel_paths.json

Writes the verdict per pair of paths (bitwise or the first departing op, its shapes and the relative size of the
difference in the final meta-weights) as JSON, and prints a table.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
from typing import Any, Dict, List

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from learned_opt.repro import KERNEL_PATHS  # noqa: E402  (no torch import)

PATHS = KERNEL_PATHS  # the kernel paths this machine can select; the first is the project's pinned path
# In-place ops that overwrite their first argument whatever it held (often memory fresh from ``empty``).
OVERWRITING = ("uniform_", "normal_", "random_", "bernoulli_", "exponential_", "fill_", "zero_", "copy_")
CLEARED = ("ATEN_CPU_CAPABILITY", "MKL_CBWR", "ONEDNN_MAX_CPU_ISA", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def _digest(t) -> str:
    """A short hash of a tensor's bytes, dtype and shape."""
    import torch

    t = t.detach()
    if t.is_complex() or t.layout != torch.strided:
        t = t.to_dense() if t.layout != torch.strided else torch.view_as_real(t)
    raw = (t.float() if t.dtype in (torch.bfloat16, torch.float16) else t).contiguous().numpy().tobytes()
    return hashlib.blake2b(raw + str((t.dtype, tuple(t.shape))).encode(), digest_size=8).hexdigest()


def trace_run(iterations: int, limit: int) -> Dict[str, Any]:
    """Meta-train for ``iterations`` under a dispatch-mode tracer; the trace and the meta-weights after each."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    from learned_opt.meta import MetaConfig, MetaTrainer
    from learned_opt.optim.learned import CoordLSTM
    from learned_opt.tasks import DigitsFamily

    threads = int(os.environ.get("OMP_NUM_THREADS", "1"))
    torch.set_num_threads(threads)

    class Tracer(TorchDispatchMode):
        """Record (op, inputs hash, outputs hash) for the first ``limit`` ATen calls."""

        def __init__(self):
            super().__init__()
            self.rows: List[List[str]] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if len(self.rows) < limit:
                overwrites = str(func).split(".")[1] in OVERWRITING
                ins = [x for x in tree_leaves((args[1:] if overwrites else args, kwargs or {}))
                       if isinstance(x, torch.Tensor)]
                outs = [x for x in tree_leaves(out) if isinstance(x, torch.Tensor)]
                shapes = ",".join(str(tuple(x.shape)) for x in ins[:3])
                # empty / new_empty / empty_strided return uninitialised memory: nothing to compare
                uninit = "empty" in str(func)
                self.rows.append([str(func), shapes, "|".join(map(_digest, ins)),
                                  "-" if uninit else "|".join(map(_digest, outs))])
            return out

    torch.manual_seed(0)
    net = CoordLSTM(hidden=8)
    cfg = MetaConfig(horizon=10, truncation=5, iterations=iterations, tasks_per_step=2, checkpoint_every=0,
                     checkpoint_seconds=0, seed=0)
    trainer = MetaTrainer(net, DigitsFamily(hidden=(20,), batch_size=32), cfg, progress=False)
    weights = []
    tracer = Tracer()
    with tracer:
        for _ in range(iterations):
            trainer.cfg.iterations = trainer.iteration + 1
            trainer.run()
            weights.append(torch.cat([p.detach().reshape(-1) for p in net.parameters()]).double().tolist())
    return {"trace": tracer.rows, "weights": weights, "torch": torch.__version__, "threads": threads,
            "mkl": torch.backends.mkl.is_available(), "capability": torch.backends.cpu.get_cpu_capability()}


def run_path(name: str, iterations: int, limit: int) -> Dict[str, Any]:
    """One kernel path in a fresh process (the variables are read when torch and MKL start)."""
    env = {k: v for k, v in os.environ.items() if k not in CLEARED}
    env.update({"OMP_NUM_THREADS": "1", "LEARNED_OPT_NATIVE_NUMERICS": "1"}, **PATHS[name])
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, __file__, "--child", str(iterations), str(limit)], env=env,
                          capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"kernel path {name} failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout)


def compare(a: Dict[str, Any], b: Dict[str, Any]) -> Dict[str, Any]:
    """Bitwise verdict of b against a: the first op whose output differs, and whether its inputs were the same."""
    import numpy as np

    out: Dict[str, Any] = {"bitwise": a["weights"] == b["weights"] and a["trace"] == b["trace"]}
    wa, wb = np.array(a["weights"]), np.array(b["weights"])
    out["max_rel_weight_diff_per_iteration"] = [
        float(np.max(np.abs(x - y)) / max(float(np.max(np.abs(x))), 1e-30)) for x, y in zip(wa, wb)]
    for i, (ra, rb) in enumerate(zip(a["trace"], b["trace"])):
        if ra[0] != rb[0]:
            out["first_difference"] = {"index": i, "op": ra[0], "other_op": rb[0], "kind": "different op sequence"}
            break
        if ra[3] != rb[3]:
            same_in = ra[2] == rb[2]
            out["first_difference"] = {"index": i, "op": ra[0], "input_shapes": ra[1],
                                       "kind": "kernel (same inputs, different output)" if same_in else
                                       "inputs differ (an earlier untraced difference)"}
            break
    out["ops_traced"] = min(len(a["trace"]), len(b["trace"]))
    return out


def main(argv=None) -> int:
    """Trace every kernel path, compare each with the pinned one, write and print the verdicts."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.path.join(ROOT, "results", "reproducibility", "kernel_paths.json"))
    p.add_argument("--iterations", type=int, default=2)
    p.add_argument("--limit", type=int, default=400000, help="ops traced per run")
    p.add_argument("--paths", default=",".join(PATHS), help="comma-separated names of " + ", ".join(PATHS))
    args = p.parse_args(argv)
    names = [n for n in args.paths.split(",") if n]
    unknown = [n for n in names if n not in PATHS]
    if unknown:
        p.error(f"--paths: unknown {', '.join(unknown)}; known: {', '.join(PATHS)}")
    runs = {n: run_path(n, args.iterations, args.limit) for n in names}
    ref = names[0]
    result = {"reference_path": ref, "paths": {n: PATHS[n] for n in names},
              "capability": {n: r["capability"] for n, r in runs.items()},
              "setup": f"digits meta-training, CoordLSTM(hidden=8), TBPTT, horizon 10, truncation 5, 2 tasks, "
                       f"{args.iterations} iterations, torch {runs[ref]['torch']}",
              "pairs": {n: compare(runs[ref], runs[n]) for n in names[1:]}}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    for n, c in result["pairs"].items():
        where = c.get("first_difference", {})
        print(f"{ref} vs {n}: {'bitwise' if c['bitwise'] else 'differs'}; first difference: "
              f"{where.get('op', '-')} {where.get('input_shapes', '')} ({where.get('kind', '-')}); max relative "
              f"meta-weight difference per iteration {c['max_rel_weight_diff_per_iteration']}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        json.dump(trace_run(int(sys.argv[2]), int(sys.argv[3])), sys.stdout)
        sys.exit(0)
    sys.exit(main())
