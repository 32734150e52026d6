"""The meta-network base class: the plumbing every learned optimizer shares.

A meta-network implements the optimizer protocol (``init`` / ``update``) *and* the controller protocol (``init``
is shared; ``decide`` turns pooled hidden state plus global features into a learning-rate multiplier and a stop
probability through :class:`~learned_opt.optim.heads.DecisionHeads`). Its meta-weights are ``.parameters()``.
Without a graph (evaluation, the drop-in optimizer, ES / PES particles) ``update`` takes a fast path: feature-major,
blocked, in place on reused buffers, equal to the reference to float rounding (``tests/test_fast_paths.py``).
The update head starts at zero updates, the LR head at multiplier 1 and the stop head near probability 0.
"""
from __future__ import annotations

import contextlib
from typing import Any, Dict, Optional, Tuple

import torch
from torch import Tensor, nn

from ..control import Observation
from .heads import DecisionHeads, DecisionState


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
        state.pop("_state_donated", None)
        return state

    def _donated(self) -> bool:
        """Whether the caller of this update gave its state away (:func:`donated_state`): the fast path may then
        write the new moments over the old ones and return updates in a scratch buffer, as torch.optim does,
        instead of allocating them afresh (at 5M coordinates, fresh buffers are a third of the step)."""
        return self.__dict__.get("_state_donated", False)

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


@contextlib.contextmanager
def donated_state(opt: Any):
    """Inside: ``opt``'s updates may overwrite the state they were given and return updates in a scratch buffer
    reused by its next update (the drop-in optimizer, which keeps only the new state and applies the updates at
    once). Outside, and for every other caller (evaluation runs, ES / PES particles that branch from one state),
    an update never changes its inputs."""
    if not isinstance(opt, _MetaNetwork):
        yield
        return
    opt.__dict__["_state_donated"] = True
    try:
        yield
    finally:
        opt.__dict__.pop("_state_donated", None)
