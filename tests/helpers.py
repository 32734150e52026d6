"""Small tasks and settings shared by several test files."""
import math
import warnings

import torch

# the device-parametrised tests run on a GPU too where there is one
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


class Square:
    """``f(x) = x^2`` for each of ``n`` independent scalars (one problem per coordinate)."""

    def __init__(self, n: int, nan: bool = False):
        self.num_problems = n
        self.nan = nan

    def init(self, g):
        return [torch.randn(self.num_problems, generator=g)]

    def sample_batch(self, g=None, split="train"):
        return None

    def losses(self, params, batch=None):
        out = params[0] ** 2
        return out * math.nan if self.nan else out

    def loss(self, params, batch=None):
        return self.losses(params).sum()


class SquareFamily:
    """Samples :class:`Square` tasks; the calls listed in ``nan_calls`` (0-based) yield NaN tasks."""

    def __init__(self, n: int = 64, nan_calls=()):
        self.n, self.nan_calls, self.calls = n, set(nan_calls), 0

    def __call__(self, g):
        task = Square(self.n, nan=self.calls in self.nan_calls)
        self.calls += 1
        return task


def randomize_(net, scale=1.0, seed=0):
    """Perturb every meta-weight (including the zero-initialised output and head layers) so every path matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return net


def quiet(fn, *args, **kwargs):
    """Run ``fn`` with warnings silenced (edge-of-grid and skipped-step warnings are expected in meta-training)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)
