"""Learned meta-control against hand-designed control, under the evaluation protocol (learned_opt/evaluate/).

Every comparison runs on MetaNet regressions (:class:`MetaNetFamily`); every choice (learning rates, schedule
parameters, lambda and the stop threshold, the reported schedule's hyper-parameters) is made on validation tasks;
the evaluation tasks are validation stream ``dev`` in development runs and the final-test split only with
``--final true``. Task streams: ``tune`` (tuning), ``stopsel`` (choice of lambda and threshold), ``select``
(checkpoint selection inside meta-training), ``dev`` (development evaluation), ``plot`` (one task for the figure).

1. **Learned stopping** (small training sets, ``n_train_stop``, so that the learner can overfit).
   One update rule under every stopping rule: Adam, its rate tuned once on ``val_tasks`` validation tasks for the
   validation loss at the patience-10 stop (the metric the reference row reports on validation tasks). Earlier
   sessions fixed it at 0.03, fast enough to overfit early; that rate is about 7% worse at its stop than the tuned
   one (measured on validation tasks), and a stopping rule should be judged on the optimizer one would use. Rules:
   early stopping with patience 5 / 10 / 20; fixed budgets, which return the best parameters seen as early
   stopping does (:class:`FixedBudget`, so they are comparable); and a :class:`LearnedController` stop head
   (restoring the best parameters too) meta-trained with the halting objective ``sum_t q_t (min_{s<=t} L_val(s)
   + lambda t)``, ``seeds`` meta-training seeds for every lambda of the grid ``lambdas``, each evaluated at every
   threshold of ``thresholds``. Both grids are fixed in the config before any evaluation. The choice of (lambda,
   threshold) is the target's own test applied on ``select_tasks`` validation tasks of stream ``stopsel``, on the
   validation loss at the stop: among the settings whose paired loss ratio to patience 10 has the upper end of its
   interval <= ``loss_bound``, the one whose interval of steps saved has the highest lower end (if none
   qualifies: the lowest upper end of the loss ratio). Only the chosen setting is evaluated on the evaluation tasks.
   Reported: the test-split loss at the stop (primary: no rule observes it), the validation loss at the stop and
   the steps used; nested bootstrap intervals (tasks, then seeds within each task) of the steps saved against
   patience 10 (1 - ratio of mean steps) and of the paired per-task loss ratio. The target is met only when the
   whole interval of steps saved is >= ``steps_saved_target`` and the whole interval of the test-loss ratio is
   <= ``loss_bound``.
2. **Learned learning rate** (larger training sets, ``n_train_lr``: the schedule matters). The
   :class:`LearnedController` LR head drives SGD and Adam at the base rate of the tuned constant schedule,
   meta-trained (``seeds`` seeds) on the validation loss with a validation loss every step; it is evaluated with a
   validation loss every step too (``val_every=1``: exactly the inputs it saw in meta-training). Against constant,
   step, exponential and cosine schedules, each tuned for every horizon (the meta-training horizon and twice it) on
   the validation loss at that horizon: the same learning-rate axis for every schedule, every schedule parameter
   (step size and factor, exponential factor) an axis widened until its best value is interior, the rate refined
   to 1/8 decade. Cosine decays to 0 without warm-up (``CosineAnnealingLR``): no parameter besides the rate.
   Reported: the test-split loss at the horizon (primary) and the validation loss; the comparison is paired
   against the schedule with the lowest mean test-split loss on the evaluation tasks (the least favourable choice
   for the learned controller), and against every schedule. Target: upper end of the paired interval <= 1.0.
3. **2x2 ablation** {hand-coded, learned} update x {hand-coded, learned} control on the overfitting family of
   part 1, changing one factor at a time. U_hand is part 1's tuned Adam; U_learned an Adam-based
   :class:`CoordLSTM` started at that same Adam (``base='adam'``, ``base_lr`` = the tuned rate: fresh, it *is*
   U_hand) and meta-trained on the validation loss, one per seed. C_hand is patience 10; C_learned the stop
   controller recipe chosen in part 1 (its lambda and threshold), meta-trained on top of the update it drives:
   part 1's controllers for U_hand, a new one per seed on top of that seed's frozen CoordLSTM for U_learned.
   Each cell is paired against (U_hand, C_hand), and each one-factor change against its neighbour, seed with seed.

Writes ``{out_dir}/{summary.json, table.md, pareto.png, lr_schedules.png}``. The full run takes about 44 minutes
of one core (``--workers 1``; measured: 2631 s of CPU), roughly half with ``--workers 2``.

    python experiments/control.py --final true --workers 2   # the reported run (make reproduce)
    python experiments/control.py --out_dir runs/control      # development: validation tasks only
    python experiments/control.py --preset smoke              # seconds; used by the tests
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Tuple

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (ProtocolConfig, configure, eval_split, open_run, paired, parallel_map,  # noqa: E402
                    parse_config, run_main, test_split_name, final_test_read, preregistered,  # noqa: F401
                    record_test_read)  # (parse_config: the tests build configs)
from control_report import (BASES, REFERENCE, SCHEDULES, SELECT_STREAM, ablation_statistics,  # noqa: E402, F401
                            choose_stop_setting, lr_statistics, report, setting, short, stacked, steps_saved,
                            stop_statistics, summarize)
from figures import lr_schedule_plot  # noqa: E402

from learned_opt.control import Cosine, EarlyStopping, ExponentialDecay, FixedBudget, StepDecay  # noqa: E402
from learned_opt.evaluate import (Axis, default_lr_axis, evaluate, make_baseline, require_final_seeds,  # noqa: E402
                                  task_seed, tune)
from learned_opt.meta import MetaConfig, MetaTrainer  # noqa: E402
from learned_opt.optim.learned import CoordLSTM, LearnedController  # noqa: E402
from learned_opt.tasks import MetaNetFamily  # noqa: E402
from learned_opt.tasks.base import generator  # noqa: E402
from learned_opt.unroll import unroll  # noqa: E402


PLOT_STREAM = "plot"
# What decides the verdicts (the summary's "preregistered" block): grids, task counts, bounds.
PREREGISTERED = ("seeds", "horizon", "lambdas", "thresholds", "patiences", "budgets", "select_tasks", "eval_tasks",
                 "val_tasks", "lr_low", "lr_high", "lr_per_decade", "max_widen", "steps_saved_target", "loss_bound",
                 "seed")


@dataclass
class Config(ProtocolConfig):
    """Control experiment settings; every field is a command-line flag."""
    horizon: int = 100  # meta-training horizon of every learned controller; LR also evaluated at 2x
    truncation: int = 25
    n_train_stop: int = 32  # small training sets: the learner overfits, stopping matters (parts 1 and 3)
    n_train_lr: int = 256  # larger training sets: the schedule matters (part 2)
    # Fixed before any evaluation. lambda prices one inner step in units of validation loss (about 0.8 here): a
    # 1% loss change over 30 steps is lambda ~ 3e-4, so the grid spans two decades around it in factors of ~3.
    lambdas: tuple = (0.0, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2)
    thresholds: tuple = (0.3, 0.5, 0.7)  # stop when the stop probability exceeds this
    patiences: tuple = (5, 10, 20)
    budgets: tuple = (10, 20, 30, 50, 75, 100)
    stop_bias: float = -4.0  # initial stop logit of the learned stop head
    stop_iterations: int = 40  # meta-iterations of each stop controller
    lr_iterations: int = 60  # meta-iterations of each LR controller
    update_iterations: int = 60  # meta-iterations of each CoordLSTM update (part 3)
    tasks_per_step: int = 4
    meta_lr: float = 3e-2  # controllers
    update_meta_lr: float = 1e-2  # CoordLSTM
    meta_val_every: int = 10  # LR controllers and CoordLSTM: checkpoint selection every this many iterations
    meta_val_tasks: int = 8  # ... on this many validation tasks of stream "select"
    select_tasks: int = 40  # validation tasks (stream "stopsel") on which lambda and the threshold are chosen
    eval_tasks: int = 100  # evaluation tasks (dev stream, or the final-test split with --final true)
    lr_low: float = 1e-4  # the learning-rate axis every tuning shares (default_lr_axis)
    lr_high: float = 1.0
    lr_per_decade: int = 2
    max_widen: int = 8  # widenings allowed per axis (the protocol's; the smoke preset allows fewer)
    steps_saved_target: float = 0.30
    loss_bound: float = 1.01
    seed: int = 0  # task streams; meta-training seeds are seed, seed + 1, ...
    cache_dir: str = ""  # tuning cache (default: out_dir/tuning_cache); tuning touches validation tasks only
    smoke: bool = False  # a smoke run (seconds, for the tests): may run final with fewer than 5 seeds; no result
    out_dir: str = "results/control"
    threads: int = 1


PRESETS = {"smoke": dict(horizon=8, truncation=4, seeds=2, val_tasks=2, select_tasks=3, eval_tasks=3,
                         lambdas=(0.0, 1e-2), thresholds=(0.3, 0.7), patiences=(2, 10), budgets=(3, 8),
                         stop_iterations=2, lr_iterations=2, update_iterations=2, tasks_per_step=1,
                         meta_val_every=1, meta_val_tasks=2, n_train_lr=32, lr_low=1e-2, lr_per_decade=1, max_widen=2,
                         out_dir="runs/control_smoke", smoke=True)}


# ------------------------------------------------------------------------------------------------ building blocks
# Jobs run in forked processes (parallel_map), so they take picklable descriptions: an optimizer spec is
# ``(name, hparams)`` for a hand-coded optimizer or ``("lstm", config, state_dict)``; a controller spec is None,
# ``("patience", p)``, ``("budget", b)``, ``("schedule", name, hparams, horizon)`` or ``("learned", config,
# state_dict)``.

def family(n_train: int) -> MetaNetFamily:
    """The MetaNet regression family with ``n_train`` training examples per task."""
    return MetaNetFamily(n_train=n_train)


def lr_axis(cfg: Config) -> Axis:
    """The learning-rate axis of every tuning in this script (equal grid density for every schedule)."""
    return default_lr_axis(cfg.lr_low, cfg.lr_high, cfg.lr_per_decade)


def schedule_axes(cfg: Config, name: str) -> Tuple[Axis, ...]:
    """The schedule's own axes besides the rate; each is widened until its best value is interior."""
    h = cfg.horizon
    return {"constant": (),
            # step size in steps (not a fraction of the horizon), so one run serves both horizons
            "step": (Axis("step_size", (0.2 * h, 0.4 * h, 0.8 * h), "log", start=0.4 * h),
                     Axis("gamma", (0.1, 0.3, 0.9), "log", start=0.3)),
            "exponential": (Axis("gamma", (0.98, 0.99, 0.995), "log1m", start=0.99),),
            "cosine": ()}[name]


