"""Learned optimizers: meta-networks that output updates, a learning-rate decision and a stop decision.

* :class:`CoordLSTM` follows Andrychowicz et al. (2016), "Learning to learn by gradient descent by gradient
  descent": a two-layer LSTM shared across coordinates, per-coordinate state, gradients preprocessed to
  ``(log|g| / p, sign g)`` (or ``(-1, e^p g)`` for tiny gradients), output times a fixed scale.
* :class:`CoordMLP` follows Metz et al. (2020/2022): a per-parameter MLP over gradient, parameter, momenta at
  several decays (normalised per tensor) and a step embedding; update ``d * exp(m * c_exp) * c_step``.

Both implement the optimizer protocol (``init`` / ``update``) *and* the controller protocol (``init`` is shared;
``decide`` turns pooled hidden state plus global features into a learning-rate multiplier and a stop
probability through :class:`DecisionHeads`). Their meta-weights are ``.parameters()``. All coordinates of all
tensors are processed in one batched call; per-tensor statistics use a segment index over that flat layout.
Without a graph (evaluation, the drop-in optimizer, ES / PES particles) ``update`` takes a fast path: feature-major,
blocked, in place on reused buffers, equal to the reference to float rounding (``tests/test_fast_paths.py``).
The update head starts at zero updates, the LR head at multiplier 1 and the stop head near probability 0.
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import torch
from einops import rearrange, repeat
from torch import Tensor, nn

from ..control import Decision, Observation
from ..registry import from_registry

STEP_TIMESCALES = (1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1000.0)


class Layout(NamedTuple):
    """How a list of tensors maps to one flat vector of ``n`` coordinates."""
    shapes: Tuple[torch.Size, ...]
    sizes: Tuple[int, ...]
    segment: Tensor  # (n,) index of the tensor each coordinate belongs to
    counts: Tensor  # (num_tensors,) coordinates per tensor


def make_layout(params: Sequence[Tensor]) -> Layout:
    """The flat layout of ``params``."""
    if len(params) == 0:
        raise ValueError("cannot optimise an empty parameter list")
    sizes = tuple(p.numel() for p in params)
    device = params[0].device
    segment = torch.repeat_interleave(torch.arange(len(sizes), device=device),
                                      torch.tensor(sizes, device=device))
    counts = torch.tensor(sizes, device=device, dtype=params[0].dtype)
    return Layout(tuple(p.shape for p in params), sizes, segment, counts)


def flatten(tensors: Sequence[Tensor]) -> Tensor:
    """Concatenate tensors into one vector."""
    return torch.cat([t.reshape(-1) for t in tensors])


def unflatten(flat: Tensor, layout: Layout) -> List[Tensor]:
    """Split a flat vector back into tensors of the layout's shapes."""
    return [c.reshape(s) for c, s in zip(torch.split(flat, layout.sizes), layout.shapes)]


def check_layout(grads: Sequence[Tensor], layout: Layout) -> None:
    """Raise ``ValueError`` unless ``grads`` have the shapes of the layout a meta-network's state was made for."""
    if len(grads) != len(layout.sizes) or any(g.shape != s for g, s in zip(grads, layout.shapes)):
        raise ValueError(f"gradient shapes {[tuple(g.shape) for g in grads]} do not match the state's "
                         f"{[tuple(s) for s in layout.shapes]}")


def segment_mean(x: Tensor, layout: Layout) -> Tensor:
    """Mean over each tensor's coordinates: ``(n, ...) -> (num_tensors, ...)``."""
    out = x.new_zeros((len(layout.sizes),) + x.shape[1:]).index_add(0, layout.segment, x)
    return out / layout.counts.reshape((-1,) + (1,) * (x.dim() - 1))


def segment_mean_acc(x: Tensor, layout: Layout) -> Tensor:
    """:func:`segment_mean` accumulated in float64 (then cast back): a float32 ``index_add`` over a 200k-coordinate
    tensor is off by ~1e-5 relative, which would make the per-tensor normalisation depend on the summation order
    (the fast paths' per-tensor means are ~100x closer to the float64 ones)."""
    if x.dtype in (torch.float64, torch.complex128):
        return segment_mean(x, layout)
    return segment_mean(x.double(), layout).to(x.dtype)


# Learners up to this many coordinates keep the float32 per-tensor sums and the reference path of CoordLSTM and
# CoordMLP: bitwise the numbers every reported CoordLSTM / CoordMLP result was made with (all on learners of at most
# 4,810 coordinates). Above it, float32 ``index_add`` drifts past 1e-6 relative and the fast paths pay off.
SMALL_LEARNER = 8192


def segment_mean_stable(x: Tensor, layout: Layout) -> Tensor:
    """:func:`segment_mean` for learners up to :data:`SMALL_LEARNER` coordinates, :func:`segment_mean_acc` above."""
    return segment_mean(x, layout) if x.shape[0] <= SMALL_LEARNER else segment_mean_acc(x, layout)


def mean_of_block_sums(sums: Tensor, sizes: Sequence[int], dtype: torch.dtype) -> Tensor:
    """Per-tensor means ``(tensors, h)`` from per-tensor sums accumulated block by block in float64."""
    return (sums / torch.tensor(sizes, dtype=torch.float64, device=sums.device).unsqueeze(1)).to(dtype)


