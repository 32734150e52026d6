"""Bad input, table-driven, across the CLI and the API (adds to the tables in ``test_cli.py`` and ``test_meta.py``).

CLI: every case runs next to an existing, finished run and must end with exactly one ``error: ...`` line on
stderr, exit code 2, no traceback, and every file under the test directory byte-for-byte unchanged (nothing
created, nothing overwritten). API: every case raises a ``ValueError``/``TypeError``/``RuntimeError`` whose
message is one line naming the problem.
"""
from __future__ import annotations

import json
import math
import os
import shutil

import numpy as np
import pytest
import torch

from learned_opt.cli import main
from learned_opt.flags import coerce, coerce_kwargs
from learned_opt.meta import MetaConfig, MetaTrainer, load_lopt
from learned_opt.optim import SGD, Adam, RMSprop, get_optimizer
from learned_opt.optim.learned import CoordLSTM, CoordMLP, DecisionHeads, build_learned
from learned_opt.tasks import QuadraticFamily, get_family
from learned_opt.tasks.base import generator
from learned_opt.unroll import unroll

SMALL = ["--iterations", "1", "--horizon", "4", "--truncation", "2", "--task-arg", "num_problems=4",
         "--net-arg", "hidden=6"]
RESUME = ["meta-train", "--run-dir", "{run}", "--resume"]
NEW = ["meta-train", "--run-dir", "{tmp}/new"]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished meta-training run (checkpoint, lopt, config, metrics) to be copied next to each case."""
    d = tmp_path_factory.mktemp("finished") / "run"
    assert main(["meta-train", "--run-dir", str(d), *SMALL]) == 0
    return d


def _snapshot(root):
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        out[dirpath] = "dir"
        for name in filenames:
            with open(os.path.join(dirpath, name), "rb") as f:
                out[os.path.join(dirpath, name)] = f.read()
    return out


CLI_CASES = [
    # wrong types and unknown names
    (["meta-train", "--run-dir", "{run}", "--iterations", "abc"], "invalid int value: 'abc'"),
    (["meta-train", "--run-dir", "{run}", "--seed", "1.5"], "invalid int value: '1.5'"),
    (["meta-train", "--run-dir", "{run}", "--itertions", "3"], "unrecognized arguments: --itertions"),
    (["train-harder"], "invalid choice: 'train-harder'"),
    (["meta-train", "--run-dir", "{tmp}/new", "--config", "{tmp}/list.json"], "must hold a JSON object"),
    (["meta-train", "--run-dir", "{tmp}/new", "--config", "{tmp}/types.json"],
     "types.json: iterations must be an integer, got 'ten'"),
    (["meta-train", "--run-dir", "{tmp}/new", "--curriculum", "10,x"], "--curriculum expects comma-separated"),
    (["meta-train", "--run-dir", "{tmp}/new", "--augment", "0.5"], "--augment: max_scale must be a finite number >= 1"),
    (["meta-train", "--run-dir", "{tmp}/new", "--task-arg", "dist=cauchy"], "unknown distribution 'cauchy'"),
    (["meta-train", "--run-dir", "{tmp}/new", "--net-arg", "base=adamw"], "unknown base 'adamw'"),
    (["meta-train", "--run-dir", "{tmp}/new", "--second-order", "maybe"], "expected true or false, got 'maybe'"),
    (["meta-train", "--run-dir", "{tmp}/new", "--task", "digits", "--task-arg", "n_train=99999"],
     "n_train=99999 exceeds"),
    # zero, negative and NaN hyper-parameters
    (NEW + ["--tasks-per-step", "0"], "tasks_per_step must be an integer >= 1, got 0"),
    (NEW + ["--clip-norm", "nan"], "clip_norm must be > 0, got nan"),
    (NEW + ["--loss-ceiling", "0.5"], "loss_ceiling must be > 1, got 0.5"),
    (NEW + ["--checkpoint-every", "-1"], "checkpoint_every must be an integer >= 0, got -1"),
    (NEW + ["--val-tasks", "0"], "val_tasks must be an integer >= 1, got 0"),
    (NEW + ["--net-arg", "hidden=0"], "hidden and layers must be >= 1"),
    (NEW + ["--net-arg", "lr_bound=nan"], "lr_bound must be > 1, got nan"),
    (NEW + ["--horizon", "3", "--truncation", "4"], "truncation 4 is longer than the horizon 3"),
    # an existing run: flags that contradict its saved settings on --resume, or no --resume
    (RESUME + SMALL[:-2] + ["--net-arg", "hidden=5"], "--net-arg hidden=5 conflicts with the run being resumed "
                                                      "(hidden=6 in"),
    (RESUME + SMALL + ["--net", "mlp"], "--net mlp conflicts with the run being resumed (net='lstm' in"),
    (["meta-train", "--run-dir", "{run}", *SMALL], "already holds a run"),
    # evaluate and compare
    (["evaluate", "--run-dir", "{run}", "--steps", "0"], "argument --steps: must be an integer >= 1, got 0"),
    (["evaluate", "--run-dir", "{run}", "--num-tasks", "-2"], "num_tasks must be an integer >= 1, got -2"),
    (["evaluate", "--run-dir", "{run}", "--steps", "3", "--num-tasks", "1", "--val-every", "-1"],
     "val_every must be >= 0"),
    (["evaluate", "--lopt", "{run}/checkpoint.pt"], "is a training checkpoint, not a saved meta-network"),
    (["evaluate", "--run-dir", "{run}", "--task", "nope"], "unknown task 'nope'"),
    (["compare", "--grid-points", "0", "--out", "{tmp}/cmp"], "must be an integer >= 1, got 0"),
    (["compare", "--grid-high", "nan", "--out", "{tmp}/cmp"], "argument --grid-high: must be a finite number"),
]

# Kinds the table above did not have (issue 11): resume conflicts, huge horizons, typed config files, controllers,
# messages that name the flag or file, outputs that exist or cannot be written, half-written logs.
CONFIGS = {  # name -> content of {tmp}/<name>.json
    "resume_conflict": {"truncation": 1},
    "random_offset": {"random_offset": "no"},
    "second_order": {"second_order": "false"},
    "task_args_text": {"task_args": "num_problems=4"},
    "curriculum_text": {"curriculum": "20,50"},
    "meta_lr_text": {"meta_lr": "1e-3"},
    "iterations_bool": {"iterations": True},
    "horizon_float": {"horizon": 1e12},
    "net_args_type": {"net_args": {"hidden": "big"}},
}
NEW_CASES = [
    # --resume: the run's saved settings win; a flag or config key that contradicts them is refused
    (RESUME + ["--horizon", "8"], "--horizon 8 conflicts with the run being resumed (horizon=4 in"),
    (RESUME + ["--task", "metanet"], "--task metanet conflicts with the run being resumed (task='quadratic' in"),
    (RESUME + ["--task-arg", "num_problems=2"], "--task-arg num_problems=2 conflicts with the run being resumed "
                                                "(num_problems=4 in"),
    (RESUME + ["--task-arg", "dim=5"], "--task-arg dim=5 conflicts with the run being resumed (dim not set, so 10"),
    (RESUME + ["--random-offset", "true"], "--random-offset True conflicts with the run being resumed"),
    (RESUME + ["--curriculum", "2,4"], "--curriculum [2, 4] conflicts with the run being resumed"),
    (RESUME + ["--seed", "3"], "--seed 3 conflicts with the run being resumed (seed=0 in"),
    (RESUME + ["--augment", "2"], "--augment 2.0 conflicts with the run being resumed"),
    (RESUME + ["--config", "{tmp}/resume_conflict.json"], "resume_conflict.json: truncation 1 conflicts with the run"),
    (["meta-train", "--run-dir", "{tmp}/missing", "--resume"], "--resume: there is no run directory"),
    (["meta-train", "--run-dir", "{tmp}/empty", "--resume"], "holds no checkpoint.pt to resume from"),
    (["meta-train", "--resume", "--iterations", "3"], "--resume needs --run-dir"),
    (["meta-train", "--run-dir", "{tmp}/lopt_as_checkpoint", "--resume"],
     "checkpoint.pt is a saved meta-network (what lopt.pt holds), not a training checkpoint"),
    # huge horizons are refused up front, not after exhausting memory
    (NEW + ["--horizon", "1e12"], "horizon 1000000000000 exceeds the maximum of 1000000 inner steps"),
    (NEW + ["--curriculum", "10,2000000"], "curriculum horizon 2000000 exceeds the maximum of 1000000"),
    (NEW + ["--val-horizon", "1e7"], "val_horizon 10000000 exceeds the maximum of 1000000"),
    (["evaluate", "--run-dir", "{run}", "--steps", "1e12"], "argument --steps: 1e12 exceeds the maximum of 1000000"),
    (["compare", "--steps", "99999999"], "argument --steps: 99999999 exceeds the maximum of 1000000"),
    # config files are type-checked, naming the file and the key
    (NEW + ["--config", "{tmp}/random_offset.json"], "random_offset.json: random_offset must be true or false, "
                                                     "got 'no'"),
    (NEW + ["--config", "{tmp}/second_order.json"], "second_order.json: second_order must be true or false, "
                                                    "got 'false'"),
    (NEW + ["--config", "{tmp}/task_args_text.json"], "task_args_text.json: task_args must be an object"),
    (NEW + ["--config", "{tmp}/curriculum_text.json"], "curriculum_text.json: curriculum must be a list of "
                                                       "integers, got '20,50'"),
    (NEW + ["--config", "{tmp}/meta_lr_text.json"], "meta_lr_text.json: meta_lr must be a number, got '1e-3'"),
    (NEW + ["--config", "{tmp}/iterations_bool.json"], "iterations_bool.json: iterations must be an integer, "
                                                       "got True"),
    (NEW + ["--config", "{tmp}/horizon_float.json"], "horizon_float.json: horizon must be an integer"),
    (NEW + ["--config", "{tmp}/net_args_type.json"], "net_args_type.json: net_args hidden must be an integer, "
                                                     "got 'big'"),
    # combinations that used to end in a traceback, and the learned controller's flags
    (NEW + ["--task-arg", "device=tpu"], "unknown device 'tpu' for --task-arg device"),
    (NEW + ["--device", "cuda:x"], "--device cuda:x"),
    (NEW + ["--net", "controller"], "--net controller learns LR and stop decisions for a hand-coded optimizer"),
    (NEW + ["--net", "controller", "--control", "none", "--optimizer", "adam"], "it needs --control learned"),
    (NEW + ["--net", "controller", "--optimizer", "lion"], "unknown optimizer 'lion' for --optimizer"),
    (NEW + ["--net", "controller", "--optimizer", "adam", "--optimizer-arg", "lr=-1"],
     "--optimizer-arg: lr must be a finite number > 0"),
    (NEW + ["--optimizer", "adam"], "--optimizer is for --net controller only"),
    # messages name the flag
    (NEW + ["--task", "digits", "--task-arg", "hidden=abc"], "--task-arg hidden must be a list of integers, "
                                                             "got 'abc'"),
    (NEW + ["--task-arg", "dtype=float65"], "--task-arg dtype must be a dtype"),
    (NEW + ["--task-arg", "num_problems=2.5"], "--task-arg num_problems must be an integer, got 2.5"),
    (NEW + ["--net-arg", "hidden=abc"], "--net-arg hidden must be an integer, got 'abc'"),
    (["compare", "--grid-high", "inf"], "argument --grid-high: must be a finite number, got inf"),
    (["compare", "--grid-low", "2", "--grid-high", "1", "--optimizers", "sgd"], "--grid-low / --grid-high"),
    (["meta-train", "--run-dir", "{run}", "--threads", "0"], "argument --threads: must be an integer >= 1"),
    (["meta-train", "--run-dir", "{run}", "--dist-timeout", "inf"], "argument --dist-timeout: must be a finite"),
    # checkpoint and file errors are short and say what is wrong
    (["evaluate", "--lopt", "{tmp}/garbage.pt"], "garbage.pt: not a torch file (corrupt or another format)"),
    (["evaluate", "--lopt", "{tmp}/pickle.pt"], "holds objects other than tensors, dicts, lists and numbers"),
    (["evaluate", "--run-dir", "{tmp}/missing"], "--run-dir: there is no run directory"),
    (["evaluate", "--run-dir", "{tmp}/empty"], "no saved meta-network at"),
    # outputs: never overwrite another result silently, check them before the work
    (["evaluate", "--run-dir", "{run}", "--out", "{tmp}/other_eval.json"], "holds another evaluation"),
    (["evaluate", "--run-dir", "{run}", "--out", "{tmp}/file/eval.json"], "cannot write in"),
    (["compare", "--out", "{tmp}/taken", "--optimizers", "sgd"], "--out {tmp}/taken already holds compare.json"),
    (["compare", "--out", "{tmp}/file", "--optimizers", "sgd"], "--out {tmp}/file is a file"),
    (["compare", "--optimizers", ","], "--optimizers names no optimizer"),
    (["plot", "--run-dir", "{tmp}/badlog"], "metrics.jsonl:2 is not valid JSON"),
]
if not torch.cuda.is_available():
    NEW_CASES.append((NEW + ["--task-arg", "device=cuda"], "--task-arg device cuda requested but CUDA is not "
                                                           "available"))
CLI_CASES += NEW_CASES


@pytest.mark.parametrize("argv,message", CLI_CASES, ids=[" ".join(a[:1] + a[-2:]) for a, _ in CLI_CASES])
def test_cli_bad_input_one_line_exit_2_nothing_written(tmp_path, capsys, finished_run, argv, message):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    (tmp_path / "list.json").write_text(json.dumps([1, 2]))
    (tmp_path / "types.json").write_text(json.dumps({"iterations": "ten"}))
    for name, content in CONFIGS.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(content))
    (tmp_path / "empty").mkdir()
    shutil.copytree(finished_run, tmp_path / "lopt_as_checkpoint")
    shutil.copy(finished_run / "lopt.pt", tmp_path / "lopt_as_checkpoint" / "checkpoint.pt")
    (tmp_path / "garbage.pt").write_bytes(b"\x00garbage" * 50)
    torch.save({"format": "learned_opt.lopt/1", "weights": np.zeros(3)}, tmp_path / "pickle.pt")
    (tmp_path / "other_eval.json").write_text(json.dumps({"settings": {"task": "digits"}}))
    (tmp_path / "file").write_text("a file, not a directory")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "compare.json").write_text("{}")
    (tmp_path / "badlog").mkdir()
    (tmp_path / "badlog" / "metrics.jsonl").write_text('{"meta_step": 0, "meta_loss": 1}\n{"meta_st\n'
                                                       '{"meta_step": 1}\n')
    argv = [a.replace("{run}", str(run)).replace("{tmp}", str(tmp_path)) for a in argv]
    message = message.replace("{tmp}", str(tmp_path))
    before = _snapshot(tmp_path)
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse usage errors exit from inside the parser
        rc = e.code
    out, err = capsys.readouterr()
    assert rc == 2
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert message in lines[0], lines[0]
    assert len(lines[0]) < 400, lines[0]  # one short line, not torch's advice
    assert "Traceback" not in err + out
    assert _snapshot(tmp_path) == before  # nothing created, nothing overwritten


def _meta_checkpoint(tmp_path):
    d = str(tmp_path / "run")
    torch.manual_seed(0)
    MetaTrainer(CoordLSTM(hidden=4), QuadraticFamily(dim=2), MetaConfig(horizon=2, truncation=2, iterations=1),
                run_dir=d).run()
    return d


API_CASES = [
    (lambda t: get_optimizer("lion"), "unknown optimizer 'lion'"),
    (lambda t: SGD(lr=math.nan), "lr must be a finite number > 0"),
    (lambda t: Adam(lr=-1e-3), "lr must be a finite number > 0"),
    (lambda t: Adam(betas=(0.9, 1.0)), "betas[1] must be in [0, 1)"),
    (lambda t: RMSprop(alpha=1.5), "alpha must be in [0, 1)"),
    (lambda t: SGD(lr=0.1, nesterov=True), "nesterov requires momentum > 0"),
    (lambda t: get_family("mnist"), "unknown task 'mnist'"),
    (lambda t: QuadraticFamily(dim=0)(generator(0)), "dim must be an integer >= 1"),
    (lambda t: build_learned("gru"), "unknown meta-network 'gru'"),
    (lambda t: CoordMLP(momentum_decays=(1.5,)), "decays must be in [0, 1)"),
    (lambda t: CoordLSTM(extra_inputs=("hessian",)), "unknown extra input 'hessian'"),
    (lambda t: DecisionHeads(4, lr_bound=1.0), "lr_bound must be > 1"),
    (lambda t: unroll(QuadraticFamily()(generator(0)), SGD(), steps=0, generator=generator(0)),
     "steps must be an integer >= 1"),
    (lambda t: unroll(QuadraticFamily()(generator(0)), SGD(), steps=2, generator=generator(0), val_every=-1),
     "val_every must be >= 0"),
    (lambda t: MetaTrainer(CoordLSTM(hidden=4), QuadraticFamily(), MetaConfig(horizon=10, truncation=20)),
     "truncation 20 is longer than the horizon 10"),
    (lambda t: MetaTrainer(CoordLSTM(hidden=4), QuadraticFamily(), MetaConfig(meta_lr=math.nan)), "meta_lr"),
    (lambda t: load_lopt(os.path.join(_meta_checkpoint(t), "checkpoint.pt")),
     "is a training checkpoint, not a saved meta-network"),
    (lambda t: load_lopt(str(t / "missing.pt")), "no usable checkpoint"),
    (lambda t: MetaTrainer(CoordLSTM(hidden=5), QuadraticFamily(dim=2), MetaConfig(horizon=2, truncation=2),
                           run_dir=_meta_checkpoint(t)).resume(), "hidden=4 there, 5 here"),
    (lambda t: MetaTrainer(CoordMLP(hidden=4), QuadraticFamily(dim=2), MetaConfig(horizon=2, truncation=2),
                           run_dir=_meta_checkpoint(t)).resume(), "is for a lstm network, not mlp"),
    # issue 11: resumes that contradict the checkpoint, huge horizons, typed arguments
    (lambda t: MetaTrainer(CoordLSTM(hidden=4), QuadraticFamily(dim=2), MetaConfig(horizon=4, truncation=2),
                           run_dir=_meta_checkpoint(t)).resume(), "written with horizon=2, this run has horizon=4"),
    (lambda t: MetaTrainer(CoordLSTM(hidden=4), QuadraticFamily(dim=2),
                           MetaConfig(horizon=2, truncation=2, iterations=1, seed=1),
                           run_dir=_meta_checkpoint(t)).resume(), "written with seed=0, this run has seed=1"),
    (lambda t: MetaConfig(horizon=10**12).validate(), "horizon 1000000000000 exceeds the maximum of 1000000"),
    (lambda t: MetaConfig(val_horizon=10**7).validate(), "val_horizon 10000000 exceeds the maximum"),
    (lambda t: MetaConfig(checkpoint_seconds=math.nan).validate(), "checkpoint_seconds must be a finite number"),
    (lambda t: coerce("no", bool, "run.json: random_offset"), "run.json: random_offset must be true or false"),
    (lambda t: coerce_kwargs(get_family("digits").__class__, {"hidden": "abc"}, "--task-arg"),
     "--task-arg hidden must be a list of integers, got 'abc'"),
    (lambda t: coerce_kwargs(CoordLSTM, {"hiddn": 4}, "--net-arg"), "--net-arg: unknown key 'hiddn'"),
]


@pytest.mark.parametrize("case,message", API_CASES, ids=[m for _, m in API_CASES])
def test_api_bad_input_raises_one_line(tmp_path, case, message):
    with pytest.raises((ValueError, TypeError, RuntimeError)) as info:
        case(tmp_path)
    text = str(info.value)
    assert message in text and "\n" not in text, text
