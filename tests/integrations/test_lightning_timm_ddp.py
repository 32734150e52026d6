"""The learned optimizer in PyTorch Lightning (examples/lightning_module.py), on a timm ViT (examples/timm_vit.py)
and under DDP and FSDP2 with 2 CPU ranks (examples/ddp.py, examples/fsdp2.py), with the real packages."""
import importlib
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, load_example, require

pytestmark = pytest.mark.integrations


@pytest.fixture
def lightning_example():
    require("lightning")
    return load_example("lightning_module")


def test_lightning_closure_hands_the_loss_to_every_step(recorded, lightning_example):
    """Automatic optimization without our callback: the closure's result (the batch's loss) reaches every step,
    with gradient clipping on; the MLP trains."""
    out = lightning_example.run(epochs=2, accumulate=1, callback=False)
    (opt, seen), = recorded
    losses = out["module"].losses
    assert len(seen) == len(losses) == 58 and seen == pytest.approx(losses, rel=1e-6)
    assert losses[-1] < 0.7 * losses[0]


def test_lightning_gradient_accumulation_hands_the_mean_of_the_micro_batches(recorded, lightning_example):
    """accumulate_grad_batches=2 with clipping: with LightningLossToOptimizer every step gets the mean loss of its
    micro-batches; without it, Lightning's closure gives the last micro-batch's loss / 2."""
    for callback in (True, False):
        out = lightning_example.run(epochs=1, accumulate=2, callback=callback)
        opt, seen = recorded[-1]
        losses = out["module"].losses  # 29 micro-batches: 14 pairs and a last one alone
        pairs = [losses[i:i + 2] for i in range(0, len(losses), 2)]
        assert len(seen) == len(pairs) == 15
        if callback:
            assert out["callback"].handed == 15
            assert seen == pytest.approx([sum(p) / 2 for p in pairs], rel=1e-5)
        else:
            assert seen == pytest.approx([p[-1] / 2 for p in pairs], rel=1e-5)


def test_lightning_resume_at_an_epoch_boundary_is_bitwise_the_uninterrupted_run(lightning_example):
    """Two epochs, a checkpoint, a new Trainer and module resumed from it for two more: the parameters are bitwise
    those of four uninterrupted epochs (accumulation, clipping and the loss callback on)."""
    straight = lightning_example.run(epochs=4, accumulate=2)["params"]
    resumed = lightning_example.run(epochs=4, accumulate=2, resume_at=2)["params"]
    assert all(torch.equal(a, b) for a, b in zip(straight, resumed))


def timm_env():
    """The environment in which timm imports, or None: the installed torchvision, else the ops-free copy of the
    registry's (CUDA) torchvision that `make test-integrations` puts in ``.venv/torchvision-python`` (see
    tests/integrations/timm_runner.py)."""
    try:
        importlib.import_module("timm")
        return dict(os.environ)
    except Exception:  # noqa: BLE001 - a torchvision that cannot load raises a RuntimeError
        pass
    copy = os.path.join(ROOT, ".venv", "torchvision-python")
    if not os.path.isdir(os.path.join(copy, "torchvision")):
        return None
    path = os.pathsep.join([copy, *filter(None, [os.environ.get("PYTHONPATH")])])
    return dict(os.environ, PYTHONPATH=path, LEARNED_OPT_TORCHVISION_WITHOUT_OPS="1")


def test_timm_vit_trains():
    """A tiny timm VisionTransformer (8x8 digits, 2x2 patches, width 32, depth 2) trained 150 steps in its own
    process (examples/timm_vit.py through tests/integrations/timm_runner.py): every step's loss reached the learned
    scheduler, and the mean of its last 5 losses is below 0.7x the first."""
    require("sklearn")
    env = timm_env()
    if env is None:
        require("timm")  # skips with the exact import error
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "integrations", "timm_runner.py"), "150"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    losses = out["losses"]
    assert len(losses) == 150 and out["seen"] == pytest.approx(losses, rel=1e-6)  # every loss reached the step
    assert sum(losses[-5:]) / 5 < 0.7 * losses[0], losses


def test_ddp_two_cpu_ranks_stay_bitwise_identical_and_train():
    """DDP, 2 gloo ranks, each on its own shard, the LearnedOptimizer stepped through step_with_loss (the loss
    averaged over the ranks): after 40 steps the parameters are bitwise identical on both ranks, and rank 0's loss
    fell below 0.3x its start."""
    ranks = load_example("ddp").run(steps=40)
    assert all(torch.equal(a, b) for a, b in zip(ranks[0]["params"], ranks[1]["params"]))
    assert ranks[0]["losses"][-1] < 0.3 * ranks[0]["losses"][0]


def test_fsdp2_two_cpu_ranks_shard_the_parameters_and_equal_ddp():
    """FSDP2 (fully_shard), 2 gloo ranks: each rank holds half of the parameters, the gathered parameters are
    bitwise identical across ranks, the model trains, and the run equals the DDP run of the same data split and init
    (gradient reduce-scatter and all-reduce happen to sum in the same order here: checked to 1e-6)."""
    ranks = load_example("fsdp2").run(steps=40)
    total = sum(p.numel() for p in ranks[0]["params"])
    assert ranks[0]["local_numel"] == ranks[1]["local_numel"] == total // 2
    assert all(torch.equal(a, b) for a, b in zip(ranks[0]["params"], ranks[1]["params"]))
    assert ranks[0]["losses"][-1] < 0.3 * ranks[0]["losses"][0]
    ddp = load_example("ddp").run(steps=40)
    for a, b in zip(ranks[0]["params"], ddp[0]["params"]):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-7)
