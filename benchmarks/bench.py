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
5. Cost against size (issue 14): MLPs of about 10k, 200k and 1M parameters and a small CNN, batch 128, random data;
   Adam, CoordLSTM, CoordMLP and the general optimizer: full step and optimizer update (ms) and their ratios to
   Adam's, floats of optimizer state per parameter, peak tensor memory of one update, the roofline estimate (flops
   and minimum bytes per coordinate) and what the update achieves against it; with one thread and with all.
6. The fast paths against the reference paths: largest absolute difference of the updates (float32, 200k MLP and
   the CNN's 4-d kernels), and the update time of each path.
7. Meta-training throughput, reference against fast path: inner steps per second of PES meta-training (its
   particles run without a graph, so they can take the fast paths; CoordLSTM and CoordMLP only from 8,192
   coordinates by default, forced here) on the digits MLP and the suite's widest digits MLP, with the same
   meta-gradients (``tests/test_fast_paths.py``); TBPTT (graph, reference path) beside it.

``--device cuda`` runs sections 5 and 6 on the GPU (CUDA-synchronised timings, ``torch.cuda`` peak memory) and
writes ``{out}/cuda/{summary.json, table.md}``.
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
           "mlp_step_over_adam_mlp200k": 3.0, "general_state_floats_per_param": 8,
           "fast_path_max_abs_diff": 1e-6}
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
        task, steps, repeats = random_task("mlp", (784, 256, 10), g), cfg.big_steps, cfg.big_repeats
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


# ------------------------------------------------------------------------------------- cost against size
SIZES = {"mlp10k": ("mlp", (64, 128, 10)), "mlp200k": ("mlp", (784, 256, 10)),
         "mlp1m": ("mlp", (784, 1024, 256, 10)), "cnn": ("cnn", (16, 32)),
         "deep": ("deep", (50, 64))}  # 50 x (Linear 64-64, LayerNorm, ReLU), Linear 64-10: 202 tensors
SCALE_OPTS = ("adam", "lstm", "mlp", "general")


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def deep_mlp(depth: int, width: int) -> torch.nn.Module:
    """``depth`` blocks of Linear(width, width), LayerNorm, ReLU, then Linear(width, 10): a learner of many small
    tensors (per-tensor costs show)."""
    from torch import nn
    layers: List[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.LayerNorm(width), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(width, 10))


def random_task(kind: str, spec, gen: torch.Generator, device: str = "cpu", n: int = 1024, batch: int = 128):
    """A learner on random data (no download): an MLP of widths ``spec``, :func:`deep_mlp` (``spec``: depth and
    width), or :class:`ConvNet` (channels ``spec``) on 28x28 single-channel images."""
    from learned_opt.tasks.models import ConvNet
    side = 28
    d_in = {"mlp": spec[0], "deep": spec[-1]}.get(kind, side * side)
    x = torch.randn(n, d_in, generator=gen).to(device)
    y = torch.randint(0, 10, (n,), generator=gen).to(device)
    with torch.random.fork_rng(devices=[]):
        module = {"mlp": lambda: MLP(list(spec), "relu"), "deep": lambda: deep_mlp(*spec),
                  "cnn": lambda: ConvNet(channels=spec, side=side)}[kind]()
    data = {s: (x, y) for s in ("train", "val", "test")}
    return SupervisedTask(module.to(device), data, "cross_entropy", batch)


def make_opts(device: str = "cpu") -> Dict[str, object]:
    torch.manual_seed(0)
    return {"adam": Adam(lr=1e-3), "lstm": CoordLSTM().to(device), "mlp": CoordMLP().to(device),
            "general": GENERAL().to(device)}


