"""Supervised tasks on any ``nn.Module`` learner, run functionally through :mod:`learned_opt.functional`.

Also holds ``MLP``, the fully connected learner used by the MetaNet and digits tasks.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..functional import FunctionalModule
from ..validate import check_choice, check_split
from .base import sample_minibatch

ACTIVATIONS = {"relu": nn.ReLU, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh}
LOSSES = ("mse", "cross_entropy")


class MLP(nn.Sequential):
    """Fully connected network ``sizes[0] -> ... -> sizes[-1]`` with one activation after each hidden layer.

    ``output_activation=True`` applies the activation after the last layer too.
    """

    def __init__(self, sizes: Sequence[int], activation: str = "relu", output_activation: bool = False):
        if len(sizes) < 2 or any(int(s) < 1 for s in sizes):
            raise ValueError(f"sizes must list at least two positive widths, got {list(sizes)!r}")
        check_choice("activation", activation, ACTIVATIONS)
        layers: List[nn.Module] = []
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
            layers.append(nn.Linear(a, b))
            if i < len(sizes) - 2 or output_activation:
                layers.append(ACTIVATIONS[activation]())
        super().__init__(*layers)
        self.sizes, self.activation = tuple(sizes), activation


class SupervisedTask:
    """A learner module, data splits ``{'train': (x, y), 'val': ..., 'test': ...}`` and a loss.

    ``backend`` chooses how the module runs functionally (``"higher"`` or ``"func"``; ``None``: the
    ``LEARNED_OPT_FUNCTIONAL`` environment variable, else ``"higher"``; see :mod:`learned_opt.functional`).
    """
    num_problems = 1

    def __init__(self, module: nn.Module, data: Dict[str, Tuple[Tensor, Tensor]], loss: str = "mse",
                 batch_size: Optional[int] = None, eval_batch_size: Optional[int] = None,
                 backend: Optional[str] = None):
        check_choice("loss", loss, LOSSES)
        self.fn = FunctionalModule(module, backend)
        self.data, self.loss_name = data, loss
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size

    def init(self, generator: torch.Generator) -> List[Tensor]:
        """Parameters from the module's default initialisation, seeded by ``generator``."""
        device = self.data["train"][0].device
        return [p.to(device) for p in self.fn.init_params(generator)]

    def sample_batch(self, generator: torch.Generator, split: str = "train"):
        """A minibatch from ``train``; the full split (or ``eval_batch_size`` rows) otherwise."""
        check_split(split)
        x, y = self.data[split]
        size = self.batch_size if split == "train" else self.eval_batch_size
        return sample_minibatch(x, y, size, generator)

    def losses(self, params: Sequence[Tensor], batch) -> Tensor:
        """Mean loss over the batch, shape ``(1,)``."""
        x, y = batch
        out = self.fn(params, x)
        if self.loss_name == "mse":
            value = F.mse_loss(out, y)
        else:
            value = F.cross_entropy(out, y)
        return value.reshape(1)

    def loss(self, params: Sequence[Tensor], batch) -> Tensor:
        """Scalar mean loss over the batch."""
        return self.losses(params, batch)[0]

    def split_losses(self, params: Sequence[Tensor], split: str) -> Tensor:
        """Loss on the *whole* ``split`` (every example, no sampling), shape ``(1,)``."""
        check_split(split)
        return self.losses(params, self.data[split])

    def accuracy(self, params: Sequence[Tensor], split: str = "test") -> float:
        """Classification accuracy on a whole split (cross-entropy tasks only)."""
        if self.loss_name != "cross_entropy":
            raise ValueError("accuracy is defined for classification tasks only")
        x, y = self.data[split]
        with torch.no_grad():
            return float((self.fn(params, x).argmax(-1) == y).float().mean())
