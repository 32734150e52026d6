"""learned_opt: learned optimizers in PyTorch.

Meta-networks (coordinatewise LSTM, per-parameter MLP) that output parameter updates, a learning-rate decision
and an early-stop decision; hand-coded baselines that match ``torch.optim``; one inner loop; meta-training by
truncated backpropagation through time with ``higher`` running any ``nn.Module`` learner functionally.

``learned_opt.LearnedOptimizer(model.parameters(), total_steps=1000)`` is a shipped learned optimizer as a
``torch.optim`` optimizer; ``learned_opt.list_pretrained()`` names the shipped ones (:mod:`learned_opt.pretrained`).
"""
from typing import Any, List

__version__ = "0.1.0"
__all__ = ["LearnedOptimizer", "list_pretrained"]

# Imported on first use: `import learned_opt` stays light (no torch), and no submodule import cycle can form.
_LAZY = {"LearnedOptimizer": "learned_opt.dropin", "list_pretrained": "learned_opt.pretrained"}


def __getattr__(name: str) -> Any:
    """The lazily imported public names (PEP 562)."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'learned_opt' has no attribute {name!r}")


def __dir__() -> List[str]:
    """Module attributes, the lazy ones included."""
    return sorted(set(globals()) | set(_LAZY))
