"""Meta-training families of convolutional, recurrent and attention learners on new synthetic data.

The held-out families test the CNN on digits, the Elman RNN and the one-layer transformer on next-token prediction
of random Markov chains, and the transformer language model on text. These families give meta-training the same
architecture classes on data that none of those read, so the held-out families stay held out by their data:

* :class:`SyntheticImageFamily`: a small CNN classifying single-channel synthetic images, either oriented bars
  (the class is the orientation) or Gaussian-smoothed noise labelled by a random frozen teacher CNN;
* :class:`AssociativeRecallFamily`: an Elman or GRU RNN reads key-value pairs then a query key and predicts the
  query's value (associative recall, as in Graves et al. 2014, Ba et al. 2016);
* :class:`SortingFamily`: a one-layer non-causal pre-LN transformer outputs its input integers sorted.

As in :mod:`.synthetic`, a task's generator first draws the task's sizes (architecture width and depth, batch size,
training-set size) and ground truth (teacher, orientations, vocabulary), then the ``train``, ``val`` and ``test``
data in that order, so a task seed fixes everything; the init and data order come from the generators of ``init``
and ``sample_batch``. Token sequences are unique across and within splits (:func:`draw_unique_splits`), so the
validation and test sequences are never trained on; continuous images do not repeat.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..validate import SPLITS, check_choice, check_positive_int
from .models import CELLS, Block, ConvNet, RNNSequenceModel, build_module
from .supervised import SupervisedTask
from .synthetic import SequenceTask, Splits, _randint, _uniform, draw_splits

BATCH_SIZES = (16, 32, 64, 128)
TRAIN_SIZES = (256, 512, 1024, 2048)


def _choice(generator: torch.Generator, options: Sequence):
    """One of ``options``, uniformly."""
    return options[_randint(generator, 0, len(options) - 1)]


def _check_options(**options) -> None:
    for name, values in options.items():
        if not values or any(int(v) < 1 for v in values):
            raise ValueError(f"{name} must be a non-empty tuple of positive integers, got {values!r}")


# ---------------------------------------------------------------------------------------------------- learners
class OneConvNet(nn.Module):
    """``(N, side * side)`` images -> conv 1->c 3x3 stride 2 -> relu -> flatten -> linear: the one-layer sibling of
    :class:`~learned_opt.tasks.models.ConvNet`."""

    def __init__(self, channels: int = 8, num_classes: int = 4, side: int = 8):
        super().__init__()
        self.side = side
        self.conv = nn.Conv2d(1, channels, 3, stride=2, padding=1)
        out_side = (side + 1) // 2
        self.head = nn.Linear(channels * out_side * out_side, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Class logits of flattened single-channel images."""
        h = F.relu(self.conv(x.reshape(x.shape[0], 1, self.side, self.side)))
        return self.head(h.flatten(1))


