"""How :class:`~learned_opt.optim.adapter.ProtocolOptimizer` keeps a protocol optimizer's state per parameter.

``torch.optim`` keeps one state dict per parameter (``optimizer.state[p]``, with a ``step`` count); the protocol
optimizers keep one state over a list of tensors. This module translates between the two:

* a ``per_tensor`` optimizer (every hand-coded baseline) has one state per tensor already: :func:`encode_tensor` /
  :func:`decode_tensor` store its fields in ``state[p]`` (a one-tensor tuple as that tensor, the count as
  ``step``);
* a meta-network lays its state out over all the tensors of a step, concatenated along a coordinate axis, but its
  update of a tensor reads only that tensor's gradient, parameter and state and the step count (the per-tensor
  feature normalisers, the per-tensor output normalisation and the per-tensor pooled hidden state all stay inside
  the tensor). :data:`CODECS` names, for each meta-network state, the coordinate axis of every per-coordinate
  field; :func:`split` cuts a state into per-tensor entries (views, no copy) and :func:`join` concatenates
  entries back into the state a call over those tensors expects. Only the learned LR and stop heads read across
  tensors (the mean of the pooled hidden states, the global gradient norm): that part stays per parameter group.

It also holds the plain-container conversion of the state dict (:func:`to_plain` / :func:`from_plain`, so that a
checkpoint loads with ``torch.load(..., weights_only=True)``) and small helpers of the adapter.
"""
from __future__ import annotations

import dataclasses
import importlib
import numbers
import sys
import warnings
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .features import make_layout
from .lstm import LSTMState
from .mlp import MLPState
from .normmlp import NormMLPState

# The state dict format. 3: per-parameter state in ``state_dict()['state']`` (torch.optim's place); 2 kept one
# protocol state per parameter group inside ``proto_state`` and cannot be read into the per-parameter layout.
STATE_FORMAT = "learned_opt.adapter/3"
_NT = "__namedtuple__"


def to_plain(x: Any) -> Any:
    """NamedTuples (the protocol states) -> tagged dicts, recursively; ``torch.Size`` -> list."""
    if isinstance(x, torch.Size):
        return {"__size__": list(x)}
    if isinstance(x, tuple) and hasattr(x, "_fields"):
        cls = type(x)
        return {_NT: f"{cls.__module__}:{cls.__qualname__}", "fields": {k: to_plain(v) for k, v in
                                                                      zip(x._fields, x)}}
    if isinstance(x, (list, tuple)):
        return type(x)(to_plain(v) for v in x)
    if isinstance(x, dict):
        return {k: to_plain(v) for k, v in x.items()}
    return x


def from_plain(x: Any) -> Any:
    """Inverse of :func:`to_plain`; only classes defined in ``learned_opt`` are rebuilt."""
    if isinstance(x, dict) and "__size__" in x:
        return torch.Size(x["__size__"])
    if isinstance(x, dict) and _NT in x:
        module, _, name = x[_NT].partition(":")
        if not (module == "learned_opt" or module.startswith("learned_opt.")):
            raise ValueError(f"refusing to rebuild {x[_NT]!r}: not a learned_opt state")
        cls = getattr(importlib.import_module(module), name)
        return cls(**{k: from_plain(v) for k, v in x["fields"].items()})
    if isinstance(x, (list, tuple)):
        return type(x)(from_plain(v) for v in x)
    if isinstance(x, dict):
        return {k: from_plain(v) for k, v in x.items()}
    return x


# Per meta-network state: the coordinate axis of every per-coordinate field (a tensor, or a tuple of tensors that
# all have it). ``count`` becomes the parameter's ``step``, ``layout`` is rebuilt from the tensors of the call and
# ``pooled`` (one row per tensor) is kept as the parameter's row. A state class not listed here (or a field not
# listed) is not split: the adapter keeps it per group.
CODECS: Dict[type, Dict[str, int]] = {
    NormMLPState: {"momenta": 1, "v": 0},
    MLPState: {"momenta": 0, "rms": 0},
    LSTMState: {"h": 1, "c": 1, "momenta": 0, "base": -1, "prev": 0},
}
_DERIVED = ("count", "layout", "pooled")


def codec_for(state: Any) -> Optional[Dict[str, int]]:
    """The per-coordinate axes of ``state``'s class when every field is known, else ``None``."""
    spec = CODECS.get(type(state))
    if spec is None or any(f not in spec and f not in _DERIVED for f in state._fields):
        return None
    return spec