def horizon_independent(name: str) -> bool:
    """Whether the schedule's trajectory does not depend on the horizon (one tuning run serves both)."""
    return name != "cosine"


def schedule(name: str, hp: Dict[str, float], h: int):
    """The schedule ``name`` with hyper-parameters ``hp`` for horizon ``h`` (None: constant)."""
    if name == "constant":
        return None
    if name == "step":
        return StepDecay(step_size=max(1, int(round(hp["step_size"]))), gamma=hp["gamma"])
    if name == "exponential":
        return ExponentialDecay(gamma=hp["gamma"])
    if name == "cosine":
        return Cosine(total_steps=h)
    raise ValueError(f"unknown schedule {name!r}")


def build_optimizer(spec):
    """An optimizer from its spec; a CoordLSTM comes frozen (its weights are not meta-trained further)."""
    if spec[0] == "lstm":
        net = CoordLSTM(**spec[1])
        net.load_state_dict(spec[2])
        return net.requires_grad_(False)
    return make_baseline(spec[0], spec[1])


def build_controller(spec):
    """A controller factory (a fresh controller per task) from its spec."""
    if spec is None:
        return None
    kind = spec[0]
    if kind == "patience":
        return lambda: EarlyStopping(patience=spec[1])
    if kind == "budget":
        return lambda: FixedBudget(budget=spec[1])
    if kind == "schedule":
        return None if spec[1] == "constant" else (lambda: schedule(spec[1], spec[2], spec[3]))
    if kind == "learned":
        ctrl = LearnedController(**spec[1])
        ctrl.load_state_dict(spec[2])
        ctrl.requires_grad_(False)
        return lambda: ctrl  # stateless between tasks: its state lives in the unroll
    raise ValueError(f"unknown controller spec {kind!r}")


