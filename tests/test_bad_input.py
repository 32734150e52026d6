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

import pytest
import torch

from learned_opt.cli import main
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


@pytest.mark.parametrize("argv,message", CLI_CASES, ids=[" ".join(a[:1] + a[-2:]) for a, _ in CLI_CASES])
def test_cli_bad_input_one_line_exit_2_nothing_written(tmp_path, capsys, finished_run, argv, message):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    (tmp_path / "list.json").write_text(json.dumps([1, 2]))
    (tmp_path / "types.json").write_text(json.dumps({"iterations": "ten"}))
    argv = [a.replace("{run}", str(run)).replace("{tmp}", str(tmp_path)) for a in argv]
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
]


@pytest.mark.parametrize("case,message", API_CASES, ids=[m for _, m in API_CASES])
def test_api_bad_input_raises_one_line(tmp_path, case, message):
    with pytest.raises((ValueError, TypeError, RuntimeError)) as info:
        case(tmp_path)
    text = str(info.value)
    assert message in text and "\n" not in text, text
