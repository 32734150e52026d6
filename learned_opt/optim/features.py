"""The flat coordinate layout and the per-coordinate feature math shared by the meta-networks.

Every meta-network processes all coordinates of all tensors in one batched call: :class:`Layout` maps a list of
tensors to one flat vector, and per-tensor statistics use a segment index over it (:func:`segment_mean`) or, on
the fast paths (no graph: evaluation, the drop-in optimizer, ES / PES particles), views of contiguous per-tensor
column blocks (:func:`chunk_means`, :func:`blocks`). Gradient preprocessing follows Andrychowicz et al. (2016)
(:func:`preprocess_gradient`), the step embedding Metz et al. (2020/2022) (:func:`step_embedding`).
"""
from __future__ import annotations

import math
from typing import Iterator, List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor

STEP_TIMESCALES = (1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1000.0)

# ProtocolOptimizer's state_dict names each state's class "module:qualname" (``adapter.to_plain``). The meta-network
# states were defined in learned_opt.optim.learned when that format was fixed: they keep that name (the module
# re-exports them), so that checkpoints are the same before and after the split into one file per network.
STATE_MODULE = "learned_opt.optim.learned"


class Layout(NamedTuple):
    """How a list of tensors maps to one flat vector of ``n`` coordinates."""
    shapes: Tuple[torch.Size, ...]
    sizes: Tuple[int, ...]
    segment: Tensor  # (n,) index of the tensor each coordinate belongs to
    counts: Tensor  # (num_tensors,) coordinates per tensor


Layout.__module__ = STATE_MODULE


def make_layout(params: Sequence[Tensor]) -> Layout:
    """The flat layout of ``params``."""
    if len(params) == 0:
        raise ValueError("cannot optimise an empty parameter list")
    sizes = tuple(p.numel() for p in params)
    device = params[0].device
    segment = torch.repeat_interleave(torch.arange(len(sizes), device=device),
                                      torch.tensor(sizes, device=device))
    counts = torch.tensor(sizes, device=device, dtype=params[0].dtype)
    return Layout(tuple(p.shape for p in params), sizes, segment, counts)


def flatten(tensors: Sequence[Tensor]) -> Tensor:
    """Concatenate tensors into one vector."""
    return torch.cat([t.reshape(-1) for t in tensors])


def unflatten(flat: Tensor, layout: Layout) -> List[Tensor]:
    """Split a flat vector back into tensors of the layout's shapes."""
    return [c.reshape(s) for c, s in zip(torch.split(flat, layout.sizes), layout.shapes)]


def check_layout(grads: Sequence[Tensor], layout: Layout) -> None:
    """Raise ``ValueError`` unless ``grads`` have the shapes of the layout a meta-network's state was made for."""
    if len(grads) != len(layout.sizes) or any(g.shape != s for g, s in zip(grads, layout.shapes)):
        raise ValueError(f"gradient shapes {[tuple(g.shape) for g in grads]} do not match the state's "
                         f"{[tuple(s) for s in layout.shapes]}")


def segment_mean(x: Tensor, layout: Layout) -> Tensor:
    """Mean over each tensor's coordinates: ``(n, ...) -> (num_tensors, ...)``."""
    out = x.new_zeros((len(layout.sizes),) + x.shape[1:]).index_add(0, layout.segment, x)
    return out / layout.counts.reshape((-1,) + (1,) * (x.dim() - 1))


def segment_mean_acc(x: Tensor, layout: Layout) -> Tensor:
    """:func:`segment_mean` accumulated in float64 (then cast back): a float32 ``index_add`` over a 200k-coordinate
    tensor is off by ~1e-5 relative, which would make the per-tensor normalisation depend on the summation order
    (the fast paths' per-tensor means are ~100x closer to the float64 ones)."""
    if x.dtype in (torch.float64, torch.complex128):
        return segment_mean(x, layout)
    return segment_mean(x.double(), layout).to(x.dtype)


# Learners up to this many coordinates keep the float32 per-tensor sums and the reference path of CoordLSTM and
# CoordMLP: bitwise the numbers every reported CoordLSTM / CoordMLP result was made with (all on learners of at most
# 4,810 coordinates). Above it, float32 ``index_add`` drifts past 1e-6 relative and the fast paths pay off.
SMALL_LEARNER = 8192


def segment_mean_stable(x: Tensor, layout: Layout) -> Tensor:
    """:func:`segment_mean` for learners up to :data:`SMALL_LEARNER` coordinates, :func:`segment_mean_acc` above."""
    return segment_mean(x, layout) if x.shape[0] <= SMALL_LEARNER else segment_mean_acc(x, layout)


