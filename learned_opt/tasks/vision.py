"""More learners on scikit-learn's 8x8 digits: an MLP autoencoder (reconstruction, MSE), a small CNN and a tiny
vision transformer (classification). All read one pool of :func:`~learned_opt.tasks.digits.digits_splits` (``meta`` for
meta-training, ``heldout`` for final test tasks only), like :class:`~learned_opt.tasks.digits.DigitsFamily`."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import torch
from torch import nn

from ..validate import check_choice
from .digits import POOLS, digits_splits
from .models import ConvNet, TinyViT, build_module
from .supervised import MLP, SupervisedTask


def _pool_data(pool: str, split_seed: int, dtype, device, autoencode: bool):
    """The pool's splits as ``dtype`` on ``device``; with ``autoencode`` the targets are the images."""
    data = {}
    for split, (x, y) in digits_splits(pool, split_seed).items():
        x = x.to(device=device, dtype=dtype)
        data[split] = (x, x) if autoencode else (x, y.to(device))
    return data


class _PoolFamily:
    """What the families over one digits pool share: the pool check, and a task over the pool's fixed data (the
    generator is not drawn from; the init comes at ``task.init``)."""
    pool: str
    split_seed: int
    batch_size: Optional[int]
    dtype: torch.dtype
    device: str
    backend: Optional[str]

    def __post_init__(self):
        check_choice("digits pool", self.pool, POOLS)

    def _task(self, factory: Callable[[], nn.Module], loss: str, autoencode: bool) -> SupervisedTask:
        data = _pool_data(self.pool, self.split_seed, self.dtype, self.device, autoencode=autoencode)
        module = build_module(factory, self.dtype, self.device)
        return SupervisedTask(module, data, loss, self.batch_size, backend=self.backend)


@dataclass(frozen=True)
class DigitsAutoencoderFamily(_PoolFamily):
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

    def __call__(self, generator: torch.Generator) -> SupervisedTask:
        """A task (the generator is not drawn from: the data are fixed, the init comes at ``task.init``)."""
        return self._task(lambda: MLP([64, *self.hidden, 64], self.activation), "mse", autoencode=True)


@dataclass(frozen=True)
class DigitsCNNFamily(_PoolFamily):
    """A small CNN (:class:`~learned_opt.tasks.models.ConvNet`) classifying one pool's digits (``heldout`` by
    default: the CNN is a held-out architecture); tasks differ by initialisation and data order."""
    channels: Tuple[int, int] = (8, 16)
    batch_size: Optional[int] = 64
    pool: str = "heldout"
    split_seed: int = 0
    dtype: torch.dtype = torch.float32
    device: str = "cpu"
    backend: Optional[str] = None

    def __call__(self, generator: torch.Generator) -> SupervisedTask:
        """A task (the generator is not drawn from: the data are fixed, the init comes at ``task.init``)."""
        return self._task(lambda: ConvNet(self.channels), "cross_entropy", autoencode=False)


@dataclass(frozen=True)
class DigitsViTFamily(_PoolFamily):
    """A tiny vision transformer (:class:`~learned_opt.tasks.models.TinyViT`: ``patch x patch`` patches, ``layers``
    blocks of width ``d_model``, mean pooling) classifying one pool's digits (``heldout`` by default: the vision
    transformer is a held-out architecture); tasks differ by initialisation and data order."""
    patch: int = 2
    d_model: int = 32
    heads: int = 2
    layers: int = 1
    batch_size: Optional[int] = 32
    pool: str = "heldout"
    split_seed: int = 0
    dtype: torch.dtype = torch.float32
    device: str = "cpu"
    backend: Optional[str] = None

    def __call__(self, generator: torch.Generator) -> SupervisedTask:
        """A task (the generator is not drawn from: the data are fixed, the init comes at ``task.init``)."""
        return self._task(lambda: TinyViT(self.patch, self.d_model, self.heads, self.layers), "cross_entropy",
                          autoencode=False)