class LastPosition(nn.Module):
    """A sequence model's logits ``(N, vocab, length)`` at the last position only: ``(N, vocab)``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, tokens: Tensor) -> Tensor:
        """Logits for the answer after the last token of ``tokens`` ``(N, length)``."""
        return self.model(tokens)[:, :, -1]


class SequenceEncoder(nn.Module):
    """A non-causal transformer on token sequences of a fixed ``length``: token + learned position embeddings ->
    ``layers`` pre-LN :class:`~learned_opt.tasks.models.Block` s with no mask -> LayerNorm -> per-position logits
    ``(N, vocab, length)`` (class dimension 1, as the other sequence models)."""

    def __init__(self, vocab: int, d_model: int = 16, heads: int = 2, length: int = 8, layers: int = 1,
                 mlp_ratio: int = 2):
        super().__init__()
        for name, v in (("vocab", vocab), ("length", length), ("layers", layers)):
            check_positive_int(name, v)
        self.length = length
        self.tok = nn.Embedding(vocab, d_model)
        self.pos = nn.Embedding(length, d_model)
        self.blocks = nn.ModuleList(Block(d_model, heads, mlp_ratio, causal=False) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab)

    def forward(self, tokens: Tensor) -> Tensor:
        """Per-position logits of ``tokens`` ``(N, length)``."""
        if tokens.shape[1] != self.length:
            raise ValueError(f"sequence length {tokens.shape[1]} differs from length={self.length}")
        # positions through the module call, not .weight: higher binds a submodule's parameters when it runs
        x = self.tok(tokens) + self.pos(torch.arange(self.length, device=tokens.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x)).transpose(1, 2)


# ---------------------------------------------------------------------------------------------------- image data
def _grid(side: int) -> Tuple[Tensor, Tensor]:
    """Pixel-centre coordinates ``(side * side,)`` each, row-major, centred on the image centre."""
    c = torch.arange(side, dtype=torch.float64) - (side - 1) / 2
    yy, xx = torch.meshgrid(c, c, indexing="ij")
    return xx.reshape(-1), yy.reshape(-1)


def bar_images(generator: torch.Generator, n: int, side: int, angles: Tensor, width: float, jitter: float,
               noise: float) -> Tuple[Tensor, Tensor]:
    """``n`` images ``(n, side * side)`` of one bar each and their classes: class ``c`` is a bar at angle
    ``angles[c]`` (plus a uniform jitter of at most ``jitter`` radians), through a random point of the central
    half, of random half-length (a quarter to a half of the side) and contrast (0.5-1.5), Gaussian profile of
    std ``width`` pixels, plus white noise of std ``noise``."""
    y = torch.randint(len(angles), (n,), generator=generator)
    theta = angles[y] + jitter * (2 * torch.rand(n, generator=generator, dtype=torch.float64) - 1)
    centre = (torch.rand((n, 2), generator=generator, dtype=torch.float64) - 0.5) * side / 2
    half = side * (0.25 + 0.25 * torch.rand((n, 1), generator=generator, dtype=torch.float64))
    contrast = 0.5 + torch.rand((n, 1), generator=generator, dtype=torch.float64)
    gx, gy = _grid(side)
    dx, dy = gx - centre[:, :1], gy - centre[:, 1:]
    cos, sin = torch.cos(theta).unsqueeze(1), torch.sin(theta).unsqueeze(1)
    across, along = dx * sin - dy * cos, dx * cos + dy * sin
    beyond = F.relu(along.abs() - half)  # distance past the bar's end, along it
    x = contrast * torch.exp(-(across ** 2 + beyond ** 2) / (2 * width ** 2))
    return x + noise * torch.randn(x.shape, generator=generator, dtype=torch.float64), y


def smooth_noise(generator: torch.Generator, n: int, side: int, sigma: float) -> Tensor:
    """``n`` images ``(n, side * side)`` of white noise filtered by a Gaussian of std ``sigma`` pixels (computed
    on a margin, so no border effect), each standardised to zero mean and unit std."""
    r = max(1, math.ceil(2 * sigma))
    k = torch.exp(-(torch.arange(-r, r + 1, dtype=torch.float64) ** 2) / (2 * sigma ** 2))
    k = k / k.sum()
    z = torch.randn((n, 1, side + 2 * r, side + 2 * r), generator=generator, dtype=torch.float64)
    z = F.conv2d(F.conv2d(z, k.reshape(1, 1, -1, 1)), k.reshape(1, 1, 1, -1)).reshape(n, -1)
    return (z - z.mean(1, keepdim=True)) / z.std(1, keepdim=True)


class TeacherCNN:
    """A random frozen CNN (conv 1->``channels`` 3x3, tanh, linear to ``classes``) that labels images. Data, not a
    learner: it holds float64 tensors drawn from the task's generator and never trains."""

    def __init__(self, generator: torch.Generator, side: int, classes: int, channels: int = 4):
        self.side = side
        self.conv = torch.randn((channels, 1, 3, 3), generator=generator, dtype=torch.float64) / 3
        self.w = torch.randn((channels * side * side, classes), generator=generator, dtype=torch.float64) \
            / math.sqrt(channels * side * side)
        self.offset = torch.zeros(classes, dtype=torch.float64)

    def logits(self, x: Tensor) -> Tensor:
        """Teacher logits of flattened images, less the class offsets."""
        h = torch.tanh(F.conv2d(x.reshape(-1, 1, self.side, self.side), self.conv, padding=1))
        return h.flatten(1) @ self.w - self.offset

    def calibrate(self, x: Tensor) -> None:
        """Offsets that centre every class's logit on the images ``x`` (its median there), so that no class of a
        random teacher takes most of the images (the classes stay unequal, within about a factor of 2-3)."""
        self.offset = torch.zeros_like(self.offset)
        self.offset = self.logits(x).median(0).values

    def __call__(self, x: Tensor) -> Tensor:
        """Class labels of flattened images."""
        return self.logits(x).argmax(1)


