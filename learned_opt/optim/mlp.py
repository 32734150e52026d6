"""The per-parameter MLP optimizer of Metz et al. (2020/2022), with learned LR and stop heads.

A per-parameter MLP over gradient, parameter, momenta at several decays (normalised per tensor) and a step
embedding; update ``d * exp(m * c_exp) * c_step``.
"""
from __future__ import annotations

from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch
from einops import rearrange, repeat
from torch import Tensor, nn

from .features import (SMALL_LEARNER, STATE_MODULE, STEP_TIMESCALES, Layout, block_width, blocks, check_layout,
                       chunk_means, ema, flatten, make_layout, mean_of_block_sums, segment_mean_stable,
                       step_embedding, unflatten)
from .network import _MetaNetwork


class MLPState(NamedTuple):
    """Per-coordinate momenta and second moment, pooled hidden, count, layout."""
    momenta: Tuple[Tensor, ...]
    rms: Tensor
    pooled: Optional[Tensor]
    count: int
    layout: Layout


MLPState.__module__ = STATE_MODULE



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
