"""A learned optimizer on a timm VisionTransformer: a tiny ViT (8x8 images, 2x2 patches) on scikit-learn's digits.

    python examples/timm_vit.py            # about 15 s on 2 CPU cores

A plain loop: ``opt.step(loss=loss)`` hands the loss to the learned scheduler. timm needs a torchvision that loads
beside your torch (a CPU torch needs a CPU torchvision build).
"""
import torch
from sklearn.datasets import load_digits
from timm.models.vision_transformer import VisionTransformer

import learned_opt


def run(steps=150, batch_size=128, seed=0):
    """Train ``steps`` steps on random batches of the digits; returns the per-step losses and the model."""
    torch.manual_seed(seed)
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32).reshape(-1, 1, 8, 8)
    y = torch.tensor(y)
    model = VisionTransformer(img_size=8, patch_size=2, in_chans=1, num_classes=10, embed_dim=32, depth=2,
                              num_heads=2, mlp_ratio=2.0)
    opt = learned_opt.LearnedOptimizer(model.parameters(), total_steps=steps)
    g = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        idx = torch.randint(0, len(x), (batch_size,), generator=g)
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
        loss.backward()
        opt.step(loss=loss)
        losses.append(loss.item())
    return {"losses": losses, "model": model}


if __name__ == "__main__":
    losses = run()["losses"]
    print(f"timm ViT on digits: loss {losses[0]:.3f} -> {losses[-1]:.3f} ({len(losses)} steps)")
