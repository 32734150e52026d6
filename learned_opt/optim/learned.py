"""Learned optimizers by name: the registry of meta-networks, and the names others import from here.

One file per meta-network over the shared modules, and none imports another; this module registers them:

* :class:`~learned_opt.optim.lstm.CoordLSTM` (``lstm``): Andrychowicz et al. (2016), a coordinatewise LSTM;
* :class:`~learned_opt.optim.mlp.CoordMLP` (``mlp``): Metz et al. (2020/2022), a per-parameter MLP;
* :class:`~learned_opt.optim.normmlp.NormMLP` (``norm_mlp``): Celo / Celo2, a per-tensor-normalised MLP update
  with a learned scheduler;
* :class:`~learned_opt.optim.controller.LearnedController` (``controller``): LR and stop decisions only.

Shared pieces: :mod:`~learned_opt.optim.features` (layout, feature math, fast-path blocks),
:mod:`~learned_opt.optim.heads` (the LR and stop decision heads), :mod:`~learned_opt.optim.network` (the
meta-network base class).
"""
from __future__ import annotations

from typing import Any

from torch import nn

from ..registry import from_registry
from .controller import ControllerState, LearnedController
from .features import (FAST_BLOCK, SMALL_LEARNER, STEP_TIMESCALES, Layout, block_width, blocks, check_layout,
                       chunk_means, ema, flatten, make_layout, mean_of_block_sums, preprocess_gradient,
                       preprocess_gradient_into, segment_mean, segment_mean_acc, segment_mean_stable, step_embedding,
                       tanh_, unflatten)
from .heads import NUM_GLOBAL_FEATURES, DecisionHeads, DecisionState
from .lstm import BASES, EXTRA_INPUTS, CoordLSTM, LSTMState
from .mlp import CoordMLP, MLPState
from .network import LearnedControl, _MetaNetwork
from .normmlp import NormMLP

LEARNED = {"lstm": CoordLSTM, "mlp": CoordMLP, "controller": LearnedController, "norm_mlp": NormMLP}


def build_learned(kind: str, **config: Any) -> _MetaNetwork:
    """A meta-network by kind (``lstm``, ``mlp``, ``norm_mlp`` or ``controller``) and constructor keyword arguments."""
    return from_registry(LEARNED, kind, "meta-network", **config)


def kind_of(net: nn.Module) -> str:
    """The registry key of a meta-network instance."""
    for k, cls in LEARNED.items():
        if type(net) is cls:
            return k
    raise ValueError(f"not a registered meta-network: {type(net).__name__}")


__all__ = ["LEARNED", "build_learned", "kind_of", "CoordLSTM", "CoordMLP", "NormMLP", "LearnedController",
           "LearnedControl", "DecisionHeads", "DecisionState", "LSTMState", "MLPState", "ControllerState", "Layout",
           "BASES", "EXTRA_INPUTS", "FAST_BLOCK", "SMALL_LEARNER", "STEP_TIMESCALES", "NUM_GLOBAL_FEATURES",
           "block_width", "blocks", "check_layout", "chunk_means", "ema", "flatten", "make_layout",
           "mean_of_block_sums", "preprocess_gradient", "preprocess_gradient_into", "segment_mean",
           "segment_mean_acc", "segment_mean_stable", "step_embedding", "tanh_", "unflatten"]
