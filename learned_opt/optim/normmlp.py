"""A per-parameter MLP update rule with a normalised output and a learned step-size scheduler.

After the recipe of Celo / Celo2 (Moudgil et al. 2025, 2026) and small_fc_lopt (Metz et al. 2022): a tiny MLP
shared by every coordinate reads scale-free features of the gradient history and proposes a direction; the
direction is normalised to unit root mean square per tensor, so the MLP decides *where* to step and the
**scheduler** (the learning-rate head) decides *how far*, from global training-progress features: the loss and
gradient-norm ratios to their first values, time embeddings and, when the horizon is known, the fraction of the
run done. The step of tensor ``i`` is ``lr_scale * exp(log_lr) * u_i / rms(u_i)``: ``log_lr`` is the scheduler's
learned bias and ``lr_scale`` its multiplier.

Scale-free inputs: every per-coordinate feature is divided by its root mean square over the tensor it belongs to
(gradient, momenta, parameter) or is a ratio of moments (Adam-like ``m / sqrt(v)``), and the scheduler reads only
ratios; multiplying a tensor's gradients (or the parameter tensor itself) by a constant leaves the proposed
direction and the decisions unchanged.

Optimizer state: three momenta and one second moment per coordinate (4 floats per parameter). Features that are
the same for every coordinate of a tensor (time, whether the tensor is a vector) enter the first layer as a
per-tensor bias, so the per-coordinate work is one ``(n, f) @ (f, h)`` product per layer. The MLP's residual
starts at zero: fresh, the update is Adam's bias-corrected direction normalised per tensor, at rate
``exp(log_lr)``.
"""
from __future__ import annotations

import itertools
import math
import struct
from typing import Any, List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from ..control import Observation
from .features import (Layout, blocks, check_layout, chunk_means, flatten, make_layout, mean_of_block_sums,
                       segment_mean_acc, step_embedding, unflatten)
from .heads import DecisionHeads, DecisionState
from .network import _MetaNetwork

TIME_SCALES = (10.0, 100.0, 1000.0, 10000.0)
# The wide-learner path (:meth:`NormMLP._update_wide`) runs on learners of at least this many coordinates: it is
# 0.86x the time of :meth:`NormMLP._direction_fast`'s path at 134k coordinates, 0.69x at 1.07M, but its fixed cost
# (about 0.2 ms of per-block and per-tensor Python work) makes it 1.1x at 68k and 1.4x at 10k (measured, one CPU
# thread). Every reported result of this network ran on learners of at most 4,810 coordinates: they stay bitwise
# reproducible.
WIDE_LEARNER = 100_000
WIDE_BLOCK = 65536  # coordinates per block of the wide path on CPU (32k-128k measured alike; 16k and less slower)
# ... and only when its blocks hold at least this many coordinates on average: each block (at least one per tensor)
# costs ~15 small ops, so a model of many small tensors is faster on the other path (a 50-layer 64-wide MLP with
# LayerNorms, 200 tensors and 214k coordinates: 20.9 ms against 11.5 per update; measured, one thread)
WIDE_MEAN_BLOCK = 16384


# "tensor": the direction is normalised to unit RMS per tensor (a fixed-size step per tensor, v1); "none": Adam's
# bias-corrected direction plus a residual bounded by tanh to [-1, 1] per coordinate, not normalised (the step keeps
# Adam's scale: it shrinks where m / sqrt(v) does, the robust base of Celo-Adam)
NORMALIZE = ("tensor", "none")


