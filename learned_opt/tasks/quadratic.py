"""Quadratic tasks f(theta) = ||W theta - y||^2 (Andrychowicz et al. 2016, section 3.1).

A ``Quadratic`` holds ``num_problems`` independent problems in one tensor so that a coordinatewise optimizer
processes them all in one call; the scalar loss is the *sum* over problems, so each problem receives its own
gradient (a mean would make the gradients ``1/num_problems`` too small).

:class:`IllConditionedQuadratic` is a held-out variant: rotated, with a Hessian condition number of 1e4 to 1e6 and
eigenvalues spread evenly over every decade in between.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ..validate import check_choice, check_positive_int, check_split
from .base import random_rotation

DISTRIBUTIONS = ("gaussian", "uniform")


def _draw(shape, dist: str, generator: torch.Generator) -> Tensor:
    if dist == "gaussian":
        return torch.randn(shape, generator=generator)
    return torch.rand(shape, generator=generator) * 2 - 1


class Quadratic:
    """A batch of ``num_problems`` quadratics in ``dim`` dimensions with W, y drawn from ``dist``.

    With ``split=True`` each problem's parameters are a tensor of their own (a list of ``num_problems``
    vectors), so that per-tensor statistics and per-tensor learning rates of a meta-network are per problem.
    """

    def __init__(self, generator: torch.Generator, dim: int = 10, num_problems: int = 1,
                 dist: str = "gaussian", init_std: float = 1.0, dtype=torch.float32, device="cpu",
                 split: bool = False):
        check_positive_int("dim", dim)
        check_positive_int("num_problems", num_problems)
        check_choice("distribution", dist, DISTRIBUTIONS)
        if not init_std >= 0:
            raise ValueError(f"init_std must be >= 0, got {init_std!r}")
        self.dim, self.num_problems, self.dist, self.init_std = dim, num_problems, dist, init_std
        self.split = split
        self.W = _draw((num_problems, dim, dim), dist, generator).to(device=device, dtype=dtype)
        self.y = _draw((num_problems, dim), dist, generator).to(device=device, dtype=dtype)

    def init(self, generator: torch.Generator) -> List[Tensor]:
        """theta0 ~ N(0, init_std^2), one row per problem."""
        theta = torch.randn((self.num_problems, self.dim), generator=generator) * self.init_std
        theta = theta.to(device=self.W.device, dtype=self.W.dtype)
        return list(theta.unbind(0)) if self.split else [theta]

    def sample_batch(self, generator: Optional[torch.Generator] = None, split: str = "train"):
        """Quadratics have no data: every split is the same deterministic problem."""
        check_split(split)
        return None

    def losses(self, params: Sequence[Tensor], batch=None) -> Tensor:
        """Per-problem ``||W theta - y||^2``, shape ``(num_problems,)``."""
        theta = torch.stack(list(params)) if self.split else params[0]
        if (not self.split and len(params) != 1) or theta.shape != (self.num_problems, self.dim):
            raise ValueError(f"theta has shape {tuple(theta.shape)}, expected "
                             f"{(self.num_problems, self.dim)}")
        r = torch.einsum("bij,bj->bi", self.W, theta) - self.y
        return (r * r).sum(-1)

    def split_losses(self, params: Sequence[Tensor], split: str) -> Tensor:
        """Per-problem losses; a quadratic has no data, so every split gives the same value."""
        check_split(split)
        return self.losses(params)

    def loss(self, params: Sequence[Tensor], batch=None) -> Tensor:
        """Sum of the per-problem losses (per-problem gradients)."""
        return self.losses(params, batch).sum()


@dataclass(frozen=True)
class QuadraticFamily:
    """Samples :class:`Quadratic` tasks."""
    dim: int = 10
    num_problems: int = 1
    dist: str = "gaussian"
    init_std: float = 1.0
    dtype: torch.dtype = torch.float32
    device: str = "cpu"
    split: bool = False

    def __call__(self, generator: torch.Generator) -> Quadratic:
        """A fresh task."""
        return Quadratic(generator, self.dim, self.num_problems, self.dist, self.init_std, self.dtype,
                         self.device, self.split)


class IllConditionedQuadratic(Quadratic):
    """One rotated, ill-conditioned quadratic ``||W theta - y||^2`` in ``dim`` dimensions: ``W = U diag(s) V^T``
    with random rotations ``U``, ``V`` and singular values ``s`` log-spaced from ``scale`` down to
    ``scale / sqrt(cond)``, so the Hessian ``2 W^T W`` has condition number exactly ``cond`` and eigenvalues spread
    evenly over every decade in between; ``y = W theta*`` with ``theta*`` standard normal (minimum 0).

    Unlike :class:`Quadratic` (Gaussian ``W``), whose ill-conditioning, when there is any, comes from one or two
    near-null directions, here most directions are ill-conditioned: the Hessian's largest eigenvalue is
    ``sqrt(cond)`` times its median one (a 10 x 10 Gaussian ``W`` gives at most about 16).
    """

    def __init__(self, generator: torch.Generator, dim: int = 20, cond: float = 1e5, scale: float = 2.0,
                 init_std: float = 1.0, dtype=torch.float32, device="cpu"):
        check_positive_int("dim", dim)
        if not (cond >= 1 and scale > 0 and init_std >= 0):
            raise ValueError(f"need cond >= 1, scale > 0 and init_std >= 0, got {cond!r}, {scale!r}, {init_std!r}")
        self.dim, self.num_problems, self.dist, self.init_std, self.split = dim, 1, "rotated", init_std, False
        self.cond, self.scale = float(cond), float(scale)
        rotations = [random_rotation(generator, dim) for _ in range(2)]
        s = scale * torch.logspace(0, -0.5 * math.log10(cond), dim, dtype=torch.float64)
        w = (rotations[0] * s) @ rotations[1].T
        theta_star = torch.randn(dim, generator=generator, dtype=torch.float64)
        self.W = w.unsqueeze(0).to(device=device, dtype=dtype)
        self.y = (w @ theta_star).unsqueeze(0).to(device=device, dtype=dtype)

    def hessian_eigenvalues(self) -> Tensor:
        """The eigenvalues of the Hessian ``2 W^T W``, descending (float64)."""
        return 2 * torch.linalg.svdvals(self.W[0].double()) ** 2


@dataclass(frozen=True)
class IllConditionedQuadraticFamily:
    """Samples :class:`IllConditionedQuadratic` tasks: a dimension uniform in ``dims`` (inclusive), a condition
    number log-uniform in ``conds``, a scale log-uniform in ``scales``, new rotations and optimum."""
    dims: Tuple[int, int] = (16, 40)
    conds: Tuple[float, float] = (1e4, 1e6)
    scales: Tuple[float, float] = (1.0, 4.0)
    init_std: float = 1.0
    dtype: torch.dtype = torch.float32
    device: str = "cpu"

    def __post_init__(self):
        if not (1 <= self.dims[0] <= self.dims[1] and 1 <= self.conds[0] <= self.conds[1]
                and 0 < self.scales[0] <= self.scales[1]):
            raise ValueError(f"bad ranges: dims={self.dims!r}, conds={self.conds!r}, scales={self.scales!r}")

    def __call__(self, generator: torch.Generator) -> IllConditionedQuadratic:
        """A fresh task."""
        dim = int(torch.randint(self.dims[0], self.dims[1] + 1, (), generator=generator))
        u = torch.rand(2, generator=generator, dtype=torch.float64).tolist()
        cond = math.exp(math.log(self.conds[0]) + u[0] * math.log(self.conds[1] / self.conds[0]))
        scale = math.exp(math.log(self.scales[0]) + u[1] * math.log(self.scales[1] / self.scales[0]))
        return IllConditionedQuadratic(generator, dim, cond, scale, self.init_std, self.dtype, self.device)
