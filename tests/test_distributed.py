"""Distributed meta-training (``learned_opt.distributed``): two gloo ranks on 127.0.0.1 give the same meta-updates
as one process holding both ranks' tasks, a NaN on one rank neither deadlocks nor poisons the others, and
``torchrun --standalone --nproc-per-node=2`` runs the CLI end to end. Every multi-process run has a timeout."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import warnings
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from learned_opt.distributed import DistContext, rank_seed
from learned_opt.meta import MetaConfig, MetaTrainer
from learned_opt.optim.learned import CoordLSTM
from learned_opt.tasks import QuadraticFamily
from learned_opt.tasks.base import generator
from tests.helpers import SquareFamily

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 90  # a deadlock fails the test instead of hanging the suite
ENV = {"MASTER_ADDR": "127.0.0.1", "OMP_NUM_THREADS": "1"}
if os.path.exists("/sys/class/net/lo"):  # keep gloo on the loopback interface
    ENV["GLOO_SOCKET_IFNAME"] = "lo"


class SnapshotTrainer(MetaTrainer):
    """Keeps the meta-weights after every meta-step."""

    def meta_step_on(self, runs, length):
        record = super().meta_step_on(runs, length)
        self.snapshots = getattr(self, "snapshots", []) + [[p.detach().clone() for p in self.net.parameters()]]
        return record


class BothRanks(SnapshotTrainer):
    """One process holding every rank's tasks: rank r's ``tasks_per_step`` tasks (and its schedule draws) come
    from rank r's generator, exactly as on rank r; the schedule is rank 0's."""

    def __init__(self, net, family, cfg, world):
        super().__init__(net, family, MetaConfig(**{**cfg.__dict__, "tasks_per_step": cfg.tasks_per_step * world}))
        self.per_rank = cfg.tasks_per_step
        self.gens = [generator(rank_seed(cfg.seed, r)) for r in range(world)]
        self.calls = 0

    def _new_run(self, horizon):
        self.gen = self.gens[(self.calls // self.per_rank) % len(self.gens)]
        self.calls += 1
        return super()._new_run(horizon)

    def _truncation_lengths(self, horizon):
        lengths = []
        for g in reversed(self.gens):  # every rank draws; rank 0's draw (the last here) is the one used
            self.gen = g
            lengths = super()._truncation_lengths(horizon)
        return lengths


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _population_config(estimator):
    return MetaConfig(horizon=6, truncation=3, iterations=2, tasks_per_step=2, meta_lr=0.01, estimator=estimator,
                      particles=8, sigma=0.01, seed=5)


def _worker(rank, world, port, scenario, out_dir):
    os.environ.update(ENV)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    try:
        ctx = DistContext(rank, world)
        torch.manual_seed(rank)  # different initial weights on purpose: the trainer broadcasts rank 0's
        if scenario == "equal":
            net = CoordLSTM(hidden=6, init_zero=False)
            family = QuadraticFamily(dim=3, num_problems=4)
            cfg = MetaConfig(horizon=6, truncation=3, iterations=3, tasks_per_step=2, meta_lr=0.01,
                             random_offset=True, seed=5)
        elif scenario in ("es", "pes"):  # the population split across the ranks
            net = CoordLSTM(hidden=6, init_zero=False)
            family = QuadraticFamily(dim=3, num_problems=4)
            cfg = _population_config(scenario)
        else:  # "nan": iteration 0 is NaN on rank 1 only, iteration 1 on both ranks, iteration 2 on none
            net = CoordLSTM(hidden=6)
            family = SquareFamily(n=8, nan_calls={0, 1} if rank == 1 else {1})
            cfg = MetaConfig(horizon=4, truncation=2, iterations=3, meta_lr=0.01, seed=0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer = SnapshotTrainer(net, family, cfg, dist=ctx).run()
        torch.save({"history": trainer.history, "snapshots": trainer.snapshots, "skipped": trainer.skipped},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _spawn(scenario, out_dir, world=2):
    ctx = mp.start_processes(_worker, args=(world, _free_port(), scenario, str(out_dir)), nprocs=world,
                             join=False, start_method="spawn")
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail(f"distributed scenario {scenario!r} did not finish in {TIMEOUT_S} s (deadlock?)")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(world)]


def _max_diff(a, b):
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


def test_two_ranks_equal_one_process_holding_both_ranks_tasks(tmp_path):
    ranks = _spawn("equal", tmp_path)
    torch.manual_seed(0)  # rank 0's initial weights
    net = CoordLSTM(hidden=6, init_zero=False)
    family = QuadraticFamily(dim=3, num_problems=4)
    cfg = MetaConfig(horizon=6, truncation=3, iterations=3, tasks_per_step=2, meta_lr=0.01, random_offset=True,
                     seed=5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = BothRanks(net, family, cfg, world=2).run()
    r0, r1 = ranks
    assert len(r0["snapshots"]) == len(r1["snapshots"]) == len(ref.snapshots) == ref.meta_step
    assert len({len(h) for h in (r0["history"], r1["history"], ref.history)}) == 1
    for step, (a, b, c) in enumerate(zip(r0["snapshots"], r1["snapshots"], ref.snapshots)):
        assert _max_diff(a, b) == 0.0, step  # every rank applies the very same update
        assert _max_diff(a, c) < 1e-6, (step, _max_diff(a, c))  # and it is the one-process update
    for h0, h1, hr in zip(r0["history"], r1["history"], ref.history):
        assert h0["finite_ranks"] == h1["finite_ranks"] == 2
        assert h0["meta_loss"] == h1["meta_loss"] == pytest.approx(hr["meta_loss"], rel=1e-6)
        assert h0["meta_grad_norm"] == pytest.approx(hr["meta_grad_norm"], rel=1e-5)
    assert not all(torch.equal(x, y) for x, y in zip(ref.snapshots[0], ref.snapshots[-1]))
    # the ranks drew different tasks (per-rank generators): their own inner losses differ, and the logged
    # diagnostics are the means over the ranks, as the one-process run holding both ranks' tasks computes them
    assert [h["inner_loss_rank"] for h in r0["history"]] != [h["inner_loss_rank"] for h in r1["history"]]
    for h0, h1, hr in zip(r0["history"], r1["history"], ref.history):
        assert h0["inner_loss"] == pytest.approx((h0["inner_loss_rank"] + h1["inner_loss_rank"]) / 2, rel=1e-12)
        for key in ("inner_loss", "lr_scale_mean", "stop_prob_mean"):
            assert h0[key] == h1[key] == pytest.approx(hr[key], rel=1e-5), key


def test_nan_on_one_rank_neither_deadlocks_nor_poisons_the_update(tmp_path):
    r0, r1 = _spawn("nan", tmp_path)
    for r in (r0, r1):
        assert [h["finite_ranks"] for h in r["history"]] == [1, 1, 0, 0, 2, 2]
        assert [h["skipped"] for h in r["history"]] == [0, 0, 1, 1, 0, 0]
        assert r["skipped"] == 2
        assert all(torch.isfinite(w).all() for snap in r["snapshots"] for w in snap)
    for a, b in zip(r0["snapshots"], r1["snapshots"]):
        assert _max_diff(a, b) == 0.0
    snaps = r0["snapshots"]
    assert all(torch.equal(x, y) for x, y in zip(snaps[1], snaps[3]))  # no finite rank: nothing applied
    assert not all(torch.equal(x, y) for x, y in zip(snaps[3], snaps[5]))  # then training goes on
    # iteration 0 used rank 0's meta-gradient alone: the same as a single process on rank 0's task
    torch.manual_seed(0)
    net = CoordLSTM(hidden=6)
    single = MetaTrainer(net, SquareFamily(n=8), MetaConfig(horizon=4, truncation=2, iterations=1, meta_lr=0.01,
                                                         seed=0)).run()
    assert single.meta_step == 2
    assert _max_diff(snaps[1], [p.detach() for p in net.parameters()]) < 1e-6


def test_torchrun_two_processes_cli_end_to_end(tmp_path):
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    if not os.path.exists(torchrun):
        pytest.skip("torchrun is not installed next to this Python")
    run_dir = tmp_path / "run"
    cmd = [torchrun, "--standalone", "--nproc-per-node=2", "-m", "learned_opt.cli", "meta-train",
           "--run-dir", str(run_dir), "--iterations", "2", "--horizon", "4", "--truncation", "2",
           "--task-arg", "num_problems=4", "--net-arg", "hidden=6", "--checkpoint-every", "1"]
    env = {**os.environ, **ENV, "WANDB_MODE": "disabled"}
    env.pop("WORLD_SIZE", None)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("meta-trained lstm on quadratic: 4 meta-steps") == 1  # rank 0 alone reports
    for name in ("config.json", "metrics.jsonl", "checkpoint.pt", "lopt.pt"):
        assert (run_dir / name).exists(), name
    assert json.loads((run_dir / "config.json").read_text())["world_size"] == 2
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in lines if "meta_loss" in r]
    assert [r["meta_step"] for r in steps] == [0, 1, 2, 3]  # one writer: nothing logged twice
    assert all(r["finite_ranks"] == 2 for r in steps)
    ck = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert ck["world_size"] == 2 and len(ck["generators"]) == 2
    assert not torch.equal(ck["generators"][0], ck["generators"][1])


def test_rank_timeout_defaults_to_5_minutes_and_follows_the_flag_and_the_variable(monkeypatch):
    from learned_opt import distributed

    seen = []
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, timeout: seen.append(timeout))
    monkeypatch.setattr(dist, "get_rank", lambda: 0)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv(distributed.TIMEOUT_ENV, raising=False)
    distributed.init_from_env()
    monkeypatch.setenv(distributed.TIMEOUT_ENV, "42")
    distributed.init_from_env()
    distributed.init_from_env(timeout_s=7)  # --dist-timeout wins over the variable
    assert seen == [timedelta(seconds=300), timedelta(seconds=42), timedelta(seconds=7)]
    monkeypatch.setenv(distributed.TIMEOUT_ENV, "soon")
    with pytest.raises(ValueError, match="LEARNED_OPT_DIST_TIMEOUT='soon' is not a number of seconds"):
        distributed.init_from_env()
    with pytest.raises(ValueError, match="--dist-timeout"):
        distributed.init_from_env(timeout_s=0)


@pytest.mark.parametrize("estimator", ["es", "pes"])
def test_population_split_over_two_ranks_equals_one_process_with_every_particle(tmp_path, estimator):
    # 8 particles: 4 on each of 2 ranks (pairs 0, 2 on rank 0 and 1, 3 on rank 1), against one process with all 8;
    # the population, not the number of ranks, decides the meta-update
    r0, r1 = _spawn(estimator, tmp_path)
    torch.manual_seed(0)  # rank 0's initial weights
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = SnapshotTrainer(CoordLSTM(hidden=6, init_zero=False), QuadraticFamily(dim=3, num_problems=4),
                              _population_config(estimator)).run()
    assert len(r0["snapshots"]) == len(ref.snapshots) == ref.meta_step == 4
    for step, (a, b, c) in enumerate(zip(r0["snapshots"], r1["snapshots"], ref.snapshots)):
        assert _max_diff(a, b) == 0.0, step
        assert _max_diff(a, c) < 1e-6, (step, _max_diff(a, c))
    assert not all(torch.equal(x, y) for x, y in zip(ref.snapshots[0], ref.snapshots[-1]))
    assert r0["history"][0]["particles_dropped"] == 0
