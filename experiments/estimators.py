"""Meta-gradient estimators compared (issue 13): truncated backprop against persistent evolution strategies.

Part 1, **influence balancing** (the PES paper's first experiment, on :class:`InfluenceBalancing`): one scalar
meta-parameter ``theta`` is learned by SGD on per-truncation meta-gradient estimates over a single unroll that is
never reset (the inner state carries on from truncation to truncation, and every PES particle keeps its own). The
long-run optimum is ``theta* = -1/6``. TBPTT sees only the last ``K`` steps of ``theta``'s influence; PES with
``K = 1`` sees all of it. Reported: the distance of the final ``theta`` from the optimum, relative to ``|theta*|``,
and ``theta`` over the meta-iterations (a figure).

Part 2, **throughput of the population split across ranks**: PES meta-training of a CoordLSTM on digits MLP tasks
in one process and in two ``gloo`` ranks (each holding half of the particles; the meta-updates are the same, as
``tests/test_distributed.py`` checks), timed; reported as particles per second, two ranks over one.

Part 3, **horizon generalisation** on digits (TBPTT against PES, 1x to 25x the meta-training horizon), is
``experiments/estimators_horizon.py`` (about an hour on two cores); this script copies its target keys from that
script's own final summary (``--horizon_summary``), never from its own previous summary.

Writes ``{out_dir}/{summary.json, table.md, influence_balancing.png}``.

    python experiments/estimators.py                   # about a minute on one core
    python experiments/estimators.py --preset smoke    # seconds; used by the tests
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import markdown_table, parse_config, provenance, run_main, write_json  # noqa: E402

from learned_opt.estimators import PES, InfluenceBalancing, tbptt_estimate  # noqa: E402


@dataclass
class Config:
    """Estimator experiment settings; every field is a command-line flag."""
    iterations: int = 3000  # meta-iterations (one truncation each), as in the PES paper
    meta_lr: float = 1e-4  # SGD on theta, as in the PES paper
    theta0: float = 0.5
    particles: int = 1000  # PES population (antithetic pairs)
    sigma: float = 0.1
    pes_truncation: int = 1
    tbptt_truncations: tuple = (1, 10, 100)
    seeds: int = 5  # PES seeds (its noise; the protocol's minimum of 5); TBPTT is deterministic
    target_rel_error: float = 0.05
    throughput: bool = True  # part 2 (spawns processes)
    tp_particles: int = 32
    tp_iterations: int = 8
    tp_truncation: int = 10
    target_speedup: float = 1.8
    out_dir: str = "results/estimators"
    # part 3's summary (experiments/estimators_horizon.py --final true): its target keys are copied from there
    horizon_summary: str = "results/estimators/horizon/summary.json"


PRESETS = {"smoke": dict(iterations=30, particles=20, tbptt_truncations=(1, 5), seeds=2, throughput=False,
                         out_dir="runs/estimators_smoke", horizon_summary="runs/estimators_smoke/no_horizon.json")}


def influence_run(cfg: Config, estimator: str, K: int, seed: int = 0):
    """theta over the meta-iterations of one run (SGD on the estimates); non-finite theta ends the run."""
    system = InfluenceBalancing()
    theta = torch.tensor([cfg.theta0], dtype=torch.float64)
    inner = system.init()
    if estimator == "pes":
        pes = PES(cfg.particles, cfg.sigma, torch.Generator().manual_seed(seed))
        state = pes.init(inner, 1)
    path = [cfg.theta0]
    for _ in range(cfg.iterations):
        if estimator == "pes":
            est, state = pes.estimate(theta, system.unroll, state, K, reset_state=system.init())
        else:
            est, inner = tbptt_estimate(theta, system.unroll, inner, K)
        theta = theta - cfg.meta_lr * est.grad
        path.append(float(theta))
        if not np.isfinite(path[-1]):
            break
    return np.array(path)


def _throughput_worker(rank: int, world: int, port: int, cfg: Config, out: str) -> None:
    """Meta-train with PES on ``world`` ranks (``world == 1``: no process group) and write rank 0's timing."""
    import torch.distributed as dist
    from datetime import timedelta

    from learned_opt.distributed import DistContext
    from learned_opt.meta import MetaConfig, MetaTrainer
    from learned_opt.optim.learned import CoordLSTM
    from learned_opt.tasks import DigitsFamily

    torch.set_num_threads(1)
    ctx = None
    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=timedelta(seconds=300))
        ctx = DistContext(rank, world)
    try:
        torch.manual_seed(0)
        net = CoordLSTM()
        mcfg = MetaConfig(horizon=2 * cfg.tp_truncation, truncation=cfg.tp_truncation, iterations=cfg.tp_iterations,
                          meta_lr=1e-3, estimator="pes", particles=cfg.tp_particles, sigma=0.01, seed=0,
                          checkpoint_every=0, checkpoint_seconds=0)
        trainer = MetaTrainer(net, DigitsFamily(pool="meta"), mcfg, dist=ctx)
        t0 = time.perf_counter()
        trainer.run()
        seconds = time.perf_counter() - t0
        if rank == 0:
            torch.save({"seconds": seconds, "meta_steps": trainer.meta_step,
                        "weights": [p.detach().clone() for p in net.parameters()]}, out)
    finally:
        if world > 1:
            dist.destroy_process_group()