def mean_of_block_sums(sums: Tensor, sizes: Sequence[int], dtype: torch.dtype) -> Tensor:
    """Per-tensor means ``(tensors, h)`` from per-tensor sums accumulated block by block in float64."""
    return (sums / torch.tensor(sizes, dtype=torch.float64, device=sums.device).unsqueeze(1)).to(dtype)


def chunk_means(x: Tensor, sizes: Sequence[int]) -> Tensor:
    """Per-tensor means of a feature-major ``(f, n)`` (or ``(n,)``) tensor: ``(num_tensors, f)`` (or
    ``(num_tensors,)``), over views of its contiguous per-tensor column blocks (no index scatter)."""
    return torch.stack([c.mean(-1) for c in x.split(list(sizes), dim=-1)])


FAST_BLOCK = 16384  # coordinates per block of the fast paths: a block's hidden activations stay in cache


def block_width(n: int) -> int:
    """The widest block :func:`blocks` yields for ``n`` coordinates (scratch buffers are this wide)."""
    return min(n, FAST_BLOCK)


def blocks(sizes: Sequence[int], block: Optional[int] = None) -> Iterator[Tuple[int, int, int]]:
    """``(tensor index, start, end)`` column ranges of the flat layout, at most ``block`` wide, never crossing a
    tensor boundary (so per-tensor biases and sums apply to a whole block). Running a chain of elementwise ops and
    small-``k`` products block by block keeps its ``(hidden, block)`` intermediates in cache instead of streaming
    ``(hidden, n)`` arrays through memory once per op (about 2x on the CoordLSTM at 200k coordinates)."""
    block = FAST_BLOCK if block is None else block
    start = 0
    for j, size in enumerate(sizes):
        for s in range(start, start + size, block):
            yield j, s, min(start + size, s + block)
        start += size


def ema(m: Tensor, g: Tensor, b: float, scratch: Tensor, out: Optional[Tensor] = None,
        square: bool = False) -> Tensor:
    """``b * m + (1 - b) * g`` (``* g`` once more with ``square``) by the very ops the reference paths use, so
    the fast paths' accumulators are bitwise the reference's: a fused ``lerp`` rounds differently, and where the
    two terms nearly cancel a 1-ulp difference becomes 1e-5 relative, which an LSTM's state carries on and grows."""
    out = torch.mul(m, b, out=out) if out is not None else torch.mul(m, b)
    t = torch.mul(g, 1 - b, out=scratch)
    if square:
        t.mul_(g)
    return out.add_(t)


def tanh_(x: Tensor) -> Tensor:
    """``tanh`` in place as ``2 sigmoid(2x) - 1``: on this CPU build ``tanh_`` costs 5.6 ns per float32 element and
    ``sigmoid_`` 0.43 (measured), and the LSTM's cell calls it on 40 floats per coordinate per step. Absolute error
    about 1e-7 (the cancellation near 0 costs relative, not absolute, accuracy)."""
    return x.mul_(2.0).sigmoid_().mul_(2.0).sub_(1.0)


def preprocess_gradient_into(g: Tensor, out: Tensor, p: float, scratch: Tensor) -> None:
    """:func:`preprocess_gradient` written feature-major into ``out`` ``(2, n)`` (fast paths; ``scratch``: an ``(n,)``
    float buffer it may overwrite). Equal to it up to float rounding at ``|g| = e^-p``."""
    floor = math.exp(-p)
    a = torch.abs(g, out=scratch)
    small = a < floor
    torch.log(a.clamp_min_(floor), out=out[0]).div_(p).masked_fill_(small, -1.0)
    torch.mul(g, math.exp(p), out=out[1]).clamp_(-1.0, 1.0)  # sign(g) where |g| >= e^-p, e^p g below


def preprocess_gradient(g: Tensor, p: float = 10.0) -> Tensor:
    """L2L preprocessing: ``(log|g|/p, sign g)`` if ``|g| >= e^-p`` else ``(-1, e^p g)``; ``(n,) -> (n, 2)``."""
    big = g.abs() >= math.exp(-p)
    first = torch.where(big, torch.log(g.abs().clamp_min(math.exp(-p))) / p, torch.full_like(g, -1.0))
    second = torch.where(big, torch.sign(g), g * math.exp(p))
    return torch.stack([first, second], dim=-1)


def step_embedding(count: int, like: Tensor, timescales: Sequence[float] = STEP_TIMESCALES) -> Tensor:
    """``tanh(t / tau)`` for several timescales, a vector like ``like``'s dtype and device."""
    return torch.tensor([math.tanh(count / tau) for tau in timescales], dtype=like.dtype, device=like.device)
