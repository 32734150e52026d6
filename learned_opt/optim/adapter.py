"""Turn any optimizer of our protocol (hand-coded or a trained meta-network) into a ``torch.optim.Optimizer``.

:class:`ProtocolOptimizer` keeps the protocol state per parameter (``optimizer.state[p]``, see
:mod:`~learned_opt.optim.adapter_state`) and applies ``p += (group['lr'] / group['lr_ref']) * u`` in place, so that
``torch.optim.lr_scheduler`` schedulers work on top of it; it behaves like ``torch.optim`` for parameters without
gradients, parameter groups, weight decay and dtypes, and runs a meta-network's learned LR and stop heads through
the same step as :func:`learned_opt.unroll.unroll`. Its ``state_dict`` is plain containers (dicts, lists,
tensors, numbers) with a format version, so a checkpoint loads with ``torch.load(..., weights_only=True)``.
"""
from __future__ import annotations

import dataclasses
import numbers
import warnings
from typing import Any, Callable, Dict, Iterable, List, Optional

import torch

from ..control import Constant, Decision
from ..validate import check_nonnegative
from .adapter_state import (STATE_FORMAT, Defaults, PerParameterState, decay_rate, from_plain, own_weight_decay,
                            reads_loss, to_plain)
from .base import Optimizer
from .network import donated_state

__all__ = ["ProtocolOptimizer", "STATE_FORMAT", "to_plain", "from_plain"]


def _set_loss(self, loss: Any) -> None:
    """Hand the training loss to the next ``step()``, for loops that call ``step()`` themselves without it (the
    HF Trainer, accelerate: see :mod:`learned_opt.integrations`).

    The next ``step()`` reads ``loss`` (detached) as if given ``step(loss=loss)``: it wins over a closure's
    result (a loss set while the closure runs counts too), an explicit ``loss=`` wins over it, and that step
    consumes it in any case, so a stale loss never reaches a later step. ``None`` clears it. It is not part of
    ``state_dict``.
    """
    self._pending_loss = None if loss is None else torch.as_tensor(loss).detach()


_NO_LOSS = ("{}.step() got no loss, but its learned controller reads it (its loss features then read as 'no "
            "information'): call opt.step(loss=loss), opt.step(closure) or opt.set_loss(loss) before step(). The HF "
            "Trainer and accelerate never pass the loss: use learned_opt.integrations.feed_loss(trainer) with the HF "
            "Trainer and learned_opt.integrations.step_with_loss(optimizer, loss) with accelerate. (Shown once.)")


