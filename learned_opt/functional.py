"""Run any ``nn.Module`` learner as a pure function of its parameters; the one module that imports ``higher``.

Two interchangeable backends sit behind :class:`FunctionalModule`:

* ``"higher"`` (the default): ``higher.monkeypatch(module, track_higher_grads=False)`` gives a functional view;
  gradients flow through the parameters passed in, and the patched module does not keep every version of them
  (memory stays flat).
* ``"func"``: ``torch.func.functional_call`` on a private copy of the module, for installs where ``higher`` (no
  release since 2020) is missing or breaks. Tests check that both give the same losses, gradients and
  second-order meta-gradients through an unroll.

The backend is chosen per module (``FunctionalModule(module, backend="func")``, ``SupervisedTask(...,
backend="func")``) or, for every task a family builds, by the environment variable ``LEARNED_OPT_FUNCTIONAL``
(``higher`` or ``func``), read when a :class:`FunctionalModule` is created.

Buffers (e.g. BatchNorm running statistics) behave the same in both: each :class:`FunctionalModule` works on its
own copy of the module taken at construction (``higher``'s ``copy_initial_weights``), so a train-mode call
updates that copy's buffers in place and never the original module's; the train / eval mode is the one the
module had at construction.
"""
from __future__ import annotations

import copy
import os
from typing import Callable, List, Optional, Sequence

import torch
from torch import Tensor, nn

BACKENDS = ("higher", "func")
ENV_VAR = "LEARNED_OPT_FUNCTIONAL"
DEFAULT_BACKEND = "higher"


def default_backend() -> str:
    """The backend named by ``$LEARNED_OPT_FUNCTIONAL``, else ``"higher"``; a bad value raises ``ValueError``."""
    value = os.environ.get(ENV_VAR, "").strip().lower()
    if not value:
        return DEFAULT_BACKEND
    if value not in BACKENDS:
        raise ValueError(f"{ENV_VAR}={os.environ[ENV_VAR]!r} is not a functional backend; known: "
                         f"{', '.join(BACKENDS)}")
    return value


def check_backend(backend: Optional[str]) -> str:
    """``backend`` validated (``None``: :func:`default_backend`)."""
    if backend is None:
        return default_backend()
    if backend not in BACKENDS:
        raise ValueError(f"unknown functional backend {backend!r}; known: {', '.join(BACKENDS)}")
    return backend


class FunctionalModule:
    """``fn(params, *inputs)`` for an ``nn.Module``; ``params`` is a list in ``module.parameters()`` order.

    ``backend``: ``"higher"`` or ``"func"`` (``None``: ``$LEARNED_OPT_FUNCTIONAL``, else ``"higher"``).
    """

    def __init__(self, module: nn.Module, backend: Optional[str] = None):
        if not isinstance(module, nn.Module):
            raise TypeError(f"expected an nn.Module, got {type(module).__name__}")
        self.backend = check_backend(backend)
        self.module = module
        self.shapes = [tuple(p.shape) for p in module.parameters()]
        if self.backend == "higher":
            try:
                import higher
            except ImportError as e:  # an old package: say how to do without it
                raise ImportError(f"the 'higher' functional backend needs the higher package ({e}); install it "
                                  f"or set {ENV_VAR}=func") from None
            self._own = higher.monkeypatch(module, copy_initial_weights=True, track_higher_grads=False)
        else:
            # A private copy, as higher's copy_initial_weights: its buffers are the ones a call updates.
            self._own = copy.deepcopy(module)
            self._names = [n for n, _ in self._own.named_parameters()]  # module.parameters() order

    def __call__(self, params: Sequence[Tensor], *inputs: Tensor) -> Tensor:
        """Evaluate the module at ``params`` on ``inputs``."""
        if len(params) != len(self.shapes):
            raise ValueError(f"expected {len(self.shapes)} parameter tensors, got {len(params)}")
        for i, (p, s) in enumerate(zip(params, self.shapes)):
            if tuple(p.shape) != s:
                raise ValueError(f"parameter {i} has shape {tuple(p.shape)}, expected {s}")
        if self.backend == "higher":
            return self._own(*inputs, params=list(params))
        return torch.func.functional_call(self._own, dict(zip(self._names, params)), inputs)

    def buffers(self) -> List[Tensor]:
        """The buffers a call reads and (in train mode) updates: those of this view's own copy of the module."""
        return list(self._own.buffers())

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


def functional(module: nn.Module, backend: Optional[str] = None) -> Callable[..., Tensor]:
    """Shorthand for :class:`FunctionalModule`."""
    return FunctionalModule(module, backend)
