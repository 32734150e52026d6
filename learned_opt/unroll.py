"""The one inner loop: any optimizer, with any controller, on any task, for T steps.

Used alike by hand-coded baselines, learned optimizers, evaluation and meta-training. With
``differentiable=True`` the parameters keep their graph through the updates (meta-training); with
``second_order=True`` the learner's gradients are themselves differentiated (Hessian-vector terms), otherwise
they enter as constants, as in Andrychowicz et al. (2016). With ``differentiable=False`` every step is cut from
the graph, so memory stays flat in the horizon.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .control import Constant, Decision, Observation
from .validate import check_positive_int

RECORD_KEYS = ("step", "train_loss", "val_loss", "lr_scale", "stop_prob", "stop", "grad_norm", "update_norm")


@dataclass
class UnrollResult:
    """What an unroll produced.

    ``train_losses`` / ``val_losses`` / ``stop_probs`` / ``problem_losses`` (per-problem vectors) are
    tensors, with graph when differentiable, one per recorded step; ``records`` holds Python floats of the
    per-step statistics, keyed by :data:`RECORD_KEYS`. Row ``i`` belongs to inner step
    ``records['step'][i]``: the loss *at* the parameters after that many updates.
    """
    params: List[Tensor]
    opt_state: Any
    ctrl_state: Any
    step: int
    stopped: bool = False
    stop_step: Optional[int] = None
    best_step: Optional[int] = None
    diverged: bool = False
    train_losses: List[Tensor] = field(default_factory=list)
    val_losses: List[Optional[Tensor]] = field(default_factory=list)
    stop_probs: List[Tensor] = field(default_factory=list)
    records: Dict[str, list] = field(default_factory=lambda: {k: [] for k in RECORD_KEYS})
    problem_losses: List[Tensor] = field(default_factory=list)

    def problem_loss_matrix(self) -> Tensor:
        """Per-problem losses stacked to ``(rows, num_problems)``, detached."""
        return torch.stack([p.detach() for p in self.problem_losses])

    def record(self, t: int, per_problem: Tensor, loss: Tensor, val: Optional[Tensor], differentiable: bool,
               scale=1.0, stop_prob=0.0, stop: bool = False, gnorm=math.nan, unorm=math.nan) -> None:
        """Append one row: the losses at the parameters after ``t`` updates and that step's decision."""
        # Without differentiable, keep no graph: a loss's grad_fn would pin that step's parameters.
        self.train_losses.append(loss if differentiable else loss.detach())
        self.val_losses.append(val)
        self.problem_losses.append(per_problem if differentiable else per_problem.detach())
        rec = self.records
        rec["step"].append(t)
        rec["train_loss"].append(float(loss.detach()) / per_problem.numel())
        rec["val_loss"].append(math.nan if val is None else float(val.detach()))
        rec["lr_scale"].append(_mean_scale(scale))
        rec["stop_prob"].append(_float(stop_prob))
        rec["stop"].append(bool(stop))
        rec["grad_norm"].append(float(gnorm))
        rec["update_norm"].append(float(unorm))


def global_norm(tensors: Sequence[Tensor]) -> Tensor:
    """Global L2 norm of a list of tensors, detached (one fused call, not a Python loop)."""
    with torch.no_grad():
        return torch.linalg.vector_norm(torch.stack(torch._foreach_norm([t.detach() for t in tensors])))


def apply_scale(updates: Sequence[Tensor], scale) -> List[Tensor]:
    """``scale * u`` for every update; ``scale`` is a number, a 0-d tensor or one scale per tensor."""
    if isinstance(scale, (list, tuple)):
        if len(scale) != len(updates):
            raise ValueError(f"got {len(scale)} learning-rate scales for {len(updates)} tensors")
        if all(isinstance(s, Tensor) for s in scale):
            return list(torch._foreach_mul(updates, list(scale)))
        return [s * u for s, u in zip(scale, updates)]
    if isinstance(scale, Tensor) or scale != 1.0:
        return [scale * u for u in updates] if isinstance(scale, Tensor) else list(
            torch._foreach_mul(updates, scale))
    return list(updates)


def _float(x) -> float:
    # detach first: float() of a tensor that requires grad (a learned scale or stop prob) warns
    return float(x.detach()) if isinstance(x, Tensor) else float(x)


def _mean_scale(scale) -> float:
    if isinstance(scale, (list, tuple)):
        return float(sum(_float(s) for s in scale) / max(len(scale), 1))
    return _float(scale)


def propose(optimizer, controller, grads: Sequence[Tensor], params: Sequence[Tensor], opt_state: Any,
            ctrl_state: Any, *, step: int, horizon: int, loss: Optional[Tensor], val_loss: Optional[Tensor] = None,
            grad_norm: Optional[Tensor] = None, training: bool = False) -> Tuple[List[Tensor], Any, Decision, Any]:
    """One inner step's proposal, not yet applied: ``(updates, opt_state, decision, ctrl_state)``.

    The optimizer updates first; the controller then decides on an :class:`Observation` that carries the new
    optimizer state (a meta-network's own heads read their pooled hidden state there). The caller applies
    ``apply_scale(updates, decision.lr_scale)`` unless ``decision.stop``. Shared by :func:`unroll` and the
    ``torch.optim`` adapter (:class:`learned_opt.optim.adapter.ProtocolOptimizer`), so both drive an optimizer
    and its controller the same way.
    """
    updates, opt_state = optimizer.update(grads, opt_state, params, loss=loss)
    obs = Observation(step, horizon, loss, val_loss, grad_norm, opt_state, training)
    decision, ctrl_state = controller.decide(obs, ctrl_state)
    return updates, opt_state, decision, ctrl_state