def _cut(value: Any, axis: int, sizes: Sequence[int]) -> List[Any]:
    if value is None:
        return [None] * len(sizes)
    if isinstance(value, tuple):
        return [tuple(parts) for parts in zip(*(v.split(list(sizes), dim=axis) for v in value))] if value \
            else [()] * len(sizes)
    return list(value.split(list(sizes), dim=axis))


def split(state: Any, spec: Dict[str, int], sizes: Sequence[int]) -> List[Dict[str, Any]]:
    """One entry per tensor of ``state`` (views of its fields): per-coordinate fields and the ``pooled`` row."""
    entries: List[Dict[str, Any]] = [{} for _ in sizes]
    for name, axis in spec.items():
        for e, part in zip(entries, _cut(getattr(state, name), axis, sizes)):
            e[name] = part
    pooled = getattr(state, "pooled", None)
    for e, row in zip(entries, pooled.unbind(0) if pooled is not None else [None] * len(sizes)):
        e["pooled"] = row
    return entries


def _concat(values: List[Any], axis: int) -> Any:
    if all(v is None for v in values):
        return None
    if isinstance(values[0], tuple):
        return tuple(torch.cat(list(parts), dim=axis) for parts in zip(*values))
    return torch.cat(values, dim=axis)


def join(cls: type, spec: Dict[str, int], entries: Sequence[Dict[str, Any]], count: int, layout: Any) -> Any:
    """The state of class ``cls`` over the tensors of ``entries`` (in that order), at step ``count``."""
    fields: Dict[str, Any] = {name: _concat([e[name] for e in entries], axis) for name, axis in spec.items()}
    rows = [e.get("pooled") for e in entries]
    if all(r is None for r in rows):
        fields["pooled"] = None
    else:
        like = next(r for r in rows if r is not None)
        fields["pooled"] = torch.stack([r if r is not None else torch.zeros_like(like) for r in rows])
    fields.update(count=count, layout=layout)
    return cls(**{f: fields[f] for f in cls._fields if f in fields})


class Parts(NamedTuple):
    """The states of a step run in parts (tensors of different step counts), with the pooled rows of all the
    tensors in the order of the step, for the decision heads."""
    states: Tuple[Any, ...]
    pooled: Optional[Tensor]


class Partitioned:
    """A meta-network run on parts of a step's tensors (each part: the tensors of one step count) and
    reassembled: the updates and the pooled rows come back in the order of the step. Exact because the update
    of a tensor reads that tensor only (see the module docstring)."""

    def __init__(self, opt: Any, parts: List[List[int]]):
        self.opt, self.parts = opt, parts

    def update(self, grads, state: Tuple[Any, ...], params, *, loss=None):
        """Each part's update from its own state; ``(updates in step order, Parts)``."""
        updates: List[Any] = [None] * len(grads)
        rows: List[Any] = [None] * len(grads)
        states = []
        for part, s in zip(self.parts, state):
            us, s = self.opt.update([grads[i] for i in part], s, [params[i] for i in part], loss=loss)
            pooled = getattr(s, "pooled", None)
            for j, i in enumerate(part):
                updates[i] = us[j]
                rows[i] = None if pooled is None else pooled[j]
            states.append(s)
        pooled = None if any(r is None for r in rows) else torch.stack(rows)
        return updates, Parts(tuple(states), pooled)


def encode_tensor(state: Any) -> Dict[str, Any]:
    """A per-tensor protocol state as ``state[p]`` entries: a one-tensor tuple as its tensor, an empty tuple
    left out, ``count`` as ``step`` (a float32 tensor, as torch.optim's); a state that is no NamedTuple goes
    whole under ``'proto'``."""
    if not (isinstance(state, tuple) and hasattr(state, "_fields")):
        return {"proto": state}
    out: Dict[str, Any] = {}
    for name, value in zip(state._fields, state):
        if name == "count":
            out["step"] = torch.tensor(float(value))
        elif isinstance(value, tuple) and len(value) == 1 and isinstance(value[0], Tensor):
            out[name] = value[0]
        elif not (isinstance(value, tuple) and len(value) == 0):
            out[name] = value
    return out


def decode_tensor(entry: Dict[str, Any], template: Any) -> Any:
    """Inverse of :func:`encode_tensor`; ``template`` (a fresh state of the same optimizer) gives the structure."""
    if "proto" in entry or not (isinstance(template, tuple) and hasattr(template, "_fields")):
        return entry["proto"]
    fields = {}
    for name, value in zip(template._fields, template):
        if name == "count":
            fields[name] = int(entry["step"])
        elif isinstance(value, tuple) and len(value) == 1 and isinstance(value[0], Tensor):
            fields[name] = (entry[name],)
        else:
            fields[name] = entry.get(name, value)
    return type(template)(**fields)


