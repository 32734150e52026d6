"""Hand-coded optimizers: SGD, momentum (heavy ball, Nesterov), Adam, AdamW, RMSprop, Muon (with AdamW).

Our own math, no ``torch.optim`` inside, written to reproduce the single-tensor ``torch.optim`` code paths
step for step (tests check 200 steps within 1e-6 in float32 and 1e-12 in float64; Muon, whose torch iteration
runs in bfloat16, is also checked step by step along torch's trajectory: tests/test_muon.py). Each optimizer is a
frozen dataclass of hyper-parameters with a NamedTuple state, following the protocol in
:mod:`learned_opt.optim.base`.
Hyper-parameters may be tensors (e.g. a learning rate that requires grad, for meta-gradients).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from ..registry import from_registry
from ..validate import _as_float, check_matching, check_nonnegative, check_positive, check_unit_interval
from .muon import (ADJUST_LR_FNS, NS_COEFFICIENTS, NS_DTYPES, NS_EPS, NS_STEPS, as_matrix, is_matrix, lr_ratio,
                   orthogonalize)

Scalar = Union[float, Tensor]


def _zeros(params: Sequence[Tensor]) -> Tuple[Tensor, ...]:
    return tuple(torch.zeros_like(p, memory_format=torch.preserve_format).detach() for p in params)


def _with_weight_decay(grads, params, weight_decay):
    """L2 weight decay folded into the gradient, as torch.optim does when ``weight_decay > 0``."""
    if isinstance(weight_decay, Tensor) or weight_decay != 0:
        return [g + weight_decay * p for g, p in zip(grads, params)]
    return list(grads)


class SGDState(NamedTuple):
    """Momentum buffers (empty tuple without momentum) and the step count."""
    momentum: Tuple[Tensor, ...]
    count: int


@dataclass(frozen=True)
class SGD:
    """Stochastic gradient descent with optional heavy-ball or Nesterov momentum, dampening and L2 decay."""
    per_tensor: ClassVar[bool] = True  # each tensor's update reads that tensor only (optim/base.py)
    coordinatewise: ClassVar[bool] = True  # each coordinate's update reads that coordinate only (batched tuning)
    lr: Scalar = 0.01
    momentum: Scalar = 0.0
    dampening: Scalar = 0.0
    nesterov: bool = False
    weight_decay: Scalar = 0.0

    def __post_init__(self):
        check_positive("lr", self.lr)
        check_unit_interval("momentum", self.momentum)
        check_unit_interval("dampening", self.dampening)
        check_nonnegative("weight_decay", self.weight_decay)
        if self.nesterov and (_as_float(self.momentum) <= 0 or _as_float(self.dampening) != 0):
            raise ValueError(f"nesterov requires momentum > 0 and dampening = 0, got "
                             f"momentum={self.momentum!r}, dampening={self.dampening!r}")

    def _uses_momentum(self) -> bool:
        return isinstance(self.momentum, Tensor) or self.momentum != 0

    def init(self, params: Sequence[Tensor]) -> SGDState:
        """Zero momentum buffers (used only from the second step, as in torch.optim)."""
        return SGDState(_zeros(params) if self._uses_momentum() else (), 0)

    def update(self, grads, state: SGDState, params, *, loss: Optional[Tensor] = None):
        """One SGD step: ``u = -lr * d`` with d the (momentum) direction."""
        check_matching(grads, params)
        d_p = _with_weight_decay(grads, params, self.weight_decay)
        bufs = state.momentum
        if self._uses_momentum():
            if state.count == 0:  # torch.optim initialises the buffer to the first gradient, undamped
                bufs = tuple(d for d in d_p)
            else:
                bufs = tuple(self.momentum * b + (1 - self.dampening) * d for b, d in zip(bufs, d_p))
            if self.nesterov:
                d_p = [d + self.momentum * b for d, b in zip(d_p, bufs)]
            else:
                d_p = list(bufs)
        return [-self.lr * d for d in d_p], SGDState(bufs, state.count + 1)


@dataclass(frozen=True)
class Momentum(SGD):
    """Heavy-ball momentum: :class:`SGD` with ``momentum=0.9`` by default."""
    momentum: Scalar = 0.9


@dataclass(frozen=True)
class Nesterov(SGD):
    """Nesterov momentum: :class:`SGD` with ``momentum=0.9, nesterov=True`` by default."""
    momentum: Scalar = 0.9
    nesterov: bool = True


class AdamState(NamedTuple):
    """First and second moment estimates, their running max (AMSGrad only) and the step count."""
    mu: Tuple[Tensor, ...]
    nu: Tuple[Tensor, ...]
    nu_max: Tuple[Tensor, ...]
    count: int


@dataclass(frozen=True)
class Adam:
    """Adam (Kingma & Ba 2015) with bias correction, optional L2 weight decay and optional AMSGrad."""
    per_tensor: ClassVar[bool] = True  # each tensor's update reads that tensor only (optim/base.py)
    coordinatewise: ClassVar[bool] = True  # each coordinate's update reads that coordinate only (batched tuning)
    lr: Scalar = 1e-3
    betas: Tuple[Scalar, Scalar] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: Scalar = 0.0
    amsgrad: bool = False
    decoupled: bool = False  # AdamW's decoupled decay; use :class:`AdamW` rather than setting this

    def __post_init__(self):
        check_positive("lr", self.lr)
        if len(self.betas) != 2:
            raise ValueError(f"betas must be a pair, got {self.betas!r}")
        check_unit_interval("betas[0]", self.betas[0])
        check_unit_interval("betas[1]", self.betas[1])
        check_positive("eps", self.eps)
        check_nonnegative("weight_decay", self.weight_decay)

    def init(self, params: Sequence[Tensor]) -> AdamState:
        """Zero moments."""
        return AdamState(_zeros(params), _zeros(params), _zeros(params) if self.amsgrad else (), 0)

    def update(self, grads, state: AdamState, params, *, loss: Optional[Tensor] = None):
        """One Adam step in the order of torch.optim's single-tensor implementation."""
        check_matching(grads, params)
        beta1, beta2 = self.betas
        count = state.count + 1
        if self.decoupled:
            g_list = list(grads)
        else:
            g_list = _with_weight_decay(grads, params, self.weight_decay)
        mu = tuple(torch.lerp(m, g, 1 - beta1) for m, g in zip(state.mu, g_list))
        nu = tuple(v * beta2 + (1 - beta2) * (g * g) for v, g in zip(state.nu, g_list))
        # No .item() here: tensor betas (meta-learned) keep their gradient through the bias corrections.
        # ``** 0.5`` as in torch.optim.Adam (not math.sqrt), so the rounding matches too.
        bc1 = 1 - beta1 ** count
        bc2_sqrt = (1 - beta2 ** count) ** 0.5
        step_size = self.lr / bc1
        if self.amsgrad:
            nu_max = tuple(torch.maximum(a, b) for a, b in zip(state.nu_max, nu))
            second = nu_max
        else:
            nu_max = ()
            second = nu
        updates = [-step_size * (m / (v.sqrt() / bc2_sqrt + self.eps)) for m, v in zip(mu, second)]
        if self.decoupled and (isinstance(self.weight_decay, Tensor) or self.weight_decay != 0):
            # torch.optim first shrinks p by (1 - lr * wd), then adds the Adam step. Computing that new parameter
            # q the same way and returning q - p makes the caller's p + (q - p) reproduce q exactly (Sterbenz),
            # whereas u - lr * wd * p rounds differently and drifts ~1e-6 from torch in float32 over 200 steps.
            decay = 1 - self.lr * self.weight_decay
            updates = [(p * decay + u) - p for u, p in zip(updates, params)]
        return updates, AdamState(mu, nu, nu_max, count)


