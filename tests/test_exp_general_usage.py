"""experiments/general_usage.py: the LR-multiplier record reads the scheduler's own outputs on validation tasks only,
and the total_steps effect compares the same task and minibatches told two horizons."""
import os
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "experiments"))
from test_exp_general import train_dir  # noqa: E402,F401  (the 2-seed general_train smoke fixture)


def test_usage_record_matches_the_scheduler_outputs(train_dir, tmp_path, monkeypatch):  # noqa: F811
    import general_usage as gu
    import learned_opt.evaluate.splits as splits

    drawn = []
    real = splits.task_seed

    def spy(split, *a, **k):
        drawn.append((split, k.get("stream")))
        return real(split, *a, **k)
    monkeypatch.setattr(gu, "task_seed", spy)
    rec = gu.main(["--preset", "smoke", "--train_dir", str(train_dir), "--out_dir", str(tmp_path)])
    assert set(drawn) == {("val", "usage")} and (tmp_path / "usage.json").exists()
    assert set(rec["seeds"]) == {"0", "1"}
    r = rec["seeds"]["0"]
    lo, hi = r["bounds"]
    # recomputed from one run: the quantiles are those of the multipliers the scheduler emitted
    from learned_opt.meta import load_lopt
    from learned_opt.tasks.suite import suite_family
    net = load_lopt(str(train_dir / "seed0" / "lopt.pt"))
    a, fa = gu.one_run(net, suite_family("wine_mlp"), 0, 6, 6)
    b, fb = gu.one_run(net, suite_family("wine_mlp"), 0, 6, 60)
    assert np.all((a >= lo) & (a <= hi))
    assert r["quantiles"]["0.5"] == pytest.approx(float(np.median(a)))
    assert r["families"]["wine_mlp"]["total_steps_mean_abs_log_shift"] == pytest.approx(
        float(np.mean(np.abs(np.log(a) - np.log(b)))))
    assert r["families"]["wine_mlp"]["total_steps_final_loss_ratio"] == pytest.approx(fa / fb)
    assert not np.array_equal(a, b)  # the scheduler reads the horizon it is told
    with pytest.raises(SystemExit, match="--families"):
        gu.main(["--preset", "smoke", "--train_dir", str(train_dir), "--families", "nope"])
    # --seeds: those seeds alone, the same record for each; a seed the folder lacks is refused by name
    one = gu.main(["--preset", "smoke", "--train_dir", str(train_dir), "--out_dir", str(tmp_path), "--seeds", "1"])
    assert set(one["seeds"]) == {"1"} and one["seeds"]["1"]["quantiles"] == rec["seeds"]["1"]["quantiles"]
    with pytest.raises(SystemExit, match="--seeds.*seed7"):
        gu.main(["--preset", "smoke", "--train_dir", str(train_dir), "--seeds", "7"])