def grad_momentum_cosines(g: Tensor, momenta: Tensor, sizes: Sequence[int]) -> Tensor:
    """Per tensor, the cosine between this step's gradient and each momentum *before* it takes the gradient in:
    ``(tensors, k)``, each in [-1, 1], 0 where either vector is zero (the first step). The hypergradient signal of
    the step size (Baydin et al. 2018): the loss's derivative with respect to the last step's rate is ``-g_t .
    u_{t-1}``, and the momenta are the smoothed past steps, so a positive cosine says the steps were too short (the
    gradient still points where they went) and a negative one that they overshot. Scale-free like every other
    input. Dot products per tensor (no ``(k, n)`` temporary), differentiable (sums of squares, not norms, so that a
    zero vector gives a zero gradient instead of NaN)."""
    rows = []
    for gc, mc in zip(g.split(list(sizes)), momenta.split(list(sizes), dim=1)):
        dot = torch.mv(mc, gc)  # (k,)
        mm = torch.bmm(mc.unsqueeze(1), mc.unsqueeze(2)).reshape(-1)  # (k,) sums of squares, no temporary
        gg = torch.dot(gc, gc)
        rows.append(dot * torch.rsqrt(mm.clamp_min(1e-30)) * torch.rsqrt(gg.clamp_min(1e-30)))
    return torch.stack(rows)


class NormMLPState(NamedTuple):
    """Per-coordinate momenta ``(k, n)`` and second moment ``(n,)``, pooled hidden, count, layout."""
    momenta: Tensor
    v: Tensor
    pooled: Optional[Tensor]
    count: int
    layout: Layout


def horizon_visible(obs: Observation, state: DecisionState, dropout: float) -> bool:
    """Whether the scheduler is told the horizon: always outside meta-training when one is given; inside it, for a
    fraction ``1 - dropout`` of the tasks, chosen by the bits of the task's first loss (deterministic per task, no
    random generator involved), so that one network learns to schedule with and without a known horizon.
    ``dropout == 1`` never tells it, in evaluation either: a network meta-trained without the feature would read
    inputs it never saw (the horizon-generalisation experiment of ``experiments/estimators_horizon.py``)."""
    if obs.horizon <= 0 or dropout >= 1:
        return False
    if not obs.training or dropout <= 0 or not math.isfinite(state.loss0):
        return True
    bits = struct.unpack("<Q", struct.pack("<d", float(state.loss0)))[0]
    # mix the bits (float32 losses leave the low bits of the double at zero) into a number in [0, 1)
    u = ((bits * 0x9E3779B97F4A7C15) >> 11 & ((1 << 53) - 1)) / float(1 << 53)
    return u >= dropout


class SchedulerHeads(DecisionHeads):
    """:class:`DecisionHeads` whose features add the fraction of the run done and a flag saying whether it is
    known (``Observation.horizon > 0``, see :func:`horizon_visible`)."""
    EXTRA_FEATURES = 2

    def __init__(self, pooled_dim: int, horizon_dropout: float = 0.5, **kwargs: Any):
        super().__init__(pooled_dim, **kwargs)
        self.horizon_dropout = horizon_dropout

    def _compute_features(self, obs: Observation, state: DecisionState, like: Tensor) -> Tensor:
        base = DecisionHeads._compute_features(obs, state, like)
        if horizon_visible(obs, state, self.horizon_dropout):
            extra = [min(1.0, obs.step / obs.horizon), 1.0]
        else:
            extra = [0.0, 0.0]
        return torch.cat([base, torch.tensor(extra, dtype=like.dtype, device=like.device)])


