"""Digits classification: scikit-learn's bundled 8x8 digits (1797 images, no download), an MLP learner.

The L2L paper's MNIST set-up (one hidden layer of 20 sigmoid units, minibatches of 128) scaled to digits.
The train / validation / test split is fixed by ``split_seed`` and disjoint; a task family varies the
learner's initialisation and the minibatch order, and may subsample the training set.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Optional, Sequence, Tuple

import torch

from .base import check_positive_int
from .supervised import MLP, SupervisedTask


@lru_cache(maxsize=None)
def _load(split_seed: int, n_val: int, n_test: int):
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float64) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    g = torch.Generator().manual_seed(split_seed)
    perm = torch.randperm(x.shape[0], generator=g)
    test, val, train = perm[:n_test], perm[n_test:n_test + n_val], perm[n_test + n_val:]
    return {"train": (x[train], y[train]), "val": (x[val], y[val]), "test": (x[test], y[test])}


def digits_splits(split_seed: int = 0, n_val: int = 300, n_test: int = 300):
    """The fixed, disjoint splits as float64 features in [0, 1] and integer labels."""
    return _load(split_seed, n_val, n_test)


class Digits(SupervisedTask):
    """Cross-entropy classification of 8x8 digits by an MLP ``64 -> hidden... -> 10``."""

    def __init__(self, generator: Optional[torch.Generator] = None, hidden: Sequence[int] = (20,),
                 activation: str = "sigmoid", batch_size: Optional[int] = 128,
                 n_train: Optional[int] = None, split_seed: int = 0, dtype=torch.float32, device="cpu"):
        if n_train is not None:
            check_positive_int("n_train", n_train)
        splits = digits_splits(split_seed)
        data = {}
        for split, (x, y) in splits.items():
            if split == "train" and n_train is not None:
                if n_train > x.shape[0]:
                    raise ValueError(f"n_train={n_train} exceeds the {x.shape[0]} training images")
                g = generator if generator is not None else torch.Generator().manual_seed(0)
                idx = torch.randperm(x.shape[0], generator=g)[:n_train]
                x, y = x[idx], y[idx]
            data[split] = (x.to(device=device, dtype=dtype), y.to(device))
        # Building the module runs its default init on the global RNG: fork it so tasks leave no trace there.
        with torch.random.fork_rng(devices=[]):
            module = MLP([64, *hidden, 10], activation).to(device=device, dtype=dtype)
        super().__init__(module, data, "cross_entropy", batch_size)


@dataclass(frozen=True)
class DigitsFamily:
    """Samples :class:`Digits` tasks: the learner's architecture is fixed, initialisation and data order vary."""
    hidden: Tuple[int, ...] = (20,)
    activation: str = "sigmoid"
    batch_size: Optional[int] = 128
    n_train: Optional[int] = None
    split_seed: int = 0
    dtype: torch.dtype = torch.float32
    device: str = "cpu"

    def __call__(self, generator: torch.Generator) -> Digits:
        """A task (its training subset, if ``n_train`` is set, drawn from ``generator``)."""
        return Digits(generator, self.hidden, self.activation, self.batch_size, self.n_train,
                      self.split_seed, self.dtype, self.device)