def chunk_means(x: Tensor, sizes: Sequence[int]) -> Tensor:
    """Per-tensor means of a feature-major ``(f, n)`` (or ``(n,)``) tensor: ``(num_tensors, f)`` (or
    ``(num_tensors,)``), over views of its contiguous per-tensor column blocks (no index scatter)."""
    return torch.stack([c.mean(-1) for c in x.split(list(sizes), dim=-1)])


FAST_BLOCK = 16384  # coordinates per block of the fast paths: a block's hidden activations stay in cache


def block_width(n: int) -> int:
    """The widest block :func:`blocks` yields for ``n`` coordinates (scratch buffers are this wide)."""
    return min(n, FAST_BLOCK)


def blocks(sizes: Sequence[int], block: Optional[int] = None) -> Iterator[Tuple[int, int, int]]:
    """``(tensor index, start, end)`` column ranges of the flat layout, at most ``block`` wide, never crossing a
    tensor boundary (so per-tensor biases and sums apply to a whole block). Running a chain of elementwise ops and
    small-``k`` products block by block keeps its ``(hidden, block)`` intermediates in cache instead of streaming
    ``(hidden, n)`` arrays through memory once per op (about 2x on the CoordLSTM at 200k coordinates)."""
    block = FAST_BLOCK if block is None else block
    start = 0
    for j, size in enumerate(sizes):
        for s in range(start, start + size, block):
            yield j, s, min(start + size, s + block)
        start += size


def ema(m: Tensor, g: Tensor, b: float, scratch: Tensor, out: Optional[Tensor] = None,
        square: bool = False) -> Tensor:
    """``b * m + (1 - b) * g`` (``* g`` once more with ``square``) by the very ops the reference paths use, so
    the fast paths' accumulators are bitwise the reference's: a fused ``lerp`` rounds differently, and where the
    two terms nearly cancel a 1-ulp difference becomes 1e-5 relative, which an LSTM's state carries on and grows."""
    out = torch.mul(m, b, out=out) if out is not None else torch.mul(m, b)
    t = torch.mul(g, 1 - b, out=scratch)
    if square:
        t.mul_(g)
    return out.add_(t)


def tanh_(x: Tensor) -> Tensor:
    """``tanh`` in place as ``2 sigmoid(2x) - 1``: on this CPU build ``tanh_`` costs 5.6 ns per float32 element and
    ``sigmoid_`` 0.43 (measured), and the LSTM's cell calls it on 40 floats per coordinate per step. Absolute error
    about 1e-7 (the cancellation near 0 costs relative, not absolute, accuracy)."""
    return x.mul_(2.0).sigmoid_().mul_(2.0).sub_(1.0)


def preprocess_gradient_into(g: Tensor, out: Tensor, p: float, scratch: Tensor) -> None:
    """:func:`preprocess_gradient` written feature-major into ``out`` ``(2, n)`` (fast paths; ``scratch``: an ``(n,)``
    float buffer it may overwrite). Equal to it up to float rounding at ``|g| = e^-p``."""
    floor = math.exp(-p)
    a = torch.abs(g, out=scratch)
    small = a < floor
    torch.log(a.clamp_min_(floor), out=out[0]).div_(p).masked_fill_(small, -1.0)
    torch.mul(g, math.exp(p), out=out[1]).clamp_(-1.0, 1.0)  # sign(g) where |g| >= e^-p, e^p g below


def preprocess_gradient(g: Tensor, p: float = 10.0) -> Tensor:
    """L2L preprocessing: ``(log|g|/p, sign g)`` if ``|g| >= e^-p`` else ``(-1, e^p g)``; ``(n,) -> (n, 2)``."""
    big = g.abs() >= math.exp(-p)
    first = torch.where(big, torch.log(g.abs().clamp_min(math.exp(-p))) / p, torch.full_like(g, -1.0))
    second = torch.where(big, torch.sign(g), g * math.exp(p))
    return torch.stack([first, second], dim=-1)


def step_embedding(count: int, like: Tensor, timescales: Sequence[float] = STEP_TIMESCALES) -> Tensor:
    """``tanh(t / tau)`` for several timescales, a vector like ``like``'s dtype and device."""
    return torch.tensor([math.tanh(count / tau) for tau in timescales], dtype=like.dtype, device=like.device)


class DecisionState(NamedTuple):
    """Running global statistics the decision heads read (all plain floats, never part of a graph)."""
    loss0: float
    gnorm0: float
    val0: float
    best_val: float
    last_val: float
    since_best: int
    checks: int


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


