"""Character-level language modelling of a bundled text snapshot by a small causal transformer (held-out tasks).

The text is ``data/cpython_stdlib.txt``: fifteen modules of the CPython 3.11.7 standard library (source code,
comments and docstrings; PSF licence, see ``data/README.md``), stored in the package as printable ASCII plus
newlines, so nothing is downloaded and nothing depends on the running Python's own library. The vocabulary is
fixed: newline and the 95 printable ASCII characters (:data:`VOCAB`).

The text is cut into blocks of ``block_chars`` characters, assigned once (by ``split_seed``) to ``test``, ``val`` and
``train``; the training blocks are grouped, in text order, into ``regions`` disjoint **regions**. A task trains on
one region, drawn from its generator, and is validated and tested on the shared ``val`` and ``test`` blocks; no
character of a test block is in a val or train block. Examples are non-overlapping windows of ``context + 1``
characters inside one block (inputs: the first ``context``, targets: the last ``context``). A window whose input
equals that of an earlier window of its split, of any training window or (for a test window) of a validation window
is dropped, so that no input row is shared between splits even where the source repeats itself (e.g. runs of
indentation); every region then keeps as many windows as the smallest one.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor

from ..validate import check_positive_int
from .models import CharTransformer, build_module
from .synthetic import SequenceTask

TEXT_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "cpython_stdlib.txt")
VOCAB = "\n" + "".join(chr(c) for c in range(32, 127))
TEXT_CHARS = 245865  # the snapshot's length: a changed or truncated file is refused


@lru_cache(maxsize=None)
def text_corpus() -> str:
    """The bundled text (checked: its length, and every character in :data:`VOCAB`)."""
    with open(TEXT_FILE, encoding="ascii", newline="") as f:
        text = f.read()
    if len(text) != TEXT_CHARS or set(text) - set(VOCAB):
        raise ValueError(f"{TEXT_FILE}: not the bundled snapshot ({len(text)} characters, expected {TEXT_CHARS}, "
                         f"or characters outside the vocabulary)")
    return text


def encode(text: str) -> Tensor:
    """Character indices into :data:`VOCAB` (int64)."""
    table = {c: i for i, c in enumerate(VOCAB)}
    return torch.tensor([table[c] for c in text], dtype=torch.long)


@lru_cache(maxsize=None)
def text_blocks(block_chars: int = 1024, split_seed: int = 0, val_blocks: int = 4,
                test_blocks: int = 8, regions: int = 12) -> Dict[str, Tuple[Tuple[Tuple[int, int], ...], ...]]:
    """Character ranges ``(start, end)`` of the blocks, by split: ``{'test': (blocks,), 'val': (blocks,),
    'train': (region_0_blocks, ..., region_{regions-1}_blocks)}``, blocks in text order within each entry."""
    for name, v in (("block_chars", block_chars), ("val_blocks", val_blocks), ("test_blocks", test_blocks),
                    ("regions", regions)):
        check_positive_int(name, v)
    n = len(text_corpus()) // block_chars
    per_region = (n - val_blocks - test_blocks) // regions
    if per_region < 1:
        raise ValueError(f"{n} blocks of {block_chars} characters leave no training block per region")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(split_seed)).tolist()
    test, val, train = sorted(perm[:test_blocks]), sorted(perm[test_blocks:test_blocks + val_blocks]), \
        sorted(perm[test_blocks + val_blocks:])

    def ranges(idx: List[int]) -> Tuple[Tuple[int, int], ...]:
        return tuple((i * block_chars, (i + 1) * block_chars) for i in idx)

    return {"test": (ranges(test),), "val": (ranges(val),),
            "train": tuple(ranges(train[r * per_region:(r + 1) * per_region]) for r in range(regions))}


def _windows(codes: Tensor, blocks, context: int, exclude: set) -> Tuple[Tensor, set]:
    """Non-overlapping ``context + 1`` windows inside each block, dropping inputs already in ``exclude`` or seen."""
    keep, seen = [], set(exclude)
    for start, end in blocks:
        for w in codes[start:end].unfold(0, context + 1, context + 1):
            key = bytes(w[:-1].to(torch.uint8).numpy())
            if key not in seen:
                seen.add(key)
                keep.append(w)
    return torch.stack(keep), seen - set(exclude)


@lru_cache(maxsize=None)
def text_splits(context: int = 32, block_chars: int = 1024, split_seed: int = 0, val_blocks: int = 4,
                test_blocks: int = 8, regions: int = 12) -> Dict[str, Tuple[Tensor, ...]]:
    """Windows ``(N, context + 1)`` by split: ``{'train': (region_0, ...), 'val': (w,), 'test': (w,)}``, the same
    number of windows in every region. Inputs are unique within a split and never shared across splits (validation
    drops every training input; test drops every training and validation input)."""
    check_positive_int("context", context)
    blocks = text_blocks(block_chars, split_seed, val_blocks, test_blocks, regions)
    codes = encode(text_corpus())
    train, train_keys = [], set()
    for region in blocks["train"]:
        w, keys = _windows(codes, region, context, set())
        train.append(w)
        train_keys |= keys
    val, val_keys = _windows(codes, blocks["val"][0], context, train_keys)
    test, _ = _windows(codes, blocks["test"][0], context, train_keys | val_keys)
    # every region keeps as many windows as the smallest one: tasks of one architecture then share shapes (and a
    # batch in evaluate_batched) whatever their region
    n = min(w.shape[0] for w in train)
    return {"train": tuple(w[:n] for w in train), "val": (val,), "test": (test,)}


def _choice(generator: torch.Generator, options: Tuple[int, ...]) -> int:
    return options[int(torch.randint(len(options), (), generator=generator))]


@dataclass(frozen=True)
class TextLMFamily:
    """Next-character prediction on the bundled text (:func:`text_splits`) by a :class:`CharTransformer`; a task
    draws its training region, its width ``d_model`` (from ``widths``, ``heads`` attention heads) and its depth
    (from ``depths``) from the generator; its init and data order come from the generators of ``init`` and
    ``sample_batch``. Validation and test windows are the same for every task."""
    context: int = 32
    widths: Tuple[int, ...] = (24, 32)
    depths: Tuple[int, ...] = (1, 2)
    heads: int = 2
    batch_size: Optional[int] = 8
    block_chars: int = 1024
    split_seed: int = 0
    val_blocks: int = 4
    test_blocks: int = 8
    regions: int = 12
    dtype: torch.dtype = torch.float32
    device: str = "cpu"
    backend: Optional[str] = None

    def __post_init__(self):
        if not self.widths or not self.depths:
            raise ValueError(f"widths and depths must be non-empty, got {self.widths!r}, {self.depths!r}")
        for w in self.widths:
            if w % self.heads:
                raise ValueError(f"width {w} is not a multiple of heads={self.heads}")
        if self.context == len(VOCAB):  # logits (N, vocab, length) would be ambiguous to shape checks
            raise ValueError(f"context must differ from the vocabulary size {len(VOCAB)}")

    def splits(self) -> Dict[str, Tuple[Tensor, ...]]:
        """This family's windows by split (see :func:`text_splits`)."""
        return text_splits(self.context, self.block_chars, self.split_seed, self.val_blocks, self.test_blocks,
                           self.regions)

    def __call__(self, generator: torch.Generator) -> SequenceTask:
        """A task: a training region, a width and a depth drawn from ``generator``."""
        windows = self.splits()
        region = int(torch.randint(len(windows["train"]), (), generator=generator))
        width, depth = _choice(generator, self.widths), _choice(generator, self.depths)
        picked = {"train": windows["train"][region], "val": windows["val"][0], "test": windows["test"][0]}
        data = {s: (w[:, :-1].to(self.device), w[:, 1:].to(self.device)) for s, w in picked.items()}
        module = build_module(lambda: CharTransformer(len(VOCAB), width, self.heads, depth,
                                                      self.context), self.dtype, self.device)
        task = SequenceTask(module, data, self.batch_size, self.backend)
        task.region = region
        return task
