"""Task splits and seeds: meta-training, validation and final-test tasks that can never coincide.

A task's seed is a hash of ``(split, seed, stream, index)`` with the split written into its two lowest bits
(:func:`task_seed`, :func:`split_of`). ``stream`` separates uses of one split (tuning, checkpoint selection,
development evaluation); :data:`TEST_DRAW` enters the hash of every test task, so that the final-test split can be
drawn again whenever its results were seen during development.
"""
from __future__ import annotations

import hashlib
from typing import Optional

from ..validate import SPLITS

_SPLIT_CODE = {"train": 0, "val": 1, "test": 2}
TEST_DRAW = 2
"""The current draw of the final-test split. Draw 1 was the offset-based split of the first sessions, whose
test tasks were looked at during development; bump this whenever test results are seen before a final run."""


def task_seed(split: str, index: int, seed: int = 0, *, stream: str = "", draw: Optional[int] = None) -> int:
    """The seed of task ``index`` of ``split`` (and ``stream``) for ``seed``; disjoint across splits by
    construction: the split is the seed's two lowest bits, the rest a 60-bit hash of everything else."""
    if split not in _SPLIT_CODE:
        raise ValueError(f"unknown split {split!r}; known: {', '.join(SPLITS)}")
    if split == "test":
        draw = TEST_DRAW if draw is None else draw
    elif draw is not None:
        raise ValueError(f"only the test split has draws; got draw={draw!r} for split {split!r}")
    key = f"{split}|{int(seed)}|{stream}|{int(index)}|{draw}".encode()
    h = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 4
    return (h << 2) | _SPLIT_CODE[split]


def split_of(seed: int) -> str:
    """The split a task seed made by :func:`task_seed` belongs to."""
    code = int(seed) & 3
    for name, c in _SPLIT_CODE.items():
        if c == code:
            return name
    raise ValueError(f"seed {seed} belongs to no split")


def evaluation_split(final: bool, draw: int) -> dict:
    """Keyword arguments of :func:`~learned_opt.evaluate.evaluate` for an experiment's evaluation tasks: the
    final-test split's ``draw`` in a final run, the validation stream ``dev`` in a development run."""
    return {"split": "test", "draw": draw} if final else {"split": "val", "stream": "dev"}
