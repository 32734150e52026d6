"""experiments/control.py: the smoke run writes what it promises, and the protocol's guards hold.

One in-process smoke run (module fixture) records every task the run creates (a spy family: the task seed says its
split) and every evaluation the script makes (a spy on the script's ``evaluate``); each test checks one guard on
those records. A second smoke run goes through the command line, as ``make reproduce`` does.
"""
import dataclasses
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAIRED_KEYS = ("ratio", "ci_low", "ci_high", "ci", "wilcoxon_p", "wilcoxon_floor", "wilcoxon_claim", "win_rate")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """Run the smoke preset in-process with spies; returns (control module, config, summary, tasks, evaluations)."""
    out = tmp_path_factory.mktemp("control")
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(os.path.join(ROOT, "experiments"))
        mp.setenv("WANDB_MODE", "disabled")
        import control

        tasks, evals = [], []

        @dataclasses.dataclass(frozen=True)
        class SpyFamily(control.MetaNetFamily):
            def __call__(self, generator):
                tasks.append(generator.initial_seed())
                return super().__call__(generator)

        real_evaluate = control.evaluate

        def spy_evaluate(fam, optimizer, controller_fn=None, **kwargs):
            ctrl = controller_fn() if controller_fn is not None else None
            evals.append({"optimizer": type(optimizer).__name__, "controller": type(ctrl).__name__,
                          "learn_lr": getattr(ctrl, "learn_lr", None), "learn_stop": getattr(ctrl, "learn_stop", None),
                          "threshold": ctrl.heads.stop_threshold if hasattr(ctrl, "heads") else None,
                          "restore_best": getattr(ctrl, "restore_best", None), **kwargs})
            return real_evaluate(fam, optimizer, controller_fn, **kwargs)

        mp.setattr(control, "MetaNetFamily", SpyFamily)
        mp.setattr(control, "evaluate", spy_evaluate)
        argv = ["--preset", "smoke", "--out_dir", str(out)]
        summary = control.main(argv)
        cfg = control.parse_config(control.Config, control.PRESETS, argv)
    return control, cfg, summary, tasks, evals


def test_control_smoke_writes_summary_with_required_keys(tmp_path):
    out = tmp_path / "control"
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "control.py"), "--preset", "smoke",
                           "--out_dir", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = json.loads((out / "summary.json").read_text())
    for key in ("protocol", "paired", "stop", "lr", "ablation", "targets", "provenance"):
        assert key in s, key
    for key in ("meta_training_seeds", "validation_tasks", "ci", "tuning_metric", "test_split"):
        assert key in s["protocol"], key
    assert s["protocol"]["meta_training_seeds"] == 2 and s["protocol"]["test_split"].startswith("val/dev")
    assert s["protocol"]["ci"] == "hierarchical_bootstrap"
    assert s["paired"] and all(set(PAIRED_KEYS) <= set(p) for p in s["paired"].values())
    stop = s["stop"]
    for key in ("chosen_lambda", "chosen_threshold", "steps_saved", "loss_ratio", "val_loss_ratio", "target_met",
                "selection", "rules"):
        assert key in stop, key
    assert set(stop["steps_saved"]) >= {"value", "ci_low", "ci_high"}
    assert set(PAIRED_KEYS) <= set(stop["loss_ratio"])
    assert {"patience 2", "patience 10", "budget 3", "budget 8"} <= set(stop["rules"])
    assert set(s["lr"]) == {"sgd@8", "sgd@16", "adam@8", "adam@16"}
    for v in s["lr"].values():
        assert v["best_schedule"] in ("constant", "step", "exponential", "cosine")
        assert set(PAIRED_KEYS) <= set(v["paired"]) and set(v["schedules"]) == {"constant", "step", "exponential",
                                                                               "cosine"}
    assert len(s["ablation"]["cells"]) == 4 and len(s["ablation"]["paired"]) == 3
    assert all(set(PAIRED_KEYS) <= set(p["test_loss"]) for p in s["ablation"]["paired"].values())
    assert set(s["targets"]) == {"learned_stopping", "learned_lr"}
    assert isinstance(s["targets"]["learned_stopping"]["met"], bool)
    for name in ("pareto.png", "lr_schedules.png", "table.md"):
        assert (out / name).exists(), name


