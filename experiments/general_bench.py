"""The general optimizer's step time over ``torch.optim.AdamW``'s (issue #24, item 6): a full training step (forward,
backward, optimizer step) of MLPs of about 200k and 5M parameters, batch 128, random data, one thread."""
from __future__ import annotations

import time
from typing import Dict, List

import numpy as np
import torch

from learned_opt.evaluate import bootstrap_interval

SIZES = {"200k": (784, 256, 10), "5m": (784, 2048, 1536, 10)}  # layer widths: 203,530 and 4,758,026 parameters


def _mlp(widths):
    import torch.nn as nn

    torch.manual_seed(0)
    layers: List[nn.Module] = []
    for a, b in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def step_time(lopt_path: str, widths, *, reps: int, steps: int, n_boot: int) -> Dict[str, float]:
    """Median step time of the learned optimizer over AdamW's (lr 1e-3, weight decay 1e-2) on an MLP of
    ``widths``; repetitions of ``steps`` steps alternate which optimizer goes first; a bootstrap interval over
    repetitions."""
    import torch.nn.functional as F

    from learned_opt.meta import load_lopt
    from learned_opt.optim.adapter import ProtocolOptimizer

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(128, widths[0], generator=g), torch.randint(0, widths[-1], (128,), generator=g)
    m_l, m_a = _mlp(widths), _mlp(widths)
    total = (reps + 1) * steps
    runs = {"learned": (m_l, ProtocolOptimizer(m_l.parameters(), load_lopt(lopt_path), total_steps=total)),
            "adamw": (m_a, torch.optim.AdamW(m_a.parameters(), lr=1e-3, weight_decay=1e-2))}

    def per_step(name):
        net, opt = runs[name]
        t = time.perf_counter()
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(net(x), y)
            loss.backward()
            opt.step(loss=loss) if name == "learned" else opt.step()
        return (time.perf_counter() - t) / steps

    per_step("learned"), per_step("adamw")  # warm-up (allocations, first-call costs)
    times = {"learned": [], "adamw": []}
    for r in range(reps):
        for name in (("learned", "adamw") if r % 2 == 0 else ("adamw", "learned")):
            times[name].append(per_step(name))
    L, A = np.array(times["learned"]), np.array(times["adamw"])
    lo, hi = bootstrap_interval(np.stack([L, A], 1), lambda b: np.median(b[..., 0], 1) / np.median(b[..., 1], 1),
                                n_boot=n_boot)
    return {"ratio": float(np.median(L) / np.median(A)), "ci_low": lo, "ci_high": hi,
            "learned_ms": 1e3 * float(np.median(L)), "adamw_ms": 1e3 * float(np.median(A)),
            "params": sum(p.numel() for p in m_a.parameters()), "reps": reps, "steps": steps, "lopt": lopt_path}


def step_time_bench(cfg, lopt_path: str) -> Dict[str, Dict[str, float]]:
    """:func:`step_time` at every size of :data:`SIZES` (``cfg.bench_sizes``)."""
    return {s: step_time(lopt_path, SIZES[s], reps=cfg.bench_reps, steps=cfg.bench_steps, n_boot=cfg.n_boot)
            for s in cfg.bench_sizes}
