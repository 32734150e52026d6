"""The one module that imports ``higher``: run any ``nn.Module`` learner as a pure function of its parameters.

``higher.monkeypatch(module, track_higher_grads=False)`` gives a functional view: gradients flow through the
parameters passed in, and the patched module does not keep every version of them (memory stays flat).
``torch.func.functional_call`` is the reference that the tests compare against.
"""
from __future__ import annotations

from typing import Callable, List, Sequence

import higher
import torch
from torch import Tensor, nn


class FunctionalModule:
    """``fn(params, *inputs)`` for an ``nn.Module``; ``params`` is a list in ``module.parameters()`` order."""

    def __init__(self, module: nn.Module):
        if not isinstance(module, nn.Module):
            raise TypeError(f"expected an nn.Module, got {type(module).__name__}")
        self.module = module
        self.shapes = [tuple(p.shape) for p in module.parameters()]
        self._patched = higher.monkeypatch(module, copy_initial_weights=True, track_higher_grads=False)

    def __call__(self, params: Sequence[Tensor], *inputs: Tensor) -> Tensor:
        """Evaluate the module at ``params`` on ``inputs``."""
        if len(params) != len(self.shapes):
            raise ValueError(f"expected {len(self.shapes)} parameter tensors, got {len(params)}")
        for i, (p, s) in enumerate(zip(params, self.shapes)):
            if tuple(p.shape) != s:
                raise ValueError(f"parameter {i} has shape {tuple(p.shape)}, expected {s}")
        return self._patched(*inputs, params=list(params))

    def init_params(self, generator: torch.Generator) -> List[Tensor]:
        """Fresh parameters from the module's own ``reset_parameters``, seeded by ``generator`` only.

        The global RNG is forked, seeded from ``generator`` and restored, so the draw is reproducible and
        leaves no trace on global state.
        """
        seed = int(torch.randint(0, 2**62, (1,), generator=generator).item())
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for m in self.module.modules():
                if hasattr(m, "reset_parameters"):
                    m.reset_parameters()
            return [p.detach().clone() for p in self.module.parameters()]


def functional(module: nn.Module) -> Callable[..., Tensor]:
    """Shorthand for :class:`FunctionalModule`."""
    return FunctionalModule(module)