def own_weight_decay(opt: Any) -> bool:
    """Whether ``opt`` is a dataclass with a ``weight_decay`` field (the hand-coded baselines): the adapter
    then runs it with the group's value instead of decaying on its own."""
    return dataclasses.is_dataclass(opt) and any(f.name == "weight_decay" for f in dataclasses.fields(opt))


def decay_rate(opt: Any) -> Any:
    """The base step size that decoupled weight decay is scaled by (see ProtocolOptimizer), or ``None``:
    ``exp(log_lr)`` of a NormMLP (the rate of its unit-RMS direction), ``exp(log_base_lr)`` of a CoordLSTM
    correcting a hand-coded step, a numeric ``lr`` attribute; other meta-networks have no such rate."""
    rate = getattr(opt, "log_rate", None)
    if callable(rate):
        return torch.exp(rate().detach())
    for name in ("log_lr", "log_base_lr"):
        w = getattr(opt, name, None)
        if isinstance(w, Tensor):
            return torch.exp(w.detach())
    lr = getattr(opt, "lr", None)
    if isinstance(lr, numbers.Real) and not isinstance(lr, bool):
        return float(lr)
    return None


def _untouched(heads: Any) -> bool:
    """Whether decision heads have the zero last layers they start with (their output ignores every input)."""
    return all(not torch.any(t) for head in (heads.lr, heads.stop)
               for t in (head[-1].weight, head[-1].bias))


def reads_loss(controller: Any, opt: Any) -> bool:
    """Whether the training loss changes what the controller (or ``opt``) does: learned decision heads that
    were trained (a fresh head's output is constant), a controller that says ``reads_loss = True``, or a
    meta-network with the ``loss`` input."""
    if "loss" in tuple(getattr(opt, "extra_inputs", ()) or ()):
        return True
    if controller is None:
        return False
    flag = getattr(controller, "reads_loss", None)
    if flag is not None:
        return bool(flag)
    heads = getattr(getattr(controller, "net", controller), "heads", None)
    return heads is not None and hasattr(heads, "lr") and not _untouched(heads)


class Defaults(dict):
    """``optimizer.defaults``, which explains itself to ``OneCycleLR`` / ``CyclicLR``: with their default
    ``cycle_momentum=True`` they look for a ``momentum`` or ``betas`` key to cycle, and torch's own message then
    only says the optimizer "must support momentum". The adapter has no such key on purpose (a meta-network's
    momentum decays are part of what it was trained with, and a baseline's are fixed fields), so the lookup made
    from those schedulers' constructors raises the same ``ValueError`` with the fix in it. Any other lookup
    (e.g. a learning-rate monitor asking whether there are betas) is an ordinary dict lookup."""

    def __contains__(self, key: object) -> bool:
        found = dict.__contains__(self, key)
        if not found and key == "momentum":
            frame = sys._getframe(1)
            caller = frame.f_locals.get("self")
            if (frame.f_globals.get("__name__") == "torch.optim.lr_scheduler" and frame.f_code.co_name == "__init__"
                    and type(caller).__name__ in ("OneCycleLR", "CyclicLR")):
                raise ValueError(f"{type(caller).__name__}: this optimizer has no momentum or betas to cycle (the "
                                 f"update rule's momentum is fixed: a meta-network was trained with its decays); "
                                 f"pass cycle_momentum=False, which cycles the learning rate only")
        return found


class PerTensor:
    """A ``per_tensor`` optimizer run on every tensor alone; its state is a tuple of one state per tensor."""

    def __init__(self, opt: Any):
        self.opt = opt

    def update(self, grads, state, params, *, loss=None):
        """Each tensor's update from its own gradient, parameter and state."""
        out = [self.opt.update([g], s, [p], loss=loss) for g, s, p in zip(grads, state, params)]
        return [u[0] for u, _ in out], tuple(s for _, s in out)


def _step(count: int) -> Tensor:
    return torch.tensor(float(count))  # float32 on the CPU, as torch.optim's 'step'


