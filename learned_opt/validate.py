"""Argument checks shared by every layer: each raises ``ValueError`` naming the argument and the bad value.

A neutral home (tasks, optimizers, controllers and the inner loop all use these), so that no layer imports
another's package for them.
"""
from __future__ import annotations

import math
from typing import Any, Iterable, Sequence

from torch import Tensor

SPLITS = ("train", "val", "test")


def _as_float(value: Any) -> float:
    return float(value.detach()) if hasattr(value, "detach") else float(value)


def check_positive(name: str, value: Any) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``value`` is a finite number > 0."""
    v = _as_float(value)
    if not math.isfinite(v) or v <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def check_nonnegative(name: str, value: Any) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``value`` is a finite number >= 0."""
    v = _as_float(value)
    if not math.isfinite(v) or v < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def check_unit_interval(name: str, value: Any) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``0 <= value < 1``."""
    v = _as_float(value)
    if not (0.0 <= v < 1.0):
        raise ValueError(f"{name} must be in [0, 1), got {value!r}")


def check_positive_int(name: str, value: Any) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``value`` is an integer >= 1."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def check_choice(what: str, value: Any, known: Iterable[str]) -> None:
    """Raise ``ValueError`` ("unknown {what} ...; known: ...") unless ``value`` is one of ``known``."""
    if value not in known:
        raise ValueError(f"unknown {what} {value!r}; known: {', '.join(known)}")


def check_split(split: str) -> None:
    """Raise ``ValueError`` for a split name other than train / val / test."""
    check_choice("split", split, SPLITS)


def check_matching(grads: Sequence[Tensor], params: Sequence[Tensor]) -> None:
    """Raise ``ValueError`` when grads and params differ in count or in any shape."""
    if len(grads) != len(params):
        raise ValueError(f"got {len(grads)} gradients for {len(params)} parameters")
    for i, (g, p) in enumerate(zip(grads, params)):
        if g.shape != p.shape:
            raise ValueError(f"gradient {i} has shape {tuple(g.shape)} but parameter {i} has "
                             f"shape {tuple(p.shape)}")
