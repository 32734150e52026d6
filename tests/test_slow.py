"""Slow reproductions (``make test-slow``): not part of ``make test``."""
import json

import pytest

from tests.test_experiments import run_script


@pytest.mark.slow
def test_quadratic_demo_learned_optimizer_beats_every_tuned_baseline_but_momentum(tmp_path):
    """The demo budget (300 meta-iterations) already beats tuned SGD, Adam and RMSprop on the mean at step 100."""
    out = tmp_path / "demo"
    proc = run_script("quadratic.py", "--preset", "demo", "--out_dir", str(out), timeout=1200)
    assert proc.returncode == 0, proc.stderr[-2000:]
    s = json.loads((out / "summary.json").read_text())
    learned = s["optimizers"]["learned"]["100"]["mean"]
    for name in ("sgd", "adam", "rmsprop"):
        assert learned < s["optimizers"][name]["100"]["mean"], name
    assert s["meta_train_seconds"] < 300
