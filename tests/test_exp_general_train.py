"""The general optimizer's meta-training script at smoke size: every seed trains and saves, the seed to ship is
chosen on validation tasks of the meta-training families (never a held-out family), and shipping registers it
in a catalogue that loads."""
from __future__ import annotations

import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "experiments"))


def test_smoke_trains_every_seed_chooses_on_validation_and_ships(tmp_path, monkeypatch):
    import general_train
    from learned_opt import evaluate as ev
    from learned_opt import pretrained
    from learned_opt.tasks.suite import heldout_families

    calls = []
    real = ev.evaluate

    def spy(family, *a, **kw):
        calls.append((kw.get("split"), kw.get("stream"), getattr(family, "names", None)))
        return real(family, *a, **kw)

    monkeypatch.setattr(general_train, "evaluate", spy)
    monkeypatch.setattr("learned_opt.meta.trainer.evaluate", spy)
    out, ship = tmp_path / "train", tmp_path / "catalogue"
    summary = general_train.main(["--preset", "smoke", "--workers", "1", "--out_dir", str(out), "--ship", "true",
                                  "--ship_dir", str(ship)])
    assert [r["seed"] for r in summary["seeds"]] == [0, 1]
    assert all((out / f"seed{s}" / "lopt.pt").exists() for s in (0, 1))
    assert summary["chosen_seed"] == min(summary["seeds"], key=lambda r: r["ship_score_mean_log_ratio"])["seed"]
    assert json.loads((out / "summary.json").read_text())["estimator"] == "tbptt"
    # every evaluation touched validation tasks of the meta-training mixture only
    assert calls and all(split == "val" and stream in ("select", "ship") for split, stream, _ in calls)
    assert all(not set(names or ()) & set(heldout_families()) for _, _, names in calls)
    assert pretrained.list_pretrained(ship) == ["general"]
    net = pretrained.load_file(os.path.join(ship, "general.pt"))
    assert type(net).__name__ == "NormMLP"


def test_bad_flag_is_refused(capsys):
    import general_train

    with pytest.raises(SystemExit):
        general_train.main(["--seeds", "x"])
    assert "--seeds" in capsys.readouterr().err


def test_a_finished_seed_is_reused_and_a_changed_one_trains_again(tmp_path, monkeypatch):
    """done.json: a second run with the same settings does not meta-train again (checkpoints are not in git, the
    weights are); other settings, or weights that changed since, train again."""
    import general_train
    from learned_opt.meta import MetaTrainer

    out = tmp_path / "train"
    args = ["--preset", "smoke", "--workers", "1", "--out_dir", str(out)]
    first = general_train.main(args)
    assert all((out / f"seed{s}" / "done.json").exists() for s in (0, 1))
    trained = []
    real_run = MetaTrainer.run
    monkeypatch.setattr(MetaTrainer, "run", lambda self: trained.append(self.cfg.seed) or real_run(self))
    for s in (0, 1):  # without its checkpoint, as in a fresh clone
        os.remove(out / f"seed{s}" / "checkpoint.pt")
    again = general_train.main(args)
    assert trained == [] and all(r["reused"] for r in again["seeds"])
    assert [r["train_seconds"] for r in again["seeds"]] == [r["train_seconds"] for r in first["seeds"]]
    assert [r["ship_score_mean_log_ratio"] for r in again["seeds"]] == \
        [r["ship_score_mean_log_ratio"] for r in first["seeds"]]
    with open(out / "seed1" / "lopt.pt", "ab") as f:  # weights changed since: seed 1 trains again
        f.write(b"\0")
    general_train.main(args)
    assert trained == [1]
    os.remove(out / "seed1" / "checkpoint.pt")  # (a checkpoint of other settings is refused on its own)
    general_train.main(args + ["--meta_lr", "0.01"])  # other settings: every seed trains again
    assert trained == [1, 0, 1]


def test_budgets_save_intermediate_weights_and_leave_the_final_ones_unchanged(tmp_path, monkeypatch):
    """--budgets 1 (of 2 iterations): each seed saves lopt_it1.pt and its meta-training seconds there, and the
    final weights are bitwise those of the run without budgets, with as many meta-steps (the second stage resumes
    the first one's training state; it neither starts over nor continues from the best weights)."""
    import general_train
    import torch
    from learned_opt.meta import MetaTrainer

    def weights(path):
        return torch.load(path, weights_only=False)

    steps = []
    real_step = MetaTrainer.meta_step_on
    monkeypatch.setattr(MetaTrainer, "meta_step_on", lambda self, *a: steps.append(1) or real_step(self, *a))
    staged, straight = tmp_path / "staged", tmp_path / "straight"
    general_train.main(["--preset", "smoke", "--workers", "1", "--seeds", "1", "--out_dir", str(staged),
                        "--budgets", "1"])
    n_staged = len(steps)
    general_train.main(["--preset", "smoke", "--workers", "1", "--seeds", "1", "--out_dir", str(straight)])
    assert n_staged == len(steps) - n_staged > 0
    budgets = json.loads((staged / "seed0" / "budgets.json").read_text())
    assert list(budgets) == ["1"] and budgets["1"]["train_seconds"] > 0 and budgets["1"]["train_cpu_seconds"] > 0
    assert (staged / "seed0" / "lopt_it1.pt").exists() and not (straight / "seed0" / "lopt_it1.pt").exists()
    a, b = weights(staged / "seed0" / "lopt.pt"), weights(straight / "seed0" / "lopt.pt")
    sa, sb = a["state_dict"], b["state_dict"]
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("budgets", ["2", "1.5", "0", "x"])
def test_bad_budgets_are_refused(budgets, capsys, tmp_path):
    import general_train

    with pytest.raises(SystemExit) as e:
        general_train.main(["--preset", "smoke", "--budgets", budgets, "--out_dir", str(tmp_path)])
    assert "--budgets" in str(e.value.code) + capsys.readouterr().err
    assert not os.listdir(tmp_path)


