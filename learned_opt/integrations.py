"""Hand the training loss to a learned optimizer inside the training loops researchers use.

A :class:`~learned_opt.LearnedOptimizer`'s learned LR (and stop) heads read the training loss. Loops that call
``optimizer.step(closure)`` hand it over already (Lightning's automatic optimization, plain loops with a closure);
those that call a bare ``optimizer.step()`` do not, and the learned scheduler then runs blind (the optimizer warns
once). For those:

* **HF transformers Trainer**: ``feed_loss(trainer)`` (after building the Trainer with the optimizer,
  ``Trainer(..., optimizers=(opt, None))``). It adds a :class:`LossToOptimizer` callback that, just before each
  optimizer step, hands the optimizer that step's training loss: the sum of what ``Trainer.training_step``
  returned for the step's micro-batches, which the Trainer scales so that the sum is the step's mean loss (the
  ``loss`` it logs), gradient accumulation included.
* **accelerate and plain loops**: ``step_with_loss(optimizer, loss)`` instead of ``optimizer.step()``; it reaches
  through accelerate's ``AcceleratedOptimizer`` and, under ``accelerator.accumulate(model)``, hands over the mean
  of the micro-batch losses of the step that actually updates.
* **Lightning** (automatic optimization): the closure passes the loss already; with ``accumulate_grad_batches=k``
  that is the last micro-batch's loss divided by ``k``. ``LightningLossToOptimizer()`` in ``Trainer(callbacks=
  [...])`` hands over the mean of the step's micro-batch losses instead.

Each one calls :meth:`~learned_opt.optim.adapter.ProtocolOptimizer.set_loss` of the learned optimizer inside the
loop's wrappers, with the mean over the ranks under ``torch.distributed`` (a rank's own loss would make the DDP
replicas step differently); an optimizer without ``set_loss`` (``torch.optim.AdamW``) is left alone, so the same
code runs with either. Importing this module imports none of transformers, accelerate or Lightning: the two
callback classes are built (and their package imported) on first access, ``learned_opt.integrations.LossToOptimizer``.
"""
from __future__ import annotations

import functools
import warnings
import weakref
from typing import Any, List, Optional

import torch

__all__ = ["unwrap_optimizer", "step_with_loss", "feed_loss", "LossToOptimizer", "LightningLossToOptimizer"]

# Losses of the micro-batches that step_with_loss saw since the last step that updated, per learned optimizer.
_ACCUMULATED: "weakref.WeakKeyDictionary[Any, List[torch.Tensor]]" = weakref.WeakKeyDictionary()


def unwrap_optimizer(optimizer: Any) -> Optional[Any]:
    """The optimizer with a ``set_loss`` method inside ``optimizer``'s wrappers, or ``None`` when there is none.

    Follows ``.optimizer`` (accelerate's ``AcceleratedOptimizer``, transformers' wrappers) and ``._optimizer``
    (Lightning's ``LightningOptimizer``) until it finds one, ``optimizer`` itself first.
    """
    seen = set()
    while optimizer is not None and id(optimizer) not in seen:
        if callable(getattr(optimizer, "set_loss", None)):
            return optimizer
        seen.add(id(optimizer))
        inner = getattr(optimizer, "optimizer", None)
        optimizer = inner if inner is not None else getattr(optimizer, "_optimizer", None)
    return None


def _scalar(loss: Any) -> torch.Tensor:
    """``loss`` as a detached float32 scalar tensor (a one-element tensor, a Python or NumPy number)."""
    return torch.as_tensor(loss).detach().float().reshape(())


def _across_ranks(loss: torch.Tensor) -> torch.Tensor:
    """The mean of ``loss`` over the ranks of ``torch.distributed`` when it runs with more than one, else ``loss``.

    The learned scheduler reads the loss: were each rank to hand over its own, the replicas of a DDP model would
    take different steps and drift apart. Every rank must call it (they all step the optimizer together).
    """
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return loss
    total = loss.detach().clone()
    dist.all_reduce(total)
    return total / dist.get_world_size()


def step_with_loss(optimizer: Any, loss: Any, closure: Any = None) -> Any:
    """``optimizer.step()``, with ``loss`` (this micro-batch's training loss) handed to the learned optimizer inside.

    For accelerate and plain loops: ``accelerator.backward(loss); step_with_loss(optimizer, loss)``. ``optimizer``
    may be the learned optimizer itself or any wrapper of it (accelerate's ``AcceleratedOptimizer``). When the
    wrapper will not update at this call (``accelerator.accumulate(model)`` before the last micro-batch of a
    step: its ``gradient_state.sync_gradients`` is false) the loss is kept, and the step that updates gets the
    mean of the losses of its micro-batches. Under ``torch.distributed`` (DDP, accelerate with several processes)
    the loss handed over is the mean over the ranks, so that every replica takes the same step. An optimizer
    without a learned optimizer inside just steps. Returns what ``optimizer.step`` returns.
    """
    inner = unwrap_optimizer(optimizer)
    if inner is not None:
        losses = _ACCUMULATED.setdefault(inner, [])
        losses.append(_scalar(loss))
        gradient_state = getattr(optimizer, "gradient_state", None)
        if gradient_state is None or bool(getattr(gradient_state, "sync_gradients", True)):
            inner.set_loss(_across_ranks(torch.stack(losses).mean()))
            losses.clear()
    return optimizer.step() if closure is None else optimizer.step(closure)


