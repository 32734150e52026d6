"""Optimizers: the shared protocol, hand-coded baselines, learned meta-networks and a torch.optim adapter."""
from .adapter import ProtocolOptimizer
from .base import Optimizer
from .baselines import (OPTIMIZERS, SGD, Adam, AdamState, AdamW, Momentum, Nesterov, RMSprop, RMSpropState,
                        SGDState, get_optimizer)

__all__ = ["Optimizer", "ProtocolOptimizer", "OPTIMIZERS", "get_optimizer", "SGD", "Momentum", "Nesterov",
           "Adam", "AdamW", "RMSprop", "SGDState", "AdamState", "RMSpropState"]