class PerParameterState:
    """The per-parameter state of :class:`~learned_opt.optim.adapter.ProtocolOptimizer` (``self.state[p]``).

    Each ``_*_state`` method returns ``(optimizer, state, commit)`` for one group's step: what to call
    ``propose`` with, and the function that stores the new state back. Derived data (the class and axes of a
    meta-network's state, the joined state of the last step, baseline variants) lives in ``_derived_state``: it is
    rebuilt when missing (after unpickling or ``load_state_dict``).
    """
    opt: Any
    state: Any
    group_states: List[Dict[str, Any]]

    def _derived(self) -> Dict[str, Any]:
        return self.__dict__.setdefault("_derived_state", {"codec": None, "joined": {}, "variants": {},
                                                           "template": None})

    def _tensor_states(self, opt: Any, live: List[Tensor], params: List[Tensor]):
        """A per-tensor optimizer: each parameter's own state, decoded from ``self.state[p]``."""
        derived = self._derived()
        states = []
        for p, q in zip(live, params):
            entry = self.state.get(p)
            if entry and "step" in entry:
                if derived["template"] is None:  # the structure of a state (which fields are one-tensor tuples)
                    derived["template"] = opt.init([q])
                states.append(decode_tensor(entry, derived["template"]))
            else:
                states.append(opt.init([q]))

        def commit(new):
            for p, s in zip(live, new):
                self.state[p] = encode_tensor(s)
        return PerTensor(opt), tuple(states), commit

    def _network_state(self, opt: Any, gi: int, idx: List[int], live: List[Tensor], params: List[Tensor]):
        """A meta-network: its state over the step's tensors, joined from theirs (or the last step's state when
        the tensors and their entries are those it left); tensors of different step counts run apart."""
        derived = self._derived()
        if derived["codec"] is False:
            return self._group_state(opt, gi, idx, live, params, None)
        entries = [self.state.get(p) for p in live]
        last = derived["joined"].get(gi)
        if last is not None and last[0] == tuple(idx) and all(e is k for e, k in zip(entries, last[2])):
            return opt, last[1], self._network_commit(gi, idx, live, None)
        fresh = [j for j, e in enumerate(entries) if not e or "pooled" not in e]
        init = opt.init([params[j] for j in fresh]) if fresh else None
        if derived["codec"] is None:
            probe = init if init is not None else opt.init(params[:1])
            spec = codec_for(probe)
            derived["codec"] = (type(probe), spec) if spec is not None else False
            if spec is None:
                return self._group_state(opt, gi, idx, live, params, init)
        if len(fresh) == len(live):
            return opt, init, self._network_commit(gi, idx, live, None)
        cls, spec = derived["codec"]
        entries = list(entries)
        for j, e in zip(fresh, split(init, spec, init.layout.sizes) if fresh else []):
            entries[j] = dict(e, step=0)
        parts: Dict[int, List[int]] = {}
        for j, e in enumerate(entries):
            parts.setdefault(int(e["step"]), []).append(j)
        states = tuple(join(cls, spec, [entries[j] for j in part], count, make_layout([params[j] for j in part]))
                       for count, part in parts.items())
        if len(states) == 1:
            return opt, states[0], self._network_commit(gi, idx, live, None)
        order = list(parts.values())
        return Partitioned(opt, order), states, self._network_commit(gi, idx, live, order)

    def _network_commit(self, gi: int, idx: List[int], live: List[Tensor], order: Optional[List[List[int]]]):
        """The function that stores a meta-network's new state(s) in ``self.state[p]`` (views, no copy)."""
        derived = self._derived()

        def commit(new):
            spec = derived["codec"][1]
            for part, s in zip(order or [list(range(len(live)))], new.states if order else [new]):
                for j, e in zip(part, split(s, spec, s.layout.sizes)):
                    self.state[live[j]] = dict(e, step=_step(s.count))
            if order is None:  # the next step with the same tensors starts from this very state
                derived["joined"][gi] = (tuple(idx), new, [self.state[p] for p in live])
            else:
                derived["joined"].pop(gi, None)
        return commit

    def _group_state(self, opt: Any, gi: int, idx: List[int], live: List[Tensor], params: List[Tensor], init: Any):
        """A state the adapter cannot split: one per group over the tensors of the step, restarted over the new
        set (with a warning) when that set changes; each parameter's ``step`` still counts its updates."""
        gs = self.group_states[gi]
        if gs.get("opt") is not None and gs["active"] != idx:
            warnings.warn(f"ProtocolOptimizer: the tensors with gradients in parameter group {gi} changed "
                          f"({len(gs['active'])} -> {len(idx)}); {type(opt).__name__}'s state cannot be kept per "
                          f"parameter, so it restarts over the new set", stacklevel=7)
            gs["opt"] = None
        state = gs["opt"] if gs.get("opt") is not None else (init if init is not None else opt.init(params))

        def commit(new):
            gs.update(active=idx, opt=new)
            for p in live:
                entry = self.state.get(p) or {}
                self.state[p] = dict(entry, step=_step(int(entry.get("step", 0)) + 1))
        return opt, state, commit