def learned_spec(trained: Dict[str, Any], **overrides) -> tuple:
    """The controller spec of a meta-trained controller, with some of its config overridden (the threshold)."""
    return ("learned", {**trained["config"], **overrides}, trained["state"])


# ------------------------------------------------------------------------------------------------ jobs
def tune_job(cfg: Config, what: str, base: str = "", name: str = "") -> Dict[int, Dict[str, Any]]:
    """Tune on validation tasks (stream "tune"): ``what='stop'``: Adam's rate for the validation loss at the
    patience-10 stop; ``what='lr'``: schedule ``name`` on ``base`` for the validation loss at each horizon."""
    torch.set_num_threads(cfg.threads)
    cache = cfg.cache_dir or os.path.join(cfg.out_dir, "tuning_cache")
    common = dict(metrics=["val_loss"], num_tasks=cfg.val_tasks, seed=cfg.seed, cache_dir=cache,
                  max_widen=cfg.max_widen)
    if what == "stop":
        make = lambda hp: (make_baseline("adam", {"lr": hp["lr"]}),  # noqa: E731
                           build_controller(("patience", REFERENCE)))
        out = tune(f"control-stop-adam+patience{REFERENCE}", make, family(cfg.n_train_stop), [lr_axis(cfg)],
                   horizons=[cfg.horizon], val_every=1, horizon_independent=True, **common)
    else:
        axes = (lr_axis(cfg),) + schedule_axes(cfg, name)
        out = {}
        groups = ([[cfg.horizon, 2 * cfg.horizon]] if horizon_independent(name)
                  else [[cfg.horizon], [2 * cfg.horizon]])
        for hs in groups:
            make = lambda hp, h=hs[-1]: (make_baseline(base, {"lr": hp["lr"]}),  # noqa: E731
                                         build_controller(("schedule", name, hp, h)))
            tag = "" if horizon_independent(name) else f"@{hs[0]}"
            out.update(tune(f"control-lr-{base}-{name}{tag}", make, family(cfg.n_train_lr), axes, horizons=hs,
                            horizon_independent=horizon_independent(name), **common))
    return {h: {"hparams": tb.hparams, "score": tb.score, "edges": tb.edges, "widened": tb.widened,
                "points": len(tb.table)} for (h, _), tb in out.items()}


