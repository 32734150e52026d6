"""Distributed meta-training on ``torch.distributed`` (gloo on CPU, NCCL on GPU), launched with ``torchrun``.

Data-parallel over tasks: every rank unrolls its own tasks (drawn from a task generator derived from the seed
and its rank, :func:`rank_seed`) and computes its local meta-gradient. Every meta-step all ranks all-reduce ONE
packed tensor ``[sum of meta-gradients (flat), number of finite ranks, sum of meta-losses]`` and then decide the
same thing from the same numbers: apply the average over the finite ranks, or skip the update everywhere when no
rank was finite. A rank whose loss or meta-gradient is non-finite still sends its packet (zeros and a finite
count of 0), so no collective ever sits behind a data-dependent condition and a NaN on one rank cannot deadlock
the others. Rank 0 alone writes checkpoints and logs; the checkpoint carries every rank's task generator, so a
resumed run continues exactly.

``torchrun --standalone --nproc-per-node=2 -m learned_opt.cli meta-train ...`` runs two ranks on one CPU machine.
A rank waits at most ``--dist-timeout`` seconds (or ``$LEARNED_OPT_DIST_TIMEOUT``; default 300) for its peers in a
collective, then fails instead of hanging.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import Tensor

from .evaluate import task_seed


# How long a rank waits in a collective before it fails. Ranks meet every meta-step and run the same work in
# between (validation and checkpoints included, which are bounded by seconds to minutes), so 5 minutes of
# silence means a stalled or dead peer; torch's own default of 30 minutes only delays the error.
TIMEOUT_ENV = "LEARNED_OPT_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 300.0


def rank_seed(seed: int, rank: int) -> int:
    """Seed of rank ``rank``'s task generator; rank 0 draws exactly the tasks of a single-process run."""
    return task_seed("train", rank, seed)


def env_world_size() -> int:
    """``WORLD_SIZE`` as set by ``torchrun`` (1 when unset)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


@dataclass
class DistContext:
    """A rank's view of the process group: who it is, how many ranks there are, where collectives run."""
    rank: int
    world_size: int
    device: torch.device = torch.device("cpu")
    group: Optional[object] = None  # None: the default process group

    @property
    def is_main(self) -> bool:
        """Rank 0 writes checkpoints and logs."""
        return self.rank == 0

    # ------------------------------------------------------------------ collectives (every rank calls each)
    def reduce_meta_gradient(self, grads: Optional[Sequence[Tensor]], loss: float, like: Sequence[Tensor],
                             extras: Sequence[float] = ()) -> Tuple[Optional[List[Tensor]], float, int, List[float]]:
        """All-reduce one packed tensor; return ``(mean gradient or None, mean loss, finite ranks, mean extras)``.

        ``grads`` is this rank's meta-gradient, or ``None`` when its loss or gradient is non-finite (it then
        sends zeros and a finite count of 0). The mean is over finite ranks; ``None`` when there are none.
        ``extras`` are per-rank diagnostics (the inner loss, the mean LR scale, ...) travelling in the same
        collective; each is averaged over the ranks where it is finite (NaN where it is finite on none).
        """
        n, k = sum(p.numel() for p in like), len(extras)
        packed = torch.zeros(n + 2 + 2 * k, dtype=torch.float64, device=self.device)
        if grads is not None:
            packed[:n] = torch.cat([g.detach().reshape(-1).to(packed) for g in grads])
            packed[n] = 1.0
            packed[n + 1] = loss
        for i, value in enumerate(extras):
            if math.isfinite(value):
                packed[n + 2 + 2 * i] = value
                packed[n + 3 + 2 * i] = 1.0
        dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=self.group)
        means = []
        for i in range(k):
            count = float(packed[n + 3 + 2 * i])
            means.append(float(packed[n + 2 + 2 * i]) / count if count > 0 else math.nan)
        finite = int(round(float(packed[n])))
        if finite == 0:
            return None, math.nan, 0, means
        mean = packed[:n] / finite
        out, start = [], 0
        for p in like:
            out.append(mean[start:start + p.numel()].reshape(p.shape).to(device=p.device, dtype=p.dtype))
            start += p.numel()
        return out, float(packed[n + 1]) / finite, finite, means

    def broadcast_int(self, value: int) -> int:
        """Rank 0's ``value`` on every rank."""
        t = torch.tensor([int(value)], dtype=torch.int64, device=self.device)
        dist.broadcast(t, src=0, group=self.group)
        return int(t.item())

    def broadcast_parameters(self, params: Sequence[Tensor]) -> None:
        """Copy rank 0's values into ``params`` on every rank (one packed broadcast)."""
        with torch.no_grad():
            flat = torch.cat([p.detach().reshape(-1) for p in params]).to(self.device)
            dist.broadcast(flat, src=0, group=self.group)
            start = 0
            for p in params:
                p.copy_(flat[start:start + p.numel()].reshape(p.shape))
                start += p.numel()

    def all_ok(self, ok: bool) -> bool:
        """True on every rank when ``ok`` holds on every rank (so all ranks raise together)."""
        t = torch.tensor([1 if ok else 0], dtype=torch.int64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.group)
        return bool(t.item())

    def gather_states(self, state: Tensor) -> List[Tensor]:
        """Every rank's generator state (a byte tensor of fixed size), in rank order, on the CPU."""
        local = state.to(self.device)
        out = [torch.empty_like(local) for _ in range(self.world_size)]
        dist.all_gather(out, local, group=self.group)
        return [t.cpu() for t in out]


def init_from_env(device: str = "cpu", timeout_s: Optional[float] = None) -> Optional[DistContext]:
    """Join the process group that ``torchrun`` describes in the environment; ``None`` for a single process.

    The backend is NCCL for a CUDA device (each rank on ``cuda:LOCAL_RANK``) and gloo otherwise. ``timeout_s``
    (default: :data:`TIMEOUT_ENV` seconds, else :data:`DEFAULT_TIMEOUT_S`) bounds how long a rank waits in a
    collective for a peer that stalled or died.
    """
    world = env_world_size()
    if world <= 1:
        return None
    if timeout_s is None:
        raw = os.environ.get(TIMEOUT_ENV, "")
        try:
            timeout_s = float(raw) if raw.strip() else DEFAULT_TIMEOUT_S
        except ValueError:
            raise ValueError(f"${TIMEOUT_ENV}={raw!r} is not a number of seconds") from None
    if not (timeout_s > 0 and math.isfinite(timeout_s)):
        raise ValueError(f"the distributed timeout must be a finite number of seconds > 0, got {timeout_s!r} "
                         f"(--dist-timeout or ${TIMEOUT_ENV})")
    if device.startswith("cuda"):
        local = int(os.environ.get("LOCAL_RANK", "0"))
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
        backend = "nccl"
    else:
        dev, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    return DistContext(dist.get_rank(), dist.get_world_size(), dev)


def shutdown(ctx: Optional[DistContext]) -> None:
    """Leave the process group (no-op for a single process)."""
    if ctx is not None and dist.is_initialized():
        dist.destroy_process_group()