def test_shipping_over_the_packaged_general_goes_through_the_promotion_rule(tmp_path):
    """--ship into the package's catalogue, where `general` is already shipped, is refused before any training:
    new weights replace it only through experiments/general_promote.py."""
    import general_train

    out = tmp_path / "train"
    with pytest.raises(SystemExit) as e:
        general_train.main(["--preset", "smoke", "--ship", "true", "--out_dir", str(out)])
    assert "general_promote.py" in str(e.value.code) and not out.exists()


def test_whole_run_selection_scores_the_ship_stream_too(tmp_path, monkeypatch):
    """--val_metric mean_log_train_val: the selection stream and the ship stream are scored by it (validation
    tasks of the meta-training families only), and the seed with the lowest score is chosen."""
    import general_train
    import learned_opt.meta.trainer as meta

    streams = []
    real = meta.evaluate

    def spy(*a, **k):
        streams.append((k["split"], k["stream"], tuple(k.get("checkpoints", ()))))
        return real(*a, **k)

    monkeypatch.setattr(meta, "evaluate", spy)
    s = general_train.main(["--preset", "smoke", "--workers", "1", "--out_dir", str(tmp_path),
                            "--val_metric", "mean_log_train_val"])
    assert {x[:2] for x in streams} == {("val", "select"), ("val", "ship")}
    assert all(c == meta.train_val_marks(8) for *_, c in streams)  # smoke: val and ship horizons 8
    assert s["chosen_seed"] == min(s["seeds"], key=lambda r: r["ship_score_mean_log_ratio"])["seed"]
    assert s["families"] == list(general_train.V1_FAMILIES)


def test_a_held_out_family_cannot_join_meta_training(tmp_path):
    import general_train

    with pytest.raises(SystemExit) as e:
        general_train.main(["--preset", "smoke", "--families", "quadratic,digits_cnn", "--out_dir", str(tmp_path)])
    assert "--families" in str(e.value.code) and "held-out" in str(e.value.code)


def test_v2b_preset_is_pilot_a_recipe_and_its_checkpoints_are_committed():
    """--preset v2b is the recipe pilot A measured on validation streams (results/general/train_v2/pilots.md):
    the v2 preset with lr_gain 1, meta-lr 1e-3, base rate 3e-3 and the initial weights scored, run longer, with
    three compute-scaling points; its checkpoints pass .gitignore so that a seed resumes in the next session."""
    import subprocess
    from dataclasses import asdict

    import general_train
    from common import parse_config

    v2b = parse_config(general_train.Config, general_train.PRESETS, ["--preset", "v2b"])
    pilot = parse_config(general_train.Config, general_train.PRESETS,
                         ["--preset", "v2", "--lr_gain", "1", "--meta_lr", "1e-3", "--init_lr", "3e-3",
                          "--val_at_start", "true", "--iterations", "250", "--budgets", "25,100",
                          "--out_dir", "results/general/train_v2b"])
    assert asdict(v2b) == asdict(pilot)
    assert len(v2b.budgets) + 1 >= 3 and v2b.seeds >= 5
    root = os.path.join(os.path.dirname(__file__), "..")
    ignored = subprocess.run(["git", "check-ignore", "-q", "results/general/train_v2b/seed0/checkpoint.pt"],
                             cwd=root).returncode
    assert ignored == 1  # 1: not ignored


def test_compute_scaling_counts_cpu_seconds_where_recorded():
    """compute_scaling's CPU-hours are the meta-steps' CPU seconds (what a loaded machine does not inflate); runs
    recorded before that fall back to their wall seconds."""
    from general_scaling import spent_seconds

    assert spent_seconds({"train_seconds": 100.0, "train_cpu_seconds": 40.0}) == 40.0
    assert spent_seconds({"train_seconds": 100.0, "train_cpu_seconds": float("nan")}) == 100.0
    assert spent_seconds({"train_seconds": 100.0}) == 100.0