@dataclass(frozen=True)
class AdamW(Adam):
    """AdamW (Loshchilov & Hutter 2019): Adam with decoupled weight decay, 0.01 by default."""
    weight_decay: Scalar = 1e-2
    decoupled: bool = True


class RMSpropState(NamedTuple):
    """Running mean of squared gradients, of gradients (centered only), momentum buffers, step count."""
    square_avg: Tuple[Tensor, ...]
    grad_avg: Tuple[Tensor, ...]
    momentum: Tuple[Tensor, ...]
    count: int


@dataclass(frozen=True)
class RMSprop:
    """RMSprop (Tieleman & Hinton 2012) with optional momentum, centering and L2 weight decay."""
    per_tensor: ClassVar[bool] = True  # each tensor's update reads that tensor only (optim/base.py)
    coordinatewise: ClassVar[bool] = True  # each coordinate's update reads that coordinate only (batched tuning)
    lr: Scalar = 1e-2
    alpha: float = 0.99
    eps: float = 1e-8
    weight_decay: Scalar = 0.0
    momentum: Scalar = 0.0
    centered: bool = False

    def __post_init__(self):
        check_positive("lr", self.lr)
        check_unit_interval("alpha", self.alpha)
        check_positive("eps", self.eps)
        check_nonnegative("weight_decay", self.weight_decay)
        check_unit_interval("momentum", self.momentum)

    def init(self, params: Sequence[Tensor]) -> RMSpropState:
        """Zero running averages and buffers."""
        uses_momentum = isinstance(self.momentum, Tensor) or self.momentum != 0
        return RMSpropState(_zeros(params), _zeros(params) if self.centered else (),
                            _zeros(params) if uses_momentum else (), 0)

    def update(self, grads, state: RMSpropState, params, *, loss: Optional[Tensor] = None):
        """One RMSprop step in the order of torch.optim's single-tensor implementation."""
        check_matching(grads, params)
        g_list = _with_weight_decay(grads, params, self.weight_decay)
        sq = tuple(s * self.alpha + (1 - self.alpha) * (g * g) for s, g in zip(state.square_avg, g_list))
        if self.centered:
            ga = tuple(torch.lerp(a, g, 1 - self.alpha) for a, g in zip(state.grad_avg, g_list))
            denom = [(s - a * a).sqrt() + self.eps for s, a in zip(sq, ga)]
        else:
            ga = ()
            denom = [s.sqrt() + self.eps for s in sq]
        if state.momentum:
            bufs = tuple(self.momentum * b + g / d for b, g, d in zip(state.momentum, g_list, denom))
            updates = [-self.lr * b for b in bufs]
        else:
            bufs = ()
            updates = [-self.lr * (g / d) for g, d in zip(g_list, denom)]
        return updates, RMSpropState(sq, ga, bufs, state.count + 1)


