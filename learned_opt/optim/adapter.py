"""Turn any optimizer of our protocol (hand-coded or a trained meta-network) into a ``torch.optim.Optimizer``.

:class:`ProtocolOptimizer` keeps the protocol state between ``step`` calls and applies ``p += (group['lr'] / lr) *
u`` in place, so that ``torch.optim.lr_scheduler`` schedulers work on top of it; it behaves like ``torch.optim``
for parameters without gradients, parameter groups and dtypes, and runs a meta-network's learned LR and stop
heads through the same step as :func:`learned_opt.unroll.unroll`. Its ``state_dict`` stores the protocol state as
plain containers (dicts, lists, tensors, numbers), so a checkpoint loads with ``torch.load(...,
weights_only=True)``.
"""
from __future__ import annotations

import importlib
import numbers
import warnings
from typing import Any, Callable, Dict, Iterable, List, Optional

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

from ..control import Constant, Decision
from ..validate import check_nonnegative, check_positive
from .base import Optimizer

STATE_FORMAT = "learned_opt.adapter/2"


class _PerTensor:
    """A ``per_tensor`` optimizer run on every tensor alone; its state is a tuple of one state per tensor."""

    def __init__(self, opt: Optimizer):
        self.opt = opt

    def update(self, grads, state, params, *, loss=None):
        """Each tensor's update from its own gradient, parameter and state."""
        out = [self.opt.update([g], s, [p], loss=loss) for g, s, p in zip(grads, state, params)]
        return [u[0] for u, _ in out], tuple(s for _, s in out)


