"""Turn any optimizer of our protocol (hand-coded or a trained meta-network) into a ``torch.optim.Optimizer``.

The adapter keeps the protocol state between ``step`` calls and applies ``p += lr_scale * u`` in place, where
``lr_scale = group['lr'] / initial lr`` so that ``torch.optim.lr_scheduler`` schedulers work on top of it.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Optional

import torch

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
        out["proto_state"] = self.proto_state
        return out

    def load_state_dict(self, state_dict):
        """Restore the param groups and the protocol state saved by :meth:`state_dict`."""
        state_dict = dict(state_dict)
        self.proto_state = state_dict.pop("proto_state", None)
        super().load_state_dict(state_dict)
