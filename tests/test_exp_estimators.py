"""Smoke run of experiments/estimators.py (influence balancing): keys and files."""
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "experiments"))


def test_estimators_smoke_writes_summary_table_and_figure(tmp_path):
    import estimators
    out = tmp_path / "est"
    s = estimators.main(["--preset", "smoke", "--out_dir", str(out)])
    for f in ("summary.json", "table.md", "influence_balancing.png"):
        assert (out / f).exists()
    saved = json.loads((out / "summary.json").read_text())
    for key in ("influence_balancing_pes_rel_error", "influence_balancing_tbptt_rel_error", "targets", "provenance",
                "not_implemented"):
        assert key in saved
    assert set(s["runs"]) == {"tbptt K=1", "tbptt K=5", "pes K=1"}
    assert len(s["runs"]["pes K=1"]["final_theta"]) == 2  # one per PES seed
    # the relative error is measured against the known optimum
    th = s["runs"]["tbptt K=1"]["final_theta"][0]
    assert abs(s["influence_balancing_tbptt_rel_error"] - abs(th + 1 / 6) * 6) < 1e-9


def test_a_rerun_takes_the_horizon_part_from_the_horizon_summary_only(tmp_path):
    import estimators
    out = tmp_path / "est"
    horizon = tmp_path / "horizon_summary.json"
    argv = ["--preset", "smoke", "--out_dir", str(out), "--horizon_summary", str(horizon)]
    estimators.main(argv)
    path = out / "summary.json"
    saved = json.loads(path.read_text())
    assert any("horizon" in n for n in saved["not_implemented"])
    # keys left in the previous summary are not carried over (they were the old horizon numbers of issue 23)
    saved["pes_over_tbptt_loss_at_10x"] = 0.9
    saved["horizon_generalisation"] = "somewhere/summary.json"
    path.write_text(json.dumps(saved))
    estimators.main(argv)
    again = json.loads(path.read_text())
    assert "pes_over_tbptt_loss_at_10x" not in again and "horizon_generalisation" not in again
    # the horizon script's own final summary is where they come from
    targets = {"pes_over_tbptt_loss_at_10x": {"value": 0.8}, "pes_divergences_at_25x": {"value": 0}}
    horizon.write_text(json.dumps({"config": {"final": True}, "targets": targets,
                                   "pes_over_tbptt_loss_at_10x": 0.8, "pes_divergences_at_25x": 0}))
    estimators.main(argv)
    again = json.loads(path.read_text())
    assert again["pes_over_tbptt_loss_at_10x"] == 0.8 and again["targets"]["pes_divergences_at_25x"] == {"value": 0}
    assert not any("horizon" in n for n in again["not_implemented"])
