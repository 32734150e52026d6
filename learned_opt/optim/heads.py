"""The learning-rate and stop decision heads every meta-network (and the learned controller) shares.

A meta-network pools its per-coordinate hidden state per tensor; :class:`DecisionHeads` turns that pooled state
plus global features of the inner run (loss, validation-loss and gradient-norm ratios, time embeddings, kept in a
:class:`DecisionState`) into a learning-rate multiplier and a stop probability. Fresh, the LR head gives a
multiplier of exactly 1 and the stop head a probability near 0.
"""
from __future__ import annotations

import contextlib
import math
from typing import Iterator, List, NamedTuple, Optional, Sequence, Tuple

import torch
from einops import repeat
from torch import Tensor, nn

from ..control import Decision, Observation
from .features import STATE_MODULE, STEP_TIMESCALES, step_embedding


class DecisionState(NamedTuple):
    """Running global statistics the decision heads read (all plain floats, never part of a graph)."""
    loss0: float
    gnorm0: float
    val0: float
    best_val: float
    last_val: float
    since_best: int
    checks: int


DecisionState.__module__ = STATE_MODULE



NUM_GLOBAL_FEATURES = 7 + len(STEP_TIMESCALES)


def _safe_log_ratio(a: float, b: float) -> float:
    if not (math.isfinite(a) and math.isfinite(b)) or a <= 0 or b <= 0:
        return 0.0
    return max(-20.0, min(20.0, math.log(a / b)))