def test_control_smoke_sweeps_at_least_two_thresholds_and_two_lambdas(smoke):
    control, cfg, summary, _, evals = smoke
    sweep = [e for e in evals if e["optimizer"] == "Adam" and e["controller"] == "LearnedController"
             and e["learn_stop"] and e.get("stream") == control.SELECT_STREAM]
    assert len({e["threshold"] for e in sweep}) >= 2  # the guard issue 10 asks for
    assert len(sweep) == len(cfg.lambdas) * len(cfg.thresholds) * cfg.seeds
    table = summary["stop"]["selection"]
    assert len({v["lambda"] for v in table.values()}) >= 2 and len({v["threshold"] for v in table.values()}) >= 2


def test_control_choices_and_tuning_touch_validation_tasks_only(smoke):
    control, cfg, summary, tasks, evals = smoke
    from learned_opt.evaluate import split_of, task_seed

    # without --final no test task is ever created, by any part of the run (tuning, meta-training, selection,
    # evaluation, the figure)
    splits = {split_of(s) for s in tasks}
    assert "test" not in splits and splits == {"train", "val"}
    streams = {"tune": cfg.val_tasks, control.SELECT_STREAM: cfg.select_tasks, "dev": cfg.eval_tasks,
               control.PLOT_STREAM: 1}
    known = {(name, i): task_seed("val", i, cfg.seed, stream=name) for name, n in streams.items() for i in range(n)}
    seeds = [cfg.seed + k for k in range(cfg.seeds)]
    known.update({("select", s, i): task_seed("val", i, s, stream="select") for s in seeds
                  for i in range(cfg.meta_val_tasks)})
    by_seed = {v: k[0] for k, v in known.items()}
    used = [by_seed.get(s, "unknown") for s in tasks if split_of(s) == "val"]
    assert "unknown" not in used
    assert {"tune", control.SELECT_STREAM, "dev", "select"} <= set(used)  # tuning ran on its own stream
    # lambda and threshold: every setting but the chosen one is seen on the selection stream only; the evaluation
    # tasks see the chosen setting once per seed
    stop = [e for e in evals if e["optimizer"] == "Adam" and e["controller"] == "LearnedController"
            and e["learn_stop"] and not e["learn_lr"]]
    on_eval = [e for e in stop if (e["split"], e.get("stream")) == ("val", "dev")]
    assert len(on_eval) == cfg.seeds
    assert {e["threshold"] for e in on_eval} == {summary["stop"]["chosen_threshold"]}
    assert all((e["split"], e.get("stream")) == ("val", control.SELECT_STREAM) for e in stop if e not in on_eval)
    assert control.SELECT_STREAM not in ("dev", "select", "tune")
    # the choice is the a-priori rule applied to the selection table (validation tasks), nothing else
    assert control.choose_stop_setting(summary["stop"]["selection"], cfg.loss_bound) == summary["stop"]["chosen"]
    # every evaluation the script makes is on validation tasks
    assert {e["split"] for e in evals} == {"val"}


def test_learned_lr_controller_is_evaluated_with_the_inputs_of_meta_training(smoke):
    _, cfg, summary, _, evals = smoke
    lr = [e for e in evals if e["controller"] == "LearnedController" and e["learn_lr"]]
    assert len(lr) == 2 * cfg.seeds  # SGD and Adam, every seed
    # meta-trained on meta_loss 'val', which reads a validation loss every step: evaluated the same way
    assert {e["val_every"] for e in lr} == {1}
    assert all(not e["learn_stop"] for e in lr)
    assert {e["steps"] for e in lr} == {2 * cfg.horizon} and all(cfg.horizon in e["checkpoints"] for e in lr)


def test_fixed_budgets_restore_the_best_parameters_like_early_stopping(smoke):
    _, cfg, summary, _, evals = smoke
    budgets = [e for e in evals if e["controller"] == "FixedBudget"]
    patience = [e for e in evals if e["controller"] == "EarlyStopping"]
    assert len(budgets) == 2 * len(cfg.budgets)  # on the selection tasks and on the evaluation tasks
    assert all(e["restore_best"] and e["val_every"] == 1 for e in budgets + patience)
