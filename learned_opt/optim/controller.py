"""A learned controller for any optimizer: a GRU over the global features of the decision heads.

It makes the learning-rate and stop decisions only (no updates), so it pairs with hand-coded optimizers as well
as with meta-networks.
"""
from __future__ import annotations

from typing import NamedTuple

from torch import Tensor, nn

from ..control import Observation
from .features import STATE_MODULE
from .heads import NUM_GLOBAL_FEATURES, DecisionHeads, DecisionState


class ControllerState(NamedTuple):
    """Running statistics and the recurrent state of a :class:`LearnedController`."""
    stats: DecisionState
    h: Tensor


ControllerState.__module__ = STATE_MODULE



class LearnedController(nn.Module):
    """A learned controller for any optimizer (hand-coded ones included): LR and stop decisions only.

    A GRU cell reads the global features of :class:`DecisionHeads` every step (loss, validation-loss and
    gradient-norm ratios, steps since the best validation loss, time embeddings); its state feeds the same
    heads as the meta-networks'. ``learn_lr=False`` fixes the LR multiplier at 1 and ``learn_stop=False`` the
    stop probability at 0, so each decision can be studied alone. With ``restore_best`` the inner loop returns
    the parameters of the lowest validation loss seen, as patience-based early stopping does. It implements the
    controller protocol (``init()`` / ``decide(obs, state)``); its meta-weights are ``.parameters()``.
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
