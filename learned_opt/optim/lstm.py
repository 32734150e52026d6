"""The coordinatewise LSTM optimizer of Andrychowicz et al. (2016), "Learning to learn by gradient descent by
gradient descent", with learned LR and stop heads.

A two-layer LSTM shared across coordinates, per-coordinate state, gradients preprocessed to ``(log|g| / p, sign
g)`` (or ``(-1, e^p g)`` for tiny gradients), output times a fixed scale; optionally a correction of a hand-coded
step (SGD, heavy ball, Adam) with learned per-coordinate step sizes.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from ..validate import check_choice
from .features import (SMALL_LEARNER, STATE_MODULE, Layout, block_width, blocks, check_layout, ema, flatten,
                       make_layout, mean_of_block_sums, preprocess_gradient, preprocess_gradient_into, segment_mean,
                       segment_mean_stable, tanh_, unflatten)
from .network import _MetaNetwork


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


LSTMState.__module__ = STATE_MODULE



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
        check_choice("base", base, BASES)
        if not base_lr > 0:
            raise ValueError(f"base_lr must be > 0, got {base_lr!r}")
        if not 0 <= base_momentum < 1:
            raise ValueError(f"base_momentum must be in [0, 1), got {base_momentum!r}")
        if not 0 <= base_beta2 < 1:
            raise ValueError(f"base_beta2 must be in [0, 1), got {base_beta2!r}")
        if not base_eps > 0:
            raise ValueError(f"base_eps must be > 0, got {base_eps!r}")
        for e in extra_inputs:
            check_choice("extra input", e, EXTRA_INPUTS)
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
