"""A learned optimizer under DistributedDataParallel: 2 CPU ranks (gloo), an MLP on scikit-learn's digits.

    python examples/ddp.py                 # about 10 s on 2 CPU cores

Each rank trains on its own shard; DDP averages the gradients. The learned scheduler also reads the loss, which
differs between ranks: ``step_with_loss(opt, loss)`` hands every rank the mean over the ranks, so the replicas
take the same steps and stay bitwise identical (with ``opt.step(loss=loss)`` of each rank's own loss they drift).
"""
import os
import socket
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from sklearn.datasets import load_digits
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import learned_opt
from learned_opt.integrations import step_with_loss


def _worker(rank, world, port, steps, out_dir):
    """One rank: train ``steps`` full-shard steps, save its parameters and losses to ``out_dir/rank{rank}.pt``."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        x, y = load_digits(return_X_y=True)
        x, y = torch.tensor(x[rank::world] / 16.0, dtype=torch.float32), torch.tensor(y[rank::world])
        torch.manual_seed(0)  # the same initial weights on every rank (DDP also broadcasts rank 0's)
        model = DistributedDataParallel(nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)))
        opt = learned_opt.LearnedOptimizer(model.parameters(), total_steps=steps)
        losses = []
        for _ in range(steps):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            step_with_loss(opt, loss)   # the loss averaged over the ranks
            losses.append(loss.item())
        torch.save({"params": [p.detach().clone() for p in model.parameters()], "losses": losses},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_ranks(worker, steps, world):
    """Run ``worker(rank, world, port, steps, out_dir)`` on ``world`` spawned ranks; returns what each saved as
    ``out_dir/rank{rank}.pt`` (examples/fsdp2.py uses it too)."""
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(worker, args=(world, _free_port(), steps, tmp), nprocs=world, join=True)
        return [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(world)]


def run(steps=40, world=2):
    """Train on ``world`` spawned ranks; returns each rank's final parameters and per-step losses."""
    return spawn_ranks(_worker, steps, world)


if __name__ == "__main__":
    ranks = run()
    same = all(torch.equal(a, b) for a, b in zip(ranks[0]["params"], ranks[1]["params"]))
    print(f"DDP, 2 ranks: rank 0 loss {ranks[0]['losses'][0]:.3f} -> {ranks[0]['losses'][-1]:.3f}; "
          f"parameters identical across ranks: {same}")