def roofline(name: str, opt) -> Dict[str, float]:
    """Flops and minimum bytes moved per coordinate by one update, counted from the network's shape: matrix
    products ``2 * in * out``, a few flops per elementwise op, transcendental functions counted as one flop (they
    cost 10-20); bytes = optimizer state read and written once, gradient and parameter read, update written
    (float32)."""
    if name == "adam":
        return {"flops": 12.0, "bytes": 4.0 * (2 * 2 + 2 + 1), "transcendentals": 1.0}
    if isinstance(opt, CoordLSTM):
        h, L = opt.hidden, opt.layers
        ins = [opt.cells[0].input_size] + [h] * (L - 1)
        mm = sum(2 * 4 * h * (i + h) for i in ins) + 2 * h * opt.out.out_features
        state = 2 * L * h + len(opt.momentum_decays) + (2 if opt.base == "adam" else opt.base == "momentum")
        return {"flops": float(mm + L * 6 * h + 30), "bytes": 4.0 * (2 * state + 3),
                "transcendentals": float(L * 5 * h + 4)}
    if isinstance(opt, CoordMLP):
        lins = [m for m in opt.body if isinstance(m, torch.nn.Linear)]
        k = len(opt.momentum_decays)
        f = 3 + 2 * k
        mm = 2 * f * lins[0].out_features + sum(2 * m.in_features * m.out_features for m in lins[1:])
        mm += 2 * lins[-1].out_features * 2
        state = k + 1
        return {"flops": float(mm + sum(m.out_features for m in lins) + 6 * f + 10), "bytes": 4.0 * (2 * state + 3),
                "transcendentals": 2.0}
    if isinstance(opt, NormMLP):
        lins = [opt.first] + [m for m in opt.rest if isinstance(m, torch.nn.Linear)]
        f = opt.coord_dim
        mm = sum(2 * m.in_features * m.out_features for m in lins) + 2 * lins[-1].out_features
        state = opt.state_floats_per_param()
        return {"flops": float(mm + sum(m.out_features for m in lins) + 6 * f + 10), "bytes": 4.0 * (2 * state + 3),
                "transcendentals": 1.0}
    raise ValueError(f"no roofline model for {name}")


def state_floats(state, n: int) -> float:
    """Floats of optimizer state per parameter (every floating tensor of the state, storages counted once; the
    per-tensor pooled summaries add a few hundredths)."""
    seen, total = set(), 0
    for t in tree_flatten(state)[0]:  # floating tensors only: the layout's int64 segment index is not state
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
            if key not in seen:
                seen.add(key)
                total += t.untyped_storage().nbytes() // t.element_size()
    return total / n


def update_peak_bytes(opt, grads, state, params, device: str) -> int:
    """Peak tensor memory of one update (its temporaries and the new state; the old state and the gradients are
    already alive and not counted)."""
    def f():
        with torch.no_grad():
            return opt.update(grads, state, params, loss=torch.tensor(1.0, device=device))
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = f()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        del out
        return int(peak)
    return peak_bytes(f)


def bench_scale(cfg, threads: int, device: str = "cpu") -> Dict[str, dict]:
    """Full step and update of every optimizer on every learner size, with ``threads`` intra-op threads."""
    torch.set_num_threads(threads)
    out = {}
    try:
        for size, (kind, spec) in SIZES.items():
            if size in cfg.skip_sizes:
                continue
            g = generator(0)
            task = random_task(kind, spec, g, device)
            opts = make_opts(device)
            params = task.init(generator(1))
            n = sum(p.numel() for p in params)
            big = n > 500_000
            steps, repeats = (cfg.scale_steps_big, cfg.scale_repeats_big) if big else (cfg.scale_steps,
                                                                                      cfg.scale_repeats)

            def full(k, opt):
                ctrl = opt.as_controller if k == "general" else None

                def f():
                    unroll(task, opt, ctrl() if ctrl else None, steps=steps, generator=generator(2), params=params,
                           final_eval=False)
                    sync(device)
                return f

            t_full = side_by_side({k: full(k, o) for k, o in opts.items()}, repeats, warmup=1)
            grads = [torch.randn(p.shape, generator=g).to(device) * 1e-2 for p in params]
            states = {}
            with torch.no_grad():
                for k, o in opts.items():
                    st = o.init(params)
                    for _ in range(3):
                        _, st = o.update(grads, st, params, loss=torch.tensor(1.0, device=device))
                    states[k] = st

            def upd(k, o):
                def f():
                    with torch.no_grad():
                        for _ in range(steps):
                            o.update(grads, states[k], params, loss=torch.tensor(1.0, device=device))
                    sync(device)
                return f

            # torch.optim.Adam's step beside them (its default implementation, in place): the baseline's cost
            # against the library's, update only (it has no place in unroll's functional loop)
            leaves = [p.detach().clone().requires_grad_() for p in params]
            for leaf, gr in zip(leaves, grads):
                leaf.grad = gr
            torch_adam = torch.optim.Adam(leaves, lr=1e-3)

            def torch_upd():
                for _ in range(steps):
                    torch_adam.step()
                sync(device)

            t_upd = side_by_side({**{k: upd(k, o) for k, o in opts.items()}, "torch_adam": torch_upd}, repeats,
                                 warmup=1)
            res = {"coordinates": n, "steps_per_timing": steps, "repeats": repeats,
                   "torch_adam_update_ms": 1e3 * t_upd["torch_adam"] / steps}
            for k, o in opts.items():
                roof = roofline(k, o)
                upd_s = t_upd[k] / steps
                res[k] = {"step_ms": 1e3 * t_full[k] / steps, "update_ms": 1e3 * upd_s,
                          "step_over_adam": t_full[k] / t_full["adam"], "update_over_adam": t_upd[k] / t_upd["adam"],
                          "state_floats_per_param": state_floats(states[k], n),
                          "update_peak_bytes": update_peak_bytes(o, grads, states[k], params, device)
                          if threads == 1 or device != "cpu" else None,
                          "flops_per_coord": roof["flops"], "bytes_per_coord": roof["bytes"],
                          "transcendentals_per_coord": roof["transcendentals"],
                          "achieved_gflops": roof["flops"] * n / upd_s / 1e9,
                          "achieved_gbytes_per_s": roof["bytes"] * n / upd_s / 1e9}
            out[size] = res
    finally:
        torch.set_num_threads(1)
    return out


