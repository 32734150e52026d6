"""A learned optimizer in a plain accelerate loop: an MLP on scikit-learn's bundled 8x8 digits.

    python examples/accelerate_loop.py     # a few seconds on 2 CPU cores

``accelerator.prepare`` wraps the optimizer (``AcceleratedOptimizer``), whose ``step()`` takes no loss;
``step_with_loss(optimizer, loss)`` hands the loss to the learned optimizer inside, then steps. Under
``accelerator.accumulate(model)`` the step that updates gets the mean loss of its micro-batches.
"""
import torch
from accelerate import Accelerator
from sklearn.datasets import load_digits
from torch import nn

import learned_opt
from learned_opt.integrations import step_with_loss


def digits(seed=0, batch_size=64):
    """scikit-learn's bundled digits (1797 images, 64 pixels in [0, 1]) as a shuffling DataLoader."""
    x, y = load_digits(return_X_y=True)
    data = torch.utils.data.TensorDataset(torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y))
    return torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=True,
                                       generator=torch.Generator().manual_seed(seed))


def run(epochs=3, grad_accum=1, seed=0):
    """Train; returns the per-step losses (mean of each step's micro-batches), the optimizer and the model."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    loader = digits(seed)
    opt = learned_opt.LearnedOptimizer(model.parameters(), total_steps=epochs * len(loader) // grad_accum)
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=grad_accum)
    model, opt, loader = accelerator.prepare(model, opt, loader)
    losses, micro = [], []
    for _ in range(epochs):
        for x, y in loader:
            with accelerator.accumulate(model):
                loss = nn.functional.cross_entropy(model(x), y)
                accelerator.backward(loss)
                step_with_loss(opt, loss)     # instead of opt.step()
                opt.zero_grad()
            micro.append(loss.item())
            if accelerator.sync_gradients:
                losses.append(sum(micro) / len(micro))
                micro = []
    return {"losses": losses, "optimizer": opt, "model": model}


if __name__ == "__main__":
    out = run()
    print(f"accelerate, MLP on digits: loss {out['losses'][0]:.3f} -> {out['losses'][-1]:.3f} "
          f"({len(out['losses'])} steps)")