class ProtocolOptimizer(PerParameterState, torch.optim.Optimizer):
    """A ``torch.optim.Optimizer`` driven by a protocol optimizer ``opt`` (``init`` / ``update``).

    Use it like any ``torch.optim`` optimizer: ``zero_grad()``, ``loss.backward()``, ``step()`` (or
    ``step(closure)``, or ``step(loss=loss)`` / ``set_loss(loss)`` to pass the loss on without a closure).

    **lr.** Every step adds ``(group['lr'] / group['lr_ref']) * u`` to the parameters, where ``u`` is the update
    that ``opt`` proposes (times the learned LR multiplier when a controller runs, see below). ``lr_ref`` is fixed
    at construction: the constructor's ``lr`` when it is > 0, and 1 when it is 0 (``lr=0`` is accepted, as in
    ``torch.optim``: every group starts frozen and ``group['lr']`` then reads as a plain multiplier of ``u``). A
    hand-coded baseline's own rate is already inside ``u``: ``ProtocolOptimizer(params, Adam(lr=1e-3))`` steps
    like ``torch.optim.Adam(params, lr=1e-3)``, and so does ``ProtocolOptimizer(params, Adam(lr=1e-3),
    lr=1e-3)``; with the default ``lr=1.0`` the group lr is a plain multiplier. ``torch.optim.lr_scheduler``
    schedulers change ``group['lr']`` and hence the multiplier (``StepLR(opt, 10, gamma=0.5)`` halves the
    updates every 10 steps); rates a scheduler sets in absolute terms (``eta_min``, ``max_lr``) are read in the
    same units. ``group['lr'] = 0`` freezes a group (its state still advances, as in ``torch.optim``).
    ``OneCycleLR`` / ``CyclicLR`` need ``cycle_momentum=False``: there is no momentum hyper-parameter to cycle (a
    meta-network's momentum decays are part of what it was trained with), and saying so is the error otherwise.

    **Weight decay** (``weight_decay``, per group, default: the baseline's own ``weight_decay`` field, else 0).
    A hand-coded baseline (a dataclass with that field) runs in each group with the group's value in its field,
    so its own kind of decay applies (L2 for ``Adam`` / ``SGD``, decoupled for ``AdamW``) and groups with
    ``weight_decay=0`` (biases, norms) step exactly like ``torch.optim`` with the same groups. Any other ``opt``
    gets decoupled decay from the adapter, applied with the update (AdamW's order): ``p <- p * (1 - factor *
    rate * s * wd) + factor * s * u`` with ``factor = group['lr'] / group['lr_ref']``, ``s`` the learned LR
    multiplier (per tensor in ``per_tensor`` LR mode) and ``rate`` the network's base step, ``exp(log_lr)`` for a
    NormMLP (the rate of its unit-RMS direction). ``factor * rate * s`` is the step size of that step, the
    quantity AdamW's ``lr`` is, so a recipe's ``weight_decay`` keeps its meaning (``wd * step size`` per step)
    and follows both the schedulers and the learned schedule. A network without a base step (a CoordMLP, a plain
    CoordLSTM) refuses ``weight_decay > 0``. No decay on a stopping step or for a parameter without a gradient.

    **Per-parameter state.** ``optimizer.state[p]`` holds each parameter's state and its ``step`` count (the
    updates it took part in, a float32 tensor as in ``torch.optim``). A parameter without a gradient at a step is
    left exactly as it is and keeps its state; the others carry on with theirs: a per-tensor baseline's fields
    (Adam's ``mu`` / ``nu``), a meta-network's per-coordinate state, flattened (a NormMLP's ``momenta``
    ``(k, numel)`` and ``v`` ``(numel,)``, and its ``pooled`` hidden row). A meta-network's update of one
    tensor reads that tensor's gradient, parameter and state only (:mod:`~learned_opt.optim.adapter_state`): the
    tensors of a step run in one call, as before (with the same tensors every step, bitwise the same updates),
    those of different step counts in one call per count. What reads across tensors, the LR and stop heads (mean pooled
    state, global gradient norm, loss) and their step clock, stays per parameter group. A meta-network whose
    state the adapter cannot split keeps one state per group, restarted (with a warning) when the set of tensors
    with gradients changes. Sparse gradients raise ``ValueError`` naming the parameter.

    **dtype.** A meta-network (an ``nn.Module``) runs in the dtype of its own weights: gradients and parameters
    are cast to it on the way in, and each update is added to its parameter in the parameter's dtype, so
    float64 and bfloat16 models work with a float32 meta-network as it is (its state stays float32). A
    hand-coded baseline computes in each parameter's own dtype, as ``torch.optim`` does. The meta-network must be
    on the parameters' device.

    **Learned LR and stop decisions.** ``controller`` drives them exactly as :func:`learned_opt.unroll.unroll`
    does (the same :func:`~learned_opt.unroll.propose`). ``"auto"`` (the default) uses the meta-network's own
    decision heads (``opt.as_controller()``) when ``opt`` has them, and none otherwise; a network meta-trained
    without a controller has untouched heads (multiplier exactly 1, stop probability about 0.0025). ``None``
    turns decisions off; any controller object can be given instead. The controller observes the group's step
    (from 0), the loss (from ``closure`` or ``loss=``; without one the loss features read as "no information",
    and a controller whose trained heads read it warns once), the group's global gradient norm and
    ``val_loss=``. After each step ``should_stop`` says whether a controller decided to stop (that step's update
    is then not applied); ``stop_prob`` is ``1 - prod(1 - p)`` over groups and ``decisions`` the last
    :class:`~learned_opt.control.Decision` of every group (``None`` for a group that did not step).
    ``total_steps`` (``None`` or an integer >= 1) reaches the controller as the horizon (0: unknown); it is a
    setting, not state: give it again when resuming.

    ``state_dict`` is ``torch.optim``'s (per-parameter ``state``, ``param_groups``) plus ``proto_state``, the
    per-group controller states and a format version (:data:`STATE_FORMAT`); a state dict of another format is
    refused with the versions named. Everything is plain containers: it loads with ``torch.load(...,
    weights_only=True)``.
    """

    def __init__(self, params: Iterable[Any], opt: Optimizer, lr: float = 1.0, controller: Any = "auto",
                 total_steps: Optional[int] = None, weight_decay: Optional[float] = None):
        if not (hasattr(opt, "init") and hasattr(opt, "update")):
            raise TypeError(f"expected an optimizer with init() and update(), got {type(opt).__name__}")
        check_nonnegative("lr", lr)
        if total_steps is not None and (isinstance(total_steps, bool) or not isinstance(total_steps, numbers.Integral)
                                        or total_steps < 1):
            raise ValueError(f"total_steps must be None or an integer >= 1, got {total_steps!r}")
        if isinstance(controller, str):
            if controller != "auto":
                raise ValueError(f"controller must be 'auto', None or a controller object, got {controller!r}")
            controller = opt.as_controller() if hasattr(opt, "as_controller") else None
        elif controller is not None and not (hasattr(controller, "init") and hasattr(controller, "decide")):
            raise TypeError(f"expected a controller with init() and decide(), got {type(controller).__name__}")
        self.opt = opt
        self.controller = controller
        self.per_tensor = bool(getattr(opt, "per_tensor", False))
        self.own_decay = own_weight_decay(opt)
        self.reads_loss = reads_loss(controller, opt)
        self.total_steps = None if total_steps is None else int(total_steps)
        if weight_decay is None:
            weight_decay = opt.weight_decay if self.own_decay else 0.0
        # Per group: the controller's step clock and state (and, for a state kept per group, that state).
        self.group_states: List[Dict[str, Any]] = []
        self.should_stop = False
        self.stop_prob = 0.0
        self.decisions: List[Optional[Decision]] = []
        # lr_ref: the constructor's lr, or 1 when it is 0 (group lr then a plain multiplier)
        super().__init__(params, Defaults(lr=lr, lr_ref=float(lr) if float(lr) > 0 else 1.0,
                                          weight_decay=weight_decay))

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        """Add a group (its own ``lr``, ``weight_decay`` and controller state); it takes part from the next step."""
        index = len(self.param_groups)
        try:
            if "lr" in param_group:
                check_nonnegative("lr", param_group["lr"])
            wd = param_group.get("weight_decay", self.defaults["weight_decay"])
            check_nonnegative("weight_decay", wd)
            if float(wd) > 0 and not self.own_decay and decay_rate(self.opt) is None:
                raise ValueError(f"weight_decay must be 0 for {type(self.opt).__name__}, got {wd!r}: it has no base "
                                 f"step size to scale decoupled weight decay by")
        except ValueError as e:
            raise ValueError(f"parameter group {index}: {e}") from None
        super().add_param_group(param_group)
        self.group_states.append({"step": 0, "ctrl": None, "active": None, "opt": None})
        self.decisions.append(None)

    def __getstate__(self):
        # torch.optim pickles only defaults, state and param_groups; the protocol states must travel too
        state = super().__getstate__()
        state.update({k: self.__dict__[k] for k in ("opt", "controller", "per_tensor", "own_decay", "reads_loss",
                                                    "total_steps", "group_states", "should_stop", "stop_prob",
                                                    "decisions")})
        return state

    set_loss = _set_loss  # the loss of the next step(), for loops that call it without one (defined above)

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], torch.Tensor]] = None, *, loss: Any = None,
             val_loss: Any = None):
        """One update of every group's parameters that have a gradient; returns the closure's loss.

        The loss (``loss=``, else the one given to :meth:`set_loss`, else the closure's result) reaches
        ``opt.update(..., loss=)`` and the controller; ``val_loss=`` reaches the controller only.
        """
        result = None
        if closure is not None:
            with torch.enable_grad():
                result = closure()
        pending = self.__dict__.pop("_pending_loss", None)  # set_loss's (also one set in the closure), consumed
        loss = loss if loss is not None else (pending if pending is not None else result)
        if loss is None and self.reads_loss and not self.__dict__.get("_warned_no_loss"):
            self._warned_no_loss = True
            warnings.warn(_NO_LOSS.format(type(self).__name__), stacklevel=4)
        loss_t = None if loss is None else torch.as_tensor(loss).detach()
        val_t = None if val_loss is None else torch.as_tensor(val_loss).detach()
        # Check every group before touching any, so that a bad gradient leaves the model as it was.
        active = [_active(gi, group) for gi, group in enumerate(self.param_groups)]
        keep = 1.0
        self.should_stop = False
        for gi, (group, idx) in enumerate(zip(self.param_groups, active)):
            if not idx:
                self.decisions[gi] = None
                continue
            decision = self._step_group(gi, group, idx, loss_t, val_t)
            self.decisions[gi] = decision
            keep *= 1.0 - float(decision.stop_prob.detach() if torch.is_tensor(decision.stop_prob)
                                else decision.stop_prob)
            self.should_stop = self.should_stop or bool(decision.stop)
        self.stop_prob = 1.0 - keep
        return result

    def _step_group(self, gi: int, group: Dict[str, Any], idx: List[int], loss, val_loss) -> Decision:
        """Update the group's tensors ``idx`` (those with a gradient) and return the controller's decision."""
        # Imported here: the inner loop sits above the optimizers (it runs them), so this arrow points upwards.
        from ..unroll import apply_scale, global_norm, propose

        gs = self.group_states[gi]
        live = [group["params"][i] for i in idx]
        dtype = _compute_as(self.opt, self.per_tensor, live[0])
        params, grads = _inputs(live, dtype)
        if self.per_tensor:
            optimizer, state, commit = self._tensor_states(self._variant(group), live, params)
        else:
            optimizer, state, commit = self._network_state(self._variant(group), gi, idx, live, params)
        controller = self.controller if self.controller is not None else Constant()
        ctrl_state = controller.init() if gs["step"] == 0 else gs["ctrl"]
        gnorm = global_norm(grads) if self.controller is not None else None
        # The horizon is the run's length when the caller gave total_steps, else 0 ("unknown")
        horizon = 0 if self.total_steps is None else self.total_steps
        with donated_state(self.opt):  # the old state is dropped and the updates applied below, at once
            updates, state, decision, ctrl_state = propose(optimizer, controller, grads, params, state, ctrl_state,
                                                           step=gs["step"], horizon=horizon, loss=loss,
                                                           val_loss=val_loss, grad_norm=gnorm, training=False)
        commit(state)
        gs.update(step=gs["step"] + 1, ctrl=ctrl_state)
        if not decision.stop:
            factor = float(group["lr"]) / float(group["lr_ref"])
            updates = apply_scale(updates, decision.lr_scale)
            self._decay(group, live, decision.lr_scale, factor)
            # add_ in the parameter's dtype from an update in the computation's: one rounding (bfloat16 too)
            for p, u in zip(live, updates):
                p.add_(_shard_like(u, p), alpha=factor)
        return decision

    def _variant(self, group: Dict[str, Any]) -> Any:
        """The protocol optimizer of this group: a baseline with the group's ``weight_decay`` in its field."""
        wd = group["weight_decay"]
        if not self.own_decay or wd is self.opt.weight_decay or float(wd) == float(self.opt.weight_decay):
            return self.opt
        variants = self._derived()["variants"]
        if float(wd) not in variants:
            variants[float(wd)] = dataclasses.replace(self.opt, weight_decay=float(wd))
        return variants[float(wd)]

    def _decay(self, group: Dict[str, Any], live: List[torch.Tensor], lr_scale: Any, factor: float) -> None:
        """Decoupled weight decay of a group's stepped tensors (optimizers without a ``weight_decay`` field)."""
        wd = float(group["weight_decay"])
        if self.own_decay or wd == 0 or factor == 0:
            return
        rate = decay_rate(self.opt)
        scales = lr_scale if isinstance(lr_scale, (list, tuple)) else [lr_scale] * len(live)
        for p, s in zip(live, scales):
            p.mul_(1 - factor * wd * rate * s)

    def state_dict(self):
        """torch.optim's state dict (per-parameter state) plus the per-group controller states and the format."""
        out = super().state_dict()
        out["state"] = {k: to_plain(v) for k, v in out["state"].items()}
        out["proto_state"] = {"format": STATE_FORMAT, "groups": to_plain(self.group_states)}
        return out

    def load_state_dict(self, state_dict):
        """Restore the param groups, the per-parameter states and the controller states saved by
        :meth:`state_dict` (of this format only)."""
        state_dict = dict(state_dict)
        saved = state_dict.pop("proto_state", None)
        found = saved.get("format") if isinstance(saved, dict) else None
        if found != STATE_FORMAT:
            what = f"format {found!r}" if found is not None else "no format version (not a ProtocolOptimizer's)"
            raise ValueError(f"cannot load this state dict: it has {what}, this version reads {STATE_FORMAT!r} "
                             f"(format 2 kept a meta-network's state per parameter group, format 3 per parameter); "
                             f"resuming it would not continue the run exactly. Resume with the learned_opt version "
                             f"that saved it, or start the optimizer afresh from the model's weights")
        groups = from_plain(saved["groups"])
        if len(groups) != len(self.param_groups):
            raise ValueError(f"the state dict has {len(groups)} parameter groups, this optimizer "
                             f"{len(self.param_groups)}")
        per_param = state_dict.get("state", {})
        # torch.optim would cast every state tensor to its parameter's dtype; a meta-network's state keeps its own
        super().load_state_dict({**state_dict, "state": {}})
        ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        by_id = dict(zip(ids, (p for g in self.param_groups for p in g["params"])))
        for k, v in per_param.items():  # the step counts stay on the CPU, as torch.optim's
            if k in by_id:
                self.state[by_id[k]] = {name: x if name == "step" else _to_device(x, by_id[k].device)
                                        for name, x in from_plain(v).items()}
        self.group_states = [dict(g) for g in groups]
        self.decisions = [None] * len(groups)
        self.should_stop, self.stop_prob = False, 0.0
        self.__dict__.pop("_derived_state", None)