class MuonState(NamedTuple):
    """One entry per parameter in each tuple: the momentum buffer of a matrix, AdamW's moments of another tensor,
    and an empty tensor where a field does not apply (so that every tensor's state has the same fields, as the
    torch.optim adapter's one state per tensor expects); the step count."""
    momentum: Tuple[Tensor, ...]
    mu: Tuple[Tensor, ...]
    nu: Tuple[Tensor, ...]
    count: int


@dataclass(frozen=True)
class Muon:
    """Muon on the matrices, AdamW on every other tensor, as Muon is used in practice.

    A tensor with two or more dimensions is a matrix; one with more than two (a convolution kernel) is
    orthogonalised as ``(shape[0], prod(shape[1:]))``, and its learning-rate adjustment uses those two sizes.
    The protocol passes no parameter names, so an output layer or an embedding (often left to AdamW by hand) is
    a matrix here too. Scalars and vectors (biases, gains) go to AdamW.

    Matrices follow ``torch.optim.Muon`` step for step: ``B <- lerp(B, g, 1 - momentum)`` (an exponential
    average, from zero), the direction ``lerp(g, B, momentum)`` with ``nesterov`` (else ``B``),
    ``O = orthogonalize(direction)`` (``ns_steps`` Newton–Schulz iterations in ``ns_dtype``: bfloat16 as in
    torch, ``None`` for the parameter's own dtype; :mod:`.muon`), then
    ``p <- p * (1 - lr * weight_decay) - lr * lr_ratio(adjust_lr_fn, rows, cols) * O``: decoupled decay scaled by
    the *unadjusted* ``lr``. Other tensors follow :class:`AdamW` (``adam_lr``, ``betas``, ``eps``,
    ``adam_weight_decay``). Defaults are the two torch classes' own.

    ``batch_dims``: leading dimensions that index independent problems (set by
    :func:`~learned_opt.evaluate.evaluate_batched` to stack tasks): a tensor is classified and orthogonalised by
    its shape after them, each slice with its own norm. ``slicewise`` says the optimizer supports that.
    """
    per_tensor: ClassVar[bool] = True  # each tensor's update reads that tensor only (optim/base.py)
    coordinatewise: ClassVar[bool] = False  # a matrix's update reads the whole matrix
    slicewise: ClassVar[bool] = True  # ... and nothing beyond it: leading batch dims are safe (``batch_dims``)
    lr: Scalar = 1e-3
    momentum: Scalar = 0.95
    nesterov: bool = True
    weight_decay: Scalar = 0.1
    ns_steps: int = NS_STEPS
    adjust_lr_fn: Optional[str] = None
    ns_coefficients: Tuple[float, float, float] = NS_COEFFICIENTS
    ns_eps: float = NS_EPS
    ns_dtype: Optional[str] = "bfloat16"
    adam_lr: Scalar = 1e-3
    betas: Tuple[Scalar, Scalar] = (0.9, 0.999)
    eps: float = 1e-8
    adam_weight_decay: Scalar = 1e-2
    batch_dims: int = 0

    def __post_init__(self):
        check_positive("lr", self.lr)
        check_unit_interval("momentum", self.momentum)
        check_nonnegative("weight_decay", self.weight_decay)
        if isinstance(self.ns_steps, bool) or not isinstance(self.ns_steps, int) or not 0 <= self.ns_steps < 100:
            raise ValueError(f"ns_steps must be an integer in [0, 100), got {self.ns_steps!r}")
        if self.adjust_lr_fn not in ADJUST_LR_FNS:
            raise ValueError(f"unknown adjust_lr_fn {self.adjust_lr_fn!r}; known: None, 'original', "
                             f"'match_rms_adamw'")
        if len(self.ns_coefficients) != 3:
            raise ValueError(f"ns_coefficients must be (a, b, c), got {self.ns_coefficients!r}")
        check_positive("ns_eps", self.ns_eps)
        if self.ns_dtype not in NS_DTYPES:
            raise ValueError(f"unknown ns_dtype {self.ns_dtype!r}; known: {', '.join(map(repr, NS_DTYPES))}")
        if isinstance(self.batch_dims, bool) or not isinstance(self.batch_dims, int) or self.batch_dims < 0:
            raise ValueError(f"batch_dims must be an integer >= 0, got {self.batch_dims!r}")
        check_positive("adam_lr", self.adam_lr)
        check_nonnegative("adam_weight_decay", self.adam_weight_decay)
        self._adamw()  # checks betas and eps

    def _adamw(self) -> AdamW:
        return AdamW(lr=self.adam_lr, betas=self.betas, eps=self.eps, weight_decay=self.adam_weight_decay)

    def _matrices(self, params: Sequence[Tensor]) -> List[bool]:
        return [is_matrix(p.shape, self.batch_dims) for p in params]

    def init(self, params: Sequence[Tensor]) -> MuonState:
        """Zero momentum buffers for the matrices, zero moments for the rest."""
        zeros, mats = _zeros(params), self._matrices(params)
        empty = [z.new_zeros(0) for z in zeros]
        return MuonState(tuple(z if m else e for z, e, m in zip(zeros, empty, mats)),
                         tuple(e if m else z for z, e, m in zip(zeros, empty, mats)),
                         tuple(e if m else z.clone() for z, e, m in zip(zeros, empty, mats)), 0)

    def update(self, grads, state: MuonState, params, *, loss: Optional[Tensor] = None):
        """One step: Muon on the matrices, AdamW (:class:`AdamW`'s own update) on the rest."""
        check_matching(grads, params)
        mats = self._matrices(params)
        rest = [i for i, m in enumerate(mats) if not m]
        adam_updates, adam_state = self._adamw().update(
            [grads[i] for i in rest], AdamState(tuple(state.mu[i] for i in rest), tuple(state.nu[i] for i in rest),
                                                (), state.count), [params[i] for i in rest])
        bufs, mu, nu = list(state.momentum), list(state.mu), list(state.nu)
        for j, i in enumerate(rest):
            mu[i], nu[i] = adam_state.mu[j], adam_state.nu[j]
        it = iter(adam_updates)
        updates: List[Optional[Tensor]] = [None if m else next(it) for m in mats]
        for i in (i for i, m in enumerate(mats) if m):
            bufs[i] = torch.lerp(bufs[i], grads[i], 1 - self.momentum)
            updates[i] = self._matrix_update(grads[i], bufs[i], params[i])
        return updates, MuonState(tuple(bufs), tuple(mu), tuple(nu), state.count + 1)

    def _matrix_update(self, g: Tensor, buf: Tensor, p: Tensor) -> Tensor:
        direction = torch.lerp(g, buf, self.momentum) if self.nesterov else buf
        dtype = p.dtype if self.ns_dtype is None else getattr(torch, self.ns_dtype)
        ortho = orthogonalize(as_matrix(direction, self.batch_dims), self.ns_coefficients, self.ns_steps,
                              self.ns_eps, dtype).reshape(p.shape)
        rows, cols = as_matrix(p, self.batch_dims).shape[-2:]
        step = self.lr * lr_ratio(self.adjust_lr_fn, rows, cols)
        # As in AdamW: the new parameter q the way torch.optim computes it (shrink, then one fused p + alpha * O),
        # returned as q - p, so that the caller's p + (q - p) is q exactly whenever q - p is exact (q within a
        # factor 2 of p) and q to rounding otherwise; a tensor lr (meta-gradients) cannot be a fused alpha, so it
        # multiplies (rounding differently, at float precision).
        q = p * (1 - self.lr * self.weight_decay)
        if isinstance(step, Tensor):
            q = q - step * ortho.to(q.dtype)
        else:
            q = torch.add(q, ortho, alpha=-step)
        return q - p


OPTIMIZERS = {
    "sgd": SGD,
    "momentum": Momentum,
    "nesterov": Nesterov,
    "adam": Adam,
    "adamw": AdamW,
    "rmsprop": RMSprop,
    "muon": Muon,
}


def get_optimizer(name: str, **hparams: Any):
    """Build a hand-coded optimizer by name (``sgd``, ``momentum``, ``nesterov``, ``adam``, ...)."""
    return from_registry(OPTIMIZERS, name, "optimizer", **hparams)