def meta_job(cfg: Config, kind: str, seed: int, *args) -> Dict[str, Any]:
    """Meta-train one network (one seed): ``stop`` (args: lambda, optimizer spec), ``lr`` (args: base, rate) or
    ``update`` (args: Adam's rate). Returns its constructor config, weights and meta-training time."""
    torch.set_num_threads(cfg.threads)
    t0 = time.perf_counter()
    torch.manual_seed(seed)  # the network's initial weights
    common = dict(horizon=cfg.horizon, truncation=cfg.truncation, tasks_per_step=cfg.tasks_per_step, seed=seed)
    # checkpoint selection (validation stream "select") on the whole-split validation loss at the horizon
    select = dict(val_every=cfg.meta_val_every, val_tasks=cfg.meta_val_tasks, val_metric="val_at_stop")
    if kind == "stop":
        lam, opt_spec = args
        # no checkpoint selection: the halting objective (loss + lambda * steps) is not a validation metric
        # MetaTrainer offers, and selecting on the loss alone would undo lambda
        net = LearnedController(learn_lr=False, stop_bias=cfg.stop_bias, restore_best=True)
        mcfg = MetaConfig(iterations=cfg.stop_iterations, meta_lr=cfg.meta_lr, meta_loss="halting",
                          halting_lambda=lam, control="learned", **common)
        trainer = MetaTrainer(net, family(cfg.n_train_stop), mcfg, optimizer=build_optimizer(opt_spec))
    elif kind == "lr":
        base, lr = args
        net = LearnedController(learn_stop=False)
        mcfg = MetaConfig(iterations=cfg.lr_iterations, meta_lr=cfg.meta_lr, meta_loss="val", control="learned",
                          **select, **common)
        trainer = MetaTrainer(net, family(cfg.n_train_lr), mcfg, optimizer=make_baseline(base, {"lr": lr}))
    elif kind == "update":
        (adam_lr,) = args
        net = CoordLSTM(base="adam", base_lr=adam_lr)  # fresh: exactly Adam at the tuned rate
        mcfg = MetaConfig(iterations=cfg.update_iterations, meta_lr=cfg.update_meta_lr, meta_loss="val",
                          **select, **common)
        trainer = MetaTrainer(net, family(cfg.n_train_stop), mcfg)
    else:
        raise ValueError(f"unknown meta-training kind {kind!r}")
    trainer.run()
    return {"kind": kind, "seed": seed, "args": args[:1], "config": net.config, "state": net.state_dict(),
            "seconds": time.perf_counter() - t0, "skipped": trainer.skipped}