class _MetaNetwork(nn.Module):
    """Shared plumbing: config for save/load, the controller half of the protocol."""
    config: Dict[str, Any]
    heads: DecisionHeads
    lr_mode: str

    def _add_output_and_heads(self, hidden: int, outputs: int, init_zero: bool, lr_bound: float,
                              stop_bias: float, stop_threshold: float, pooled_extra: int = 0,
                              lr_max: Optional[float] = None) -> None:
        """The per-coordinate output layer (zero-initialised: a stable start where every meta-gradient is
        informative) and the LR / stop decision heads over the pooled hidden state."""
        self.out = nn.Linear(hidden, outputs)
        if init_zero:
            nn.init.zeros_(self.out.weight)
            nn.init.zeros_(self.out.bias)
        self.heads = DecisionHeads(hidden + pooled_extra, lr_bound=lr_bound, stop_bias=stop_bias,
                                   stop_threshold=stop_threshold, lr_max=lr_max)

    # The fast path of ``update`` (feature-major, in-place work on reused scratch buffers, no autograd) runs
    # whenever nothing needs a graph and the configuration has one; False (per instance) forces the reference.
    fast_path = True
    # ... and only on learners of at least this many coordinates (CoordLSTM / CoordMLP: :data:`SMALL_LEARNER`)
    fast_min_coordinates = 0

    def _fast_ok(self, n: int, *tensors: Optional[Tensor]) -> bool:
        """Whether the fast path may run on a learner of ``n`` coordinates: it is large enough and no autograd
        graph is wanted (evaluation, the drop-in optimizer, ES / PES particles), neither through ``tensors``
        (gradients, parameters, state) nor through the meta-weights."""
        if not self.fast_path or n < self.fast_min_coordinates:
            return False
        if not torch.is_grad_enabled():
            return True
        return not (any(t is not None and t.requires_grad for t in tensors)
                    or any(w.requires_grad for w in self.parameters()))

    def _workspace(self, name: str, shape: Tuple[int, ...], like: Tensor, fill: Optional[float] = None) -> Tensor:
        """A scratch tensor kept between steps (fast paths only). Allocating tens of floats per coordinate afresh
        every step made glibc map and fault in new pages each time: at 200k coordinates that alone doubled the
        NormMLP step (16 ms against 6.4 ms with the allocations reused). ``fill``: the value a new buffer starts
        with (rows of it that the caller never writes keep it)."""
        ws = self.__dict__.setdefault("_ws", {})
        key = (name, tuple(shape), like.dtype, like.device)
        buf = ws.get(key)
        if buf is None:
            for old in [k for k in ws if k[0] == name]:  # one size per name: a new model replaces the old buffer
                del ws[old]
            buf = ws[key] = torch.empty(shape, dtype=like.dtype, device=like.device)
            if fill is not None:
                buf.fill_(fill)
        return buf

    def __getstate__(self):
        # scratch buffers are not state: a pickled optimizer (ProtocolOptimizer's state travels) leaves them out
        state = dict(super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__)
        state.pop("_ws", None)
        return state

    def _check_common(self, lr_mode: str) -> None:
        if lr_mode not in ("global", "per_tensor"):
            raise ValueError(f"lr_mode must be 'global' or 'per_tensor', got {lr_mode!r}")

    # Controller protocol: init() is shared with the optimizer protocol, so the controller state is separate.
    def init_control(self) -> DecisionState:
        """Initial controller state."""
        return self.heads.init()

    def decide(self, obs: Observation, state: Optional[DecisionState]):
        """LR and stop decisions from the pooled hidden state held in ``obs.opt_state``."""
        if state is None:
            state = self.heads.init()
        if obs.opt_state is None or getattr(obs.opt_state, "pooled", None) is None:
            raise ValueError(f"{type(self).__name__}.decide needs its own optimizer state in the observation")
        return self.heads.decision(obs.opt_state.pooled, obs, state, self.lr_mode == "per_tensor")

    def as_controller(self) -> "LearnedControl":
        """This network's decision heads as a stand-alone controller object."""
        return LearnedControl(self)


class LearnedControl:
    """Controller-protocol view of a meta-network's LR and stop heads (``unroll(task, net, net.as_controller())``)."""

    def __init__(self, net: _MetaNetwork):
        self.net = net

    def init(self) -> DecisionState:
        """Initial controller state."""
        return self.net.init_control()

    def decide(self, obs: Observation, state: DecisionState):
        """Delegate to the network's heads."""
        return self.net.decide(obs, state)


class LSTMState(NamedTuple):
    """Per-coordinate LSTM state ``(layers, n, hidden)``, momenta (inputs; base update), pooled hidden, count."""
    h: Tensor
    c: Tensor
    momenta: Tuple[Tensor, ...]
    base: Optional[Tensor]
    pooled: Optional[Tensor]
    count: int
    layout: Layout
    prev: Optional[Tensor] = None  # last update ("agreement" input only)


EXTRA_INPUTS = ("param", "momentum", "loss", "pooled", "agreement")
BASES = ("none", "sgd", "momentum", "adam")