def throughput(cfg: Config) -> dict:
    """Particles per second of PES meta-training on 1 and 2 ranks (spawned processes, one thread each)."""
    import socket
    import tempfile

    import torch.multiprocessing as mp
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for world in (1, 2):
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                port = sock.getsockname()[1]
            path = os.path.join(tmp, f"world{world}.pt")
            os.environ.update({"MASTER_ADDR": "127.0.0.1", "OMP_NUM_THREADS": "1"})
            mp.start_processes(_throughput_worker, args=(world, port, cfg, path), nprocs=world, join=True,
                               start_method="spawn")
            r = torch.load(path, weights_only=False)
            out[world] = {"seconds": r["seconds"], "meta_steps": r["meta_steps"],
                          "particles_per_second": cfg.tp_particles * r["meta_steps"] / r["seconds"],
                          "weights": r["weights"]}
    same = max(float((a - b).abs().max()) for a, b in zip(out[1]["weights"], out[2]["weights"]))
    ratio = out[2]["particles_per_second"] / out[1]["particles_per_second"]
    return {"particles": cfg.tp_particles, "truncation": cfg.tp_truncation,
            "ranks": {str(w): {k: v for k, v in o.items() if k != "weights"} for w, o in out.items()},
            "max_weight_difference_2_ranks_vs_1": same, "particles_per_second_2_ranks_over_1": ratio,
            "cpus": os.cpu_count()}


def horizon_part(path: str, summary: dict) -> None:
    """Part 3's target keys, read from the horizon script's own summary at ``path`` when that summary is a final
    run (never from this script's previous summary: a number must come from the run that made it)."""
    import json

    if not os.path.exists(path):
        return
    with open(path) as f:
        horizon = json.load(f)
    if not horizon.get("config", {}).get("final"):  # a development run's numbers are not results
        return
    summary.update({k: horizon[k] for k in horizon["targets"]})
    summary["targets"].update(horizon["targets"])
    summary["horizon_generalisation"] = path
    summary["not_implemented"] = [n for n in summary["not_implemented"] if "horizon" not in n]


def rel_error(theta: float) -> float:
    """|theta - theta*| / |theta*| on the influence-balancing problem (infinite for a non-finite theta)."""
    opt = InfluenceBalancing.optimum
    return abs(theta - opt) / abs(opt) if np.isfinite(theta) else float("inf")