IMAGE_PATTERNS = ("bars", "teacher")


@dataclass(frozen=True)
class SyntheticImageFamily:
    """Classification of synthetic ``side x side`` single-channel images (no digits) by a small CNN.

    A task draws: the image side (``sides``), the number of classes (``classes``, inclusive), the ``pattern``
    (``bars``: the class is a bar's orientation, ``classes`` orientations evenly spread from a random offset,
    with random bar width, orientation jitter and noise; ``teacher``: Gaussian-smoothed noise images of random
    smoothness labelled by a random frozen :class:`TeacherCNN`), then the learner: one conv layer of
    ``channels`` (:class:`OneConvNet`, stride 2) or two (:class:`~learned_opt.tasks.models.ConvNet`: stride 1, then
    stride 2), then a linear head; then its batch size and training-set size; validation and test sets have
    ``eval_sizes`` images."""
    sides: Tuple[int, ...] = (8, 10)
    classes: Tuple[int, int] = (3, 5)
    patterns: Tuple[str, ...] = IMAGE_PATTERNS
    depths: Tuple[int, ...] = (1, 2)
    channels: Tuple[int, ...] = (4, 8, 16)
    batch_sizes: Tuple[int, ...] = BATCH_SIZES
    train_sizes: Tuple[int, ...] = TRAIN_SIZES
    eval_sizes: Tuple[int, int] = (256, 256)
    dtype: torch.dtype = torch.float32
    device: str = "cpu"
    backend: Optional[str] = None

    def __post_init__(self):
        _check_options(sides=self.sides, depths=self.depths, channels=self.channels, batch_sizes=self.batch_sizes,
                       train_sizes=self.train_sizes, eval_sizes=self.eval_sizes)
        if not self.patterns:
            raise ValueError("patterns must be non-empty")
        for p in self.patterns:
            check_choice("image pattern", p, IMAGE_PATTERNS)
        if set(self.depths) - {1, 2} or not 2 <= self.classes[0] <= self.classes[1]:
            raise ValueError(f"depths must be 1 or 2 and classes a range from 2 up, got {self.depths!r}, "
                             f"{self.classes!r}")

    def _sampler(self, generator: torch.Generator, pattern: str, side: int,
                 classes: int) -> Callable[[int], Tuple[Tensor, Tensor]]:
        """The task's ground truth, drawn now; returns a sampler of ``n`` labelled images."""
        if pattern == "bars":
            offset = _uniform(generator, 0.0, math.pi / classes)
            angles = offset + math.pi * torch.arange(classes, dtype=torch.float64) / classes
            width, noise = _uniform(generator, 0.5, 1.0), _uniform(generator, 0.1, 0.6)
            jitter = _uniform(generator, 0.0, 0.4) * math.pi / classes
            return lambda n: bar_images(generator, n, side, angles, width, jitter, noise)
        sigma = _uniform(generator, 0.7, 1.5)
        teacher = TeacherCNN(generator, side, classes)
        teacher.calibrate(smooth_noise(generator, 1024, side, sigma))

        def sample(n):
            x = smooth_noise(generator, n, side, sigma)
            return x, teacher(x)
        return sample

    def __call__(self, generator: torch.Generator) -> SupervisedTask:
        """A fresh task: sizes, learner, ground truth and data drawn from ``generator``."""
        side, pattern = _choice(generator, self.sides), _choice(generator, self.patterns)
        classes = _randint(generator, *self.classes)
        depth = _choice(generator, self.depths)
        widths = tuple(sorted(_choice(generator, self.channels) for _ in range(depth)))
        batch, n_train = _choice(generator, self.batch_sizes), _choice(generator, self.train_sizes)
        sample = self._sampler(generator, pattern, side, classes)
        data = draw_splits(sample, (n_train, *self.eval_sizes), self.dtype, self.device)
        if depth == 1:
            factory = lambda: OneConvNet(widths[0], classes, side)  # noqa: E731
        else:
            factory = lambda: ConvNet(widths, classes, side)  # noqa: E731
        task = SupervisedTask(build_module(factory, self.dtype, self.device), data, "cross_entropy", batch,
                              backend=self.backend)
        task.pattern, task.side, task.classes, task.channels = pattern, side, classes, widths
        return task


