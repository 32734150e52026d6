"""Shared helpers of the framework tests: load an examples/ script as a module, skip when a framework does not
import (with the exact error), and record the loss each optimizer step hands the learned scheduler."""
import importlib
import os
import sys

import pytest

import learned_opt

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def require(*modules):
    """Import ``modules`` or skip the test with the exact error (a framework missing, or one that cannot load)."""
    for name in modules:
        try:
            importlib.import_module(name)
        except Exception as e:  # noqa: BLE001 - e.g. timm's torchvision failing with a RuntimeError
            pytest.skip(f"{name} does not import here: {type(e).__name__}: {e}")


def load_example(name):
    """``examples/<name>.py`` as a module (the tests run the examples themselves, so that they cannot rot).

    Imported by name with examples/ on ``sys.path``, so that processes spawned from it (examples/ddp.py) import
    it too."""
    folder = os.path.join(ROOT, "examples")
    if folder not in sys.path:
        sys.path.insert(0, folder)
    return importlib.import_module(name)


def record_losses(opt):
    """Record, in the returned list, the loss each ``step()`` of ``opt`` hands its first group's controller
    (``None`` when it gets none)."""
    seen = []
    inner = opt._step_group

    def step_group(gi, group, idx, loss, val_loss):
        if gi == 0:
            seen.append(None if loss is None else float(loss))
        return inner(gi, group, idx, loss, val_loss)

    opt._step_group = step_group
    return seen


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch):
    """One intra-op thread: the tests share 2 cores with other work."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def recorded(monkeypatch):
    """Every LearnedOptimizer built during the test, with the list of losses its steps received."""
    from learned_opt.dropin import LearnedOptimizer as real

    made = []

    def build(*args, **kwargs):
        opt = real(*args, **kwargs)
        made.append((opt, record_losses(opt)))
        return opt

    monkeypatch.setattr(learned_opt, "LearnedOptimizer", build, raising=False)
    yield made