def main(argv=None) -> dict:
    """Run the experiment; write summary.json, table.md and influence_balancing.png."""
    cfg = parse_config(Config, PRESETS, argv)
    torch.set_num_threads(1)
    prov = provenance()
    os.makedirs(cfg.out_dir, exist_ok=True)
    t0 = time.perf_counter()
    runs = {}
    for K in cfg.tbptt_truncations:
        runs[f"tbptt K={K}"] = [influence_run(cfg, "tbptt", K)]
    runs[f"pes K={cfg.pes_truncation}"] = [influence_run(cfg, "pes", cfg.pes_truncation, s) for s in range(cfg.seeds)]
    rows, results = [], {}
    for name, paths in runs.items():
        finals = [p[-1] for p in paths]
        errs = [rel_error(f) for f in finals]
        # diverged: stopped non-finite, or ended with |theta| above 100 (600x the optimum's size)
        diverged = sum(len(p) < cfg.iterations + 1 or not abs(p[-1]) <= 100 for p in paths)
        results[name] = {"final_theta": finals, "rel_error": errs, "diverged": int(diverged)}
        rows.append([name, len(paths), ", ".join(f"{f:.4g}" for f in finals), ", ".join(f"{e:.3g}" for e in errs),
                     diverged])
    pes_key = f"pes K={cfg.pes_truncation}"
    pes_err = float(np.max(results[pes_key]["rel_error"]))  # the worst seed
    tb_key = f"tbptt K={min(cfg.tbptt_truncations)}"
    summary = {
        "config": asdict(cfg), "provenance": prov, "optimum": InfluenceBalancing.optimum, "runs": results,
        "influence_balancing_pes_rel_error": pes_err,
        "influence_balancing_tbptt_rel_error": float(results[tb_key]["rel_error"][0]),
        "targets": {"influence_balancing_pes_rel_error": {
            "bound": cfg.target_rel_error, "value": pes_err, "over": f"worst of {cfg.seeds} seeds",
            "verdict": "met" if pes_err <= cfg.target_rel_error else "not met"}},
        "not_implemented": ["horizon generalisation on digits (pes_over_tbptt_loss_at_10x, "
                            "pes_divergences_at_25x)"],
        "seconds": time.perf_counter() - t0,
    }
    if cfg.throughput:
        tp = throughput(cfg)
        summary["throughput"] = tp
        summary["particles_per_second_2_ranks_over_1"] = tp["particles_per_second_2_ranks_over_1"]
        summary["targets"]["particles_per_second_2_ranks_over_1"] = {
            "bound": cfg.target_speedup, "value": tp["particles_per_second_2_ranks_over_1"],
            "verdict": "met" if tp["particles_per_second_2_ranks_over_1"] >= cfg.target_speedup else "not met"}
    summary["seconds"] = time.perf_counter() - t0
    table = markdown_table(["estimator", "runs", "final theta", "relative error to theta*",
                            "diverged"], rows)
    text = (f"Influence balancing: theta* = {InfluenceBalancing.optimum:.6f}; SGD lr {cfg.meta_lr}, "
            f"{cfg.iterations} meta-iterations from theta = {cfg.theta0}; PES {cfg.particles} particles, "
            f"sigma {cfg.sigma}.\n\n{table}\n\n- target: PES relative error <= {cfg.target_rel_error} (worst seed): "
            f"{pes_err:.3g}, {summary['targets']['influence_balancing_pes_rel_error']['verdict']}\n")
    if cfg.throughput:
        r = summary["throughput"]["ranks"]
        text += (f"\nPES throughput (CoordLSTM on digits MLP tasks, {cfg.tp_particles} particles, truncation "
                 f"{cfg.tp_truncation}, one thread per process): 1 rank {r['1']['particles_per_second']:.1f} "
                 f"particles/s, 2 ranks {r['2']['particles_per_second']:.1f} particles/s: "
                 f"{summary['particles_per_second_2_ranks_over_1']:.2f}x (target >= {cfg.target_speedup}: "
                 f"{summary['targets']['particles_per_second_2_ranks_over_1']['verdict']}); largest difference of "
                 f"the meta-weights, 2 ranks against 1: "
                 f"{summary['throughput']['max_weight_difference_2_ranks_vs_1']:.2g}\n")
    print(text)
    with open(os.path.join(cfg.out_dir, "table.md"), "w") as f:
        f.write(text)
    horizon_part(cfg.horizon_summary, summary)
    write_json(os.path.join(cfg.out_dir, "summary.json"), summary)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, paths in runs.items():
        for i, p in enumerate(paths):
            ax.plot(np.clip(p, -1, 4), label=name if i == 0 else None, alpha=0.8)
    ax.axhline(InfluenceBalancing.optimum, color="k", ls="--", lw=1, label="theta*")
    ax.set_xlabel("meta-iteration")
    ax.set_ylabel("theta (clipped to [-1, 4])")
    ax.set_title("influence balancing")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(cfg.out_dir, "influence_balancing.png"), dpi=100)
    plt.close(fig)
    return summary


if __name__ == "__main__":
    run_main(main)
