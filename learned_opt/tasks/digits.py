"""Digits classification: scikit-learn's bundled 8x8 digits (1797 images, no download), an MLP learner.

The L2L paper's MNIST set-up (one hidden layer of 20 sigmoid units, minibatches of 128) scaled to digits.

The 1797 images are split once (fixed by ``split_seed``) into two disjoint **pools** of about 900 images:
``meta`` for meta-training, validation and development tasks, ``heldout`` for the final test tasks only. Each pool
is split again into the task's own ``train`` images (what the learner trains on), ``val`` images and ``test``
images (held-out loss and accuracy). A *task* is the learner's initialisation, its minibatch order and
(optionally) a subsample of its pool's training images; tasks of the ``heldout`` pool train on images that no
meta-training or tuning run has ever seen.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Optional, Sequence, Tuple

import torch

from ..validate import check_choice, check_positive_int
from .supervised import MLP, SupervisedTask

POOLS = ("meta", "heldout")


@lru_cache(maxsize=None)
def _load(split_seed: int, n_val: int, n_test: int):
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float64) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    g = torch.Generator().manual_seed(split_seed)
    perm = torch.randperm(x.shape[0], generator=g)
    half = x.shape[0] // 2
    pools = {}
    for name, idx in zip(POOLS, (perm[:half], perm[half:])):
        test, val, train = idx[:n_test], idx[n_test:n_test + n_val], idx[n_test + n_val:]
        pools[name] = {"train": (x[train], y[train]), "val": (x[val], y[val]), "test": (x[test], y[test])}
    return pools


def digits_splits(pool: str = "meta", split_seed: int = 0, n_val: int = 150, n_test: int = 150):
    """The fixed, disjoint train / val / test images of ``pool`` (float64 features in [0, 1], integer labels)."""
    check_choice("digits pool", pool, POOLS)
    return _load(split_seed, n_val, n_test)[pool]


class Digits(SupervisedTask):
    """Cross-entropy classification of 8x8 digits by an MLP ``64 -> hidden... -> 10`` on one pool's images."""

    def __init__(self, generator: Optional[torch.Generator] = None, hidden: Sequence[int] = (20,),
                 activation: str = "sigmoid", batch_size: Optional[int] = 128,
                 n_train: Optional[int] = None, split_seed: int = 0, dtype=torch.float32, device="cpu",
                 pool: str = "meta"):
        if n_train is not None:
            check_positive_int("n_train", n_train)
        splits = digits_splits(pool, split_seed)
        self.pool = pool
        data = {}
        for split, (x, y) in splits.items():
            if split == "train" and n_train is not None:
                if n_train > x.shape[0]:
                    raise ValueError(f"n_train={n_train} exceeds the {x.shape[0]} training images of pool "
                                     f"{pool!r}")
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
    """Samples :class:`Digits` tasks of one image pool: the learner's architecture is fixed, initialisation and
    data order vary. ``pool='heldout'`` is for final test tasks only."""
    hidden: Tuple[int, ...] = (20,)
    activation: str = "sigmoid"
    batch_size: Optional[int] = 128
    n_train: Optional[int] = None
    split_seed: int = 0
    dtype: torch.dtype = torch.float32
    device: str = "cpu"
    pool: str = "meta"

    def __post_init__(self):
        check_choice("digits pool", self.pool, POOLS)

    def __call__(self, generator: torch.Generator) -> Digits:
        """A task (its training subset, if ``n_train`` is set, drawn from ``generator``)."""
        return Digits(generator, self.hidden, self.activation, self.batch_size, self.n_train,
                      self.split_seed, self.dtype, self.device, self.pool)
