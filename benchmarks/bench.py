"""Speed and memory benchmarks of learned_opt, every ratio measured side by side in one run.

    python benchmarks/bench.py            # full run: results/benchmarks/{summary.json, table.md} (a few minutes)
    python benchmarks/bench.py --quick    # smoke run with tiny repetition counts (seconds)

Measures, with one intra-op thread (small-op workloads, DESIGN.md section 3), warm-ups, and medians of repeated
timings taken in alternation, so that a load change on a shared machine hits both sides of a ratio alike:

1. ``higher_over_func_meta_step``: one meta-training step (truncation 10 on the digits MLP 64->20->10) with the
   learner run through ``higher`` (:class:`~learned_opt.functional.FunctionalModule`'s default backend) over the
   same step with its ``torch.func.functional_call`` backend; the worse of CoordLSTM and CoordMLP. Target <= 1.1.
2. ``lopt_over_adam_eval_step_digits``: one evaluation inner step (forward, backward, update, apply; no graph) of
   each meta-network over the same step with hand-coded Adam on the digits MLP; the worse of CoordLSTM, CoordMLP
   and the digits experiment's configuration (Adam-based CoordLSTM driven by its own LR head). Target
   <= 5. Also on a 784->256->10 MLP with random data, and the optimizer update alone.
3. Peak tensor memory: of one meta-step against the truncation length (grows), of an evaluation unroll against
   the horizon (flat) and of a meta-training iteration against the horizon at a fixed truncation (flat). Memory
   is the peak of live tensor-storage bytes allocated inside the measured call, counted by a
   ``TorchDispatchMode`` that sees every op's outputs and a finalizer on each new storage (CPU has no
   allocator statistics, and RSS hides tensors behind the allocator's caching).
4. Inner steps per second during meta-training (digits and quadratics).
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
import warnings
import weakref
from typing import Callable, Dict, List

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from learned_opt.functional import FunctionalModule  # noqa: E402
from learned_opt.log import provenance  # noqa: E402
from learned_opt.meta import MetaConfig, MetaTrainer  # noqa: E402
from learned_opt.optim import Adam  # noqa: E402
from learned_opt.optim.learned import CoordLSTM, CoordMLP  # noqa: E402
from learned_opt.optim.normmlp import NormMLP  # noqa: E402
from learned_opt.tasks import DigitsFamily, QuadraticFamily  # noqa: E402
from learned_opt.tasks.base import generator  # noqa: E402
from learned_opt.tasks.supervised import MLP, SupervisedTask  # noqa: E402
from learned_opt.unroll import unroll  # noqa: E402

TARGETS = {"higher_over_func_meta_step": 1.1, "lopt_over_adam_eval_step_digits": 5.0,
           # issue 14 (full inner step on the 784-256-10 MLP over Adam's, one thread)
           "general_step_over_adam_mlp200k": 2.0, "lstm_step_over_adam_mlp200k": 10.0,
           "mlp_step_over_adam_mlp200k": 3.0, "general_state_floats_per_param": 8}
NETS = {"lstm": CoordLSTM, "mlp": CoordMLP}


def GENERAL():  # noqa: N802 - a factory named like the class it configures
    """The shipped general optimizer (a NormMLP with its scheduler); a fresh NormMLP when it has not shipped yet."""
    from learned_opt import pretrained

    if "general" in pretrained.list_pretrained():
        return pretrained.load("general")
    return NormMLP()


def DIGITS_LSTM():  # noqa: N802 - a factory named like the class it configures
    """The configuration ``experiments/digits.py`` reports: Adam-based CoordLSTM with a lower-only LR head."""
    return CoordLSTM(base="adam", base_lr=0.1, lr_max=1.0, base_lr_range=1.0)


EVAL_NETS = ("lstm", "mlp", "lstm_digits", "general")  # timed against Adam in the evaluation-step benchmark


# ----------------------------------------------------------------------------------------------- tools
def side_by_side(fns: Dict[str, Callable[[], None]], repeats: int, warmup: int = 2) -> Dict[str, float]:
    """Median seconds per call of each function, calls interleaved (order rotated every round)."""
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    times: Dict[str, List[float]] = {n: [] for n in names}
    for r in range(repeats):
        order = names[r % len(names):] + names[:r % len(names)]
        for n in order:
            t = time.perf_counter()
            fns[n]()
            times[n].append(time.perf_counter() - t)
    return {n: statistics.median(v) for n, v in times.items()}


class LiveTensorBytes(TorchDispatchMode):
    """Peak bytes of tensor storages created inside the ``with`` block and alive at the same time."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.seen = set()

    def _free(self, key, nbytes):
        self.seen.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            st = t.untyped_storage()
            key, nbytes = st.data_ptr(), st.nbytes()
            if nbytes == 0 or key in self.seen:  # views and in-place results share a counted storage
                continue
            self.seen.add(key)
            self.live += nbytes
            self.peak = max(self.peak, self.live)
            weakref.finalize(st, self._free, key, nbytes)
        return out


