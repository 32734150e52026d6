"""experiments/general_promote.py: new general weights ship only when their recipe beats the shipped one's on
validation tasks, by the rule fixed in its config; a refusal writes nothing to the catalogue."""
import copy
import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "experiments"))
KEYS = ("train_vs_tuned_adam_1x", "train_vs_tuned_adam_10x", "test_vs_tuned_adam",
        "train_vs_best_single_adam_lr_1x")
BOUNDS = (1.0, 1.2, 1.1, 0.7)


def summary(ratios, *, split="val/dev", seeds=(0, 1), divergences=0, shipped=None, families=("wine_mlp",)):
    """A general.py summary with the fields the promotion reads (ratios in the order of KEYS)."""
    s = {"config": {"smoke": True, "tune_tasks": 2, "test_tasks": 2, "long_factor": 10, "long_axes": "lr",
                    "baselines": ["adam"], "loss_floor": 1e-6, "test_draw": 4},
         "seeds": list(seeds), "families_evaluated": list(families), "horizons": {"1x": 5, "10x": 50, "30x": 150},
         "protocol": {"test_split": split}, "divergences": {"count": divergences, "runs": 20},
         "late_spikes": {"count": 0, "runs": 20, "fraction": 0.0, "met": True},
         "shipped_seed": {"seed": shipped}, "targets_met": {}}
    for k, r, b in zip(KEYS, ratios, BOUNDS):
        s[k] = {"ratio": r, "ci_low": r / 2, "ci_high": r * 2, "bound": b}
        s["targets_met"][k] = r * 2 <= b
    return s


def test_the_rule_promotes_only_a_better_recipe_without_a_large_regression():
    import general_promote as gp

    cfg = gp.Config()
    inc = summary((1.0, 2.0, 1.5, 0.5), shipped=1)
    assert gp.decide(cfg, summary((0.8, 1.5, 1.4, 9.0)), inc)["promote"]  # 4th key not in the rule
    worse = gp.decide(cfg, summary((0.5, 1.0, 1.7, 0.5)), inc)  # better mean, test loss 1.13x the incumbent's
    assert not worse["promote"] and "test_vs_tuned_adam" in worse["failures"][0]
    same = gp.decide(cfg, summary((1.0, 2.0, 1.5, 0.5)), inc)  # not strictly better
    assert not same["promote"] and "not below" in same["failures"][0]
    div = gp.decide(cfg, summary((0.8, 1.5, 1.4, 0.5), divergences=1), inc)
    assert not div["promote"] and "divergences" in div["failures"][0]


@pytest.mark.parametrize("change, message", [
    (dict(split="test (draw 4)"), "validation tasks only"),
    (dict(families=("wine_mlp", "digits_cnn")), "families_evaluated"),
])
def test_incomparable_or_test_split_evaluations_are_refused(change, message):
    import general_promote as gp

    with pytest.raises(ValueError, match=message):
        gp.check_comparable(summary((0.5,) * 4, **change), summary((1.0,) * 4, shipped=0))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    import general_train

    out = tmp_path_factory.mktemp("train")
    general_train.main(["--preset", "smoke", "--workers", "1", "--out_dir", str(out)])
    return out


def _write(folder, s):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "summary.json"), "w") as f:
        json.dump(s, f)


def test_promotion_registers_the_chosen_seed_with_its_card_and_a_refusal_writes_nothing(trained, tmp_path):
    import general_promote as gp
    from learned_opt import pretrained

    chosen = json.loads((trained / "summary.json").read_text())["chosen_seed"]
    cand, inc, ship = tmp_path / "cand", tmp_path / "inc", tmp_path / "catalogue"
    _write(inc, summary((1.0, 2.0, 1.5, 0.5), shipped=1))
    _write(cand, summary((2.0, 2.0, 1.5, 0.5)))
    args = ["--candidate_train", str(trained), "--candidate_eval", str(cand), "--incumbent_eval", str(inc),
            "--ship_dir", str(ship)]
    with pytest.raises(SystemExit) as e:
        gp.main(args)
    assert e.value.code == 1 and not ship.exists()
    assert json.loads((cand / "promotion.json").read_text())["verdict"]["promote"] is False
    _write(cand, summary((0.8, 1.5, 1.4, 0.3)))
    record = gp.main(args)
    assert record["seed"] == chosen and pretrained.list_pretrained(ship) == ["general"]
    entry = json.loads((ship / "manifest.json").read_text())["optimizers"]["general"]
    assert "train_vs_tuned_adam_1x 0.8 [0.4, 1.6]" in entry["description"]
    # every unmet target of the candidate is a known failure: 1x (ci_high 1.6 > 1.0), 10x, test; not the 4th
    assert [f.split(":")[0] for f in entry["known_failures"]] == list(KEYS[:3])
    assert type(pretrained.load_file(ship / "general.pt")).__name__ == "NormMLP"


def test_an_incumbent_without_the_shipped_weights_is_refused(trained, tmp_path):
    import general_promote as gp

    _write(tmp_path / "inc", summary((1.0,) * 4, shipped=None))
    _write(tmp_path / "cand", summary((0.5,) * 4))
    with pytest.raises(SystemExit) as e:
        gp.main(["--candidate_train", str(trained), "--candidate_eval", str(tmp_path / "cand"), "--incumbent_eval",
                 str(tmp_path / "inc"), "--ship_dir", str(tmp_path / "catalogue")])
    assert "--incumbent_eval" in str(e.value.code) and not (tmp_path / "catalogue").exists()