def fast_path_check(cfg, device: str = "cpu") -> dict:
    """Largest absolute difference between the fast and the reference updates (float32, 3 steps from a fresh
    state; the 200k MLP and the CNN with its 4-d kernels), and each path's update time."""
    out = {}
    for size in ("mlp200k", "cnn"):
        kind, spec = SIZES[size]
        g = generator(0)
        task = random_task(kind, spec, g, device)
        params = task.init(generator(1))
        stream = [[torch.randn(p.shape, generator=g).to(device) * 10.0 ** (i % 3 - 2) for i, p in enumerate(params)]
                  for _ in range(3)]
        for k, net in make_opts(device).items():
            if k == "adam":
                continue
            # fresh CoordLSTM / CoordMLP output layers are zero (zero updates): perturb every meta-weight so that
            # every path of the computation shows in the updates
            gen = torch.Generator().manual_seed(3)
            with torch.no_grad():
                for w in net.parameters():
                    w.add_(0.3 * torch.randn(w.shape, generator=gen).to(device))
            ups, secs = {}, {}
            for fast in (True, False):
                net.fast_path = fast
                with torch.no_grad():
                    st = net.init(params)
                    sync(device)
                    t = time.perf_counter()
                    for grads in stream:
                        u, st = net.update(grads, st, params, loss=torch.tensor(1.0, device=device))
                    sync(device)
                secs[fast] = (time.perf_counter() - t) / len(stream)
                ups[fast] = u
            net.fast_path = True
            diff = max(float((a - b).abs().max()) for a, b in zip(ups[True], ups[False]))
            out[f"{size}/{k}"] = {"max_abs_diff": diff, "max_abs_update": max(float(u.abs().max()) for u in ups[False]),
                                  "fast_ms": 1e3 * secs[True], "reference_ms": 1e3 * secs[False],
                                  "reference_over_fast": secs[False] / secs[True]}
    return out