def peak_bytes(fn: Callable[[], object]) -> int:
    """Peak live tensor bytes allocated while ``fn`` runs (results dropped before returning)."""
    gc.collect()
    mode = LiveTensorBytes()
    with mode:
        result = fn()
    del result
    return mode.peak


def quiet(fn, *args, **kwargs):
    """Run ``fn`` with warnings silenced."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def random_mlp_task(gen: torch.Generator, sizes=(784, 256, 10), n: int = 1024, batch: int = 128):
    """Cross-entropy on random data with an MLP learner (no dataset download)."""
    x = torch.randn(n, sizes[0], generator=gen)
    y = torch.randint(0, sizes[-1], (n,), generator=gen)
    with torch.random.fork_rng(devices=[]):
        module = MLP(list(sizes), "relu")
    data = {s: (x, y) for s in ("train", "val", "test")}
    return SupervisedTask(module, data, "cross_entropy", batch)


def make_trainer(kind: str, family, truncation: int, horizon: int = 100, functional_call: bool = False):
    """A trainer and one inner run on a fresh task, ready for ``meta_step_on``."""
    torch.manual_seed(0)
    net = NETS[kind]()
    trainer = MetaTrainer(net, family, MetaConfig(horizon=horizon, truncation=truncation, iterations=1))
    run = trainer._new_run(horizon)
    if functional_call:
        run.task.fn = FunctionalModule(run.task.fn.module, backend="func")
    return trainer, run


# ----------------------------------------------------------------------------------------------- sections
def bench_meta_step(cfg) -> Dict[str, dict]:
    """Meta-step time through higher and through functional_call, per meta-network, on digits."""
    out = {}
    family = DigitsFamily()
    for kind in NETS:
        pairs = {p: make_trainer(kind, family, cfg.truncation, functional_call=p == "func") for p in ("higher", "func")}
        fns = {p: (lambda tr=tr, run=run: quiet(tr.meta_step_on, [run], cfg.truncation))
               for p, (tr, run) in pairs.items()}
        t = side_by_side(fns, cfg.repeats)
        out[kind] = {"higher_s": t["higher"], "func_s": t["func"], "ratio": t["higher"] / t["func"],
                     "inner_steps_per_s": cfg.truncation / t["higher"]}
    return out


def bench_eval_step(cfg, task_name: str) -> dict:
    """Evaluation step (full inner step, and the optimizer update alone) of each optimizer on one task."""
    g = generator(0)
    if task_name == "digits":
        task, steps, repeats = DigitsFamily()(g), cfg.eval_steps, cfg.repeats
    else:
        task, steps, repeats = random_mlp_task(g), cfg.big_steps, cfg.big_repeats
    torch.manual_seed(0)
    opts = {"adam": Adam(lr=1e-3), "lstm": CoordLSTM(), "mlp": CoordMLP(), "lstm_digits": DIGITS_LSTM(),
            "general": GENERAL()}
    params = task.init(generator(1))

    def full(k, opt):
        # the digits experiment's optimizer runs with its own LR head as the controller
        ctrl = opt.as_controller if k in ("lstm_digits", "general") else None
        return lambda: unroll(task, opt, ctrl() if ctrl else None, steps=steps, generator=generator(2),
                              params=params, final_eval=False)

    t_full = side_by_side({k: full(k, o) for k, o in opts.items()}, repeats, warmup=1)
    # the update alone, on fixed gradients, from a warmed-up state
    grads = [torch.randn(p.shape, generator=g) * 1e-2 for p in params]
    states = {}
    with torch.no_grad():
        for k, o in opts.items():
            s = o.init(params)
            for _ in range(3):
                _, s = o.update(grads, s, params, loss=torch.tensor(1.0))
            states[k] = s

    def upd(k, o):
        def f():
            with torch.no_grad():
                for _ in range(steps):
                    o.update(grads, states[k], params, loss=torch.tensor(1.0))
        return f

    t_upd = side_by_side({k: upd(k, o) for k, o in opts.items()}, repeats, warmup=1)
    n = sum(p.numel() for p in params)
    res = {"coordinates": n, "steps_per_timing": steps}
    for k in opts:
        res[k] = {"step_ms": 1e3 * t_full[k] / steps, "update_ms": 1e3 * t_upd[k] / steps}
    for k in EVAL_NETS:
        res[k]["step_over_adam"] = t_full[k] / t_full["adam"]
        res[k]["update_over_adam"] = t_upd[k] / t_upd["adam"]
    return res


def bench_memory(cfg) -> dict:
    """Peak live tensor bytes against truncation (meta-step) and horizon (evaluation, meta-training)."""
    family = DigitsFamily()
    out = {"meta_step_vs_truncation": {}, "eval_vs_horizon": {}, "meta_iteration_vs_horizon": {}}
    for k in cfg.mem_truncations:
        trainer, run = make_trainer("lstm", family, k)
        out["meta_step_vs_truncation"][k] = peak_bytes(lambda: quiet(trainer.meta_step_on, [run], k))
    task = family(generator(0))
    net = CoordLSTM()
    for h in cfg.mem_horizons:
        out["eval_vs_horizon"][h] = peak_bytes(lambda: unroll(task, net, steps=h, generator=generator(1)))
    for h in cfg.mem_meta_horizons:
        torch.manual_seed(0)
        trainer = MetaTrainer(CoordLSTM(), family, MetaConfig(horizon=h, truncation=cfg.mem_meta_truncation,
                                                              iterations=1))
        out["meta_iteration_vs_horizon"][h] = peak_bytes(lambda: quiet(trainer.run))
    return out


def bench_quadratic_throughput(cfg) -> dict:
    """Inner steps per second of meta-training on L2L quadratics (10-d, a batch of problems per task)."""
    family = QuadraticFamily(dim=10, num_problems=cfg.quad_problems)
    out = {}
    for kind in NETS:
        trainer, run = make_trainer(kind, family, cfg.truncation)
        t = side_by_side({kind: lambda: quiet(trainer.meta_step_on, [run], cfg.truncation)}, cfg.repeats)[kind]
        out[kind] = {"meta_step_s": t, "inner_steps_per_s": cfg.truncation / t}
    return out


# ----------------------------------------------------------------------------------------------- report
def _fmt_bytes(n: float) -> str:
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def _fmt_load(pair) -> str:
    return " / ".join("n/a" if v is None else f"{v:.2f}" for v in pair)


def table(summary: dict) -> str:
    """The markdown report."""
    d = summary["details"]
    lines = [f"# Benchmarks{' (quick run: smoke numbers only)' if summary['quick'] else ''}", "",
             f"torch {summary['env']['torch']}, {summary['env']['threads']} intra-op thread, "
             f"{summary['env']['cpus']} CPUs ({summary['env']['machine']}); medians of {summary['env']['repeats']} "
             f"interleaved timings after warm-up; 1-minute load average {_fmt_load(summary['env']['load_average_before_after'])} "
             f"(before / after). Regenerate: `make bench` or `OMP_NUM_THREADS=1 python benchmarks/bench.py`.", "",
             "| ratio | measured | target |", "|---|---|---|"]
    for key, target in TARGETS.items():
        v = summary[key]
        lines.append(f"| `{key}` | {v:.2f} | <= {target} {'(met)' if v <= target else '(MISSED)'} |")
    lines += ["", "## Meta-training step (digits MLP 64->20->10, truncation "
              f"{summary['env']['truncation']}): `higher` against `torch.func.functional_call`", "",
              "| meta-network | higher (ms) | functional_call (ms) | ratio | inner steps/s |", "|---|---|---|---|---|"]
    for k, r in d["meta_step"].items():
        lines.append(f"| {k} | {1e3 * r['higher_s']:.2f} | {1e3 * r['func_s']:.2f} | {r['ratio']:.3f} | "
                     f"{r['inner_steps_per_s']:.0f} |")
    lines += ["", "## Evaluation step: meta-networks against hand-coded Adam", "",
              "Full inner step = forward + backward + update + apply, no graph kept; update = the optimizer alone.",
              "", "| learner | coordinates | optimizer | step (ms) | step / Adam | update (ms) | update / Adam |",
              "|---|---|---|---|---|---|---|"]
    for name, label in (("eval_digits", "digits MLP 64->20->10"), ("eval_mlp784", "MLP 784->256->10, random data")):
        r = d[name]
        for k in ("adam", *EVAL_NETS):
            so = f"{r[k]['step_over_adam']:.2f}" if k != "adam" else "1"
            uo = f"{r[k]['update_over_adam']:.2f}" if k != "adam" else "1"
            lines.append(f"| {label} | {r['coordinates']} | {k} | {r[k]['step_ms']:.3f} | {so} | "
                         f"{r[k]['update_ms']:.3f} | {uo} |")
    m = d["memory"]
    lines += ["", "## Peak live tensor memory (CoordLSTM on digits)", "",
              "| measured call | length | peak |", "|---|---|---|"]
    for k, v in m["meta_step_vs_truncation"].items():
        lines.append(f"| one meta-step | truncation {k} | {_fmt_bytes(v)} |")
    for h, v in m["eval_vs_horizon"].items():
        lines.append(f"| evaluation unroll | horizon {h} | {_fmt_bytes(v)} |")
    for h, v in m["meta_iteration_vs_horizon"].items():
        lines.append(f"| meta-training iteration, truncation {summary['env']['mem_meta_truncation']} | "
                     f"horizon {h} | {_fmt_bytes(v)} |")
    lines += ["", f"Evaluation peak, largest over smallest horizon: {summary['eval_memory_growth']:.3f}x; "
              f"meta-step peak per truncation step: {_fmt_bytes(summary['meta_step_bytes_per_truncation_step'])}.",
              "", "## Inner steps per second during meta-training", "", "| task | meta-network | inner steps/s |",
              "|---|---|---|"]
    for k, r in d["meta_step"].items():
        lines.append(f"| digits MLP (batch 128) | {k} | {r['inner_steps_per_s']:.0f} |")
    for k, r in d["quadratic"].items():
        lines.append(f"| quadratics 10-d x {summary['env']['quad_problems']} | {k} | {r['inner_steps_per_s']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    """Run every benchmark, print the ratios and write ``summary.json`` and ``table.md``."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny repetition counts (a smoke run, not numbers)")
    p.add_argument("--out", default=os.path.join(ROOT, "results", "benchmarks"))
    cfg = p.parse_args(argv)
    q = cfg.quick
    cfg.repeats = 2 if q else 25
    cfg.truncation = 10
    cfg.eval_steps = 3 if q else 50
    cfg.big_steps, cfg.big_repeats = (1, 1) if q else (3, 7)
    cfg.mem_truncations = (2, 4) if q else (5, 10, 20, 40)
    cfg.mem_horizons = (2, 4) if q else (25, 50, 100, 200)
    cfg.mem_meta_horizons = (2, 4) if q else (20, 40, 80)
    cfg.mem_meta_truncation = 2 if q else 10
    cfg.quad_problems = 64
    torch.set_num_threads(1)
    torch.manual_seed(0)

    details = {}
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    t0 = time.perf_counter()
    details["meta_step"] = bench_meta_step(cfg)
    details["quadratic"] = bench_quadratic_throughput(cfg)
    details["eval_digits"] = bench_eval_step(cfg, "digits")
    details["eval_mlp784"] = bench_eval_step(cfg, "mlp784")
    details["memory"] = bench_memory(cfg)
    mem = details["memory"]
    ev = list(mem["eval_vs_horizon"].values())
    tr = mem["meta_step_vs_truncation"]
    ks = sorted(tr)
    summary = {
        "higher_over_func_meta_step": max(r["ratio"] for r in details["meta_step"].values()),
        "lopt_over_adam_eval_step_digits": max(details["eval_digits"][k]["step_over_adam"] for k in EVAL_NETS),
        "higher_over_func_meta_step_by_net": {k: r["ratio"] for k, r in details["meta_step"].items()},
        "lopt_over_adam_eval_step_digits_by_net": {k: details["eval_digits"][k]["step_over_adam"]
                                                   for k in EVAL_NETS},
        "lopt_over_adam_update_digits_by_net": {k: details["eval_digits"][k]["update_over_adam"]
                                                for k in EVAL_NETS},
        "lopt_over_adam_eval_step_mlp784_by_net": {k: details["eval_mlp784"][k]["step_over_adam"]
                                                   for k in EVAL_NETS},
        # issue 14's targets: full inner step on the 784-256-10 MLP (203,530 coordinates) over Adam's
        "general_step_over_adam_mlp200k": details["eval_mlp784"]["general"]["step_over_adam"],
        "lstm_step_over_adam_mlp200k": details["eval_mlp784"]["lstm"]["step_over_adam"],
        "mlp_step_over_adam_mlp200k": details["eval_mlp784"]["mlp"]["step_over_adam"],
        "general_state_floats_per_param": NormMLP().state_floats_per_param(),
        "eval_memory_growth": max(ev) / max(min(ev), 1),
        "meta_step_bytes_per_truncation_step": (tr[ks[-1]] - tr[ks[0]]) / (ks[-1] - ks[0]),
        "meta_inner_steps_per_s": {f"digits_{k}": r["inner_steps_per_s"] for k, r in details["meta_step"].items()},
        "targets": TARGETS,
        "quick": q,
        "seconds": time.perf_counter() - t0,
        "env": {"torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
                "cpus": os.cpu_count(), "threads": torch.get_num_threads(), "repeats": cfg.repeats,
                "truncation": cfg.truncation, "quad_problems": cfg.quad_problems,
                "mem_meta_truncation": cfg.mem_meta_truncation,
                # other work on a shared machine slows the small-op side of a ratio more than the other
                "load_average_before_after": [load_before[0] if load_before else None,
                                              os.getloadavg()[0] if load_before else None]},
        # taken after the timings, so its git subprocesses do not share the CPU with them
        "provenance": provenance(),
        "details": details,
    }
    summary["meta_inner_steps_per_s"].update({f"quadratic_{k}": r["inner_steps_per_s"]
                                              for k, r in details["quadratic"].items()})
    os.makedirs(cfg.out, exist_ok=True)
    with open(os.path.join(cfg.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2, default=lambda v: None if isinstance(v, float) and math.isnan(v) else v)
    report = table(summary)
    with open(os.path.join(cfg.out, "table.md"), "w") as f:
        f.write(report)
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