def eval_job(cfg: Config, n_train: int, opt_spec, ctrl_spec, steps: int, where: Dict[str, Any], val_every: int,
             marks: tuple = ()) -> Dict[str, Any]:
    """Per-task test-split and validation loss at the end (and at ``marks``) and steps used."""
    torch.set_num_threads(cfg.threads)
    res = evaluate(family(n_train), build_optimizer(opt_spec), build_controller(ctrl_spec), steps=steps,
                   seed=cfg.seed, val_every=val_every, checkpoints=marks, **where)
    out = {"steps": np.asarray(res.stop_steps, dtype=float)}
    for m in sorted(set(marks) | {steps}):
        out[m] = {k: res.metric(k, m) for k in ("test_loss", "val_loss")}
    return out


def _run(job):
    """Dispatch one job description ``(kind, args)`` (parallel_map needs a module-level function)."""
    kind, args = job
    return {"tune": tune_job, "meta": meta_job, "eval": eval_job}[kind](*args)


def run_jobs(cfg: Config, jobs: List[tuple]) -> List[Any]:
    """Run heterogeneous jobs, in ``cfg.workers`` processes."""
    return parallel_map(_run, [(j,) for j in jobs], cfg.workers)




def check(cfg: Config) -> None:
    """Exit with a message naming the first bad setting."""
    problems = []
    if cfg.seeds < 1 or cfg.eval_tasks < 1 or cfg.val_tasks < 1 or cfg.select_tasks < 1:
        problems.append("--seeds, --eval_tasks, --val_tasks and --select_tasks must be >= 1")
    require_final_seeds(cfg.seeds, cfg.final, smoke=cfg.smoke or cfg.check_run)
    if not cfg.lambdas or any(not (lam >= 0) for lam in cfg.lambdas):
        problems.append(f"--lambdas must be numbers >= 0, got {cfg.lambdas!r}")
    if not cfg.thresholds or any(not (0 < t < 1) for t in cfg.thresholds):
        problems.append(f"--thresholds must lie in (0, 1), got {cfg.thresholds!r}")
    if REFERENCE not in cfg.patiences:
        problems.append(f"--patiences must include the reference patience {REFERENCE}")
    if any(not (isinstance(b, int) and b >= 1) for b in cfg.budgets):
        problems.append(f"--budgets must be integers >= 1, got {cfg.budgets!r}")
    if problems:
        sys.exit("error: " + problems[0])
    try:
        MetaConfig(horizon=cfg.horizon, truncation=cfg.truncation, meta_lr=cfg.meta_lr).validate()
        lr_axis(cfg)
    except ValueError as e:
        sys.exit(f"error: {e}")