class CoordLSTM(_MetaNetwork):
    """Coordinatewise LSTM optimizer (Andrychowicz et al. 2016) with learned LR and stop heads.

    ``base='none'`` is the paper's optimizer: update = ``output_scale * LSTM(...)``. With ``base='sgd'`` or
    ``'momentum'`` the LSTM instead corrects a hand-coded step: update = ``output_scale * a - lr_i * d`` where
    ``d`` is the gradient or heavy-ball buffer (``d = base_momentum * d + g``), and the per-coordinate rate
    ``lr_i = exp(log_base_lr + base_lr_range * tanh(b))`` is modulated by a second LSTM output ``b``
    (``log_base_lr`` is a meta-weight). Fresh, it is exactly that hand-coded optimizer with rate ``base_lr``; it
    then learns per-coordinate step sizes, which scale with the gradient and so keep converging at small
    gradients where a plain LSTM output stalls.

    ``base='adam'`` corrects Adam's normalised direction ``d = m_hat / (sqrt(v_hat) + eps)`` (``beta1 =
    base_momentum``, ``beta2 = base_beta2``) and expresses the LSTM's own term in the same units:
    update = ``-lr_i * (d - output_scale * a)``; ``d`` is also an LSTM input. Apart from the L2L log-magnitude
    input, every input and the output are then invariant to the scale of the gradients, which helps it carry
    over to learners whose gradients are far larger or smaller than in meta-training (ReLU, tanh, deeper nets).
    """

    def __init__(self, hidden: int = 20, layers: int = 2, preproc_p: float = 10.0, output_scale: float = 0.1,
                 extra_inputs: Sequence[str] = (), momentum_decays: Sequence[float] = (0.9, 0.99),
                 lr_mode: str = "global", lr_bound: float = 10.0, stop_bias: float = -6.0,
                 stop_threshold: float = 0.5, init_zero: bool = True, base: str = "none",
                 base_lr: float = 0.01, base_momentum: float = 0.9, base_lr_range: float = 3.0,
                 base_beta2: float = 0.999, base_eps: float = 1e-8, lr_max: Optional[float] = None):
        super().__init__()
        if base not in BASES:
            raise ValueError(f"unknown base {base!r}; known: {', '.join(BASES)}")
        if not base_lr > 0:
            raise ValueError(f"base_lr must be > 0, got {base_lr!r}")
        if not 0 <= base_momentum < 1:
            raise ValueError(f"base_momentum must be in [0, 1), got {base_momentum!r}")
        if not 0 <= base_beta2 < 1:
            raise ValueError(f"base_beta2 must be in [0, 1), got {base_beta2!r}")
        if not base_eps > 0:
            raise ValueError(f"base_eps must be > 0, got {base_eps!r}")
        bad = [e for e in extra_inputs if e not in EXTRA_INPUTS]
        if bad:
            raise ValueError(f"unknown extra input {bad[0]!r}; known: {', '.join(EXTRA_INPUTS)}")
        if int(hidden) < 1 or int(layers) < 1:
            raise ValueError(f"hidden and layers must be >= 1, got hidden={hidden!r}, layers={layers!r}")
        if not preproc_p > 0:
            raise ValueError(f"preproc_p must be > 0, got {preproc_p!r}")
        self._check_common(lr_mode)
        self.config = dict(hidden=hidden, layers=layers, preproc_p=preproc_p, output_scale=output_scale,
                           extra_inputs=list(extra_inputs), momentum_decays=list(momentum_decays),
                           lr_mode=lr_mode, lr_bound=lr_bound, stop_bias=stop_bias,
                           stop_threshold=stop_threshold, init_zero=init_zero, base=base, base_lr=base_lr,
                           base_momentum=base_momentum, base_lr_range=base_lr_range, base_beta2=base_beta2,
                           base_eps=base_eps, lr_max=lr_max)
        self.hidden, self.layers, self.p, self.output_scale = hidden, layers, preproc_p, output_scale
        self.base, self.base_momentum, self.base_lr_range = base, base_momentum, base_lr_range
        self.base_beta2, self.base_eps = base_beta2, base_eps
        if base != "none":
            self.log_base_lr = nn.Parameter(torch.tensor(math.log(base_lr)))
        self.extra_inputs, self.lr_mode = tuple(extra_inputs), lr_mode
        self.momentum_decays = tuple(momentum_decays) if "momentum" in extra_inputs else ()
        in_dim = (2 + ("param" in extra_inputs) + 2 * len(self.momentum_decays) + ("loss" in extra_inputs)
                  + hidden * ("pooled" in extra_inputs) + (base == "adam"))
        in_dim += "agreement" in extra_inputs
        self.cells = nn.ModuleList([nn.LSTMCell(in_dim if i == 0 else hidden, hidden) for i in range(layers)])
        # zero-initialised: fresh, it makes zero (or exactly the base optimizer's) updates
        self._add_output_and_heads(hidden, 1 if base == "none" else 2, init_zero, lr_bound, stop_bias,
                                   stop_threshold, pooled_extra=int("agreement" in extra_inputs), lr_max=lr_max)

    def init(self, params: Sequence[Tensor]) -> LSTMState:
        """Zero LSTM state for every coordinate of ``params``."""
        layout = make_layout(params)
        n = sum(layout.sizes)
        like = params[0]
        zeros = like.new_zeros((self.layers, n, self.hidden))
        momenta = tuple(like.new_zeros(n) for _ in self.momentum_decays)
        base = {"momentum": like.new_zeros(n), "adam": like.new_zeros((2, n))}.get(self.base)
        return LSTMState(zeros, zeros, momenta, base, None, 0, layout)

    def update(self, grads, state: LSTMState, params, *, loss: Optional[Tensor] = None):
        """One step for all coordinates at once."""
        layout = state.layout
        check_layout(grads, layout)
        g = flatten(grads)
        if self._lstm_fast_config() and self._fast_ok(g.shape[0], g, state.h, state.c, state.base, *state.momenta,
                                                       *(params if "param" in self.extra_inputs else ())):
            return self._update_fast(g, state, params, loss)
        inputs = [preprocess_gradient(g, self.p)]
        base = state.base
        if self.base == "adam":  # Adam's moments and bias-corrected direction, exactly as torch.optim.Adam
            b1, b2, t = self.base_momentum, self.base_beta2, state.count + 1
            m = b1 * base[0] + (1 - b1) * g
            v = b2 * base[1] + (1 - b2) * g * g
            base = torch.stack([m, v])
            # the clamp (1e-30, far below eps^2) keeps sqrt's meta-gradient finite where a gradient is exactly 0
            adam_dir = (m / (1 - b1 ** t)) / (torch.sqrt((v / (1 - b2 ** t)).clamp_min(1e-30)) + self.base_eps)
            inputs.append(adam_dir.unsqueeze(-1))
        if "param" in self.extra_inputs:
            inputs.append(flatten(params).unsqueeze(-1))
        momenta = tuple(b * m + (1 - b) * g for b, m in zip(self.momentum_decays, state.momenta))
        inputs.extend(preprocess_gradient(m, self.p) for m in momenta)
        if "loss" in self.extra_inputs:
            # Clamped to [1e-30, 1e30] (NaN: no information): an infinite input makes 0 * inf = NaN in the cell
            lv = math.nan if loss is None else float(loss.detach())
            value = 0.0 if math.isnan(lv) else math.log(min(max(lv, 1e-30), 1e30))
            inputs.append(g.new_full((g.shape[0], 1), value / self.p))
        if "pooled" in self.extra_inputs:  # last step's mean hidden state of this coordinate's tensor
            pooled_prev = state.pooled[:, :self.hidden] if state.pooled is not None else \
                g.new_zeros((len(layout.sizes), self.hidden))
            inputs.append(pooled_prev[layout.segment])
        agreement = None
        if "agreement" in self.extra_inputs:
            # Per tensor, the cosine between this gradient and the last update: about -1 when the steps
            # overshoot (the hypergradient of the learning rate, Baydin et al. 2018, normalised), so a signal of
            # a too-large rate that does not depend on the learner's architecture. 0 at the first step.
            prev = state.prev if state.prev is not None else torch.zeros_like(g)
            dot = segment_mean(g * prev, layout)
            # the clamp keeps sqrt's meta-gradient finite at the first step (no last update) and for zero gradients
            norms = torch.sqrt((segment_mean(g * g, layout) * segment_mean(prev * prev, layout)).clamp_min(1e-30))
            agreement = -dot / norms  # the update points down the gradient: flip the sign
            inputs.append(agreement[layout.segment].unsqueeze(-1))
        x = torch.cat(inputs, dim=-1)
        hs, cs = [], []
        for i, cell in enumerate(self.cells):
            h, c = cell(x, (state.h[i], state.c[i]))
            hs.append(h)
            cs.append(c)
            x = h
        out = self.out(x)
        step = out[:, 0] * self.output_scale
        if self.base != "none":
            direction = g
            if self.base == "momentum":
                base = g if state.count == 0 else self.base_momentum * state.base + g
                direction = base
            rate = torch.exp(self.log_base_lr + self.base_lr_range * torch.tanh(out[:, 1]))
            if self.base == "adam":
                step = -rate * (adam_dir - step)
            else:
                step = step - rate * direction
        pooled = segment_mean_stable(x, layout)
        if agreement is not None:
            pooled = torch.cat([pooled, agreement.unsqueeze(-1)], dim=-1)
        new = LSTMState(torch.stack(hs), torch.stack(cs), momenta, base, pooled, state.count + 1, layout,
                        step if agreement is not None else None)
        return unflatten(step, layout), new

    fast_min_coordinates = SMALL_LEARNER  # see SMALL_LEARNER (fast path ~1x at 1,510 coordinates, 2x at 6,010)

    def _lstm_fast_config(self) -> bool:
        """The fast path covers every configuration but the inputs that read last step's pooled state or update
        (``pooled``, ``agreement``): those fall back to the reference."""
        return not ({"pooled", "agreement"} & set(self.extra_inputs))

    @torch.no_grad()
    def _update_fast(self, g: Tensor, state: LSTMState, params, loss: Optional[Tensor]):
        """:meth:`update` feature-major: inputs ``(in, n)`` in a reused buffer; block by block (:func:`blocks`), per
        layer the gates ``(4h, block)`` are two products (``W_ih @ x + b``, then ``+= W_hh @ h``) and the cell's
        nonlinearities run in place on them (gate order i, f, g, o, as ``nn.LSTMCell``); the new ``h`` and ``c`` are
        written straight into ``(layers, hidden, n)`` tensors whose transposed views are the state's ``(layers, n,
        hidden)``, so the next step reads them without a copy. Equal to the reference to float rounding (tested)."""
        layout, sizes, n, hd = state.layout, state.layout.sizes, g.shape[0], self.hidden
        t = state.count + 1

        def feature_major(x: Tensor) -> Tensor:  # (layers, n, h) -> (layers, h, n), a view when possible
            xt = x.transpose(1, 2)
            return xt if xt.is_contiguous() else xt.contiguous()

        h_old, c_old = feature_major(state.h), feature_major(state.c)
        k = len(self.momentum_decays)
        in_dim = self.cells[0].input_size
        x = self._workspace("x", (in_dim, n), g)
        scratch = self._workspace("abs", (n,), g)
        preprocess_gradient_into(g, x[0:2], self.p, scratch)
        row, base, adam_dir = 2, state.base, None
        if self.base == "adam":
            b1, b2 = self.base_momentum, self.base_beta2
            base = torch.empty((2, n), dtype=g.dtype, device=g.device)
            ema(state.base[0], g, b1, scratch, out=base[0])
            ema(state.base[1], g, b2, scratch, out=base[1], square=True)
            adam_dir = x[row]
            torch.div(base[1], 1 - b2 ** t, out=adam_dir).clamp_min_(1e-30).sqrt_().add_(self.base_eps)
            adam_dir.reciprocal_().mul_(base[0]).div_(1 - b1 ** t)
            row += 1
        if "param" in self.extra_inputs:
            torch.cat([q.reshape(-1) for q in params], out=x[row])
            row += 1
        momenta = tuple(ema(m, g, b, scratch) for b, m in zip(self.momentum_decays, state.momenta))
        for m in momenta:
            preprocess_gradient_into(m, x[row:row + 2], self.p, scratch)
            row += 2
        if "loss" in self.extra_inputs:
            lv = math.nan if loss is None else float(loss.detach())
            x[row].fill_(0.0 if math.isnan(lv) else math.log(min(max(lv, 1e-30), 1e30)) / self.p)
            row += 1
        h_new = torch.empty((self.layers, hd, n), dtype=g.dtype, device=g.device)
        c_new = torch.empty_like(h_new)
        out = self._workspace("out", (self.out.out_features, n), g)
        biases = [(cell.bias_ih + cell.bias_hh).unsqueeze(1) for cell in self.cells]
        gates_buf = self._workspace("gates", (4 * hd, block_width(n)), g)
        pooled = g.new_zeros((len(sizes), hd), dtype=torch.float64)  # sums accumulated in float64
        for j, s0, s1 in blocks(sizes):
            inp = x[:, s0:s1]
            for i, cell in enumerate(self.cells):
                gates = torch.addmm(biases[i], cell.weight_ih, inp, out=gates_buf[:, :s1 - s0])
                gates.addmm_(cell.weight_hh, h_old[i, :, s0:s1])
                gates[:2 * hd].sigmoid_()
                tanh_(gates[2 * hd:3 * hd])
                gates[3 * hd:].sigmoid_()
                c, h = c_new[i, :, s0:s1], h_new[i, :, s0:s1]
                torch.mul(gates[hd:2 * hd], c_old[i, :, s0:s1], out=c).addcmul_(gates[:hd], gates[2 * hd:3 * hd])
                tanh_(h.copy_(c)).mul_(gates[3 * hd:])
                inp = h
            torch.addmm(self.out.bias.unsqueeze(1), self.out.weight, inp, out=out[:, s0:s1])
            pooled[j] += inp.sum(1)  # float32 within a block (pairwise), float64 across blocks
        pooled = mean_of_block_sums(pooled, sizes, g.dtype)
        step = torch.mul(out[0], self.output_scale)
        if self.base != "none":
            rate = tanh_(scratch.copy_(out[1])).mul_(self.base_lr_range).add_(self.log_base_lr).exp_()
            if self.base == "adam":
                step.sub_(adam_dir).mul_(rate)  # -rate * (adam_dir - output_scale * a)
            else:
                direction = g
                if self.base == "momentum":
                    base = g.clone() if state.count == 0 else torch.mul(state.base, self.base_momentum).add_(g)
                    direction = base
                step.sub_(rate.mul_(direction))
        new = LSTMState(h_new.transpose(1, 2), c_new.transpose(1, 2), momenta, base, pooled, t, layout, None)
        return unflatten(step, layout), new


