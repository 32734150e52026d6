"""A learned optimizer in PyTorch Lightning: an MLP on scikit-learn's digits, with gradient accumulation, gradient
clipping, and a checkpoint resumed at an epoch boundary.

    python examples/lightning_module.py    # about 15 s on 2 CPU cores

Lightning's automatic optimization calls ``optimizer.step(closure)``, and the closure's result reaches the learned
scheduler; with ``accumulate_grad_batches=k`` that result is the last micro-batch's loss divided by ``k``, so the
``LightningLossToOptimizer()`` callback hands over the mean loss of the step's micro-batches instead. The learned
optimizer's state (per-parameter states, the scheduler's clock and state) travels in Lightning's checkpoint.
"""
import os
import tempfile

import torch
from sklearn.datasets import load_digits
from torch import nn

try:
    import lightning.pytorch as pl
except ImportError:  # the older package name
    import pytorch_lightning as pl

import learned_opt
from learned_opt.integrations import LightningLossToOptimizer


class EpochSampler(torch.utils.data.Sampler):
    """A shuffle that depends on the epoch only (Lightning calls ``set_epoch``), so a resumed run sees the batches
    an uninterrupted one does."""

    def __init__(self, n, seed=0):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __iter__(self):
        return iter(torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist())

    def __len__(self):
        return self.n


class DigitsMLP(pl.LightningModule):
    """An MLP classifier of the 8x8 digits trained by a ``LearnedOptimizer`` over ``total_steps`` steps."""

    def __init__(self, total_steps, batch_size=64):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
        self.total_steps, self.batch_size = total_steps, batch_size
        self.losses = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.losses.append(loss.item())
        return loss

    def configure_optimizers(self):
        return learned_opt.LearnedOptimizer(self.parameters(), total_steps=self.total_steps)

    def train_dataloader(self):
        x, y = load_digits(return_X_y=True)
        data = torch.utils.data.TensorDataset(torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y))
        return torch.utils.data.DataLoader(data, batch_size=self.batch_size, sampler=EpochSampler(len(data)))


def trainer(max_epochs, accumulate=2, callbacks=()):
    """A quiet CPU Trainer with gradient accumulation and gradient clipping."""
    return pl.Trainer(accelerator="cpu", devices=1, max_epochs=max_epochs, accumulate_grad_batches=accumulate,
                      gradient_clip_val=1.0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, callbacks=list(callbacks))


def run(epochs=4, accumulate=2, resume_at=None, callback=True):
    """Train ``epochs`` epochs, or ``resume_at`` epochs, save a checkpoint and resume it in a new Trainer for the
    rest. Returns the module (its ``losses``), the final parameters and the callback."""
    steps_per_epoch = -(-len(DigitsMLP(1).train_dataloader()) // accumulate)
    module = DigitsMLP(total_steps=epochs * steps_per_epoch)
    cb = LightningLossToOptimizer() if callback else None
    cbs = [cb] if cb else []
    if resume_at is None:
        trainer(epochs, accumulate, cbs).fit(module)
    else:
        first = trainer(resume_at, accumulate, cbs)
        first.fit(module)
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "epoch.ckpt")
            first.save_checkpoint(path)
            module = DigitsMLP(total_steps=epochs * steps_per_epoch)   # a fresh process would start like this
            trainer(epochs, accumulate, cbs).fit(module, ckpt_path=path)
    return {"module": module, "params": [p.detach().clone() for p in module.parameters()], "callback": cb}


if __name__ == "__main__":
    out = run()
    losses = out["module"].losses
    print(f"Lightning, MLP on digits: loss {losses[0]:.3f} -> {losses[-1]:.3f} ({len(losses)} micro-batches, "
          f"loss handed to the optimizer at {out['callback'].handed} steps)")