# ---------------------------------------------------------------------------------------------------- sequence data
def draw_unique_splits(sample: Callable[[int], Tuple[Tensor, Tensor]], sizes: Sequence[int], device="cpu",
                       max_rounds: int = 50) -> Splits:
    """Like :func:`~learned_opt.tasks.synthetic.draw_splits` for integer data, but no input row occurs twice in one
    split or in two splits: ``train``, ``val``, ``test`` are drawn in that order, each in rounds of ``sample(n)``
    for the rows still missing, dropping every row seen before (the result depends on the generator only)."""
    if len(sizes) != len(SPLITS):
        raise ValueError(f"sizes must give {len(SPLITS)} split sizes (train, val, test), got {list(sizes)!r}")
    seen, out = set(), {}
    for split, n in zip(SPLITS, sizes):
        check_positive_int(f"{split} size", n)
        xs, ys, have = [], [], 0
        for _ in range(max_rounds):
            if have == n:
                break
            x, y = sample(n - have)
            keep = []
            for i, row in enumerate(x.tolist()):
                key = tuple(row)
                if key not in seen:
                    seen.add(key)
                    keep.append(i)
            keep = torch.tensor(keep, dtype=torch.long)
            xs.append(x[keep])
            ys.append(y[keep])
            have += len(keep)
        if have < n:
            raise ValueError(f"could not draw {n} distinct {split} sequences in {max_rounds} rounds: the space of "
                             "sequences is too small for the split sizes")
        out[split] = (torch.cat(xs).to(device), torch.cat(ys).to(device))
    return out


def recall_sequences(generator: torch.Generator, n: int, pairs: int, keys: int,
                     values: int) -> Tuple[Tensor, Tensor]:
    """``n`` associative-recall sequences ``k_1 v_1 ... k_pairs v_pairs q`` ``(n, 2 * pairs + 1)`` and their
    answers ``(n,)``: distinct keys (tokens ``0..keys-1``), values (tokens ``keys..keys+values-1``) drawn
    independently, and a query ``q``, one of the sequence's keys; the answer is the value paired with ``q``."""
    k = torch.rand((n, keys), generator=generator).argsort(1)[:, :pairs]  # distinct keys per sequence
    v = keys + torch.randint(values, (n, pairs), generator=generator)
    which = torch.randint(pairs, (n, 1), generator=generator)
    seq = torch.stack([k, v], 2).reshape(n, 2 * pairs)
    return torch.cat([seq, k.gather(1, which)], 1), v.gather(1, which).squeeze(1)


@dataclass(frozen=True)
class AssociativeRecallFamily:
    """Associative recall (:func:`recall_sequences`) by a recurrent network
    (:class:`~learned_opt.tasks.models.RNNSequenceModel`, an Elman or GRU ``cell``), its logits at the query's
    position (:class:`LastPosition`) over the whole vocabulary, under cross-entropy.

    A task draws the number of ``pairs``, of ``keys`` and of ``values`` (inclusive ranges), the cell, the hidden
    width, its batch size and training-set size; validation and test sets have ``eval_sizes`` sequences, none of
    them a training sequence (:func:`draw_unique_splits`)."""
    pairs: Tuple[int, int] = (2, 4)
    keys: Tuple[int, int] = (8, 12)
    values: Tuple[int, int] = (8, 12)
    cells: Tuple[str, ...] = CELLS
    hidden: Tuple[int, ...] = (8, 16, 32)
    batch_sizes: Tuple[int, ...] = BATCH_SIZES
    train_sizes: Tuple[int, ...] = TRAIN_SIZES
    eval_sizes: Tuple[int, int] = (256, 256)
    dtype: torch.dtype = torch.float32
    device: str = "cpu"
    backend: Optional[str] = None

    def __post_init__(self):
        _check_options(hidden=self.hidden, batch_sizes=self.batch_sizes, train_sizes=self.train_sizes,
                       eval_sizes=self.eval_sizes)
        if not self.cells:
            raise ValueError("cells must be non-empty")
        for c in self.cells:
            check_choice("recurrent cell", c, CELLS)
        if not (1 <= self.pairs[0] <= self.pairs[1] <= self.keys[0] <= self.keys[1]) or self.values[0] < 2:
            raise ValueError(f"need 1 <= pairs <= keys and values >= 2, got pairs={self.pairs!r}, "
                             f"keys={self.keys!r}, values={self.values!r}")

    def __call__(self, generator: torch.Generator) -> SupervisedTask:
        """A fresh task: sizes, learner and sequences drawn from ``generator``."""
        pairs, keys, values = (_randint(generator, *r) for r in (self.pairs, self.keys, self.values))
        cell, hidden = _choice(generator, self.cells), _choice(generator, self.hidden)
        batch, n_train = _choice(generator, self.batch_sizes), _choice(generator, self.train_sizes)
        data = draw_unique_splits(lambda n: recall_sequences(generator, n, pairs, keys, values),
                                  (n_train, *self.eval_sizes), self.device)
        factory = lambda: LastPosition(RNNSequenceModel(keys + values, hidden, cell))  # noqa: E731
        task = SupervisedTask(build_module(factory, self.dtype, self.device), data, "cross_entropy", batch,
                              backend=self.backend)
        task.pairs, task.keys, task.values, task.cell, task.hidden = pairs, keys, values, cell, hidden
        return task