def feed_loss(trainer: Any) -> Any:
    """Make a ``transformers.Trainer`` hand each optimizer step's training loss to its (learned) optimizer.

    Wraps the Trainer's ``training_step`` (on this instance; subclass overrides included) to collect the loss of
    each micro-batch, and adds a :class:`LossToOptimizer` callback that hands their sum to the optimizer in
    ``on_pre_optimizer_step`` (after gradient clipping, just before ``optimizer.step()``). The Trainer scales each
    micro-batch's loss for gradient accumulation, so the sum is the step's mean loss, the ``loss`` it logs.
    Calling it again on the same Trainer changes nothing. Returns the callback.
    """
    cls = _hf_callback_class()
    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, cls):
            callback.capture(trainer)
            return callback
    callback = cls(trainer)
    trainer.add_callback(callback)
    return callback


@functools.lru_cache(maxsize=None)
def _hf_callback_class() -> type:
    """The :class:`LossToOptimizer` class (imports transformers)."""
    from transformers import TrainerCallback

    class LossToOptimizer(TrainerCallback):
        """A ``transformers.TrainerCallback`` that hands each optimizer step's training loss to the optimizer.

        Build it with the Trainer whose loss it reads, ``trainer.add_callback(LossToOptimizer(trainer))``, or call
        :func:`feed_loss` (which does both). It collects what ``trainer.training_step`` returns and, in
        ``on_pre_optimizer_step``, calls ``set_loss`` of the learned optimizer inside the Trainer's optimizer
        with their sum. ``handed`` counts the steps it handed a loss to.
        """

        def __init__(self, trainer: Any = None):
            self._losses: List[torch.Tensor] = []
            self._warned = False
            self.handed = 0
            if trainer is not None:
                self.capture(trainer)

        def capture(self, trainer: Any) -> None:
            """Wrap ``trainer.training_step`` (once) so that each micro-batch's returned loss is collected."""
            original = trainer.training_step
            if getattr(original, "_learned_opt_callback", None) is self:
                return

            @functools.wraps(original)
            def training_step(*args: Any, **kwargs: Any) -> Any:
                loss = original(*args, **kwargs)
                self._losses.append(_scalar(loss))
                return loss

            training_step._learned_opt_callback = self
            trainer.training_step = training_step

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            """A new run (or a resumed one) starts with nothing collected."""
            self._losses.clear()

        def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, optimizer: Any = None,
                                  **kwargs: Any) -> None:
            """Hand the collected loss of this step to the learned optimizer, then start collecting afresh."""
            inner = unwrap_optimizer(optimizer)
            if inner is not None and self._losses:
                inner.set_loss(_across_ranks(torch.stack(self._losses).sum()))
                self.handed += 1
            elif inner is not None and not self._warned:
                self._warned = True
                warnings.warn("LossToOptimizer saw no training loss for this step: build it with the Trainer, "
                              "learned_opt.integrations.feed_loss(trainer), so that it can read the loss",
                              stacklevel=2)
            self._losses.clear()

    return LossToOptimizer


@functools.lru_cache(maxsize=None)
def _lightning_callback_class() -> type:
    """The :class:`LightningLossToOptimizer` class (imports Lightning: ``lightning``, else ``pytorch_lightning``)."""
    try:
        from lightning.pytorch import Callback
    except ImportError:
        from pytorch_lightning import Callback

    class LightningLossToOptimizer(Callback):
        """A Lightning ``Callback`` that hands the learned optimizer the mean loss of each step's micro-batches.

        Lightning's automatic optimization passes the optimizer a closure whose result, with
        ``accumulate_grad_batches=k``, is the last micro-batch's loss divided by ``k``. This callback collects
        the (so divided) loss of every micro-batch in ``on_before_backward`` and hands their sum, the mean loss
        of the step, to ``set_loss`` in ``on_before_optimizer_step`` (which runs inside ``optimizer.step``, after
        the closure, before the update). Under manual optimization it does nothing: pass the loss yourself with
        ``opt.step(loss=loss)``. ``handed`` counts the steps it handed a loss to.
        """

        def __init__(self) -> None:
            self._losses: List[torch.Tensor] = []
            self.handed = 0

        def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
            """Each epoch (a resumed one too) starts with nothing collected."""
            self._losses.clear()

        def on_before_backward(self, trainer: Any, pl_module: Any, loss: torch.Tensor) -> None:
            """Collect a micro-batch's loss (automatic optimization only)."""
            if pl_module.automatic_optimization:
                self._losses.append(_scalar(loss))

        def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
            """Hand the step's collected loss to the learned optimizer, then start collecting afresh."""
            inner = unwrap_optimizer(optimizer)
            if inner is not None and self._losses and pl_module.automatic_optimization:
                inner.set_loss(_across_ranks(torch.stack(self._losses).sum()))
                self.handed += 1
            self._losses.clear()

    return LightningLossToOptimizer


_LAZY_CLASSES = {"LossToOptimizer": _hf_callback_class, "LightningLossToOptimizer": _lightning_callback_class}


def __getattr__(name: str) -> Any:
    """The callback classes, built (and their framework imported) on first access (PEP 562)."""
    if name in _LAZY_CLASSES:
        return _LAZY_CLASSES[name]()
    raise AttributeError(f"module 'learned_opt.integrations' has no attribute {name!r}")
