"""More learners on scikit-learn's 8x8 digits: an MLP autoencoder (reconstruction, MSE) and a small CNN
(classification). Both read one pool of :func:`~learned_opt.tasks.digits.digits_splits` (``meta`` for
meta-training, ``heldout`` for final test tasks only), like :class:`~learned_opt.tasks.digits.DigitsFamily`."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from .digits import POOLS, digits_splits
from .models import ConvNet, build_module
from .supervised import MLP, SupervisedTask


def _pool_data(pool: str, split_seed: int, dtype, device, autoencode: bool):
    """The pool's splits as ``dtype`` on ``device``; with ``autoencode`` the targets are the images."""
    data = {}
    for split, (x, y) in digits_splits(pool, split_seed).items():
        x = x.to(device=device, dtype=dtype)
        data[split] = (x, x) if autoencode else (x, y.to(device))
    return data


def _check_pool(pool: str) -> None:
    if pool not in POOLS:
        raise ValueError(f"unknown digits pool {pool!r}; known: {', '.join(POOLS)}")


@dataclass(frozen=True)
class DigitsAutoencoderFamily:
    """An MLP autoencoder ``64 -> hidden... -> 64`` (``activation`` after hidden layers, linear output)
    reconstructing one pool's digits under MSE; tasks differ by initialisation and data order."""
    hidden: Tuple[int, ...] = (16,)
    activation: str = "tanh"
    batch_size: Optional[int] = 128
    pool: str = "meta"
    split_seed: int = 0
    dtype: torch.dtype = torch.float32
    device: str = "cpu"
    backend: Optional[str] = None

    def __post_init__(self):
        _check_pool(self.pool)

    def __call__(self, generator: torch.Generator) -> SupervisedTask:
        """A task (the generator is not drawn from: the data are fixed, the init comes at ``task.init``)."""
        data = _pool_data(self.pool, self.split_seed, self.dtype, self.device, autoencode=True)
        module = build_module(lambda: MLP([64, *self.hidden, 64], self.activation), self.dtype, self.device)
        return SupervisedTask(module, data, "mse", self.batch_size, backend=self.backend)


@dataclass(frozen=True)
class DigitsCNNFamily:
    """A small CNN (:class:`~learned_opt.tasks.models.ConvNet`) classifying one pool's digits (``heldout`` by
    default: the CNN is a held-out architecture); tasks differ by initialisation and data order."""
    channels: Tuple[int, int] = (8, 16)
    batch_size: Optional[int] = 64
    pool: str = "heldout"
    split_seed: int = 0
    dtype: torch.dtype = torch.float32
    device: str = "cpu"
    backend: Optional[str] = None

    def __post_init__(self):
        _check_pool(self.pool)

    def __call__(self, generator: torch.Generator) -> SupervisedTask:
        """A task (the generator is not drawn from: the data are fixed, the init comes at ``task.init``)."""
        data = _pool_data(self.pool, self.split_seed, self.dtype, self.device, autoencode=False)
        module = build_module(lambda: ConvNet(self.channels), self.dtype, self.device)
        return SupervisedTask(module, data, "cross_entropy", self.batch_size, backend=self.backend)