class NormMLP(_MetaNetwork):
    """Per-parameter MLP update rule, normalised per tensor, with a learned scheduler (and an optional stop head).

    Per-coordinate features: ``g``, the momenta ``m_k`` (decays ``momentum_decays``) and the parameter, each divided
    by its RMS over the tensor; ``g / sqrt(v_hat)``, ``m_k_hat / sqrt(v_hat)``. Per-tensor features (first-layer
    bias): time embeddings ``tanh(t / tau)``, a vector flag. Output per coordinate: ``u = -adam_direction +
    mlp(features)``, then ``u / rms_tensor(u)`` (``normalize="none"``: ``tanh(mlp) - adam_direction``, not
    normalised); the update is ``exp(log_lr)`` (``init_lr`` when fresh) times that times the scheduler's
    multiplier (``DecisionHeads``' LR head, bounds ``[1/lr_bound, lr_max]``).
    """

    def __init__(self, hidden: int = 8, layers: int = 2, momentum_decays: Sequence[float] = (0.5, 0.9, 0.99),
                 rms_decay: float = 0.999, init_lr: float = 1e-3, lr_bound: float = 30.0,
                 lr_max: Optional[float] = None, stop_bias: float = -6.0, stop_threshold: float = 0.5,
                 horizon_dropout: float = 0.5, eps: float = 1e-8, normalize: str = "tensor", lr_gain: float = 1.0,
                 hyper: bool = False):
        super().__init__()
        if isinstance(hidden, bool) or int(hidden) != hidden or hidden < 1 or int(layers) != layers or layers < 1:
            raise ValueError(f"hidden and layers must be integers >= 1, got hidden={hidden!r}, layers={layers!r}")
        if not momentum_decays:
            raise ValueError("momentum_decays must list at least one decay")
        for b in (*momentum_decays, rms_decay):
            if not 0 <= b < 1:
                raise ValueError(f"decays must be in [0, 1), got {b!r}")
        if not (math.isfinite(init_lr) and init_lr > 0):
            raise ValueError(f"init_lr must be a finite number > 0, got {init_lr!r}")
        if not 0 <= horizon_dropout <= 1:
            raise ValueError(f"horizon_dropout must be in [0, 1], got {horizon_dropout!r}")
        if not eps > 0 or normalize not in NORMALIZE:
            raise ValueError(f"need eps > 0 and normalize in {NORMALIZE}, got eps={eps!r}, normalize={normalize!r}")
        if not (math.isfinite(lr_gain) and lr_gain > 0):
            raise ValueError(f"lr_gain must be a finite number > 0, got {lr_gain!r}")
        self.config = dict(hidden=hidden, layers=layers, momentum_decays=list(momentum_decays),
                           rms_decay=rms_decay, init_lr=init_lr, lr_bound=lr_bound, lr_max=lr_max,
                           stop_bias=stop_bias, stop_threshold=stop_threshold, horizon_dropout=horizon_dropout,
                           eps=eps)
        self.normalize = normalize  # only a non-default enters the config: v1 checkpoints keep their bytes
        self.config.update({"normalize": normalize} if normalize != "tensor" else {})
        # the base rate is exp(lr_gain * log_lr): a gain > 1 lets meta-training move the base rate lr_gain times
        # faster than one meta-weight moves (meta-Adam moves each by about meta_lr per step), so that the constant
        # part of the step size goes to the base rate instead of pushing the scheduler's multiplier to its bound
        self.lr_gain = float(lr_gain)
        self.config.update({"lr_gain": self.lr_gain} if lr_gain != 1 else {})
        # hyper: the scheduler also reads, per tensor, the cosines of the gradient with the momenta before it
        # (grad_momentum_cosines), the signal of whether the last steps were too short or too long
        if not isinstance(hyper, bool):
            raise ValueError(f"hyper must be True or False, got {hyper!r}")
        self.hyper = hyper
        self.config.update({"hyper": True} if hyper else {})
        self.lr_mode = "global"
        self.momentum_decays, self.rms_decay, self.eps = tuple(momentum_decays), rms_decay, eps
        k = len(self.momentum_decays)
        self.coord_dim = 2 * (1 + k) + 1  # normalised g, m_k; g / sqrt(v), m_k / sqrt(v); parameter
        self.tensor_dim = len(TIME_SCALES) + 1
        self.first = nn.Linear(self.coord_dim, hidden)
        self.first_tensor = nn.Linear(self.tensor_dim, hidden, bias=False)
        rest: List[nn.Module] = []
        for _ in range(layers - 1):
            rest += [nn.Linear(hidden, hidden), nn.ReLU()]
        self.rest = nn.Sequential(*rest)
        self.out = nn.Linear(hidden, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        self.log_lr = nn.Parameter(torch.tensor(math.log(init_lr) / self.lr_gain))
        self.heads = SchedulerHeads(hidden + (k if hyper else 0), horizon_dropout=horizon_dropout,
                                    lr_bound=lr_bound, stop_bias=stop_bias, stop_threshold=stop_threshold,
                                    lr_max=lr_max)

    normalize = "tensor"  # the class default: instances pickled before the option existed are v1 networks
    lr_gain = 1.0
    hyper = False

    def _pooled(self, pooled: Tensor, g: Tensor, old_momenta: Tensor, sizes: Sequence[int]) -> Tensor:
        """The per-tensor row the heads read: the pooled hidden units, then (``hyper``) the gradient-momentum
        cosines."""
        if not self.hyper:
            return pooled
        return torch.cat([pooled, grad_momentum_cosines(g, old_momenta, sizes).to(pooled.dtype)], dim=1)

    def log_rate(self) -> Tensor:
        """The log of the base rate, ``lr_gain * log_lr``."""
        return self.log_lr * self.lr_gain if self.lr_gain != 1 else self.log_lr
    # learners at least this large, in blocks at least this large on average, take the wide path (per instance)
    wide_min_coordinates, wide_min_mean_block = WIDE_LEARNER, WIDE_MEAN_BLOCK

    def _wide_ok(self, sizes: Sequence[int], n: int, like: Tensor) -> bool:
        """Whether :meth:`_update_wide` is the faster no-graph path for a learner of these tensor sizes (``n``
        coordinates in all)."""
        if n < self.wide_min_coordinates:
            return False
        width = max(1, self._wide_width(n, like))
        return sum(-(-size // width) for size in sizes) * self.wide_min_mean_block <= n

    @staticmethod
    def _wide_width(n: int, like: Tensor) -> int:
        """Coordinates per block of the wide path: a GPU gains nothing from cache blocks, only launches."""
        return n if like.is_cuda else min(n, WIDE_BLOCK)

    def init(self, params: Sequence[Tensor]) -> NormMLPState:
        """Zero moments for every coordinate of ``params``."""
        layout = make_layout(params)
        n = sum(layout.sizes)
        like = params[0]
        return NormMLPState(like.new_zeros((len(self.momentum_decays), n)), like.new_zeros(n), None, 0, layout)

    def _decays(self, like: Tensor) -> Tensor:
        return torch.tensor(self.momentum_decays, dtype=like.dtype, device=like.device).unsqueeze(-1)

    def tensor_features(self, count: int, layout: Layout, like: Tensor) -> Tensor:
        """Per-tensor features ``(num_tensors, tensor_dim)``: time embeddings and a vector flag."""
        emb = step_embedding(count, like, TIME_SCALES)
        vec = torch.tensor([float(len(s) <= 1) for s in layout.shapes], dtype=like.dtype, device=like.device)
        return torch.cat([emb.expand(len(layout.shapes), -1), vec.unsqueeze(-1)], dim=-1)

    def direction(self, g: Tensor, p: Tensor, momenta: Tensor, v: Tensor, count: int,
                  layout: Layout) -> Tuple[Tensor, Tensor]:
        """The normalised direction ``(n,)`` (unit RMS per tensor, before the rate) and the hidden ``(n, h)``."""
        b = self._decays(g)
        vhat = v / (1 - self.rms_decay ** count)
        inv = torch.rsqrt(vhat + self.eps ** 2)
        mhat = momenta / (1 - b ** count)
        raw = torch.cat([g.unsqueeze(0), momenta, p.unsqueeze(0)])  # (k + 2, n): normalised per tensor
        scale = torch.rsqrt(segment_mean_acc(raw.T * raw.T, layout).clamp_min(1e-30))  # (tensors, k + 2)
        feats = torch.cat([raw.T * scale[layout.segment], (g * inv).unsqueeze(-1), (mhat * inv).T], dim=-1)
        bias = self.first_tensor(self.tensor_features(count, layout, g))  # (tensors, h)
        h = torch.relu(self.first(feats) + bias[layout.segment])
        h = self.rest(h)
        adam = mhat[min(1, len(self.momentum_decays) - 1)] * inv  # the 0.9 momentum by default
        if self.normalize == "none":
            return torch.tanh(self.out(h).squeeze(-1)) - adam, h
        u = self.out(h).squeeze(-1) - adam
        norm = torch.rsqrt(segment_mean_acc(u * u, layout).clamp_min(1e-30))
        return u * norm[layout.segment], h

    @torch.no_grad()
    def _direction_fast(self, g: Tensor, p: Tensor, momenta: Tensor, v: Tensor, count: int,
                        layout: Layout) -> Tuple[Tensor, Tensor]:
        """:meth:`direction` computed feature-major (``(features, n)``, so each layer is one wide ``(h, f) @ (f,
        n)`` product), with per-tensor reductions and broadcasts over views of the contiguous tensor chunks instead
        of index scatters and gathers, and elementwise work in place. The same numbers as the reference to float
        rounding (tested to 1e-6); it returns the pooled hidden ``(tensors, h)`` instead of the hidden."""
        sizes = layout.sizes
        b = self._decays(g)
        n = g.shape[0]
        inv = torch.div(v, 1 - self.rms_decay ** count, out=self._workspace("inv", (n,), g))
        inv.add_(self.eps ** 2).rsqrt_()
        k = len(self.momentum_decays)
        x = self._workspace("x", (2 * k + 3, n), g)
        x[0], x[1:k + 1], x[k + 1] = g, momenta, p
        torch.mul(g, inv, out=x[k + 2])
        torch.mul(momenta, inv, out=x[k + 3:])
        x[k + 3:].div_(1 - b ** count)  # bias-corrected momenta over sqrt(v_hat)
        adam = x[k + 3 + min(1, k - 1)]
        raw = x[:k + 2]
        # per-tensor RMS of the raw features, then each chunk scaled in place (views: no copy of the features)
        sq = torch.mul(raw, raw, out=self._workspace("sq", raw.shape, g))
        scale = torch.rsqrt(chunk_means(sq, sizes).clamp_min(1e-30))  # (tensors, k + 2)
        for c, sc in zip(raw.split(sizes, dim=1), scale):
            c.mul_(sc.unsqueeze(1))
        bias = self.first_tensor(self.tensor_features(count, layout, g)) + self.first.bias  # (tensors, h)
        h = torch.mm(self.first.weight, x, out=self._workspace("h0", (self.first.out_features, n), g))  # (h, n)
        for c, bi in zip(h.split(sizes, dim=1), bias):
            c.add_(bi.unsqueeze(1))
        h.relu_()
        for i, layer in enumerate(self.rest):
            if isinstance(layer, nn.Linear):
                h = torch.addmm(layer.bias.unsqueeze(1), layer.weight, h,
                                out=self._workspace(f"h{i // 2 % 2 + 1}", (layer.out_features, n), g))
            else:
                h.relu_()
        u = torch.addmm(self.out.bias.unsqueeze(1), self.out.weight, h).squeeze(0)
        if self.normalize == "none":
            return u.tanh_().sub_(adam), chunk_means(h, sizes)
        u.sub_(adam)
        pooled = chunk_means(h, sizes)
        for c in u.split(sizes):
            c.mul_(torch.rsqrt((c * c).mean().clamp_min(1e-30)))
        return u, pooled

    def _update_wide(self, grads: Sequence[Tensor], params: Sequence[Tensor], state: NormMLPState,
                     count: int) -> Tuple[List[Tensor], NormMLPState]:
        """The whole of :meth:`update` on wide learners: :func:`update_wide`."""
        return update_wide(self, grads, params, state, count)

    def update(self, grads, state: NormMLPState, params, *, loss: Optional[Tensor] = None):
        """One step for all coordinates at once: ``exp(log_lr) * normalised direction``."""
        layout = state.layout
        check_layout(grads, layout)
        count = state.count + 1
        n = sum(layout.sizes)
        if self._wide_ok(layout.sizes, n, grads[0]) and self._fast_ok(n, *grads, *params, state.momenta):
            return self._update_wide(grads, params, state, count)
        g, p = flatten(grads), flatten(params)
        b = self._decays(g)
        if self._fast_ok(n, g, p, state.momenta):
            with torch.no_grad():  # the same moments, one pass each (lerp: m + (1 - b) (g - m))
                momenta = torch.lerp(state.momenta, g.unsqueeze(0), 1 - b)
                v = torch.lerp(state.v, torch.mul(g, g, out=self._workspace("gg", g.shape, g)), 1 - self.rms_decay)
                u, pooled = self._direction_fast(g, p, momenta, v, count, layout)
                step = u.mul_(torch.exp(self.log_rate()))
                pooled = self._pooled(pooled, g, state.momenta, layout.sizes)
            return unflatten(step, layout), NormMLPState(momenta, v, pooled, count, layout)
        momenta = b * state.momenta + (1 - b) * g
        v = self.rms_decay * state.v + (1 - self.rms_decay) * g * g
        u, h = self.direction(g, p, momenta, v, count, layout)
        step = torch.exp(self.log_rate()) * u
        pooled = self._pooled(segment_mean_acc(h, layout), g, state.momenta, layout.sizes)
        return unflatten(step, layout), NormMLPState(momenta, v, pooled, count, layout)

    def state_floats_per_param(self) -> int:
        """Floats of per-coordinate optimizer state per parameter."""
        return len(self.momentum_decays) + 1


@torch.no_grad()
def update_wide(net: "NormMLP", grads: Sequence[Tensor], params: Sequence[Tensor], state: NormMLPState,
                count: int) -> Tuple[List[Tensor], NormMLPState]:
    """The whole of :meth:`NormMLP.update` on wide learners (:meth:`NormMLP._wide_ok`: at least :data:`WIDE_LEARNER`
    coordinates in blocks of :data:`WIDE_MEAN_BLOCK` on average), with every per-tensor and per-step constant
    folded into the weights of the matrix products.

    The first layer reads the raw ``g, m_k, p`` and ``g r, m_k r`` with ``r = rsqrt(v + eps^2 (1 - beta_v^t))``;
    tensor ``t``'s first layer is ``W diag(c_t)`` plus a bias column, ``c_t`` holding that tensor's RMS
    normalisers, ``sqrt(1 - beta_v^t)`` and the momenta's bias corrections; every layer's bias enters its
    product through a row of ones. So no pass over the coordinates scales a feature or adds a bias, and the
    products, which cost what the per-coordinate flops cost at the BLAS's rate (about 45 GFLOP/s for these
    8-row products on one core here), dominate. The features and hidden units are made block by block
    (:data:`WIDE_BLOCK` coordinates, never crossing a tensor) in reused buffers: the scratch stays a fixed
    size instead of ~30 floats per coordinate. Equal to the reference to float rounding (tested to 1e-6 in
    float32, also across blocks and on 4-d kernels)."""
    layout = state.layout
    sizes = list(layout.sizes)
    n, k, f, hid = sum(sizes), len(net.momentum_decays), net.coord_dim, net.first.out_features
    like = grads[0]
    # the moments, whole (the per-tensor RMS of the momenta must be known before any product)
    g = torch.cat([t.reshape(-1) for t in grads], out=net._workspace("wide_g", (n,), like))
    flat_p = [t.reshape(-1) for t in params]
    gg = torch.mul(g, g, out=net._workspace("wide_gg", (n,), like))
    donated = net._donated()  # the drop-in: the new moments over the old ones, the updates in a scratch buffer
    cosines = grad_momentum_cosines(g, state.momenta, sizes) if net.hyper else None  # before they are overwritten
    momenta = torch.lerp(state.momenta, g.unsqueeze(0), 1 - net._decays(g), out=state.momenta if donated else None)
    v = torch.lerp(state.v, gg, 1 - net.rms_decay, out=state.v if donated else None)
    cv = 1 - net.rms_decay ** count
    # per-tensor RMS of g, m_k, p, and each tensor's first layer with its columns scaled: the RMS normalisers,
    # sqrt(1 - beta_v^t) (for g r and m_k r) and the bias corrections (for m_k r); its bias as a last column
    rows = [*grads, *(c for m in momenta for c in m.split(sizes)), *params]  # (k + 2) x tensors, row-major
    norms = torch.stack(torch._foreach_norm(rows)).reshape(k + 2, len(sizes)).T.double()
    counts = torch.tensor(sizes, dtype=torch.float64, device=like.device).unsqueeze(1)
    rms_inv = torch.rsqrt((norms * norms / counts).to(like.dtype).clamp_min(1e-30))  # (tensors, k + 2)
    corr = [math.sqrt(cv) / (1 - b ** count) for b in net.momentum_decays]
    per_step = torch.tensor([math.sqrt(cv), *corr, 1.0], dtype=like.dtype, device=like.device)
    cols = torch.cat([rms_inv, per_step.expand(len(sizes), -1)], dim=1)  # (tensors, f + 1)
    bias = net.first_tensor(net.tensor_features(count, layout, like)) + net.first.bias  # (tensors, h)
    w = torch.cat([net.first.weight.expand(len(sizes), -1, -1), bias.unsqueeze(-1)], dim=-1) * cols.unsqueeze(1)
    lin = [torch.cat([m.weight, m.bias.unsqueeze(1)], dim=1) for m in net.rest if isinstance(m, nn.Linear)]
    w_out = torch.cat([net.out.weight, net.out.bias.unsqueeze(1)], dim=1)
    a = min(1, k - 1)  # Adam's direction: the 0.9 momentum by default
    unnormalized = net.normalize == "none"  # the output: tanh(mlp) - Adam's direction, or (mlp - it) / its RMS
    # block by block, in reused buffers with a row of ones at the bottom (written once): the features
    # (rows g, m_1..m_k, p | g r, m_1 r..m_k r with r = rsqrt(v + eps^2 (1 - beta_v^t))), the hidden layers,
    # the output minus Adam's direction, and the per-tensor sums of the last hidden layer
    bw = net._wide_width(n, like)
    xb = net._workspace("wide_x", (f + 1, bw), like, fill=1.0)
    hb = [net._workspace(f"wide_h{i}", (hid + 1, bw), like, fill=1.0) for i in range(2)]
    u = net._workspace("wide_u", (1, n), like) if donated else like.new_empty((1, n))
    sums = like.new_zeros((len(sizes), hid), dtype=torch.float64)  # float32 within a block, float64 across
    e2 = net.eps ** 2 * cv
    offsets = list(itertools.accumulate(sizes, initial=0))  # where each tensor starts in the flat layout
    for j, s, e in blocks(sizes, bw):
        c = e - s
        x = xb[:, :c]
        x[0].copy_(g[s:e])
        x[1:k + 1].copy_(momenta[:, s:e])
        x[k + 1].copy_(flat_p[j][s - offsets[j]:e - offsets[j]])
        r = torch.add(v[s:e], e2, out=x[k + 2]).rsqrt_()
        torch.mul(x[1:k + 1], r, out=x[k + 3:f])
        r.mul_(x[0])
        h = hb[0]
        torch.mm(w[j], x, out=h[:hid, :c]).relu_()
        for i, wb in enumerate(lin):
            torch.mm(wb, h[:, :c], out=hb[(i + 1) % 2][:hid, :c]).relu_()
            h = hb[(i + 1) % 2]
        out = torch.mm(w_out, h[:, :c], out=u[:, s:e])
        (out.tanh_() if unnormalized else out).sub_(x[k + 3 + a], alpha=corr[a])
        sums[j].add_(h[:hid, :c].sum(1))
    pooled = mean_of_block_sums(sums, sizes, like.dtype)
    if cosines is not None:
        pooled = torch.cat([pooled, cosines.to(pooled.dtype)], dim=1)
    u = u.squeeze(0)
    lr = torch.exp(net.log_rate())
    if unnormalized:  # tanh(mlp) - Adam's direction, as it is
        u.mul_(lr)
    else:
        for c in u.split(sizes):
            c.mul_(lr * torch.rsqrt((torch.dot(c, c) / c.shape[0]).clamp_min(1e-30)))
    return unflatten(u, layout), NormMLPState(momenta, v, pooled, count, layout)
