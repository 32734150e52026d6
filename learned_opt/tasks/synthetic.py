"""Synthetic task families: linear and logistic regression, a teacher-student MLP regression with student width
variety, and next-token prediction on random Markov chains (recurrent or transformer learner).

Each task's generator first draws the task's ground truth (weights, class means, teacher, transition matrix), then
independent ``train`` / ``val`` / ``test`` samples of fixed sizes. Tasks of a family thus differ by the drawn
problem, and (through the generators passed to ``init`` / ``sample_batch``) by initialisation and data order.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from ..validate import SPLITS, check_choice, check_positive_int
from .metanet import MetaNetRegression
from .models import CELLS, RNNSequenceModel, TinyTransformer, build_module
from .supervised import SupervisedTask

Splits = Dict[str, Tuple[Tensor, Tensor]]


def draw_splits(sample: Callable[[int], Tuple[Tensor, Tensor]], sizes: Sequence[int], dtype=torch.float32,
                device="cpu") -> Splits:
    """``{'train': sample(sizes[0]), 'val': sample(sizes[1]), 'test': sample(sizes[2])}``, independent draws in
    that order; floating tensors cast to ``dtype``, all moved to ``device``."""
    if len(sizes) != len(SPLITS):
        raise ValueError(f"sizes must give {len(SPLITS)} split sizes (train, val, test), got {list(sizes)!r}")
    for split, n in zip(SPLITS, sizes):
        check_positive_int(f"{split} size", n)

    def cast(t: Tensor) -> Tensor:
        return t.to(device=device, dtype=dtype) if t.is_floating_point() else t.to(device)

    return {split: tuple(cast(t) for t in sample(n)) for split, n in zip(SPLITS, sizes)}


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator, dtype=torch.float64))


def _randint(generator: torch.Generator, low: int, high: int) -> int:
    """An integer in ``[low, high]`` (both included)."""
    return int(torch.randint(low, high + 1, (), generator=generator))


class _DrawnFamily:
    """What the families whose data are drawn from the task's generator share: the task over splits that
    ``sample`` draws (:func:`draw_splits`: train, val, test in that order) and the learner ``factory`` builds."""
    sizes: Tuple[int, int, int]
    batch_size: Optional[int]
    dtype: torch.dtype
    device: str
    backend: Optional[str]

    def _task(self, sample: Callable[[int], Tuple[Tensor, Tensor]], factory: Callable[[], nn.Module],
              loss: str) -> SupervisedTask:
        data = draw_splits(sample, self.sizes, self.dtype, self.device)
        module = build_module(factory, self.dtype, self.device)
        return SupervisedTask(module, data, loss, self.batch_size, backend=self.backend)


@dataclass(frozen=True)
class LinearRegressionFamily(_DrawnFamily):
    """``y = x w + b + noise`` with a random dimension in ``dims`` (inclusive), features of log-uniform scales in
    ``[1 / feature_scale, feature_scale]`` (ill-conditioning) and noise std uniform in ``noise``; a linear layer
    learns it under MSE."""
    dims: Tuple[int, int] = (5, 30)
    feature_scale: float = 3.0
    noise: Tuple[float, float] = (0.05, 0.5)
    sizes: Tuple[int, int, int] = (512, 256, 256)
    batch_size: Optional[int] = 64
    dtype: torch.dtype = torch.float32
    device: str = "cpu"
    backend: Optional[str] = None

    def __call__(self, generator: torch.Generator) -> SupervisedTask:
        """A fresh task: a new dimension, weights, feature scales, noise level and data."""
        d = _randint(generator, *self.dims)
        w = torch.randn((d, 1), generator=generator) / math.sqrt(d)
        b = 0.5 * torch.randn((1,), generator=generator)
        scale = torch.exp((torch.rand(d, generator=generator) * 2 - 1) * math.log(self.feature_scale))
        noise = _uniform(generator, *self.noise)

        def sample(n):
            z = torch.randn((n, d), generator=generator)
            return z * scale, z @ w + b + noise * torch.randn((n, 1), generator=generator)

        return self._task(sample, lambda: nn.Linear(d, 1), "mse")


@dataclass(frozen=True)
class LogisticRegressionFamily(_DrawnFamily):
    """Gaussian-mixture classification: ``classes`` (inclusive range) unit-variance clusters in a random
    dimension from ``dims``, their means ``separation / sqrt(d)`` times a standard normal vector; a linear
    classifier learns it under cross-entropy."""
    dims: Tuple[int, int] = (5, 20)
    classes: Tuple[int, int] = (2, 5)
    separation: float = 3.0
    sizes: Tuple[int, int, int] = (512, 256, 256)
    batch_size: Optional[int] = 64
    dtype: torch.dtype = torch.float32
    device: str = "cpu"
    backend: Optional[str] = None

    def __call__(self, generator: torch.Generator) -> SupervisedTask:
        """A fresh task: a new dimension, number of classes, class means and data."""
        d = _randint(generator, *self.dims)
        c = _randint(generator, *self.classes)
        means = torch.randn((c, d), generator=generator) * self.separation / math.sqrt(d)

        def sample(n):
            y = torch.randint(c, (n,), generator=generator)
            return means[y] + torch.randn((n, d), generator=generator), y

        return self._task(sample, lambda: nn.Linear(d, c), "cross_entropy")


STUDENT_ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU}


@dataclass(frozen=True)
class TeacherMLPFamily:
    """Regression of a random tanh teacher MLP plus noise (the teacher and data of
    :class:`~learned_opt.tasks.metanet.MetaNetRegression`) by a student ``in -> width -> out`` with a width drawn
    from ``widths`` and an activation from ``activations``: a family whose learners vary in width."""
    in_dim: int = 8
    out_dim: int = 2
    widths: Tuple[int, ...] = (16, 32)
    activations: Tuple[str, ...] = ("relu", "gelu")
    teacher_hidden: int = 32
    noise: float = 0.1
    sizes: Tuple[int, int, int] = (512, 256, 256)
    batch_size: Optional[int] = 64
    dtype: torch.dtype = torch.float32
    device: str = "cpu"
    backend: Optional[str] = None

    def __post_init__(self):
        bad = [a for a in self.activations if a not in STUDENT_ACTIVATIONS]
        if bad or not self.activations or not self.widths:
            raise ValueError(f"activations must be a non-empty subset of {', '.join(STUDENT_ACTIVATIONS)} and "
                             f"widths non-empty, got {self.activations!r}, {self.widths!r}")

    def __call__(self, generator: torch.Generator) -> SupervisedTask:
        """A fresh task: a new teacher and data, a student width and activation."""
        width = self.widths[_randint(generator, 0, len(self.widths) - 1)]
        act = STUDENT_ACTIVATIONS[self.activations[_randint(generator, 0, len(self.activations) - 1)]]
        # The MetaNet regression draws exactly this teacher and its data; reuse it rather than copy it (its own
        # student, hidden=1, is unused and costs nothing).
        n_train, n_val, n_test = self.sizes
        data = MetaNetRegression(generator, self.in_dim, 1, self.out_dim, n_train=n_train, n_val=n_val,
                                 n_test=n_test, noise=self.noise, teacher_hidden=self.teacher_hidden,
                                 dtype=self.dtype, device=self.device).data
        module = build_module(lambda: nn.Sequential(nn.Linear(self.in_dim, width), act(),
                                                    nn.Linear(width, self.out_dim)), self.dtype, self.device)
        return SupervisedTask(module, data, "mse", self.batch_size, backend=self.backend)


class SequenceTask(SupervisedTask):
    """A :class:`SupervisedTask` whose learner returns per-position logits ``(N, vocab, length)`` for integer
    targets ``(N, length)``: the loss is the mean cross-entropy over every position."""

    def __init__(self, module: nn.Module, data: Splits, batch_size: Optional[int] = None,
                 backend: Optional[str] = None):
        super().__init__(module, data, "cross_entropy", batch_size, backend=backend)

    def accuracy(self, params: Sequence[Tensor], split: str = "test") -> float:
        """Next-token accuracy over every position of a whole split."""
        x, y = self.data[split]
        with torch.no_grad():
            return float((self.fn(params, x).argmax(1) == y).float().mean())


def markov_chain(generator: torch.Generator, vocab: int, order: int, temperature: float) -> Tensor:
    """Transition probabilities ``(vocab ** order, vocab)`` of a random order-``order`` chain: a softmax of
    ``temperature`` times standard normal logits (larger: more predictable)."""
    logits = temperature * torch.randn((vocab ** order, vocab), generator=generator, dtype=torch.float64)
    return torch.softmax(logits, -1)


def sample_markov(generator: torch.Generator, probs: Tensor, order: int, n: int, length: int) -> Tensor:
    """``n`` token sequences of ``length`` from the chain ``probs``; the first ``order`` tokens uniform."""
    vocab = probs.shape[1]
    seq = torch.randint(vocab, (n, order), generator=generator)
    for _ in range(length - order):
        state = torch.zeros(n, dtype=torch.long)
        for j in range(order):
            state = state * vocab + seq[:, seq.shape[1] - order + j]
        nxt = torch.multinomial(probs[state], 1, generator=generator)
        seq = torch.cat([seq, nxt], 1)
    return seq


SEQUENCE_MODELS = ("rnn", "transformer")


@dataclass(frozen=True)
class MarkovSequenceFamily:
    """Next-token prediction on sequences of a random Markov chain (``vocab`` tokens, ``order``, ``length``
    inputs), learned by a recurrent network (``model='rnn'``, an Elman or GRU ``cell`` of ``hidden`` units) or a
    one-layer transformer (``model='transformer'``, ``d_model``, ``heads``). Inputs are tokens ``0..length-1`` of
    a sampled sequence, targets tokens ``1..length``."""
    model: str = "rnn"
    cell: str = "elman"
    vocab: int = 8
    order: int = 2
    length: int = 12
    temperature: float = 2.0
    hidden: int = 16
    d_model: int = 16
    heads: int = 2
    sizes: Tuple[int, int, int] = (512, 256, 256)
    batch_size: Optional[int] = 64
    dtype: torch.dtype = torch.float32
    device: str = "cpu"
    backend: Optional[str] = None

    def __post_init__(self):
        check_choice("sequence model", self.model, SEQUENCE_MODELS)
        check_choice("recurrent cell", self.cell, CELLS)
        for name in ("vocab", "order", "length"):
            check_positive_int(name, getattr(self, name))
        if self.order >= self.length:
            raise ValueError(f"order={self.order} must be smaller than length={self.length}")

    def __call__(self, generator: torch.Generator) -> SequenceTask:
        """A fresh task: a new chain and new sequences."""
        probs = markov_chain(generator, self.vocab, self.order, self.temperature)

        def sample(n):
            seq = sample_markov(generator, probs, self.order, n, self.length + 1)
            return seq[:, :-1], seq[:, 1:]

        data = draw_splits(sample, self.sizes, self.dtype, self.device)
        if self.model == "rnn":
            factory = lambda: RNNSequenceModel(self.vocab, self.hidden, self.cell)  # noqa: E731
        else:
            factory = lambda: TinyTransformer(self.vocab, self.d_model, self.heads, self.length)  # noqa: E731
        return SequenceTask(build_module(factory, self.dtype, self.device), data, self.batch_size, self.backend)