def sorting_sequences(generator: torch.Generator, n: int, length: int, vocab: int) -> Tuple[Tensor, Tensor]:
    """``n`` sequences of ``length`` integers uniform in ``0..vocab-1`` and the same sequences sorted."""
    x = torch.randint(vocab, (n, length), generator=generator)
    return x, x.sort(1).values


@dataclass(frozen=True)
class SortingFamily:
    """Sorting small integers (:func:`sorting_sequences`) by a one-layer non-causal transformer
    (:class:`SequenceEncoder`): position ``i`` of the output is the ``i``-th smallest input, under the mean
    cross-entropy over positions (:class:`~learned_opt.tasks.synthetic.SequenceTask`).

    A task draws the sequence ``length`` and the ``vocab`` size (inclusive ranges), the width ``d_model``
    (``heads`` heads), its batch size and training-set size; validation and test sets have ``eval_sizes``
    sequences, none of them a training sequence (:func:`draw_unique_splits`)."""
    lengths: Tuple[int, int] = (5, 8)
    vocabs: Tuple[int, int] = (8, 16)
    widths: Tuple[int, ...] = (16, 24, 32)
    heads: int = 2
    layers: int = 1
    batch_sizes: Tuple[int, ...] = (16, 32, 64)  # batch 128 at length 8, width 32: about 3.5 ms per step
    train_sizes: Tuple[int, ...] = TRAIN_SIZES
    eval_sizes: Tuple[int, int] = (256, 256)
    dtype: torch.dtype = torch.float32
    device: str = "cpu"
    backend: Optional[str] = None

    def __post_init__(self):
        _check_options(widths=self.widths, batch_sizes=self.batch_sizes, train_sizes=self.train_sizes,
                       eval_sizes=self.eval_sizes)
        if any(w % self.heads for w in self.widths):
            raise ValueError(f"every width must be a multiple of heads={self.heads}, got {self.widths!r}")
        if not (2 <= self.lengths[0] <= self.lengths[1]) or not (2 <= self.vocabs[0] <= self.vocabs[1]):
            raise ValueError(f"lengths and vocabs must be ranges from 2 up, got {self.lengths!r}, {self.vocabs!r}")

    def __call__(self, generator: torch.Generator) -> SequenceTask:
        """A fresh task: sizes, learner and sequences drawn from ``generator``."""
        length, vocab = _randint(generator, *self.lengths), _randint(generator, *self.vocabs)
        width = _choice(generator, self.widths)
        batch, n_train = _choice(generator, self.batch_sizes), _choice(generator, self.train_sizes)
        data = draw_unique_splits(lambda n: sorting_sequences(generator, n, length, vocab),
                                  (n_train, *self.eval_sizes), self.device)
        factory = lambda: SequenceEncoder(vocab, width, self.heads, length, self.layers)  # noqa: E731
        task = SequenceTask(build_module(factory, self.dtype, self.device), data, batch, self.backend)
        task.length, task.vocab, task.d_model = length, vocab, width
        return task
