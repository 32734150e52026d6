"""Classification of scikit-learn's bundled tabular data sets (no download) by an MLP: ``wine`` (178 rows,
13 features, 3 classes) and ``breast_cancer`` (569 rows, 30 features, 2 classes).

Each data set is split once, by a fixed ``split_seed``, into disjoint ``train`` / ``val`` / ``test`` rows and
standardised with the training rows' mean and standard deviation. These data sources are for held-out tasks:
no meta-training family reads them.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Optional, Tuple

import torch

from ..validate import SPLITS, check_choice
from .models import build_module
from .supervised import MLP, SupervisedTask

DATASETS = ("wine", "breast_cancer")


@lru_cache(maxsize=None)
def _load(name: str, split_seed: int, val_frac: float, test_frac: float):
    from sklearn import datasets

    d = getattr(datasets, f"load_{name}")()
    x = torch.tensor(d.data, dtype=torch.float64)
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(split_seed))
    n_test, n_val = round(test_frac * x.shape[0]), round(val_frac * x.shape[0])
    rows = {"test": perm[:n_test], "val": perm[n_test:n_test + n_val], "train": perm[n_test + n_val:]}
    mean, std = x[rows["train"]].mean(0), x[rows["train"]].std(0).clamp_min(1e-12)
    return {split: ((x[rows[split]] - mean) / std, y[rows[split]]) for split in SPLITS}


def tabular_splits(name: str, split_seed: int = 0, val_frac: float = 0.2, test_frac: float = 0.2):
    """The fixed, disjoint, standardised train / val / test rows of data set ``name`` (float64 features,
    integer labels); the statistics are the training rows'."""
    check_choice("tabular data set", name, DATASETS)
    if not (0 < val_frac and 0 < test_frac and val_frac + test_frac < 1):
        raise ValueError(f"val_frac and test_frac must be > 0 with a sum < 1, got {val_frac!r}, {test_frac!r}")
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