# ------------------------------------------------------------------------------------------------ stages
def tune_stage(cfg: Config, seconds: Dict[str, float]) -> tuple:
    """Tuning, on validation tasks only: Adam's rate for the stopping experiments, every schedule x base.
    Returns ``(adam_tuned, tuned, const_lr)``."""
    H = cfg.horizon
    t = time.perf_counter()
    tune_jobs = [("tune", (cfg, "stop"))] + [("tune", (cfg, "lr", b, n)) for b in BASES for n in SCHEDULES]
    tuned_list = run_jobs(cfg, tune_jobs)
    adam_tuned = tuned_list[0][H]
    adam_lr = adam_tuned["hparams"]["lr"]
    tuned = {(b, n): tl for (_, (_, _, b, n)), tl in zip(tune_jobs[1:], tuned_list[1:])}
    const_lr = {b: tuned[(b, "constant")][H]["hparams"]["lr"] for b in BASES}
    seconds["tuning"] = time.perf_counter() - t
    print(f"Adam for the stopping experiments: lr {adam_lr:.4g} (tuned on {cfg.val_tasks} validation tasks for the "
          f"validation loss at the patience-{REFERENCE} stop)")
    for (b, n), tl in tuned.items():
        for h, v in sorted(tl.items()):
            edge = "" if all(e != "grid" for e in v["edges"].values()) else "  (AT GRID EDGE)"
            print(f"tuned {b}+{n:11s} @{h}: " + ", ".join(f"{k}={x:.4g}" for k, x in v["hparams"].items())
                  + f"  val loss {v['score']:.4f}{edge}")
    return adam_tuned, tuned, const_lr


def meta_train_stage(cfg: Config, seeds: List[int], adam_lr: float, const_lr: Dict[str, float],
                     seconds: Dict[str, float]) -> tuple:
    """Meta-training: CoordLSTM updates, LR controllers (bases x seeds), stop controllers (lambdas x seeds).
    Returns ``(updates, lr_ctrls, stop_ctrls)``."""
    t = time.perf_counter()
    adam_spec = ("adam", {"lr": adam_lr})
    meta_jobs = ([("meta", (cfg, "update", s, adam_lr)) for s in seeds]
                 + [("meta", (cfg, "lr", s, b, const_lr[b])) for b in BASES for s in seeds]
                 + [("meta", (cfg, "stop", s, lam, adam_spec)) for lam in cfg.lambdas for s in seeds])
    trained = run_jobs(cfg, meta_jobs)
    updates = {r["seed"]: r for r in trained if r["kind"] == "update"}
    lr_ctrls = {(r["args"][0], r["seed"]): r for r in trained if r["kind"] == "lr"}
    stop_ctrls = {(r["args"][0], r["seed"]): r for r in trained if r["kind"] == "stop"}
    seconds["meta_training"] = time.perf_counter() - t
    return updates, lr_ctrls, stop_ctrls


def hand_rules(cfg: Config) -> List[tuple]:
    """``(name, controller spec)`` of every hand-coded stopping rule: patiences, then fixed budgets."""
    return ([(f"patience {p}", ("patience", p)) for p in cfg.patiences]
            + [(f"budget {b}", ("budget", b)) for b in cfg.budgets])