class DecisionHeads(nn.Module):
    """Learning-rate and stop heads over ``(pooled hidden, global features)``.

    The LR multiplier is ``exp(log(lr_bound) * tanh(z))`` for ``z <= 0`` and ``exp(log(lr_max) * tanh(z))`` for
    ``z > 0``, inside ``[1/lr_bound, lr_max]`` (``lr_max`` defaults to ``lr_bound``; ``lr_max=1`` gives a head that
    can only lower the rate: warm-up, decay, backing off); the stop probability is ``stop_max * sigmoid(z +
    stop_bias)``. Last layers start at zero, so a fresh head gives an LR multiplier of exactly 1 and a stop
    probability of ``stop_max * sigmoid(stop_bias)``.
    """

    EXTRA_FEATURES = 0  # features a subclass appends to :meth:`_compute_features`

    def __init__(self, pooled_dim: int, hidden: int = 32, lr_bound: float = 10.0, stop_bias: float = -6.0,
                 stop_max: float = 1.0, stop_threshold: float = 0.5, lr_max: Optional[float] = None):
        super().__init__()
        if not lr_bound > 1:
            raise ValueError(f"lr_bound must be > 1, got {lr_bound!r}")
        lr_max = lr_bound if lr_max is None else lr_max
        if not (math.isfinite(lr_max) and lr_max >= 1):
            raise ValueError(f"lr_max must be a finite number >= 1, got {lr_max!r}")
        self.lr_max = lr_max
        if not 0 < stop_max <= 1:
            raise ValueError(f"stop_max must be in (0, 1], got {stop_max!r}")
        self.lr_bound, self.stop_bias, self.stop_max = lr_bound, stop_bias, stop_max
        self.stop_threshold = stop_threshold
        dim = pooled_dim + NUM_GLOBAL_FEATURES + self.EXTRA_FEATURES
        self.lr = nn.Sequential(nn.Linear(dim, hidden), nn.Tanh(), nn.Linear(hidden, 1))
        self.stop = nn.Sequential(nn.Linear(dim, hidden), nn.Tanh(), nn.Linear(hidden, 1))
        for head in (self.lr, self.stop):
            nn.init.zeros_(head[-1].weight)
            nn.init.zeros_(head[-1].bias)

    def init(self) -> DecisionState:
        """No statistics yet."""
        return DecisionState(math.nan, math.nan, math.nan, math.inf, math.nan, 0, 0)

    @staticmethod
    def observe(obs: Observation, state: DecisionState) -> DecisionState:
        """Fold this step's loss, gradient norm and (when present) validation loss into the statistics."""
        loss = float(obs.loss.detach()) if obs.loss is not None else math.nan
        gnorm = float(obs.grad_norm) if obs.grad_norm is not None else math.nan
        loss0 = loss if math.isnan(state.loss0) else state.loss0
        gnorm0 = gnorm if math.isnan(state.gnorm0) else state.gnorm0
        val0, best, last, since, checks = state.val0, state.best_val, state.last_val, state.since_best, \
            state.checks
        if obs.val_loss is not None:
            last = float(obs.val_loss.detach())
            val0 = last if math.isnan(val0) else val0
            checks += 1
            if last < best:
                best, since = last, 0
            else:
                since += 1
        return DecisionState(loss0, gnorm0, val0, best, last, since, checks)

    def features(self, obs: Observation, state: DecisionState, like: Tensor) -> Tensor:
        """Global features: loss, validation and gradient-norm ratios, time embeddings.

        Built from Python floats, so they are *constants* in the meta-graph (a deliberate choice: the
        meta-gradient is the derivative with these features held fixed, not their full derivative, which would
        run through every loss and gradient norm they read). :meth:`record_features` / :meth:`replay_features`
        freeze them, so that a finite-difference check measures the same derivative.
        """
        if self._feature_override is not None:
            return self._feature_override(obs, state, like)
        return self._compute_features(obs, state, like)

    # Off (None) except inside record_features / replay_features: the hot path pays one attribute check.
    _feature_override = None

    @contextlib.contextmanager
    def _override_features(self, fn):
        previous = self._feature_override
        self._feature_override = fn
        try:
            yield
        finally:
            self._feature_override = previous

    @contextlib.contextmanager
    def record_features(self) -> Iterator[List[Tuple[int, Tensor]]]:
        """Record ``(step, features)`` of every decision made inside the block into the yielded list."""
        tape: List[Tuple[int, Tensor]] = []

        def record(obs, state, like):
            feats = self._compute_features(obs, state, like)
            tape.append((obs.step, feats))
            return feats

        with self._override_features(record):
            yield tape

    @contextlib.contextmanager
    def replay_features(self, tape: Sequence[Tuple[int, Tensor]]) -> Iterator[None]:
        """Inside the block, use the recorded features in order instead of computing them (finite differences
        of a meta-gradient with the features frozen to those of the recorded run). Raises ``RuntimeError`` when
        the decisions do not follow the tape step for step, or leave some of it unused."""
        position = 0

        def replay(obs, state, like):
            nonlocal position
            if position >= len(tape) or tape[position][0] != obs.step:
                expected = tape[position][0] if position < len(tape) else "the end of the tape"
                raise RuntimeError(f"feature replay out of step: decision at step {obs.step}, tape at {expected}")
            position += 1
            return tape[position - 1][1].to(like)

        with self._override_features(replay):
            yield
        if position != len(tape):
            raise RuntimeError(f"feature replay used {position} of {len(tape)} recorded steps")

    @staticmethod
    def _compute_features(obs: Observation, state: DecisionState, like: Tensor) -> Tensor:
        """The features of :meth:`features`, always computed afresh."""
        loss = float(obs.loss.detach()) if obs.loss is not None else math.nan
        gnorm = float(obs.grad_norm) if obs.grad_norm is not None else math.nan
        has_val = state.checks > 0
        feats = [
            _safe_log_ratio(loss, state.loss0),
            _safe_log_ratio(state.last_val, state.val0) if has_val else 0.0,
            _safe_log_ratio(state.last_val, state.best_val) if has_val else 0.0,
            math.tanh(state.since_best / 5.0),
            math.tanh(state.since_best / 20.0),
            _safe_log_ratio(gnorm, state.gnorm0),
            1.0 if has_val else 0.0,
        ]
        base = torch.tensor(feats, dtype=like.dtype, device=like.device)
        return torch.cat([base, step_embedding(obs.step, like)])

    def heads(self, pooled: Tensor, g: Tensor, per_tensor: bool):
        """``(lr_scale, stop_prob)`` from pooled hidden ``(num_tensors, d)`` and global features ``g``."""
        global_in = torch.cat([pooled.mean(0), g])
        stop_logit = self.stop(global_in).squeeze(-1) + self.stop_bias
        stop_prob = self.stop_max * torch.sigmoid(stop_logit)
        if per_tensor:
            tensor_in = torch.cat([pooled, repeat(g, "f -> t f", t=pooled.shape[0])], dim=-1)
            lr_scale = list(torch.exp(self._log_lr(self.lr(tensor_in).squeeze(-1))).unbind(0))
        else:
            lr_scale = torch.exp(self._log_lr(self.lr(global_in).squeeze(-1)))
        return lr_scale, stop_prob

    def _log_lr(self, z: Tensor) -> Tensor:
        """``log(lr_bound) * tanh(z)`` for ``z <= 0``, ``log(lr_max) * tanh(z)`` above (continuous at 0)."""
        t = torch.tanh(z)
        if self.lr_max == self.lr_bound:
            return math.log(self.lr_bound) * t
        # at z = 0 (a fresh head) the lower branch gives the gradient, so a head with lr_max = 1 can learn
        return torch.where(t <= 0, math.log(self.lr_bound) * t, math.log(self.lr_max) * t)

    def forward(self, pooled: Tensor, obs: Observation, state: DecisionState, per_tensor: bool):
        """``(lr_scale, stop_prob, new_state)``; ``pooled`` is ``(num_tensors, d)`` and ``(d,)`` globally."""
        state = self.observe(obs, state)
        lr_scale, stop_prob = self.heads(pooled, self.features(obs, state, pooled), per_tensor)
        return lr_scale, stop_prob, state

    def to_decision(self, lr_scale, stop_prob: Tensor, obs: Observation) -> Decision:
        """A :class:`Decision`; a hard stop only outside meta-training, when the probability crosses the
        threshold."""
        stop = (not obs.training) and float(stop_prob.detach()) > self.stop_threshold
        return Decision(lr_scale=lr_scale, stop_prob=stop_prob, stop=stop)

    def decision(self, pooled: Tensor, obs: Observation, state: DecisionState, per_tensor: bool):
        """This step's :class:`Decision` and the next state."""
        lr_scale, stop_prob, state = self(pooled, obs, state, per_tensor)
        return self.to_decision(lr_scale, stop_prob, obs), state
