"""Meta-gradient estimators for unrolled computations: truncated backprop (TBPTT), antithetic evolution strategies
(ES) and persistent evolution strategies (PES, Vicol et al. 2021).

The three work on one abstraction, an *unrolled system*: a function ``unroll_fn(thetas, inner, K)`` that advances
``P`` copies of an inner state by ``K`` steps, copy ``i`` under meta-parameters ``thetas[i]`` (shape ``(P, d)``),
and returns each copy's loss over those steps (shape ``(P,)``) and the new states. It is batched over copies so
that a population of perturbed meta-parameters costs one vectorised call. Each estimator returns, for the
truncation it just ran, an estimate of the derivative of that truncation's loss with respect to ``theta``:

- **TBPTT** differentiates the truncation's loss with the inner state entering as a constant: exact inside the
  truncation, blind to how ``theta`` shaped the state it started from (biased when that influence matters);
- **ES** (antithetic, on a truncation that starts from the unperturbed state) estimates the gradient of the
  Gaussian-smoothed truncation loss ``E[L(theta + sigma z)]``, with the same blindness to the past;
- **PES** keeps one inner state per particle and the sum of every perturbation that particle has received since
  its inner problem started; weighting the loss by that sum makes the estimate unbiased for the gradient of the
  smoothed loss *through all earlier truncations* (the sum over truncations estimates the gradient of the smoothed
  total loss of the whole unroll, however short the truncations).

Estimates with a non-finite loss are dropped in antithetic pairs and counted (``dropped``), as the meta-trainer's
guards do for TBPTT. The population is split across ranks by the caller; the estimators' sums are additive, so
``sum`` and ``count`` (see :meth:`PES.estimate`) can be all-reduced before dividing.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import torch
from torch import Tensor

UnrollFn = Callable[[Tensor, Tensor, int], Tuple[Tensor, Tensor]]


@dataclass
class Estimate:
    """One truncation's meta-gradient estimate: ``grad`` (shape ``(d,)``) = ``total / count``; ``loss`` the mean
    truncation loss of the unperturbed (TBPTT) or perturbed (ES, PES) copies that counted; ``dropped`` the copies
    left out for a non-finite loss."""
    grad: Tensor
    loss: float
    total: Tensor
    count: int
    dropped: int = 0


def local_pairs(num_particles: int, rank: int = 0, world_size: int = 1) -> range:
    """The antithetic pairs of a population of ``num_particles`` that rank ``rank`` of ``world_size`` holds:
    ``rank, rank + world_size, ...`` (``ValueError`` for an odd population or a rank without a pair)."""
    if isinstance(num_particles, bool) or not isinstance(num_particles, int) or num_particles < 2 \
            or num_particles % 2:
        raise ValueError(f"num_particles must be even and at least 2 (antithetic pairs), got {num_particles}")
    if not 0 <= rank < world_size or world_size > num_particles // 2:
        raise ValueError(f"rank {rank} of {world_size}: every rank needs at least one of the "
                         f"{num_particles // 2} antithetic pairs")
    return range(rank, num_particles // 2, world_size)


def antithetic_noise(num_particles: int, d: int, sigma: float, generator: torch.Generator, dtype=torch.float32,
                     rank: int = 0, world_size: int = 1) -> Tensor:
    """This rank's perturbations, ``(2 * local pairs, d)``: the whole population's ``P/2`` Gaussian draws times
    ``sigma`` are drawn on every rank (so the population, not the number of ranks, decides the result), the rank
    keeps its :func:`local_pairs`, and its rows are those draws followed by their negatives (pair ``i`` is rows
    ``i`` and ``i + pairs``)."""
    mine = local_pairs(num_particles, rank, world_size)
    half = torch.randn(num_particles // 2, d, generator=generator, dtype=dtype)[mine.start::mine.step] * sigma
    return torch.cat([half, -half])


def antithetic_sum(losses: Tensor, weights: Tensor, sigma: float) -> Tuple[Tensor, Tensor]:
    """The ES / PES sum over antithetic pairs (rows ``i`` and ``i + P/2``) with finite losses:
    ``sum_pairs (L_i - L_i') w_i / (2 sigma^2)``, ``w`` the perturbation (ES) or its running sum (PES; pairs stay
    mirrored, so this is ``sum_i L_i w_i / sigma^2``). Returns the sum and the ``(P,)`` mask of the copies that
    counted; dividing by the number of counted pairs gives the estimate."""
    half = losses.shape[0] // 2
    ok = torch.isfinite(losses[:half]) & torch.isfinite(losses[half:])
    diff = torch.where(ok, losses[:half] - losses[half:], torch.zeros_like(losses[:half]))
    return (diff[:, None] * weights[:half]).sum(0) / (2 * sigma ** 2), torch.cat([ok, ok])


def tbptt_estimate(theta: Tensor, unroll_fn: UnrollFn, inner: Tensor, K: int) -> Tuple[Estimate, Tensor]:
    """Truncated backprop: the gradient of the truncation loss from ``inner`` (one state, no batch dimension),
    which enters as a constant. Returns the estimate and the state after the truncation."""
    th = theta.detach().clone().requires_grad_(True)
    loss, new = unroll_fn(th[None], inner.detach()[None], K)
    if not torch.isfinite(loss).all():
        zero = torch.zeros_like(theta)
        return Estimate(zero, float("nan"), zero, 0, 1), new[0].detach()
    (grad,) = torch.autograd.grad(loss.sum(), th)
    return Estimate(grad, float(loss.detach()), grad.detach(), 1), new[0].detach()


class _Population:
    """A population of ``num_particles`` perturbations (antithetic pairs) of scale ``sigma``, drawn from
    ``generator``; with ``world_size`` ranks, this rank holds pairs ``rank, rank + world_size, ...`` (every rank
    draws the whole population from the same generator state, so the split does not change the numbers). The
    estimate of the whole population is ``sum of every rank's total / sum of every rank's count``.
    """

    def __init__(self, num_particles: int, sigma: float, generator: torch.Generator, rank: int = 0,
                 world_size: int = 1):
        if not sigma > 0:
            raise ValueError(f"sigma must be positive, got {sigma}")
        self.local = 2 * len(local_pairs(num_particles, rank, world_size))  # validates the population and split
        self.num_particles, self.sigma, self.generator = num_particles, float(sigma), generator
        self.rank, self.world_size = rank, world_size

    def _noise(self, theta: Tensor) -> Tensor:
        return antithetic_noise(self.num_particles, theta.numel(), self.sigma, self.generator, theta.dtype,
                                self.rank, self.world_size)


class ES(_Population):
    """Antithetic evolution strategies on a truncation (or, with ``K`` the whole horizon, on the full unroll).

    Every particle starts the truncation from the same state ``inner``; the state then advances under the
    unperturbed ``theta``. The estimate is ``sum_pairs (L(theta + e) - L(theta - e)) e / (2 * pairs * sigma^2)``.
    """

    def estimate(self, theta: Tensor, unroll_fn: UnrollFn, inner: Tensor, K: int) -> Tuple[Estimate, Tensor]:
        theta = theta.detach()
        eps = self._noise(theta)
        with torch.no_grad():
            states = inner.detach().expand(self.local, *inner.shape)
            losses, _ = unroll_fn(theta[None] + eps, states, K)
            total, ok = antithetic_sum(losses, eps, self.sigma)
            pairs = int(ok.sum()) // 2
            _, new = unroll_fn(theta[None], inner.detach()[None], K)
        grad = total / max(pairs, 1)
        loss = float(losses[ok].mean()) if pairs else float("nan")
        return Estimate(grad, loss, total, pairs, self.local - 2 * pairs), new[0]


@dataclass
class PESState:
    """What PES carries across truncations: each particle's inner state ``(P, ...)``, the sum of the perturbations
    it received since its inner problem started ``(P, d)``, and the steps it has run. Part of a checkpoint."""
    inner: Tensor
    accumulated: Tensor
    steps: int = 0

    def state_dict(self) -> dict:
        return {"inner": self.inner.clone(), "accumulated": self.accumulated.clone(), "steps": self.steps}

    @classmethod
    def from_state_dict(cls, d: dict) -> "PESState":
        return cls(d["inner"].clone(), d["accumulated"].clone(), int(d["steps"]))


class PES(_Population):
    """Persistent evolution strategies with antithetic pairs.

    At each truncation, particle ``i`` runs ``K`` steps from its own state under ``theta + e_i`` (pairs mirror
    each other: ``e_{i+P/2} = -e_i``), adds ``e_i`` to its accumulated perturbation ``xi_i`` and contributes
    ``L_i * xi_i``; the estimate is ``sum_i L_i xi_i / (P sigma^2)``. Because pairs start together and receive
    mirrored perturbations, ``xi`` stays antithetic and the estimate equals ``sum_pairs (L_i - L_i') xi_i /
    (P sigma^2)``: the antithetic pair difference is itself a baseline (subtracting the pair's mean loss from both
    members changes nothing). A particle pair with a non-finite loss is dropped from the estimate, counted, and
    restarted from ``reset_state`` (without one: from the state it started the truncation in) with its
    accumulator cleared, so one blow-up does not poison later truncations.
    """

    def init(self, inner: Tensor, d: int) -> PESState:
        """Every particle at ``inner`` (one state, no batch dimension), nothing accumulated."""
        states = inner.detach().expand(self.local, *inner.shape).clone()
        return PESState(states, torch.zeros(self.local, d, dtype=inner.dtype), 0)

    def estimate(self, theta: Tensor, unroll_fn: UnrollFn, state: PESState, K: int,
                 reset_state: Optional[Tensor] = None) -> Tuple[Estimate, PESState]:
        theta = theta.detach()
        eps = self._noise(theta)
        with torch.no_grad():
            losses, new_inner = unroll_fn(theta[None] + eps, state.inner, K)
            acc = state.accumulated + eps
            total, ok = antithetic_sum(losses, acc, self.sigma)
            pairs = int(ok.sum()) // 2
            if not ok.all():  # restart the dropped pairs
                bad = ~ok
                restart = state.inner if reset_state is None else reset_state.expand_as(state.inner)
                new_inner = torch.where(bad.view(-1, *[1] * (new_inner.dim() - 1)), restart, new_inner)
                acc = torch.where(bad[:, None], torch.zeros_like(acc), acc)
        grad = total / max(pairs, 1)
        loss = float(losses[ok].mean()) if pairs else float("nan")
        return (Estimate(grad, loss, total, pairs, self.local - 2 * pairs),
                PESState(new_inner, acc, state.steps + K))


class InfluenceBalancing:
    """The influence-balancing system (Tallec & Ollivier 2017; the PES paper's first experiment): a 23-d state
    ``s' = A s + theta * v`` with ``A = 0.5 I + 0.5 (superdiagonal)`` and ``v`` ten +1 entries then thirteen -1,
    started at ones and never reset; a truncation's loss is ``0.5 (s_0 - 1)^2`` at its end. In the steady state
    ``s_0 = 2 theta sum(v) = -6 theta``, so the long-run optimum is ``theta* = -1/6``; a short truncation sees only
    the first, positive entries of ``v`` and pushes ``theta`` the wrong way."""
    n = 23
    positive = 10
    optimum = -1.0 / 6.0

    def __init__(self, dtype=torch.float64):
        self.dtype = dtype
        self.A = 0.5 * torch.eye(self.n, dtype=dtype) + 0.5 * torch.diag(torch.ones(self.n - 1, dtype=dtype), 1)
        self.v = torch.cat([torch.ones(self.positive, dtype=dtype), -torch.ones(self.n - self.positive, dtype=dtype)])

    def init(self) -> Tensor:
        return torch.ones(self.n, dtype=self.dtype)

    def unroll(self, thetas: Tensor, inner: Tensor, K: int) -> Tuple[Tensor, Tensor]:
        """``thetas (P, 1)``, ``inner (P, 23)`` -> (losses ``(P,)``, states after ``K`` steps)."""
        s = inner
        for _ in range(K):
            s = s @ self.A.T + thetas[:, :1] * self.v
        return 0.5 * (s[:, 0] - 1.0) ** 2, s
