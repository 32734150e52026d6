"""learned_opt: learned optimizers in PyTorch.

Meta-networks (coordinatewise LSTM, per-parameter MLP) that output parameter updates, a learning-rate decision
and an early-stop decision; hand-coded baselines that match ``torch.optim``; one inner loop; meta-training by
truncated backpropagation through time with ``higher`` running any ``nn.Module`` learner functionally.
"""
__version__ = "0.1.0"
