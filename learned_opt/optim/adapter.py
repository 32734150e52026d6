"""Turn any optimizer of our protocol (hand-coded or a trained meta-network) into a ``torch.optim.Optimizer``.

The adapter keeps the protocol state between ``step`` calls and applies ``p += lr_scale * u`` in place, where
``lr_scale = group['lr'] / initial lr`` so that ``torch.optim.lr_scheduler`` schedulers work on top of it. Its
``state_dict`` stores the protocol state as plain containers (dicts, lists, tensors, numbers), so a checkpoint
loads with ``torch.load(..., weights_only=True)``.
"""
from __future__ import annotations

import importlib
from typing import Any, Callable, Iterable, Optional

import torch

_NT = "__namedtuple__"


def to_plain(x: Any) -> Any:
    """NamedTuples (the protocol states) -> tagged dicts, recursively; ``torch.Size`` -> list."""
    if isinstance(x, torch.Size):
        return {"__size__": list(x)}
    if isinstance(x, tuple) and hasattr(x, "_fields"):
        cls = type(x)
        return {_NT: f"{cls.__module__}:{cls.__qualname__}", "fields": {k: to_plain(v) for k, v in
                                                                      zip(x._fields, x)}}
    if isinstance(x, (list, tuple)):
        return type(x)(to_plain(v) for v in x)
    if isinstance(x, dict):
        return {k: to_plain(v) for k, v in x.items()}
    return x


def from_plain(x: Any) -> Any:
    """Inverse of :func:`to_plain`; only classes defined in ``learned_opt`` are rebuilt."""
    if isinstance(x, dict) and "__size__" in x:
        return torch.Size(x["__size__"])
    if isinstance(x, dict) and _NT in x:
        module, _, name = x[_NT].partition(":")
        if not (module == "learned_opt" or module.startswith("learned_opt.")):
            raise ValueError(f"refusing to rebuild {x[_NT]!r}: not a learned_opt state")
        cls = getattr(importlib.import_module(module), name)
        return cls(**{k: from_plain(v) for k, v in x["fields"].items()})
    if isinstance(x, (list, tuple)):
        return type(x)(from_plain(v) for v in x)
    if isinstance(x, dict):
        return {k: from_plain(v) for k, v in x.items()}
    return x

from .base import Optimizer, check_positive


class ProtocolOptimizer(torch.optim.Optimizer):
    """A ``torch.optim.Optimizer`` driven by a protocol optimizer ``opt`` (``init`` / ``update``)."""

    def __init__(self, params: Iterable[torch.Tensor], opt: Optimizer, lr: float = 1.0):
        if not (hasattr(opt, "init") and hasattr(opt, "update")):
            raise TypeError(f"expected an optimizer with init() and update(), got {type(opt).__name__}")
        check_positive("lr", lr)  # the update scale is lr / initial lr: a zero initial lr would divide by 0
        super().__init__(params, {"lr": lr, "initial_lr": lr})
        if len(self.param_groups) != 1:
            raise ValueError("ProtocolOptimizer supports a single parameter group")
        self.opt = opt
        self._params = list(self.param_groups[0]["params"])
        self.proto_state: Any = None

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], torch.Tensor]] = None):
        """Apply one update of the wrapped optimizer; the loss from ``closure`` (if any) is passed on."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        params = self._params
        if self.proto_state is None:
            self.proto_state = self.opt.init([p.detach() for p in params])
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        loss_t = None if loss is None else torch.as_tensor(loss).detach()
        updates, self.proto_state = self.opt.update(grads, self.proto_state, [p.detach() for p in params],
                                                    loss=loss_t)
        group = self.param_groups[0]
        scale = group["lr"] / group["initial_lr"]
        for p, u in zip(params, updates):
            p.add_(u, alpha=scale)
        return loss

    def state_dict(self):
        """torch.optim's state dict plus the wrapped optimizer's protocol state (restored by load_state_dict)."""
        out = super().state_dict()
        out["proto_state"] = to_plain(self.proto_state)
        return out

    def load_state_dict(self, state_dict):
        """Restore the param groups and the protocol state saved by :meth:`state_dict`."""
        state_dict = dict(state_dict)
        self.proto_state = from_plain(state_dict.pop("proto_state", None))
        super().load_state_dict(state_dict)