class MLPState(NamedTuple):
    """Per-coordinate momenta and second moment, pooled hidden, count, layout."""
    momenta: Tuple[Tensor, ...]
    rms: Tensor
    pooled: Optional[Tensor]
    count: int
    layout: Layout


class CoordMLP(_MetaNetwork):
    """Per-parameter MLP optimizer (Metz et al.) with learned LR and stop heads.

    Features per coordinate: gradient, parameter, momenta at ``momentum_decays``, gradient and momenta divided
    by the RMS of the gradient (Adam-like), each normalised by its root mean square over the tensor; plus a
    step embedding. Output ``(d, m)``; update ``d * exp(m * exp_mult) * step_mult``.
    """

    def __init__(self, hidden: int = 32, layers: int = 2, momentum_decays: Sequence[float] = (0.5, 0.9, 0.99,
                 0.999), rms_decay: float = 0.999, step_mult: float = 1e-3, exp_mult: float = 1e-3,
                 lr_mode: str = "global", lr_bound: float = 10.0, stop_bias: float = -6.0,
                 stop_threshold: float = 0.5, init_zero: bool = True, lr_max: Optional[float] = None):
        super().__init__()
        if int(hidden) < 1 or int(layers) < 1:
            raise ValueError(f"hidden and layers must be >= 1, got hidden={hidden!r}, layers={layers!r}")
        for b in (*momentum_decays, rms_decay):
            if not 0 <= b < 1:
                raise ValueError(f"decays must be in [0, 1), got {b!r}")
        self._check_common(lr_mode)
        self.config = dict(hidden=hidden, layers=layers, momentum_decays=list(momentum_decays),
                           rms_decay=rms_decay, step_mult=step_mult, exp_mult=exp_mult, lr_mode=lr_mode,
                           lr_bound=lr_bound, stop_bias=stop_bias, stop_threshold=stop_threshold,
                           init_zero=init_zero, lr_max=lr_max)
        self.momentum_decays, self.rms_decay = tuple(momentum_decays), rms_decay
        self.step_mult, self.exp_mult, self.lr_mode = step_mult, exp_mult, lr_mode
        k = len(self.momentum_decays)
        in_dim = 2 + k + (1 + k) + len(STEP_TIMESCALES)
        mods: List[nn.Module] = []
        for i in range(layers):
            mods += [nn.Linear(in_dim if i == 0 else hidden, hidden), nn.ReLU()]
        self.body = nn.Sequential(*mods)
        self._add_output_and_heads(hidden, 2, init_zero, lr_bound, stop_bias, stop_threshold, lr_max=lr_max)

    fast_min_coordinates = SMALL_LEARNER  # see SMALL_LEARNER (fast path ~1x at 1,510 coordinates, 2.6x at 6,010)

    def init(self, params: Sequence[Tensor]) -> MLPState:
        """Zero accumulators."""
        layout = make_layout(params)
        n = sum(layout.sizes)
        like = params[0]
        return MLPState(tuple(like.new_zeros(n) for _ in self.momentum_decays), like.new_zeros(n), None, 0,
                        layout)

    def update(self, grads, state: MLPState, params, *, loss: Optional[Tensor] = None):
        """One step for all coordinates at once."""
        layout = state.layout
        check_layout(grads, layout)
        g, p = flatten(grads), flatten(params)
        count = state.count + 1
        if self._fast_ok(g.shape[0], g, p, state.rms, *state.momenta):
            return self._update_fast(g, p, state, count)
        momenta = tuple(b * m + (1 - b) * g for b, m in zip(self.momentum_decays, state.momenta))
        rms_acc = self.rms_decay * state.rms + (1 - self.rms_decay) * g * g
        rms = torch.sqrt(rms_acc / (1 - self.rms_decay ** count)) + 1e-8
        raw = torch.stack([g, p, *momenta, g / rms, *(m / rms for m in momenta)], dim=-1)
        # Normalise each feature by its root mean square over the tensor it belongs to.
        # (a floor far below any float32 feature's square, so the scale-invariance holds for tiny gradients too)
        scale = torch.sqrt(segment_mean_stable(raw * raw, layout).clamp_min(1e-30))
        feats = raw / scale[layout.segment]
        emb = repeat(step_embedding(count, g), "f -> n f", n=g.shape[0])
        h = self.body(torch.cat([feats, emb], dim=-1))
        d, m = rearrange(self.out(h), "n (two) -> two n", two=2)
        step = d * torch.exp(m * self.exp_mult) * self.step_mult
        new = MLPState(momenta, rms_acc, segment_mean_stable(h, layout), count, layout)
        return unflatten(step, layout), new

    @torch.no_grad()
    def _update_fast(self, g: Tensor, p: Tensor, state: MLPState, count: int):
        """:meth:`update` feature-major: the ``(features, n)`` inputs in one reused buffer, each layer one wide
        ``(h, f) @ (f, n)`` product (the step embedding, the same for every coordinate, folded into the first
        layer's bias), per-tensor reductions over column views, elementwise work in place. The momenta live in
        one ``(k, n)`` tensor (the state's tuple holds its rows). Equal to the reference to float rounding."""
        layout, sizes, n = state.layout, state.layout.sizes, g.shape[0]
        k = len(self.momentum_decays)
        scratch = self._workspace("gg", (n,), g)
        momenta = torch.empty((k, n), dtype=g.dtype, device=g.device)
        for i, (b, m) in enumerate(zip(self.momentum_decays, state.momenta)):
            ema(m, g, b, scratch, out=momenta[i])
        rms_acc = ema(state.rms, g, self.rms_decay, scratch, square=True)
        inv = torch.div(rms_acc, 1 - self.rms_decay ** count, out=self._workspace("inv", (n,), g))
        inv.sqrt_().add_(1e-8).reciprocal_()
        x = self._workspace("x", (3 + 2 * k, n), g)  # g, p, momenta, g / rms, momenta / rms
        x[0], x[1], x[2:2 + k] = g, p, momenta
        torch.mul(x[0], inv, out=x[2 + k])
        torch.mul(x[2:2 + k], inv, out=x[3 + k:])
        sq = torch.mul(x, x, out=self._workspace("sq", x.shape, g))
        scale = torch.rsqrt(chunk_means(sq, sizes).clamp_min(1e-30))  # (tensors, f)
        linears = [m for m in self.body if isinstance(m, nn.Linear)]
        first = linears[0]
        f = x.shape[0]
        emb = step_embedding(count, g)
        bias = (first.bias + first.weight[:, f:] @ emb).unsqueeze(1)
        # the per-tensor feature scales folded into the first layer's weights: W (x * s) = (W * s) x
        w_first = first.weight[:, :f].unsqueeze(0) * scale.unsqueeze(1)  # (tensors, h, f)
        width = block_width(n)
        bufs = [self._workspace(f"h{i}", (layer.out_features, width), g) for i, layer in enumerate(linears)]
        out = self._workspace("out", (2, width), g)
        step = torch.empty(n, dtype=g.dtype, device=g.device)
        pooled = g.new_zeros((len(sizes), linears[-1].out_features), dtype=torch.float64)
        for j, s0, s1 in blocks(sizes):
            w = s1 - s0
            h = torch.addmm(bias, w_first[j], x[:, s0:s1], out=bufs[0][:, :w]).relu_()
            for i, layer in enumerate(linears[1:]):
                h = torch.addmm(layer.bias.unsqueeze(1), layer.weight, h, out=bufs[i + 1][:, :w]).relu_()
            o = torch.addmm(self.out.bias.unsqueeze(1), self.out.weight, h, out=out[:, :w])
            torch.mul(o[1], self.exp_mult, out=step[s0:s1]).exp_().mul_(o[0]).mul_(self.step_mult)
            pooled[j] += h.sum(1)  # float32 within a block (pairwise), float64 across blocks
        pooled = mean_of_block_sums(pooled, sizes, g.dtype)
        new = MLPState(tuple(momenta.unbind(0)), rms_acc, pooled, count, layout)
        return unflatten(step, layout), new


