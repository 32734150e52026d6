"""Classification of scikit-learn's bundled tabular data sets (no download) by an MLP: ``wine`` (178 rows,
13 features, 3 classes) and ``breast_cancer`` (569 rows, 30 features, 2 classes).

Each data set is split once, by a fixed ``split_seed``, into disjoint ``train`` / ``val`` / ``test`` rows and
standardised with the training rows' mean and standard deviation. These data sources are for held-out tasks:
no meta-training family reads them.

Regression: ``diabetes`` (442 rows, 10 features, a disease-progression target), split the same way, with the
target standardised by the training rows' statistics too; :class:`TabularRegressionFamily` fits it by an MLP whose
width, and the subset of training rows it sees, vary by task.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Dict, Optional, Tuple

import torch

from ..validate import SPLITS, check_choice
from .models import build_module
from .supervised import MLP, SupervisedTask

DATASETS = ("wine", "breast_cancer")


REGRESSION_DATASETS = ("diabetes",)


def _standardise(t: torch.Tensor, rows: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """``t``'s rows of each split, standardised with the training rows' mean and standard deviation."""
    mean, std = t[rows["train"]].mean(0), t[rows["train"]].std(0).clamp_min(1e-12)
    return {split: (t[rows[split]] - mean) / std for split in SPLITS}


@lru_cache(maxsize=None)
def _load(name: str, split_seed: int, val_frac: float, test_frac: float):
    from sklearn import datasets

    d = getattr(datasets, f"load_{name}")()
    x = torch.tensor(d.data, dtype=torch.float64)
    if name in REGRESSION_DATASETS:
        y = torch.tensor(d.target, dtype=torch.float64).reshape(-1, 1)
    else:
        y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(split_seed))
    n_test, n_val = round(test_frac * x.shape[0]), round(val_frac * x.shape[0])
    rows = {"test": perm[:n_test], "val": perm[n_test:n_test + n_val], "train": perm[n_test + n_val:]}
    xs = _standardise(x, rows)
    ys = _standardise(y, rows) if name in REGRESSION_DATASETS else {s: y[rows[s]] for s in SPLITS}
    return {split: (xs[split], ys[split]) for split in SPLITS}


def _check_fracs(val_frac: float, test_frac: float) -> None:
    if not (0 < val_frac and 0 < test_frac and val_frac + test_frac < 1):
        raise ValueError(f"val_frac and test_frac must be > 0 with a sum < 1, got {val_frac!r}, {test_frac!r}")


def tabular_splits(name: str, split_seed: int = 0, val_frac: float = 0.2, test_frac: float = 0.2):
    """The fixed, disjoint, standardised train / val / test rows of data set ``name`` (float64 features,
    integer labels); the statistics are the training rows'."""
    check_choice("tabular data set", name, DATASETS)
    _check_fracs(val_frac, test_frac)
    return _load(name, split_seed, val_frac, test_frac)


def regression_splits(name: str = "diabetes", split_seed: int = 0, val_frac: float = 0.2, test_frac: float = 0.2):
    """The fixed, disjoint train / val / test rows of regression data set ``name``: float64 features and
    ``(rows, 1)`` targets, both standardised with the training rows' statistics."""
    check_choice("tabular regression data set", name, REGRESSION_DATASETS)
    _check_fracs(val_frac, test_frac)
    return _load(name, split_seed, val_frac, test_frac)


@dataclass(frozen=True)
class TabularFamily:
    """An MLP ``features -> hidden... -> classes`` classifying data set ``dataset`` under cross-entropy; tasks
    differ by initialisation and data order."""
    dataset: str = "wine"
    hidden: Tuple[int, ...] = (32,)
    activation: str = "relu"
    batch_size: Optional[int] = 64
    split_seed: int = 0
    dtype: torch.dtype = torch.float32
    device: str = "cpu"
    backend: Optional[str] = None

    def __post_init__(self):
        check_choice("tabular data set", self.dataset, DATASETS)

    def __call__(self, generator: torch.Generator) -> SupervisedTask:
        """A task (the generator is not drawn from: the data are fixed, the init comes at ``task.init``)."""
        splits = tabular_splits(self.dataset, self.split_seed)
        data = {s: (x.to(device=self.device, dtype=self.dtype), y.to(self.device)) for s, (x, y) in splits.items()}
        classes = int(max(int(y.max()) for _, y in splits.values())) + 1
        sizes = [splits["train"][0].shape[1], *self.hidden, classes]
        module = build_module(lambda: MLP(sizes, self.activation), self.dtype, self.device)
        return SupervisedTask(module, data, "cross_entropy", self.batch_size, backend=self.backend)


@dataclass(frozen=True)
class TabularRegressionFamily:
    """An MLP ``features -> width (x depth) -> 1`` regressing data set ``dataset``'s standardised target under
    MSE. A task draws its width from ``widths``, its depth (hidden layers) from ``depths`` and the ``train_frac``
    share of the training rows it trains on from its generator; validation and test rows are the same for every
    task (and never among any task's training rows)."""
    dataset: str = "diabetes"
    widths: Tuple[int, ...] = (16, 32, 64)
    depths: Tuple[int, ...] = (1, 2)
    activation: str = "tanh"
    train_frac: float = 0.8
    batch_size: Optional[int] = 32
    split_seed: int = 0
    dtype: torch.dtype = torch.float32
    device: str = "cpu"
    backend: Optional[str] = None

    def __post_init__(self):
        check_choice("tabular regression data set", self.dataset, REGRESSION_DATASETS)
        if not self.widths or not self.depths or not 0 < self.train_frac <= 1:
            raise ValueError(f"widths and depths must be non-empty and 0 < train_frac <= 1, got {self.widths!r}, "
                             f"{self.depths!r}, {self.train_frac!r}")

    def __call__(self, generator: torch.Generator) -> SupervisedTask:
        """A task: a width, a depth and a subset of the training rows drawn from ``generator``."""
        splits = regression_splits(self.dataset, self.split_seed)
        width = self.widths[int(torch.randint(len(self.widths), (), generator=generator))]
        depth = self.depths[int(torch.randint(len(self.depths), (), generator=generator))]
        x, y = splits["train"]
        keep = torch.randperm(x.shape[0], generator=generator)[:max(1, round(self.train_frac * x.shape[0]))]
        picked = {"train": (x[keep], y[keep]), "val": splits["val"], "test": splits["test"]}
        data = {s: (a.to(device=self.device, dtype=self.dtype), b.to(device=self.device, dtype=self.dtype))
                for s, (a, b) in picked.items()}
        sizes = [x.shape[1], *([width] * depth), 1]
        module = build_module(lambda: MLP(sizes, self.activation), self.dtype, self.device)
        task = SupervisedTask(module, data, "mse", self.batch_size, backend=self.backend)
        task.train_rows = keep
        return task
