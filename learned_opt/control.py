"""Meta-control: learning-rate decisions and stop decisions, hand-coded or learned.

A controller observes global scalars of the inner loop (step, loss, validation loss, gradient norm, the
optimizer's state) and returns a :class:`Decision`: a learning-rate scale applied to the optimizer's updates,
a stop probability, a hard stop flag, and whether the current parameters are the best seen so far (early
stopping restores them). Hand-coded schedules reproduce ``torch.optim.lr_scheduler`` step by step, with the
learning rate expressed as a multiple of the base rate. Controllers compose with :class:`Compose`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Optional, Protocol, Sequence, Tuple, Union

from torch import Tensor

from .registry import from_registry
from .validate import check_nonnegative, check_positive, check_unit_interval

LRScale = Union[float, Tensor, Sequence[Tensor]]


@dataclass
class Observation:
    """What a controller sees at inner step ``step`` (0-based), before that step's update is applied."""
    step: int
    horizon: int
    loss: Tensor
    val_loss: Optional[Tensor] = None
    grad_norm: Optional[Tensor] = None
    opt_state: Any = None
    training: bool = False  # True inside a differentiable (meta-training) unroll: decide softly, never hard-stop


@dataclass
class Decision:
    """A controller's output for one inner step."""
    lr_scale: LRScale = 1.0
    stop_prob: Union[float, Tensor] = 0.0
    stop: bool = False
    is_best: bool = False


class Controller(Protocol):
    """``init() -> state`` and ``decide(obs, state) -> (Decision, state)``."""

    def init(self) -> Any:
        """Return the initial controller state."""

    def decide(self, obs: Observation, state: Any) -> Tuple[Decision, Any]:
        """Return this step's decision and the next state."""


class _Stateless:
    """Mixin for pure schedules: the state is ``None`` and the scale depends on the step only."""

    def init(self) -> None:
        """Schedules keep no state."""
        return None

    def decide(self, obs: Observation, state: None) -> Tuple[Decision, None]:
        """The schedule's scale at ``obs.step``; never stops."""
        return Decision(lr_scale=self.scale(obs.step)), None


@dataclass(frozen=True)
class Constant(_Stateless):
    """A constant learning-rate scale (1.0: the optimizer's own learning rate)."""
    value: float = 1.0

    def __post_init__(self):
        check_positive("value", self.value)

    def scale(self, step: int) -> float:
        """``value`` at every step."""
        return self.value