def bench_meta_throughput(cfg) -> dict:
    """Inner steps per second of meta-training: PES (no graph: the fast paths) with the reference and with the fast
    path, TBPTT (a graph: always the reference) beside it."""
    from learned_opt.tasks.suite import suite_family
    families = {"digits_mlp_sigmoid (1,510 coordinates)": DigitsFamily(pool="meta"),
                "digits_mlp_tanh_wide (4,810 coordinates)": suite_family("digits_mlp_tanh_wide")}
    out = {}
    for fam_name, family in families.items():
        for kind, make in (("lstm", CoordLSTM), ("mlp", CoordMLP), ("general", NormMLP)):
            row = {}
            for label, est, fast in (("pes_reference", "pes", False), ("pes_fast", "pes", True),
                                     ("tbptt", "tbptt", True)):
                torch.manual_seed(0)
                net = make()
                net.fast_path = fast
                if fast and est == "pes":  # these learners are below the default threshold: force the fast path
                    net.fast_min_coordinates = 0
                mcfg = MetaConfig(horizon=4 * cfg.truncation, truncation=cfg.truncation, iterations=1,
                                  estimator=est, particles=cfg.meta_particles, sigma=0.01, meta_loss="mean_log",
                                  second_order=est == "tbptt", checkpoint_every=0, checkpoint_seconds=0)
                trainer = MetaTrainer(net, family, mcfg, progress=False)
                run = trainer._new_run(mcfg.horizon)
                t = side_by_side({label: lambda: quiet(trainer.meta_step_on, [run], cfg.truncation)},
                                 cfg.meta_repeats, warmup=1)[label]
                unrolls = cfg.meta_particles + 1 if est == "pes" else 1
                row[label] = {"meta_step_s": t, "inner_steps_per_s": unrolls * cfg.truncation / t}
            row["pes_fast_over_reference"] = (row["pes_fast"]["inner_steps_per_s"]
                                              / row["pes_reference"]["inner_steps_per_s"])
            out[f"{fam_name}/{kind}"] = row
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
        shown = f"{v:.2f}" if v >= 0.01 else f"{v:.2g}"
        lines.append(f"| `{key}` | {shown} | <= {target} {'(met)' if v <= target else '(MISSED)'} |")
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
    lines += scale_tables(d)
    lines += ["", "## Meta-training throughput: PES through the reference and the fast path, TBPTT beside it", "",
              f"Inner steps per second (PES counts every particle's steps; {d['meta_throughput_particles']} particles, "
              f"truncation {summary['env']['truncation']}); the meta-gradients of the two PES rows agree "
              "(`tests/test_fast_paths.py`).", "",
              "| task | meta-network | PES, reference | PES, fast path (forced) | fast / reference | TBPTT (graph) |",
              "|---|---|---|---|---|---|"]
    for key, r in d["meta_throughput"].items():
        fam, kind = key.rsplit("/", 1)
        lines.append(f"| {fam} | {kind} | {r['pes_reference']['inner_steps_per_s']:.0f} | "
                     f"{r['pes_fast']['inner_steps_per_s']:.0f} | {r['pes_fast_over_reference']:.2f} | "
                     f"{r['tbptt']['inner_steps_per_s']:.0f} |")
    return "\n".join(lines) + "\n"