def select_stage(cfg: Config, seeds: List[int], adam_spec: tuple, stop_ctrls, seconds: Dict[str, float]) -> dict:
    """The choice of lambda and threshold on validation tasks of their own stream (``SELECT_STREAM``).
    Returns ``{"hand", "selection", "chosen", "lambda", "threshold"}``."""
    H = cfg.horizon
    t = time.perf_counter()
    where_sel = {"split": "val", "stream": SELECT_STREAM, "num_tasks": cfg.select_tasks}
    lam_thr = [(lam, thr) for lam in cfg.lambdas for thr in cfg.thresholds]
    rules = hand_rules(cfg)
    sel_jobs = [("eval", (cfg, cfg.n_train_stop, adam_spec, spec, H, where_sel, 1)) for _, spec in rules]
    sel_jobs += [("eval", (cfg, cfg.n_train_stop, adam_spec,
                           learned_spec(stop_ctrls[(lam, s)], stop_threshold=thr), H, where_sel, 1))
                 for lam, thr in lam_thr for s in seeds]
    sel_out = run_jobs(cfg, sel_jobs)
    sel_hand = {name: o for (name, _), o in zip(rules, sel_out)}
    sel_learned = {}
    for i, (lam, thr) in enumerate(lam_thr):
        outs = sel_out[len(rules) + i * len(seeds):len(rules) + (i + 1) * len(seeds)]
        sel_learned[(lam, thr)] = stacked(outs, H)
    ref_sel = sel_hand[f"patience {REFERENCE}"]
    selection = {}
    for (lam, thr), v in sel_learned.items():
        selection[setting(lam, thr)] = {
            "lambda": lam, "threshold": thr, "loss_ratio": short(paired(v["val_loss"], ref_sel[H]["val_loss"])),
            "steps_saved": steps_saved(v["steps"], ref_sel["steps"]), "mean_steps": float(v["steps"].mean()),
            "mean_val_loss": float(v["val_loss"].mean())}
    chosen = choose_stop_setting(selection, cfg.loss_bound)
    seconds["stop_selection"] = time.perf_counter() - t
    print(f"chosen on {cfg.select_tasks} validation tasks: {chosen}")
    return {"hand": sel_hand, "selection": selection, "chosen": chosen, "lambda": selection[chosen]["lambda"],
            "threshold": selection[chosen]["threshold"]}


def evaluate_stage(cfg: Config, seeds: List[int], adam_spec: tuple, tuned, const_lr, trained: tuple, sel: dict,
                   seconds: Dict[str, float]) -> tuple:
    """C_learned on top of U_learned (part 3), meta-trained with the chosen lambda; then every evaluation.
    Returns ``(evaluations, lstm_stop)``: the per-task outputs by role, and the stop controllers on CoordLSTMs."""
    H, H2 = cfg.horizon, 2 * cfg.horizon
    updates, lr_ctrls, stop_ctrls = trained
    lam_star, thr_star = sel["lambda"], sel["threshold"]
    where_eval = {**eval_split(cfg), "num_tasks": cfg.eval_tasks}
    rules = hand_rules(cfg)
    t = time.perf_counter()
    lstm_spec = {s: ("lstm", updates[s]["config"], updates[s]["state"]) for s in seeds}
    jobs = [("meta", (cfg, "stop", s, lam_star, lstm_spec[s])) for s in seeds]
    jobs += [("eval", (cfg, cfg.n_train_stop, adam_spec, spec, H, where_eval, 1)) for _, spec in rules]
    jobs += [("eval", (cfg, cfg.n_train_stop, adam_spec, learned_spec(stop_ctrls[(lam_star, s)],
                                                                      stop_threshold=thr_star), H, where_eval, 1))
             for s in seeds]
    # schedules: each tuned for its horizon, run to that horizon; the constant rate and the learned LR are
    # measured at both horizons
    sched_keys = [(b, n, h) for b in BASES for n in SCHEDULES for h in (H, H2)]
    jobs += [("eval", (cfg, cfg.n_train_lr, (b, {"lr": tuned[(b, n)][h]["hparams"]["lr"]}),
                       ("schedule", n, tuned[(b, n)][h]["hparams"], h), h, where_eval, 0)) for b, n, h in sched_keys]
    # The LR controller reads a validation loss every step in meta-training (meta_loss 'val'), so it is
    # evaluated with one every step. Its features carry time as the step count only (no horizon), so one run to
    # 2H passes through H exactly as a run to H would.
    jobs += [("eval", (cfg, cfg.n_train_lr, (b, {"lr": const_lr[b]}), learned_spec(lr_ctrls[(b, s)]), H2,
                       where_eval, 1, (H,))) for b in BASES for s in seeds]
    jobs += [("eval", (cfg, cfg.n_train_stop, lstm_spec[s], ("patience", REFERENCE), H, where_eval, 1))
             for s in seeds]
    out = iter(run_jobs(cfg, jobs))

    def take(n):
        return [next(out) for _ in range(n)]

    lstm_stop = dict(zip(seeds, take(len(seeds))))
    ev = {"hand": {name: o for (name, _), o in zip(rules, take(len(rules)))}, "learned_stop": take(len(seeds)),
          "sched": dict(zip(sched_keys, take(len(sched_keys)))), "lr": {b: take(len(seeds)) for b in BASES},
          "lstm_p10": take(len(seeds))}
    ev["lstm_learned"] = run_jobs(cfg, [("eval", (cfg, cfg.n_train_stop, lstm_spec[s],
                                                  learned_spec(lstm_stop[s], stop_threshold=thr_star), H,
                                                  where_eval, 1)) for s in seeds])
    seconds["evaluation"] = time.perf_counter() - t
    return ev, lstm_stop


