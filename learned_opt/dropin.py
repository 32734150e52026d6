"""A shipped learned optimizer as a drop-in ``torch.optim`` optimizer: :class:`LearnedOptimizer`.

    opt = learned_opt.LearnedOptimizer(model.parameters(), total_steps=1000)
    ...
    loss.backward(); opt.step(loss=loss)

It is :class:`~learned_opt.optim.adapter.ProtocolOptimizer` around a meta-network of :mod:`learned_opt.pretrained`
(or any ``lopt.pt``), with the meta-network's own learned LR (and stop) heads running, and ``lr`` read as a plain
multiplier of the learned step.
"""
from __future__ import annotations

import os
from typing import Any, Iterable, List, Optional

import torch

from . import pretrained
from .optim.adapter import ProtocolOptimizer
from .validate import check_nonnegative


def _materialise(params: Iterable[Any]) -> List[Any]:
    """``params`` as a list, and every group's ``params`` as a list too, so that reading them consumes nothing."""
    if isinstance(params, torch.Tensor):
        raise TypeError("params must be an iterable of tensors or of parameter groups (dicts), got a tensor")
    out = []
    for item in params:
        if isinstance(item, dict) and "params" in item:
            group = dict(item)
            ps = group["params"]
            group["params"] = [ps] if isinstance(ps, torch.Tensor) else list(ps)
            item = group
        out.append(item)
    return out


def _first_tensor(params: List[Any]) -> Optional[torch.Tensor]:
    """The first parameter of (materialised) ``params``: tensors, ``(name, tensor)`` pairs or groups of either."""
    for item in params:
        for c in item["params"] if isinstance(item, dict) else [item]:
            c = c[1] if isinstance(c, tuple) and len(c) == 2 else c
            if isinstance(c, torch.Tensor):
                return c
    return None


def _looks_like_path(name: str) -> bool:
    """Whether a ``name`` that is not in the catalogue is meant as a file (catalogue names never look like this)."""
    return "/" in name or os.sep in name or name.endswith(".pt") or os.path.isfile(name)


def _resolve(name: Any, device: Any) -> torch.nn.Module:
    """The meta-network ``name``: a pretrained name, or the path of a ``lopt.pt`` file (``PathLike`` as ``str``)."""
    if not isinstance(name, str):
        raise ValueError(f"name must be a pretrained optimizer name or the path of a lopt.pt file, got {name!r}")
    known = pretrained.list_pretrained()
    if name in known:
        return pretrained.load(name, device)
    if _looks_like_path(name):
        return pretrained.load_file(name, device)
    raise ValueError(f"name {name!r} is neither a pretrained optimizer ({', '.join(known)}) nor the path of a "
                     f"lopt.pt file")


class LearnedOptimizer(ProtocolOptimizer):
    """A pretrained learned optimizer as a ``torch.optim`` optimizer (update rule and learned LR head).

    ``name`` is one of :func:`learned_opt.pretrained.list_pretrained` or the path of a ``lopt.pt`` file written
    by :func:`learned_opt.meta.save_lopt`; by default (``None``) it is :func:`learned_opt.pretrained.default_name`:
    ``'general'`` when the catalogue holds it, otherwise ``'digits_lstm'`` (a research artefact meta-trained on
    one small digits MLP). ``learned_opt.pretrained.info(name)`` says what each was meta-trained on and where it
    is known to fail. The meta-network is loaded in eval mode with frozen weights, on ``device`` (by default the
    device of the first parameter); it computes in its own dtype (float32) for float32, float64 and bfloat16
    models alike, and the parameters keep theirs.

    **lr** multiplies every learned update: each step adds ``lr * u`` to a parameter, where ``u`` is the
    meta-network's update times its learned LR multiplier, so ``lr=0.5`` halves every update and ``lr=2``
    doubles it. A parameter group may set its own ``lr`` (the same kind of multiplier, ``0`` freezes it), and
    ``torch.optim.lr_scheduler`` schedulers scale it as usual (``StepLR(opt, 100, gamma=0.5)`` halves the updates
    every 100 steps); ``lr=0`` is accepted (every group starts frozen; warm-up schedulers that set
    ``group['lr']`` start there). ``OneCycleLR`` runs with ``cycle_momentum=False``: the learned rule has no
    momentum hyper-parameter to cycle.

    **weight_decay** (default 0; per group too, e.g. ``{'params': biases, 'weight_decay': 0.0}``) is decoupled,
    as in AdamW: each step first multiplies a parameter by ``1 - lr * base_rate * s * weight_decay``, where
    ``lr * base_rate * s`` is that step's size: the group's ``lr``, the network's learned base rate
    (``exp(log_lr)``, 3.7e-4 for ``'general'``) and its learned LR multiplier ``s``. That is the quantity AdamW's
    ``lr`` is, so a recipe's ``weight_decay`` keeps its meaning.

    **total_steps**, the number of steps you mean to run, reaches the learned scheduler as its horizon (the
    fraction of the run done); ``None``: unknown. ``controller='auto'`` runs the meta-network's own LR and stop
    heads (``opt.should_stop`` says whether the stop head would halt now); ``None`` turns them off; any
    controller object replaces them. The learned scheduler reads the training loss: pass it with
    ``opt.step(loss=loss)``, ``opt.step(closure)`` or ``opt.set_loss(loss)`` before ``step()`` (a step without it
    warns once; the HF Trainer and accelerate do not pass it: :mod:`learned_opt.integrations` hands it over).
    Everything else (parameters without gradients, parameter groups, per-parameter ``optimizer.state[p]``,
    ``state_dict``) is as in :class:`~learned_opt.optim.adapter.ProtocolOptimizer`.
    """

    def __init__(self, params: Iterable[Any], name: Any = None, total_steps: Optional[int] = None,
                 lr: float = 1.0, controller: Any = "auto", device: Any = None, weight_decay: float = 0.0):
        check_nonnegative("lr", lr)
        params = _materialise(params)
        if device is None:
            first = _first_tensor(params)
            device = first.device if first is not None else "cpu"
        self.name = pretrained.default_name() if name is None else (os.fspath(name) if isinstance(
            name, os.PathLike) else name)
        net = _resolve(self.name, device)
        # ProtocolOptimizer steps by group['lr'] / (its constructor's lr): with a reference of 1, every group's
        # lr is a plain multiplier, and the groups that set none take this one.
        if params and not any(isinstance(p, dict) for p in params):
            params = [{"params": params}]
        params = [dict(p, lr=lr) if isinstance(p, dict) and "lr" not in p else p for p in params]
        super().__init__(params, net, lr=1.0, controller=controller, total_steps=total_steps,
                         weight_decay=weight_decay)
        self.defaults["lr"] = lr  # and so do groups added later with add_param_group

    def __getstate__(self):
        # ProtocolOptimizer pickles its own attributes; the catalogue name travels too
        state = super().__getstate__()
        state["name"] = self.name
        return state
