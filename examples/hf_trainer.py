"""A learned optimizer in the HF transformers Trainer: a random-init tiny GPT-2 on a repeated token pattern.

    python examples/hf_trainer.py          # about 20 s on 2 CPU cores

The Trainer calls ``optimizer.step()`` without the loss; ``feed_loss(trainer)`` hands each step's training loss
(the mean over its gradient-accumulation micro-batches, the ``loss`` the Trainer logs) to the learned scheduler.
``lr_scheduler_type="constant"``: the learned optimizer schedules its own step size (the Trainer's default
"linear" schedule would decay it to 0 on top).
"""
import tempfile

import torch
from transformers import GPT2Config, GPT2LMHeadModel, PrinterCallback, Trainer, TrainingArguments

import learned_opt
from learned_opt.integrations import feed_loss


class PatternText(torch.utils.data.Dataset):
    """Windows of ``length`` tokens from a fixed random pattern of ``period`` tokens repeated (no download)."""

    def __init__(self, n=256, length=32, period=12, vocab=64, seed=0):
        g = torch.Generator().manual_seed(seed)
        pattern = torch.randperm(vocab, generator=g)[:period]
        stream = pattern.repeat(length // period + 2)
        starts = torch.randint(0, period, (n,), generator=g)
        self.items = [stream[s:s + length].clone() for s in starts.tolist()]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return {"input_ids": self.items[i], "labels": self.items[i]}


def run(steps=40, grad_accum=1, feed=True, seed=0, out_dir=None):
    """Train for ``steps`` optimizer steps; returns the logged losses, the callback (or None) and the optimizer."""
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=64, n_positions=32))
    opt = learned_opt.LearnedOptimizer(model.parameters(), total_steps=steps)
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(output_dir=out_dir or tmp, max_steps=steps, per_device_train_batch_size=8,
                                 gradient_accumulation_steps=grad_accum, lr_scheduler_type="constant",
                                 logging_steps=1, save_strategy="no", report_to="none", use_cpu=True,
                                 disable_tqdm=True, seed=seed, dataloader_num_workers=0)
        trainer = Trainer(model=model, args=args, train_dataset=PatternText(seed=seed), optimizers=(opt, None))
        trainer.remove_callback(PrinterCallback)   # no per-step log lines
        callback = feed_loss(trainer) if feed else None   # the one line this integration needs
        trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"losses": losses, "callback": callback, "optimizer": opt}


if __name__ == "__main__":
    out = run()
    print(f"HF Trainer, tiny GPT-2: loss {out['losses'][0]:.3f} -> {out['losses'][-1]:.3f} "
          f"({len(out['losses'])} steps, loss handed to the optimizer at {out['callback'].handed})")