def _is_dtensor(t: torch.Tensor) -> bool:
    return type(t).__name__ == "DTensor" and hasattr(t, "full_tensor")


def _inputs(live: List[torch.Tensor], dtype: Optional[torch.dtype]):
    """The parameters and gradients the update reads, detached, in ``dtype`` (``None``: their own), whole: under
    FSDP2 every rank gathers each tensor, computes the same update and adds its own shard (:func:`_shard_like`)."""
    def prep(t):
        t = _whole(t.detach())
        return t if dtype is None else t.to(dtype)
    return [prep(p) for p in live], [prep(p.grad) for p in live]


def _whole(t: torch.Tensor) -> torch.Tensor:
    """A DTensor (an FSDP2 shard) gathered into the whole plain tensor; any other tensor as it is."""
    return t.full_tensor() if _is_dtensor(t) else t


def _shard_like(u: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """The whole update ``u`` laid out as ``p``: for a DTensor ``p``, this rank's shard of it (every rank holds the
    same ``u``, so each takes its own part without communication)."""
    if not _is_dtensor(p):
        return u
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(u, p.device_mesh, p.placements, src_data_rank=None)


def _to_device(x: Any, device: torch.device) -> Any:
    """``x`` with every tensor moved to ``device`` (dtype kept), containers rebuilt."""
    if isinstance(x, torch.Tensor):
        return x.to(device=device)
    if isinstance(x, dict):
        return {k: _to_device(v, device) for k, v in x.items()}
    if isinstance(x, (list, tuple)) and not hasattr(x, "_fields"):
        return type(x)(_to_device(v, device) for v in x)
    return x


def _active(gi: int, group: Dict[str, Any]) -> List[int]:
    """Indices of the group's tensors that have a gradient and at least one element (an empty tensor has
    nothing to update, and its per-tensor statistics would be 0 / 0 for a meta-network); a sparse gradient
    raises ``ValueError``."""
    idx = []
    for i, p in enumerate(group["params"]):
        if p.grad is None or p.numel() == 0:
            continue
        if p.grad.layout != torch.strided:
            names = group.get("param_names")
            name = repr(names[i]) if names else f"{i} of parameter group {gi}"
            raise ValueError(f"parameter {name} (shape {tuple(p.shape)}) has a sparse gradient "
                             f"({p.grad.layout}); ProtocolOptimizer needs dense gradients (e.g. "
                             f"nn.Embedding(..., sparse=False))")
        idx.append(i)
    return idx


def _compute_as(opt: Any, per_tensor: bool, p: torch.Tensor) -> Optional[torch.dtype]:
    """The dtype a meta-network computes in (that of its weights); ``None``: the parameter's own."""
    if per_tensor or not isinstance(opt, torch.nn.Module):
        return None
    for w in opt.parameters():
        if w.is_floating_point():
            if w.device != p.device:
                raise ValueError(f"the meta-network is on {w.device} but the parameters are on {p.device}; "
                                 f"move it there with .to({str(p.device)!r})")
            return w.dtype
    return None
