"""``MetaNet``, the project's reference learner, and a teacher-student regression task that can overfit.

``MetaNet`` is an MLP of three fully connected layers (10 -> 10 -> 10 -> 10 by default). The reference design
applies the activation after all three layers (``output_activation=True``); the regression task uses a linear
output by default because a ReLU output cannot fit negative targets. Targets come from a random teacher network
plus Gaussian noise; the training set is small (it overfits), validation and test sets are large.

:class:`ShiftedMetaNetRegression` trains the same learner, wider, on data of another distribution (correlated,
shifted inputs; a sinusoidal teacher; Laplace noise): held-out tasks for optimizers meta-trained on the first.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from ..validate import check_positive_int
from .base import random_rotation
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


class ShiftedMetaNetRegression(SupervisedTask):
    """A student :class:`MetaNet` (``in -> hidden -> hidden -> out``, relu, linear output) on data of another
    distribution than :class:`MetaNetRegression`'s, for held-out tasks. What differs, besides the width:

    - inputs: correlated and shifted, ``x = mean + (z * scales) Q`` with ``z`` standard normal, ``Q`` a random
      rotation and per-axis ``scales`` log-spaced over ``[input_scales[0], input_scales[1]]`` (so the input
      covariance has condition number ``(hi / lo) ** 2``), ``mean`` standard normal times ``mean_scale``; MetaNet's
      inputs are isotropic standard normal;
    - teacher: random sinusoidal features ``y = sqrt(2 / F) * sin(x A + b) B`` (``A`` normal with standard deviation
      ``frequency / sqrt(in_dim)``, ``b`` uniform phases, ``B`` standard normal, ``F = features``); MetaNet's is a
      tanh MLP;
    - noise: Laplace (heavy-tailed) with a scale uniform in ``noise``; MetaNet's is Gaussian of std 0.5;
    - sizes: ``n_train`` training points (MetaNet: 32).
    """

    def __init__(self, generator: torch.Generator, in_dim: int = 10, hidden: int = 24, out_dim: int = 10,
                 n_train: int = 64, n_val: int = 256, n_test: int = 256, input_scales=(0.3, 3.0),
                 mean_scale: float = 1.0, features: int = 32, frequency: float = 1.0, noise=(0.05, 0.3),
                 batch_size: Optional[int] = None, dtype=torch.float32, device="cpu"):
        for name, v in (("n_train", n_train), ("n_val", n_val), ("n_test", n_test), ("features", features)):
            check_positive_int(name, v)
        lo, hi = input_scales
        if not (0 < lo <= hi and 0 <= noise[0] <= noise[1]):
            raise ValueError(f"need 0 < input_scales[0] <= input_scales[1] and 0 <= noise[0] <= noise[1], got "
                             f"{input_scales!r}, {noise!r}")
        f64 = dict(generator=generator, dtype=torch.float64)
        rot = random_rotation(generator, in_dim)
        scales = torch.logspace(math.log10(lo), math.log10(hi), in_dim, dtype=torch.float64)
        mean = mean_scale * torch.randn(in_dim, **f64)
        a = torch.randn((in_dim, features), **f64) * frequency / math.sqrt(in_dim)
        b = 2 * math.pi * torch.rand(features, **f64)
        w = torch.randn((features, out_dim), **f64) * math.sqrt(2.0 / features)
        scale = noise[0] + (noise[1] - noise[0]) * float(torch.rand((), **f64))
        data = {}
        for split, n in (("train", n_train), ("val", n_val), ("test", n_test)):
            x = mean + (torch.randn((n, in_dim), **f64) * scales) @ rot
            u = torch.rand((n, out_dim), **f64).clamp(1e-12, 1 - 1e-12) - 0.5
            laplace = -scale * torch.sign(u) * torch.log1p(-2 * u.abs())
            y = torch.sin(x @ a + b) @ w + laplace
            data[split] = (x.to(device=device, dtype=dtype), y.to(device=device, dtype=dtype))
        self.input_rotation, self.input_scales, self.noise_scale = rot, scales, scale
        with torch.random.fork_rng(devices=[]):
            student = MetaNet(in_dim, hidden, out_dim, "relu", False).to(device=device, dtype=dtype)
        super().__init__(student, data, "mse", batch_size)


@dataclass(frozen=True)
class ShiftedMetaNetFamily:
    """Samples :class:`ShiftedMetaNetRegression` tasks: a new input distribution, teacher, noise scale and data
    each time, and a student width drawn from ``widths``. For held-out tests of optimizers meta-trained on
    :class:`MetaNetFamily` (see the class for what differs)."""
    in_dim: int = 10
    widths: Tuple[int, ...] = (20, 32)
    out_dim: int = 10
    n_train: int = 64
    n_val: int = 256
    n_test: int = 256
    input_scales: Tuple[float, float] = (0.3, 3.0)
    noise: Tuple[float, float] = (0.05, 0.3)
    batch_size: Optional[int] = None
    dtype: torch.dtype = torch.float32
    device: str = "cpu"

    def __post_init__(self):
        if not self.widths or any(int(w) < 1 for w in self.widths):
            raise ValueError(f"widths must list positive widths, got {self.widths!r}")

    def __call__(self, generator: torch.Generator) -> ShiftedMetaNetRegression:
        """A fresh task."""
        width = self.widths[int(torch.randint(len(self.widths), (), generator=generator))]
        return ShiftedMetaNetRegression(generator, self.in_dim, width, self.out_dim, self.n_train, self.n_val,
                                        self.n_test, self.input_scales, noise=self.noise,
                                        batch_size=self.batch_size, dtype=self.dtype, device=self.device)