def scale_tables(d: dict) -> List[str]:
    """Cost against size (one thread and all threads) and the fast-path check, as markdown lines."""
    lines = []
    for key, label in (("scale_1_thread", "one thread"), ("scale_all_threads", "all threads")):
        if key not in d:
            continue
        lines += ["", f"## Cost against size ({label}): full inner step and update, batch 128", "",
                  "Roofline columns: flops and minimum bytes per coordinate of one update (matrix products 2 in out, "
                  "transcendentals counted as 1 flop), and what the measured update achieves. Adam is the "
                  "project's hand-coded Adam (functional: new state tensors every step); torch.optim.Adam's own "
                  "step (in place, its default implementation) is timed beside it, update only.", "",
                  "| learner | coordinates | optimizer | step (ms) | step / Adam | update (ms) | update / Adam | "
                  "state floats / param | update peak | flops / coord | bytes / coord | GFLOP/s | GB/s |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for size, r in d[key].items():
            for k in SCALE_OPTS:
                x = r[k]
                peak = "n/a" if x["update_peak_bytes"] is None else _fmt_bytes(x["update_peak_bytes"])
                lines.append(f"| {size} | {r['coordinates']:,} | {k} | {x['step_ms']:.2f} | "
                             f"{x['step_over_adam']:.2f} | {x['update_ms']:.2f} | {x['update_over_adam']:.1f} | "
                             f"{x['state_floats_per_param']:.2f} | "
                             f"{peak} | {x['flops_per_coord']:.0f} | {x['bytes_per_coord']:.0f} | "
                             f"{x['achieved_gflops']:.2f} | {x['achieved_gbytes_per_s']:.2f} |")
            if "torch_adam_update_ms" in r:
                t = r["torch_adam_update_ms"]
                lines.append(f"| {size} | {r['coordinates']:,} | torch.optim.Adam | n/a | n/a | {t:.2f} | "
                             f"{t / r['adam']['update_ms']:.1f} | 2.00 | n/a | 12 | 28 | n/a | n/a |")
    if "fast_path" in d:
        lines += ["", "## Fast path against the reference path (float32, 3 updates from a fresh state)", "",
                  "| learner / optimizer | max abs difference | max abs update | reference (ms) | fast (ms) | "
                  "reference / fast |", "|---|---|---|---|---|---|"]
        for k, r in d["fast_path"].items():
            lines.append(f"| {k} | {r['max_abs_diff']:.2g} | {r['max_abs_update']:.2g} | {r['reference_ms']:.2f} | "
                         f"{r['fast_ms']:.2f} | {r['reference_over_fast']:.2f} |")
    return lines


def main_device(cfg) -> int:
    """Sections 5 and 6 on ``cfg.device`` (a GPU): ``{out}/cuda/{summary.json, table.md}``."""
    t0 = time.perf_counter()
    details = {"scale_1_thread": bench_scale(cfg, 1, cfg.device), "fast_path": fast_path_check(cfg, cfg.device)}
    r = details["scale_1_thread"]
    summary = {"device": cfg.device, "gpu": torch.cuda.get_device_name(cfg.device), "quick": cfg.quick,
               "fast_path_max_abs_diff": max(x["max_abs_diff"] for x in details["fast_path"].values()),
               "step_over_adam_by_size": {size: {k: x[k]["step_over_adam"] for k in SCALE_OPTS if k != "adam"}
                                          for size, x in r.items()},
               "seconds": time.perf_counter() - t0, "provenance": provenance(), "details": details}
    out = os.path.join(cfg.out, "cuda")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    report = "\n".join([f"# Benchmarks on {summary['gpu']} ({cfg.device})", *scale_tables(details)]) + "\n"
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write(report)
    print(report)
    return 0


def main(argv=None) -> int:
    """Run every benchmark, print the ratios and write ``summary.json`` and ``table.md``."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny repetition counts (a smoke run, not numbers)")
    p.add_argument("--out", default=os.path.join(ROOT, "results", "benchmarks"))
    p.add_argument("--device", default="cpu", help="cpu, or cuda: sections 5 and 6 on the GPU (written to OUT/cuda)")
    p.add_argument("--skip-sizes", default="", help="comma-separated learner sizes to leave out of section 5 "
                                                     f"({', '.join(SIZES)})")
    cfg = p.parse_args(argv)
    cfg.skip_sizes = tuple(x for x in cfg.skip_sizes.split(",") if x)
    bad = [x for x in cfg.skip_sizes if x not in SIZES]
    if bad:
        p.error(f"--skip-sizes: unknown size {bad[0]!r}; known: {', '.join(SIZES)}")
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device {cfg.device}: CUDA is not available on this machine")
    if not (cfg.device == "cpu" or cfg.device.startswith("cuda")):
        p.error(f"--device must be cpu or cuda[:N], got {cfg.device!r}")
    q = cfg.quick
    cfg.scale_steps, cfg.scale_repeats = (1, 1) if q else (5, 7)
    cfg.scale_steps_big, cfg.scale_repeats_big = (1, 1) if q else (2, 5)
    cfg.meta_particles, cfg.meta_repeats = (2, 1) if q else (4, 5)
    if q:
        cfg.skip_sizes = tuple(set(cfg.skip_sizes) | {"mlp1m"})
    if cfg.device != "cpu":
        return main_device(cfg)
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
    details["scale_1_thread"] = bench_scale(cfg, 1)
    details["scale_all_threads"] = bench_scale(cfg, os.cpu_count() or 1)
    details["fast_path"] = fast_path_check(cfg)
    details["meta_throughput"] = bench_meta_throughput(cfg)
    mem = details["memory"]
    ev = list(mem["eval_vs_horizon"].values())
    tr = mem["meta_step_vs_truncation"]
    ks = sorted(tr)
    details["meta_throughput_particles"] = cfg.meta_particles
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
        "fast_path_max_abs_diff": max(r["max_abs_diff"] for r in details["fast_path"].values()),
        # the same ratios from the cost-against-size section (its own interleaved run, 5 steps per timing)
        "step_over_adam_by_size": {size: {k: r[k]["step_over_adam"] for k in SCALE_OPTS if k != "adam"}
                                   for size, r in details["scale_1_thread"].items()},
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
    summary["pes_meta_inner_steps_per_s_fast_over_reference"] = {
        k: r["pes_fast_over_reference"] for k, r in details["meta_throughput"].items()}
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
