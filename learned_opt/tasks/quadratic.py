"""Quadratic tasks f(theta) = ||W theta - y||^2 (Andrychowicz et al. 2016, section 3.1).

A ``Quadratic`` holds ``num_problems`` independent problems in one tensor so that a coordinatewise optimizer
processes them all in one call; the scalar loss is the *sum* over problems, so each problem receives its own
gradient (a mean would make the gradients ``1/num_problems`` too small).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch
from torch import Tensor

from ..validate import check_choice, check_positive_int, check_split

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
