"""The optimizer protocol shared by hand-coded baselines and learned optimizers.

Borrowed from optax's ``GradientTransformation``: an optimizer is ``init(params) -> state`` and
``update(grads, state, params, *, loss=None) -> (updates, state)`` over a flat list of tensors. Updates are
*added* to the parameters (``new = p + lr_scale * u``) by the caller, so a controller's learning-rate scale
composes with any optimizer. Everything is out-of-place, hence differentiable when the inputs carry a graph.

An optimizer whose update of each tensor depends on that tensor alone (its gradient, parameter and state; every
hand-coded baseline) sets the class attribute ``per_tensor = True``. The ``torch.optim`` adapter then keeps one
state per tensor, so that a tensor without a gradient at a step keeps its state exactly, as ``torch.optim`` does.
"""
from __future__ import annotations

import math
from typing import Any, List, Optional, Protocol, Sequence, Tuple, runtime_checkable

from torch import Tensor

Params = List[Tensor]


@runtime_checkable
class Optimizer(Protocol):
    """Anything with optax-style ``init`` and ``update`` over a list of tensors."""

    def init(self, params: Sequence[Tensor]) -> Any:
        """Return the initial optimizer state for ``params``."""

    def update(self, grads: Sequence[Tensor], state: Any, params: Sequence[Tensor], *,
               loss: Optional[Tensor] = None) -> Tuple[Params, Any]:
        """Return ``(updates, new_state)``; the caller applies ``p + u``."""


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


def from_registry(registry: dict, name: str, what: str, **kwargs: Any):
    """Build ``registry[name.lower()](**kwargs)``; an unknown name raises ``ValueError`` listing the known."""
    key = str(name).lower()
    if key not in registry:
        raise ValueError(f"unknown {what} {name!r}; known: {', '.join(sorted(registry))}")
    return registry[key](**kwargs)


def check_matching(grads: Sequence[Tensor], params: Sequence[Tensor]) -> None:
    """Raise ``ValueError`` when grads and params differ in count or in any shape."""
    if len(grads) != len(params):
        raise ValueError(f"got {len(grads)} gradients for {len(params)} parameters")
    for i, (g, p) in enumerate(zip(grads, params)):
        if g.shape != p.shape:
            raise ValueError(f"gradient {i} has shape {tuple(g.shape)} but parameter {i} has "
                             f"shape {tuple(p.shape)}")