def _losses_at(task, params: Sequence[Tensor], t: int, need_grad: bool, generator: torch.Generator,
               differentiable: bool, val_every: int) -> Tuple[List[Tensor], Tensor, Tensor, Optional[Tensor]]:
    """``(params, per-problem losses, their sum, validation loss or None)`` on a fresh training batch at step ``t``."""
    batch = task.sample_batch(generator, "train")
    params = [p if p.requires_grad else p.detach().requires_grad_(need_grad) for p in params]
    with torch.set_grad_enabled(need_grad or differentiable):
        per_problem = task.losses(params, batch)
        loss = per_problem.sum()
    val = None
    if val_every and t % val_every == 0:
        with torch.set_grad_enabled(differentiable):
            val = task.loss(params, task.sample_batch(generator, "val"))
    return params, per_problem, loss, val


def _start(task, optimizer, controller, generator: torch.Generator, params, opt_state, ctrl_state,
           differentiable: bool) -> Tuple[List[Tensor], Any, Any]:
    """The parameters, optimizer state and controller state an unroll starts from (fresh where not given)."""
    if params is None:
        params = task.init(generator)
    params = [p if differentiable else p.detach() for p in params]
    if opt_state is None:
        with torch.no_grad():
            opt_state = optimizer.init([p.detach() for p in params])
    if ctrl_state is None:
        ctrl_state = controller.init()
    return params, opt_state, ctrl_state


def unroll(task, optimizer, controller=None, *, steps: int, generator: torch.Generator,
           params: Optional[Sequence[Tensor]] = None, opt_state: Any = None, ctrl_state: Any = None,
           start_step: int = 0, horizon: Optional[int] = None, differentiable: bool = False,
           second_order: bool = False, val_every: int = 0, final_eval: bool = True,
           observe: Optional[Callable[[int, List[Tensor]], None]] = None) -> UnrollResult:
    """Run ``steps`` inner steps of ``optimizer`` under ``controller`` on ``task``.

    ``params`` / ``opt_state`` / ``ctrl_state`` / ``start_step`` continue an earlier unroll (truncations);
    by default the task initialises the parameters. ``val_every=k`` evaluates the validation loss every ``k``
    steps (0: never). The loop stops early when the controller decides to stop; without ``differentiable`` it
    also stops when every problem's loss is non-finite (``diverged``). ``observe(t, params)``, when given, is
    called with the (detached) parameters after ``t`` updates at the start of every step and after the last one;
    it must not draw from ``generator`` (evaluation at checkpoints uses it).
    """
    check_positive_int("steps", steps)
    horizon = start_step + steps if horizon is None else horizon
    check_positive_int("horizon", horizon)
    if val_every < 0:
        raise ValueError(f"val_every must be >= 0, got {val_every!r}")
    controller = Constant() if controller is None else controller
    params, opt_state, ctrl_state = _start(task, optimizer, controller, generator, params, opt_state, ctrl_state,
                                           differentiable)
    restore_best = getattr(controller, "restore_best", False)
    result = UnrollResult(params, opt_state, ctrl_state, start_step)
    best = None  # (parameters, step, validation loss) of the best validation check, for restore_best
    t = start_step
    for t in range(start_step, start_step + steps):
        if observe is not None:
            observe(t, [p.detach() for p in params])
        params, per_problem, loss, val = _losses_at(task, params, t, True, generator, differentiable, val_every)
        grads = torch.autograd.grad(loss, params, create_graph=differentiable and second_order,
                                    retain_graph=differentiable)
        if differentiable and not second_order:
            grads = [g.detach() for g in grads]
        gnorm = global_norm(grads)
        with torch.set_grad_enabled(differentiable):
            loss_in = loss if differentiable else loss.detach()
            updates, opt_state, decision, ctrl_state = propose(
                optimizer, controller, grads, params, opt_state, ctrl_state, step=t, horizon=horizon,
                loss=loss_in, val_loss=val, grad_norm=gnorm, training=differentiable)
            if isinstance(decision.stop_prob, Tensor):
                result.stop_probs.append(decision.stop_prob)
            if decision.is_best:
                best = ([p.detach().clone() for p in params], t, _float(val) if val is not None else math.inf)
            if decision.stop:
                result.record(t, per_problem, loss, val, differentiable, decision.lr_scale, decision.stop_prob,
                              True, gnorm)
                result.stopped, result.stop_step = True, t
                break
            scaled = apply_scale(updates, decision.lr_scale)
            params = list(torch._foreach_add(params, scaled))  # one fused, differentiable op for all tensors
            if not differentiable:
                params = [p.detach() for p in params]
        result.record(t, per_problem, loss, val, differentiable, decision.lr_scale, decision.stop_prob, False,
                      gnorm, global_norm(scaled))
        if not differentiable and not torch.isfinite(per_problem).any():
            result.diverged = True
            break
    else:
        t = start_step + steps
        if observe is not None:
            observe(t, [p.detach() for p in params])
        if final_eval:
            # The closing evaluation only peeks at the data stream: a run continued from here (the next
            # truncation) draws the same batch for step t, so truncated unrolls follow the untruncated trajectory.
            # With restore_best the final parameters are a candidate too, so their validation loss is measured.
            compare_final = restore_best and best is not None
            state = generator.get_state()
            _, per_problem, loss, val = _losses_at(task, params, t, False, generator, differentiable,
                                                   1 if compare_final else val_every)
            generator.set_state(state)
            result.record(t, per_problem, loss, val, differentiable)
            if compare_final and _float(val) < best[2]:
                best = (params, t, _float(val))
    if restore_best and best is not None:
        params = best[0]
        result.best_step = best[1]
    if not differentiable:
        params = [p.detach() for p in params]
    result.params, result.opt_state, result.ctrl_state = params, opt_state, ctrl_state
    result.step = t
    return result