@dataclass(frozen=True)
class StepDecay(_Stateless):
    """Multiply by ``gamma`` every ``step_size`` steps (``torch.optim.lr_scheduler.StepLR``)."""
    step_size: int = 30
    gamma: float = 0.1

    def __post_init__(self):
        if int(self.step_size) < 1:
            raise ValueError(f"step_size must be >= 1, got {self.step_size!r}")
        check_positive("gamma", self.gamma)

    def scale(self, step: int) -> float:
        """``gamma ** (step // step_size)``."""
        return self.gamma ** (step // self.step_size)


@dataclass(frozen=True)
class ExponentialDecay(_Stateless):
    """Multiply by ``gamma`` every step (``torch.optim.lr_scheduler.ExponentialLR``)."""
    gamma: float = 0.99

    def __post_init__(self):
        check_positive("gamma", self.gamma)

    def scale(self, step: int) -> float:
        """``gamma ** step``."""
        return self.gamma ** step


@dataclass(frozen=True)
class Cosine(_Stateless):
    """Cosine decay to ``min_scale`` over ``total_steps``, after an optional linear warm-up.

    Equals ``SequentialLR([LinearLR(warmup_start, 1, warmup_steps), CosineAnnealingLR(T_max, eta_min)])``
    with ``T_max = total_steps - warmup_steps`` (plain ``CosineAnnealingLR`` without warm-up).
    """
    total_steps: int = 100
    min_scale: float = 0.0
    warmup_steps: int = 0
    warmup_start: float = 0.1

    def __post_init__(self):
        if int(self.total_steps) < 1:
            raise ValueError(f"total_steps must be >= 1, got {self.total_steps!r}")
        if not (0 <= int(self.warmup_steps) < int(self.total_steps)):
            raise ValueError(f"warmup_steps must be in [0, total_steps), got {self.warmup_steps!r}")
        check_nonnegative("min_scale", self.min_scale)
        if not (0 < self.warmup_start <= 1):
            raise ValueError(f"warmup_start must be in (0, 1], got {self.warmup_start!r}")

    def scale(self, step: int) -> float:
        """Linear warm-up, then ``min + (1 - min) (1 + cos(pi t / T)) / 2`` (periodic past T, as torch)."""
        if step < self.warmup_steps:
            return self.warmup_start + (1 - self.warmup_start) * step / self.warmup_steps
        t = step - self.warmup_steps
        period = self.total_steps - self.warmup_steps
        return self.min_scale + (1 - self.min_scale) * (1 + math.cos(math.pi * t / period)) / 2


class PlateauState(NamedTuple):
    """Current scale, best metric, consecutive bad checks, remaining cooldown."""
    scale: float
    best: float
    num_bad: int
    cooldown: int


@dataclass(frozen=True)
class ReduceOnPlateau:
    """Multiply by ``factor`` when the validation loss stops improving (``ReduceLROnPlateau``, mode min)."""
    factor: float = 0.1
    patience: int = 10
    threshold: float = 1e-4
    threshold_mode: str = "rel"
    cooldown: int = 0
    min_scale: float = 0.0

    def __post_init__(self):
        check_unit_interval("factor", self.factor)
        if int(self.patience) < 0:
            raise ValueError(f"patience must be >= 0, got {self.patience!r}")
        if self.threshold_mode not in ("rel", "abs"):
            raise ValueError(f"threshold_mode must be 'rel' or 'abs', got {self.threshold_mode!r}")
        check_nonnegative("threshold", self.threshold)

    def init(self) -> PlateauState:
        """Scale 1, no best yet."""
        return PlateauState(1.0, math.inf, 0, 0)

    def _better(self, a: float, best: float) -> bool:
        if self.threshold_mode == "rel":
            return a < best * (1 - self.threshold)
        return a < best - self.threshold

    def decide(self, obs: Observation, state: PlateauState) -> Tuple[Decision, PlateauState]:
        """Update on steps with a validation loss, as ``ReduceLROnPlateau.step(val_loss)``."""
        if obs.val_loss is None:
            return Decision(lr_scale=state.scale), state
        scale, best, bad, cool = state
        current = float(obs.val_loss)
        if self._better(current, best):
            best, bad = current, 0
        else:
            bad += 1
        if cool > 0:
            cool, bad = cool - 1, 0
        if bad > self.patience:
            new = max(scale * self.factor, self.min_scale)
            if scale - new > 1e-8:
                scale = new
            cool, bad = self.cooldown, 0
        return Decision(lr_scale=scale), PlateauState(scale, best, bad, cool)


class EarlyStoppingState(NamedTuple):
    """Best validation loss so far, its step, and the number of checks without improvement."""
    best: float
    best_step: int
    num_bad: int


@dataclass(frozen=True)
class EarlyStopping:
    """Stop after ``patience`` consecutive validation checks that do not improve the best by ``min_delta``.

    An improvement means ``val < best - min_delta``. With ``restore_best`` the inner loop returns the
    parameters that gave the best validation loss.
    """
    patience: int = 10
    min_delta: float = 0.0
    restore_best: bool = True

    def __post_init__(self):
        if not isinstance(self.patience, int) or self.patience < 1:
            raise ValueError(f"patience must be an integer >= 1, got {self.patience!r}")
        check_nonnegative("min_delta", self.min_delta)

    def init(self) -> EarlyStoppingState:
        """No best yet."""
        return EarlyStoppingState(math.inf, -1, 0)

    def decide(self, obs: Observation, state: EarlyStoppingState) -> Tuple[Decision, EarlyStoppingState]:
        """Count a check on steps that carry a validation loss; stop when the count reaches patience."""
        if obs.val_loss is None:
            return Decision(), state
        val = float(obs.val_loss)
        if val < state.best - self.min_delta:
            return Decision(is_best=True), EarlyStoppingState(val, obs.step, 0)
        bad = state.num_bad + 1
        stop = bad >= self.patience
        return Decision(stop_prob=float(stop), stop=stop), EarlyStoppingState(state.best, state.best_step, bad)


class FixedBudgetState(NamedTuple):
    """Best validation loss seen so far."""
    best: float


@dataclass(frozen=True)
class FixedBudget:
    """Stop after ``budget`` updates; with ``restore_best`` the inner loop returns the parameters of the lowest
    validation loss seen (early stopping's restore without its patience), so that a fixed budget compares like
    for like with patience-based early stopping."""
    budget: int = 100
    restore_best: bool = True

    def __post_init__(self):
        if not isinstance(self.budget, int) or isinstance(self.budget, bool) or self.budget < 1:
            raise ValueError(f"budget must be an integer >= 1, got {self.budget!r}")

    def init(self) -> FixedBudgetState:
        """No best yet."""
        return FixedBudgetState(math.inf)

    def decide(self, obs: Observation, state: FixedBudgetState) -> Tuple[Decision, FixedBudgetState]:
        """Mark a new best on steps with a validation loss; stop at step ``budget`` (after ``budget`` updates)."""
        is_best = False
        if obs.val_loss is not None:
            val = float(obs.val_loss)
            if val < state.best:
                state, is_best = FixedBudgetState(val), True
        stop = obs.step >= self.budget
        return Decision(stop_prob=float(stop), stop=stop, is_best=is_best), state


@dataclass(frozen=True)
class Compose:
    """Run several controllers: scales multiply, the run stops if any stops, ``is_best`` if any says so."""
    controllers: Tuple[Any, ...] = field(default_factory=tuple)

    def __init__(self, *controllers: Any):
        object.__setattr__(self, "controllers", tuple(controllers))

    @property
    def restore_best(self) -> bool:
        """True when any member restores the best parameters."""
        return any(getattr(c, "restore_best", False) for c in self.controllers)

    def init(self) -> Tuple[Any, ...]:
        """The members' states."""
        return tuple(c.init() for c in self.controllers)

    def decide(self, obs: Observation, state: Tuple[Any, ...]) -> Tuple[Decision, Tuple[Any, ...]]:
        """Combine the members' decisions; stop probability ``1 - prod(1 - p_i)``."""
        out, states = Decision(), []
        keep = 1.0
        for c, s in zip(self.controllers, state):
            d, s = c.decide(obs, s)
            states.append(s)
            out.lr_scale = multiply_scales(out.lr_scale, d.lr_scale)
            keep = keep * (1 - d.stop_prob)
            out.stop = out.stop or d.stop
            out.is_best = out.is_best or d.is_best
        out.stop_prob = 1 - keep
        return out, tuple(states)


def multiply_scales(a: LRScale, b: LRScale) -> LRScale:
    """Product of two learning-rate scales, each a scalar or a per-tensor sequence."""
    a_seq, b_seq = isinstance(a, (list, tuple)), isinstance(b, (list, tuple))
    if a_seq and b_seq:
        return [x * y for x, y in zip(a, b)]
    if a_seq:
        return [x * b for x in a]
    if b_seq:
        return [a * y for y in b]
    return a * b


SCHEDULES = {
    "constant": Constant,
    "step": StepDecay,
    "exponential": ExponentialDecay,
    "cosine": Cosine,
    "plateau": ReduceOnPlateau,
    "early_stopping": EarlyStopping,
    "fixed_budget": FixedBudget,
}


def get_controller(name: str, **kwargs: Any):
    """Build a hand-coded controller by name (``constant``, ``step``, ``cosine``, ``early_stopping`` ...)."""
    return from_registry(SCHEDULES, name, "controller", **kwargs)