class ProtocolOptimizer(torch.optim.Optimizer):
    """A ``torch.optim.Optimizer`` driven by a protocol optimizer ``opt`` (``init`` / ``update``).

    Use it like any ``torch.optim`` optimizer: ``zero_grad()``, ``loss.backward()``, ``step()`` (or
    ``step(closure)``, or ``step(loss=loss)`` to pass the loss on without a closure).

    **lr.** ``lr`` multiplies the update of the wrapped protocol optimizer, relative to the ``lr`` given to the
    constructor: every step adds ``(group['lr'] / lr) * u`` to the parameters, where ``u`` is the update that
    ``opt`` proposes (times the learned LR multiplier when a controller runs, see below). A hand-coded
    baseline's own rate is already inside ``u``: ``ProtocolOptimizer(params, Adam(lr=1e-3))`` steps exactly like
    ``torch.optim.Adam(params, lr=1e-3)``, and so does ``ProtocolOptimizer(params, Adam(lr=1e-3), lr=1e-3)``:
    the constructor's ``lr`` is only the reference that the groups' rates are measured against (kept in every
    group as ``group['lr_ref']``). With the default ``lr=1.0`` it reads as a plain multiplier. A group with its
    own rate, ``{'params': head, 'lr': 0.1}``, takes ``0.1 / lr`` times the update. ``torch.optim.lr_scheduler``
    schedulers change ``group['lr']`` and hence the multiplier: ``StepLR(opt, 10, gamma=0.5)`` halves the
    updates every 10 steps; rates a scheduler sets in absolute terms (``CosineAnnealingLR``'s ``eta_min``,
    ``OneCycleLR``'s ``max_lr``) are read in the same units, relative to the constructor's ``lr``.
    ``group['lr'] = 0`` freezes a group (its state still advances, as in ``torch.optim``).

    **Parameters without gradients.** As in ``torch.optim``, a step moves only the parameters whose ``.grad``
    is not ``None`` (``requires_grad=False`` parameters never have one); the others are left exactly as they
    are. An optimizer marked ``per_tensor`` (every hand-coded baseline) keeps one state per tensor: a tensor
    skipped at a step keeps its state (Adam's moments and step count) unchanged, exactly like ``torch.optim``.
    Any other optimizer (a learned meta-network, whose state is laid out over all the tensors it updates at
    once) keeps one state per parameter group over the tensors that take part in the step. While that set
    stays the same (the usual case, frozen parameters included), the state carries on; when it changes, the
    state restarts, ``opt.init`` over the new set (a warning says so), while the group's step count and
    controller statistics carry on. Sparse gradients raise ``ValueError`` naming the parameter.

    **Parameter groups.** Every group (including those added by :meth:`add_param_group`) has its own ``lr``,
    its own protocol state and its own controller state.

    **dtype.** A meta-network (an ``nn.Module``) runs in the dtype of its own weights: gradients and parameters
    are cast to it on the way in, and each update is added to its parameter in the parameter's dtype, so
    float64 and bfloat16 models work with a float32 meta-network as it is. A hand-coded baseline computes in
    each parameter's own dtype, as ``torch.optim`` does. The meta-network must be on the parameters' device.

    **Learned LR and stop decisions.** ``controller`` drives the LR and stop decisions exactly as
    :func:`learned_opt.unroll.unroll` does (the same :func:`~learned_opt.unroll.propose`). ``"auto"`` (the
    default) uses the meta-network's own decision heads (``opt.as_controller()``) when ``opt`` has them, and
    none otherwise. A meta-network meta-trained without a controller has untouched heads, whose LR multiplier is
    exactly 1 and whose stop probability stays at its initial ``sigmoid(stop_bias)`` (about 0.0025), so ``"auto"``
    changes nothing for it; one meta-trained with ``control='learned'`` gets its learned step-size schedule.
    ``None`` turns decisions off; any controller object (``LearnedController``, ``EarlyStopping``,
    ``ReduceOnPlateau``, ...) can be given instead. The controller observes the step (counted per group from 0),
    the loss (from ``closure`` or ``loss=``; without one the loss features read as "no information"), the
    global gradient norm of the group, and ``val_loss=`` when given. After each step ``should_stop`` says
    whether a controller decided to stop (the update of that step is then not applied, as in ``unroll``);
    ``stop_prob`` is the stop probability (``1 - prod(1 - p)`` over groups) and ``decisions`` the last
    :class:`~learned_opt.control.Decision` of every group (``None`` for a group that did not step).

    **Run length.** ``total_steps`` (``None`` or an integer >= 1) is the number of steps the caller means to
    run; it reaches the controller as the observation's ``horizon``, so that a learned scheduler can read the
    fraction of the run done (``step / horizon``). Without it the horizon is 0, "unknown". It is a constructor
    setting, not state: give it again when resuming from a ``state_dict``.

    ``state_dict`` stores the protocol and controller states as plain containers (dicts, lists, tensors,
    numbers), so a checkpoint loads with ``torch.load(..., weights_only=True)``.
    """

    def __init__(self, params: Iterable[Any], opt: Optimizer, lr: float = 1.0, controller: Any = "auto",
                 total_steps: Optional[int] = None):
        if not (hasattr(opt, "init") and hasattr(opt, "update")):
            raise TypeError(f"expected an optimizer with init() and update(), got {type(opt).__name__}")
        check_positive("lr", lr)  # the reference of every group's multiplier group['lr'] / lr: never 0
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
        self.total_steps = None if total_steps is None else int(total_steps)
        # Per group: step count, the tensors of the last step (shared state only), protocol and controller state.
        self.group_states: List[Dict[str, Any]] = []
        self.should_stop = False
        self.stop_prob = 0.0
        self.decisions: List[Optional[Decision]] = []
        super().__init__(params, {"lr": lr, "lr_ref": lr})

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        """Add a group (its own ``lr``, protocol and controller state); it takes part from the next step."""
        index = len(self.param_groups)
        if "lr" in param_group:
            try:
                check_nonnegative("lr", param_group["lr"])
            except ValueError as e:
                raise ValueError(f"parameter group {index}: {e}") from None
        super().add_param_group(param_group)
        self.group_states.append({"step": 0, "active": None, "opt": None, "ctrl": None})
        self.decisions.append(None)

    def __getstate__(self):
        # torch.optim pickles only defaults, state and param_groups; the protocol states must travel too
        state = super().__getstate__()
        state.update({k: self.__dict__[k] for k in ("opt", "controller", "per_tensor", "total_steps",
                                                    "group_states", "should_stop", "stop_prob", "decisions")})
        return state

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], torch.Tensor]] = None, *, loss: Any = None,
             val_loss: Any = None):
        """One update of every group's parameters that have a gradient; returns the closure's loss.

        The loss (from ``closure``, or ``loss=`` when there is none) reaches ``opt.update(..., loss=)`` and the
        controller; ``val_loss=`` reaches the controller only.
        """
        result = None
        if closure is not None:
            with torch.enable_grad():
                result = closure()
            if loss is None:
                loss = result
        loss_t = None if loss is None else torch.as_tensor(loss).detach()
        val_t = None if val_loss is None else torch.as_tensor(val_loss).detach()
        # Check every group before touching any, so that a bad gradient leaves the model as it was.
        active = [self._active(gi, group) for gi, group in enumerate(self.param_groups)]
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

    def _active(self, gi: int, group: Dict[str, Any]) -> List[int]:
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

    def _compute_as(self, p: torch.Tensor) -> Optional[torch.dtype]:
        """The dtype a meta-network computes in (that of its weights); ``None``: the parameter's own."""
        if self.per_tensor or not isinstance(self.opt, torch.nn.Module):
            return None
        for w in self.opt.parameters():
            if w.is_floating_point():
                if w.device != p.device:
                    raise ValueError(f"the meta-network is on {w.device} but the parameters are on {p.device}; "
                                     f"move it there with .to({str(p.device)!r})")
                return w.dtype
        return None

    def _step_group(self, gi: int, group: Dict[str, Any], idx: List[int], loss, val_loss) -> Decision:
        """Update the group's tensors ``idx`` (those with a gradient) and return the controller's decision."""
        # Imported here: the inner loop sits above the optimizers (it runs them), so this arrow points upwards.
        from ..unroll import apply_scale, global_norm, propose

        gs = self.group_states[gi]
        live = [group["params"][i] for i in idx]
        dtype = self._compute_as(live[0])
        params = [p.detach() if dtype is None else p.detach().to(dtype) for p in live]
        grads = [p.grad.detach() if dtype is None else p.grad.detach().to(dtype) for p in live]
        optimizer: Any = self.opt
        if self.per_tensor:
            optimizer = _PerTensor(self.opt)
            states = gs["opt"] if gs["opt"] is not None else [None] * len(group["params"])
            state = tuple(states[i] if states[i] is not None else self.opt.init([p]) for i, p in zip(idx, params))
        else:
            if gs["opt"] is not None and gs["active"] != idx:
                warnings.warn(f"ProtocolOptimizer: the tensors with gradients in parameter group {gi} changed "
                              f"({len(gs['active'])} -> {len(idx)} of {len(group['params'])}); "
                              f"{type(self.opt).__name__} restarts its state over the new set", stacklevel=3)
                gs["opt"] = None
            state = gs["opt"] if gs["opt"] is not None else self.opt.init(params)
        controller = self.controller if self.controller is not None else Constant()
        ctrl_state = controller.init() if gs["step"] == 0 else gs["ctrl"]
        gnorm = global_norm(grads) if self.controller is not None else None
        # The horizon is the run's length when the caller gave total_steps, else 0 ("unknown")
        horizon = 0 if self.total_steps is None else self.total_steps
        updates, state, decision, ctrl_state = propose(optimizer, controller, grads, params, state, ctrl_state,
                                                       step=gs["step"], horizon=horizon, loss=loss,
                                                       val_loss=val_loss, grad_norm=gnorm, training=False)
        if self.per_tensor:
            states = list(states)
            for i, s in zip(idx, state):
                states[i] = s
            state = states
        gs.update(step=gs["step"] + 1, active=idx, opt=state, ctrl=ctrl_state)
        if not decision.stop:
            factor = float(group["lr"]) / float(group["lr_ref"])
            # add_ in the parameter's dtype from an update in the computation's: one rounding (bfloat16 too)
            for p, u in zip(live, apply_scale(updates, decision.lr_scale)):
                p.add_(u, alpha=factor)
        return decision

    def state_dict(self):
        """torch.optim's state dict plus every group's protocol and controller state (plain containers)."""
        out = super().state_dict()
        out["proto_state"] = {"format": STATE_FORMAT, "groups": to_plain(self.group_states)}
        return out

    def load_state_dict(self, state_dict):
        """Restore the param groups and the protocol and controller states saved by :meth:`state_dict`."""
        state_dict = dict(state_dict)
        saved = state_dict.pop("proto_state", None)
        if not (isinstance(saved, dict) and saved.get("format") == STATE_FORMAT):
            raise ValueError("not a state dict of this ProtocolOptimizer version (no "
                             f"{STATE_FORMAT!r} protocol state); it cannot be resumed exactly")
        groups = from_plain(saved["groups"])
        if len(groups) != len(self.param_groups):
            raise ValueError(f"the state dict has {len(groups)} parameter groups, this optimizer "
                             f"{len(self.param_groups)}")
        super().load_state_dict(state_dict)
        self.group_states = [dict(g) for g in groups]
        self.decisions = [None] * len(groups)
        self.should_stop, self.stop_prob = False, 0.0
