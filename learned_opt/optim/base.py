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

from typing import Any, List, Optional, Protocol, Sequence, Tuple, runtime_checkable

from torch import Tensor

# The argument checks and the registry helper live in neutral modules; re-exported here for older imports.
from ..registry import from_registry  # noqa: F401
from ..validate import (_as_float, check_matching, check_nonnegative, check_positive,  # noqa: F401
                        check_unit_interval)

Params = List[Tensor]


@runtime_checkable
class Optimizer(Protocol):
    """Anything with optax-style ``init`` and ``update`` over a list of tensors."""

    def init(self, params: Sequence[Tensor]) -> Any:
        """Return the initial optimizer state for ``params``."""

    def update(self, grads: Sequence[Tensor], state: Any, params: Sequence[Tensor], *,
               loss: Optional[Tensor] = None) -> Tuple[Params, Any]:
        """Return ``(updates, new_state)``; the caller applies ``p + u``."""