def lr_traces(cfg: Config, seeds: List[int], lr_ctrls, tuned, const_lr) -> Dict[str, Dict[str, list]]:
    """Per base: the learned controllers' LR multipliers on one validation task of its own stream (the same task
    for every seed), and every tuned schedule's, relative to the tuned constant rate."""
    H, H2 = cfg.horizon, 2 * cfg.horizon
    traces = {}
    for b in BASES:
        traces[b] = {}
        for s in seeds:
            ctrl = build_controller(learned_spec(lr_ctrls[(b, s)]))()
            g = generator(task_seed("val", 0, cfg.seed, stream=PLOT_STREAM))
            task = family(cfg.n_train_lr)(g)
            tr = unroll(task, make_baseline(b, {"lr": const_lr[b]}), ctrl, steps=H2, generator=g, val_every=1)
            traces[b][f"learned (seed {s})"] = tr.records["lr_scale"][:-1]
        for h in (H, H2):
            for n in SCHEDULES:
                hp = tuned[(b, n)][h]["hparams"]
                c = schedule(n, hp, h)
                traces[b][f"{n} (tuned @{h})"] = [hp["lr"] / const_lr[b] * (c.scale(t) if c else 1.0)
                                                  for t in range(h)]
    return traces


# ------------------------------------------------------------------------------------------------ main
def main(argv=None) -> dict:
    """Tune, meta-train, choose the stop setting, evaluate, report; returns the summary."""
    cfg = configure(Config, PRESETS, argv, check)
    prov = open_run(cfg.out_dir)
    t_start = time.perf_counter()
    seconds: Dict[str, float] = {}
    seeds = [cfg.seed + s for s in range(cfg.seeds)]
    adam_tuned, tuned, const_lr = tune_stage(cfg, seconds)
    adam_spec = ("adam", {"lr": adam_tuned["hparams"]["lr"]})
    updates, lr_ctrls, stop_ctrls = trained = meta_train_stage(cfg, seeds, adam_spec[1]["lr"], const_lr, seconds)
    sel = select_stage(cfg, seeds, adam_spec, stop_ctrls, seconds)
    read = final_test_read(cfg, preregistered(cfg, PREREGISTERED, {"reference_patience": REFERENCE}),
                           states=[r["state"] for group in trained for r in group.values()])
    ev, lstm_stop = evaluate_stage(cfg, seeds, adam_spec, tuned, const_lr, trained, sel, seconds)
    split_name = test_split_name(cfg)
    H = cfg.horizon
    stop = stop_statistics(cfg, H, seeds, sel, ev, stop_ctrls, adam_tuned)
    lr = lr_statistics(H, seeds, ev, tuned, const_lr, lr_ctrls)
    ablation = ablation_statistics(H, seeds, ev, sel["chosen"], adam_spec[1]["lr"], updates, lstm_stop)
    summary = summarize(cfg, prov, split_name, stop, lr, ablation, seconds)
    summary["total_seconds"] = time.perf_counter() - t_start
    report(cfg, record_test_read(summary, read), sel, split_name)
    lr_schedule_plot(os.path.join(cfg.out_dir, "lr_schedules.png"), lr_traces(cfg, seeds, lr_ctrls, tuned, const_lr),
                     H)
    return summary


if __name__ == "__main__":
    run_main(main)
