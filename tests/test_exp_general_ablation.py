"""experiments/general_ablation.py: every variant's flags make a valid general_train.py config that differs from v1 in
exactly its ingredients, evaluations run on validation tasks only, and a bad variant is refused."""
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "experiments"))
import general_ablation as ga  # noqa: E402
import general_train as gt  # noqa: E402
from common import parse_config  # noqa: E402


def test_variants_switch_on_their_ingredients_only():
    v1 = parse_config(gt.Config, gt.PRESETS, ga.VARIANTS["v1"])
    changed = {}
    for name, flags in ga.VARIANTS.items():
        c = parse_config(gt.Config, gt.PRESETS, flags)
        changed[name] = {k for k in vars(v1) if getattr(c, k) != getattr(v1, k) and k != "out_dir"}
    assert changed["v1"] == set()
    assert changed["none"] == {"normalize", "lr_bound", "init_lr"}
    assert changed["pes"] == {"estimator", "sample_horizons", "truncation"}
    assert changed["val"] == {"meta_loss"}
    assert changed["families"] == {"families"} and set(gt.V1_FAMILIES) < set(
        parse_config(gt.Config, gt.PRESETS, ga.VARIANTS["families"]).families)
    assert changed["select"] == {"val_metric", "val_horizon", "ship_horizon"}
    assert changed["v2"] >= (changed["none"] | changed["pes"] | changed["val"] | changed["families"]
                             | changed["select"])


def test_evaluations_read_validation_tasks_only_and_bad_variants_are_refused(monkeypatch):
    calls = []
    monkeypatch.setattr(ga, "run", lambda script, flags: calls.append((script, flags)) or (_ for _ in ()).throw(
        SystemExit("stop")) if script == "general.py" else calls.append((script, flags)))
    with pytest.raises(SystemExit, match="stop"):
        ga.main(["--variants", "val"])
    (train, tflags), (ev, eflags) = calls
    assert train == "general_train.py" and ev == "general.py"
    assert eflags[eflags.index("--final") + 1] == "false" and "--cache_dir" in eflags
    with pytest.raises(SystemExit, match="--variants"):
        ga.main(["--variants", "v3"])


def test_the_v2_variant_trains_in_the_main_v2_folder_and_bad_folders_are_refused(monkeypatch):
    calls = []

    def fake(script, flags):
        calls.append((script, flags))
        if script == "general.py":
            raise SystemExit("stop")
    monkeypatch.setattr(ga, "run", fake)
    with pytest.raises(SystemExit, match="stop"):
        ga.main(["--variants", "v2"])
    (_, tflags), (_, eflags) = calls
    assert tflags[tflags.index("--out_dir") + 1] == eflags[eflags.index("--train_dir") + 1] \
        == "results/general/train_v2"
    with pytest.raises(SystemExit, match="--train_dirs"):
        ga.main(["--variants", "v2", "--train_dirs", "v3=somewhere"])