class ControllerState(NamedTuple):
    """Running statistics and the recurrent state of a :class:`LearnedController`."""
    stats: DecisionState
    h: Tensor


class LearnedController(nn.Module):
    """A learned controller for any optimizer (hand-coded ones included): LR and stop decisions only.

    A GRU cell reads the global features of :class:`DecisionHeads` every step (loss, validation-loss and
    gradient-norm ratios, steps since the best validation loss, time embeddings); its state feeds the same
    heads as the meta-networks'. ``learn_lr=False`` fixes the LR multiplier at 1 and ``learn_stop=False`` the
    stop probability at 0, so each decision can be studied alone. With ``restore_best`` the inner loop returns
    the parameters of the lowest validation loss seen, as patience-based early stopping does. It implements the controller protocol
    (``init()`` / ``decide(obs, state)``); its meta-weights are ``.parameters()``.
    """

    def __init__(self, hidden: int = 16, lr_bound: float = 10.0, stop_bias: float = -6.0,
                 stop_threshold: float = 0.5, learn_lr: bool = True, learn_stop: bool = True,
                 restore_best: bool = False):
        super().__init__()
        if int(hidden) < 1:
            raise ValueError(f"hidden must be >= 1, got {hidden!r}")
        self.config = dict(hidden=hidden, lr_bound=lr_bound, stop_bias=stop_bias,
                           stop_threshold=stop_threshold, learn_lr=learn_lr, learn_stop=learn_stop,
                           restore_best=restore_best)
        self.restore_best = restore_best
        self.hidden, self.learn_lr, self.learn_stop = hidden, learn_lr, learn_stop
        self.cell = nn.GRUCell(NUM_GLOBAL_FEATURES, hidden)
        self.heads = DecisionHeads(hidden, lr_bound=lr_bound, stop_bias=stop_bias,
                                   stop_threshold=stop_threshold)

    def init(self) -> ControllerState:
        """No statistics, zero recurrent state."""
        w = self.cell.weight_ih
        return ControllerState(self.heads.init(), w.new_zeros(self.hidden))

    def decide(self, obs: Observation, state: ControllerState):
        """Update the statistics and the GRU state, then decide."""
        stats = self.heads.observe(obs, state.stats)
        g = self.heads.features(obs, stats, state.h)
        h = self.cell(g.unsqueeze(0), state.h.unsqueeze(0)).squeeze(0)
        lr_scale, stop_prob = self.heads.heads(h.unsqueeze(0), g, per_tensor=False)
        if not self.learn_lr:
            lr_scale = 1.0
        if not self.learn_stop:
            stop_prob = stop_prob * 0
        decision = self.heads.to_decision(lr_scale, stop_prob, obs)
        decision.is_best = obs.val_loss is not None and stats.since_best == 0
        return decision, ControllerState(stats, h)


LEARNED = {"lstm": CoordLSTM, "mlp": CoordMLP, "controller": LearnedController}
from . import normmlp  # noqa: E402,F401  (builds on the classes above and registers "norm_mlp" here)


def build_learned(kind: str, **config: Any) -> _MetaNetwork:
    """A meta-network by kind (``lstm``, ``mlp``, ``norm_mlp`` or ``controller``) and constructor keyword arguments."""
    return from_registry(LEARNED, kind, "meta-network", **config)


def kind_of(net: nn.Module) -> str:
    """The registry key of a meta-network instance."""
    for k, cls in LEARNED.items():
        if type(net) is cls:
            return k
    raise ValueError(f"not a registered meta-network: {type(net).__name__}")
