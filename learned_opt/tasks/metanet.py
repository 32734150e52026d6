"""``MetaNet``, the project's reference learner, and a teacher-student regression task that can overfit.

``MetaNet`` is an MLP of three fully connected layers (10 -> 10 -> 10 -> 10 by default). The reference design
applies the activation after all three layers (``output_activation=True``); the regression task uses a linear
output by default because a ReLU output cannot fit negative targets. Targets come from a random teacher network
plus Gaussian noise; the training set is small (it overfits), validation and test sets are large.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..validate import check_positive_int
from .supervised import MLP, SupervisedTask


class MetaNet(MLP):
    """The reference learner: three fully connected layers, ``in -> hidden -> hidden -> out``."""

    def __init__(self, in_dim: int = 10, hidden: int = 10, out_dim: int = 10, activation: str = "relu",
                 output_activation: bool = True):
        super().__init__([in_dim, hidden, hidden, out_dim], activation, output_activation)


class MetaNetRegression(SupervisedTask):
    """Regression of a random teacher ``MetaNet`` plus noise, learned by a student ``MetaNet``."""

    def __init__(self, generator: torch.Generator, in_dim: int = 10, hidden: int = 10, out_dim: int = 10,
                 activation: str = "relu", output_activation: bool = False, n_train: int = 32,
                 n_val: int = 256, n_test: int = 256, noise: float = 0.5, teacher_hidden: int = 32,
                 batch_size: Optional[int] = None, dtype=torch.float32, device="cpu"):
        for name, v in (("n_train", n_train), ("n_val", n_val), ("n_test", n_test)):
            check_positive_int(name, v)
        if not noise >= 0:
            raise ValueError(f"noise must be >= 0, got {noise!r}")
        # Building modules runs their default init on the global RNG: fork it so tasks leave no trace there.
        with torch.random.fork_rng(devices=[]):
            teacher = MLP([in_dim, teacher_hidden, teacher_hidden, out_dim], "tanh")
        seed = int(torch.randint(0, 2**62, (1,), generator=generator).item())
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for m in teacher.modules():
                if isinstance(m, torch.nn.Linear):
                    torch.nn.init.normal_(m.weight, std=1.5 / m.in_features ** 0.5)
                    torch.nn.init.normal_(m.bias, std=0.1)
        data = {}
        with torch.no_grad():
            for split, n in (("train", n_train), ("val", n_val), ("test", n_test)):
                x = torch.randn((n, in_dim), generator=generator)
                y = teacher(x) + noise * torch.randn((n, out_dim), generator=generator)
                data[split] = (x.to(device=device, dtype=dtype), y.to(device=device, dtype=dtype))
        with torch.random.fork_rng(devices=[]):
            student = MetaNet(in_dim, hidden, out_dim, activation, output_activation).to(device=device,
                                                                                            dtype=dtype)
        super().__init__(student, data, "mse", batch_size)


@dataclass(frozen=True)
class MetaNetFamily:
    """Samples :class:`MetaNetRegression` tasks (new teacher, data and noise each time)."""
    in_dim: int = 10
    hidden: int = 10
    out_dim: int = 10
    activation: str = "relu"
    output_activation: bool = False
    n_train: int = 32
    n_val: int = 256
    n_test: int = 256
    noise: float = 0.5
    batch_size: Optional[int] = None
    dtype: torch.dtype = torch.float32
    device: str = "cpu"

    def __call__(self, generator: torch.Generator) -> MetaNetRegression:
        """A fresh task."""
        return MetaNetRegression(generator, self.in_dim, self.hidden, self.out_dim, self.activation,
                                 self.output_activation, self.n_train, self.n_val, self.n_test, self.noise,
                                 batch_size=self.batch_size, dtype=self.dtype, device=self.device)
