"""The learned optimizer in the HF transformers Trainer (examples/hf_trainer.py) and in an accelerate loop
(examples/accelerate_loop.py), with the real packages: the training loss reaches the learned scheduler at every
optimizer step (gradient accumulation: the mean of the step's micro-batches), the model trains, and without the
hand-over the optimizer warns."""
import warnings

import pytest

from conftest import load_example, require

pytestmark = pytest.mark.integrations


@pytest.fixture
def fresh_accelerate():
    """accelerate keeps process-wide singletons: each test starts (and leaves) them reset."""
    require("accelerate")
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


@pytest.mark.parametrize("grad_accum,steps", [(1, 40), (2, 12)])
def test_hf_trainer_hands_the_optimizer_each_steps_loss(recorded, fresh_accelerate, grad_accum, steps):
    """With feed_loss(trainer): one loss per optimizer step, equal to the loss the Trainer logs for that step (the
    mean over the accumulated micro-batches); the tiny GPT-2 trains (last loss < 0.7x the first)."""
    require("transformers")
    out = load_example("hf_trainer").run(steps=steps, grad_accum=grad_accum)
    (opt, seen), = recorded
    logged = out["losses"]
    assert len(logged) == steps and out["callback"].handed == steps
    assert seen == pytest.approx(logged, rel=1e-5)
    if grad_accum == 1:
        assert logged[-1] < 0.7 * logged[0], logged


def test_hf_trainer_without_the_callback_runs_blind_and_warns(recorded, fresh_accelerate):
    """Without feed_loss the Trainer's optimizer.step() brings no loss: every step gets none, and the optimizer
    warns once, naming the helper."""
    require("transformers")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_example("hf_trainer").run(steps=5, feed=False)
    (opt, seen), = recorded
    assert seen == [None] * 5
    ours = [str(w.message) for w in caught if "got no loss" in str(w.message)]
    assert len(ours) == 1 and "feed_loss(trainer)" in ours[0]


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_accelerate_loop_hands_the_optimizer_each_steps_loss(recorded, fresh_accelerate, grad_accum):
    """Through Accelerator().prepare (an AcceleratedOptimizer around the learned one), step_with_loss hands every
    updating step its loss (under accumulate(): the mean of its micro-batches); the MLP trains."""
    out = load_example("accelerate_loop").run(epochs=2, grad_accum=grad_accum)
    (opt, seen), = recorded
    assert type(out["optimizer"]).__name__ == "AcceleratedOptimizer" and out["optimizer"].optimizer is opt
    assert len(seen) == len(out["losses"]) == -(-29 // grad_accum) * 2
    assert seen == pytest.approx(out["losses"], rel=1e-5)
    if grad_accum == 1:
        assert out["losses"][-1] < 0.7 * out["losses"][0]
