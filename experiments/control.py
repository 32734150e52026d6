"""Learned meta-control against hand-designed control, under the evaluation protocol (learned_opt/evaluate.py).

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
   the steps used; bootstrap intervals over seeds and tasks of the steps saved against patience 10 (1 - ratio of
   mean steps) and of the paired per-task loss ratio. The target is met only when the whole interval of steps
   saved is >= ``steps_saved_target`` and the whole interval of the test-loss ratio is <= ``loss_bound``.
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
from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Tuple

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (ProtocolConfig, eval_split, fmt_paired, markdown_table, paired, parallel_map,  # noqa: E402
                    parse_config, provenance, run_main, test_split_name, verdict, save_report)

from learned_opt.control import Cosine, EarlyStopping, ExponentialDecay, FixedBudget, StepDecay  # noqa: E402
from learned_opt.evaluate import (Axis, default_lr_axis, evaluate, make_baseline, protocol_record,  # noqa: E402
                                  task_seed, tune)
from learned_opt.meta import MetaConfig, MetaTrainer  # noqa: E402
from learned_opt.optim.learned import CoordLSTM, LearnedController  # noqa: E402
from learned_opt.tasks import MetaNetFamily  # noqa: E402
from learned_opt.tasks.base import generator  # noqa: E402
from learned_opt.unroll import unroll  # noqa: E402

BASES = ("sgd", "adam")
SCHEDULES = ("constant", "step", "exponential", "cosine")
REFERENCE = 10  # the patience of the reference stopping rule (and of C_hand)
SELECT_STREAM = "stopsel"  # validation stream of the lambda / threshold choice (no other use touches it)
PLOT_STREAM = "plot"


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
    out_dir: str = "results/control"
    threads: int = 1


PRESETS = {"smoke": dict(horizon=8, truncation=4, seeds=2, val_tasks=2, select_tasks=3, eval_tasks=3,
                         lambdas=(0.0, 1e-2), thresholds=(0.3, 0.7), patiences=(2, 10), budgets=(3, 8),
                         stop_iterations=2, lr_iterations=2, update_iterations=2, tasks_per_step=1,
                         meta_val_every=1, meta_val_tasks=2, n_train_lr=32, lr_low=1e-2, lr_per_decade=1, max_widen=2,
                         out_dir="runs/control_smoke")}


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


# ------------------------------------------------------------------------------------------------ statistics
def steps_saved(learned: np.ndarray, reference: np.ndarray) -> Dict[str, float]:
    """1 - ratio of mean steps (learned over reference), with the bootstrap interval over seeds and tasks."""
    p = paired(learned, reference)
    lo, hi = p["ratio_of_means_ci"]
    return {"value": 1 - p["ratio_of_means"], "ci_low": 1 - hi, "ci_high": 1 - lo,
            "per_seed": [1 - float(np.mean(r)) / float(np.mean(reference)) for r in np.atleast_2d(learned)]}


def choose_stop_setting(table: Dict[str, Dict[str, Any]], bound: float) -> str:
    """The selection rule of part 1 (fixed a priori): among settings whose validation-loss ratio interval ends at
    or below ``bound``, the highest lower end of steps saved; if none, the lowest upper end of the loss ratio."""
    ok = [k for k, v in table.items() if v["loss_ratio"]["ci_high"] <= bound]
    if ok:
        return max(ok, key=lambda k: (table[k]["steps_saved"]["ci_low"], -table[k]["loss_ratio"]["ci_high"]))
    return min(table, key=lambda k: table[k]["loss_ratio"]["ci_high"])


def short(p: Dict[str, Any]) -> Dict[str, Any]:
    """The paired record without its bulky per-seed lists (kept in full elsewhere)."""
    return {k: v for k, v in p.items() if k not in ("per_seed_ratio",)}


def check(cfg: Config) -> None:
    """Exit with a message naming the first bad setting."""
    problems = []
    if cfg.seeds < 1 or cfg.eval_tasks < 1 or cfg.val_tasks < 1 or cfg.select_tasks < 1:
        problems.append("--seeds, --eval_tasks, --val_tasks and --select_tasks must be >= 1")
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


# ------------------------------------------------------------------------------------------------ main
def main(argv=None) -> dict:
    cfg = parse_config(Config, PRESETS, argv)
    torch.set_num_threads(cfg.threads)
    check(cfg)
    prov = provenance()  # before any output is written
    os.makedirs(cfg.out_dir, exist_ok=True)
    t_start = time.perf_counter()
    seconds: Dict[str, float] = {}
    H, H2 = cfg.horizon, 2 * cfg.horizon
    seeds = [cfg.seed + s for s in range(cfg.seeds)]
    where_eval = {**eval_split(cfg), "num_tasks": cfg.eval_tasks}
    where_sel = {"split": "val", "stream": SELECT_STREAM, "num_tasks": cfg.select_tasks}
    lam_thr = [(lam, thr) for lam in cfg.lambdas for thr in cfg.thresholds]

    def setting(lam, thr):
        return f"lambda={lam:g}, threshold={thr:g}"

    # 1. Tuning, on validation tasks only: Adam's rate for the stopping experiments, every schedule x base.
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

    # 2. Meta-training: stop controllers (seeds x lambdas), LR controllers (bases x seeds), CoordLSTM updates.
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

    # 3. Choice of lambda and threshold on validation tasks of their own stream ("stopsel").
    t = time.perf_counter()
    hand_rules = ([(f"patience {p}", ("patience", p)) for p in cfg.patiences]
                  + [(f"budget {b}", ("budget", b)) for b in cfg.budgets])
    sel_jobs = [("eval", (cfg, cfg.n_train_stop, adam_spec, spec, H, where_sel, 1)) for _, spec in hand_rules]
    sel_jobs += [("eval", (cfg, cfg.n_train_stop, adam_spec,
                           learned_spec(stop_ctrls[(lam, s)], stop_threshold=thr), H, where_sel, 1))
                 for lam, thr in lam_thr for s in seeds]
    sel_out = run_jobs(cfg, sel_jobs)
    sel_hand = {name: o for (name, _), o in zip(hand_rules, sel_out)}
    sel_learned = {}
    for i, (lam, thr) in enumerate(lam_thr):
        outs = sel_out[len(hand_rules) + i * len(seeds):len(hand_rules) + (i + 1) * len(seeds)]
        sel_learned[(lam, thr)] = {"steps": np.stack([o["steps"] for o in outs]),
                                   "val_loss": np.stack([o[H]["val_loss"] for o in outs]),
                                   "test_loss": np.stack([o[H]["test_loss"] for o in outs])}
    ref_sel = sel_hand[f"patience {REFERENCE}"]
    selection = {}
    for (lam, thr), v in sel_learned.items():
        selection[setting(lam, thr)] = {
            "lambda": lam, "threshold": thr, "loss_ratio": short(paired(v["val_loss"], ref_sel[H]["val_loss"])),
            "steps_saved": steps_saved(v["steps"], ref_sel["steps"]), "mean_steps": float(v["steps"].mean()),
            "mean_val_loss": float(v["val_loss"].mean())}
    chosen = choose_stop_setting(selection, cfg.loss_bound)
    lam_star, thr_star = selection[chosen]["lambda"], selection[chosen]["threshold"]
    seconds["stop_selection"] = time.perf_counter() - t
    print(f"chosen on {cfg.select_tasks} validation tasks: {chosen}")

    # 4. C_learned on top of U_learned (part 3), meta-trained with the chosen lambda; then every evaluation.
    t = time.perf_counter()
    lstm_spec = {s: ("lstm", updates[s]["config"], updates[s]["state"]) for s in seeds}
    jobs = [("meta", (cfg, "stop", s, lam_star, lstm_spec[s])) for s in seeds]
    stop_rule_jobs = [("eval", (cfg, cfg.n_train_stop, adam_spec, spec, H, where_eval, 1)) for _, spec in hand_rules]
    jobs += stop_rule_jobs
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
    out = run_jobs(cfg, jobs)
    k = 0

    def take(n):
        nonlocal k
        k += n
        return out[k - n:k]

    lstm_stop = dict(zip(seeds, take(len(seeds))))
    ev_hand = {name: o for (name, _), o in zip(hand_rules, take(len(hand_rules)))}
    ev_learned_stop = take(len(seeds))
    ev_sched = dict(zip(sched_keys, take(len(sched_keys))))
    ev_lr = {}
    for b in BASES:
        ev_lr[b] = take(len(seeds))
    ev_lstm_p10 = take(len(seeds))
    ev_lstm_learned = run_jobs(cfg, [("eval", (cfg, cfg.n_train_stop, lstm_spec[s],
                                               learned_spec(lstm_stop[s], stop_threshold=thr_star), H, where_eval,
                                               1)) for s in seeds])
    seconds["evaluation"] = time.perf_counter() - t

    # ---------------------------------------------------------------- statistics: 1. learned stopping
    split_name = test_split_name(cfg)
    ref = ev_hand[f"patience {REFERENCE}"]
    L = {m: np.stack([o[H][m] for o in ev_learned_stop]) for m in ("test_loss", "val_loss")}
    L_steps = np.stack([o["steps"] for o in ev_learned_stop])
    stop_paired = {"test_loss": paired(L["test_loss"], ref[H]["test_loss"]),
                   "val_loss": paired(L["val_loss"], ref[H]["val_loss"])}
    saved = steps_saved(L_steps, ref["steps"])
    loss_p = stop_paired["test_loss"]
    stop_met = bool(saved["ci_low"] >= cfg.steps_saved_target and loss_p["ci_high"] <= cfg.loss_bound)
    rules = {}
    for name, o in ev_hand.items():
        rules[name] = {"test_loss": float(o[H]["test_loss"].mean()), "val_loss": float(o[H]["val_loss"].mean()),
                       "steps": float(o["steps"].mean()),
                       "vs_patience10_test_loss": short(paired(o[H]["test_loss"], ref[H]["test_loss"])),
                       "steps_saved": steps_saved(o["steps"], ref["steps"])}
    rules[f"learned ({chosen})"] = {"test_loss": float(L["test_loss"].mean()),
                                    "val_loss": float(L["val_loss"].mean()), "steps": float(L_steps.mean()),
                                    "per_seed_test_loss": L["test_loss"].mean(1).tolist(),
                                    "per_seed_steps": L_steps.mean(1).tolist(),
                                    "vs_patience10_test_loss": stop_paired["test_loss"], "steps_saved": saved}
    stop_summary = {
        "adam_lr": adam_lr, "adam_tuning": {**adam_tuned, "metric": f"val_loss at the patience-{REFERENCE} stop",
                                            "tasks": cfg.val_tasks},
        "lambdas": list(cfg.lambdas), "thresholds": list(cfg.thresholds), "chosen": chosen,
        "chosen_lambda": lam_star, "chosen_threshold": thr_star,
        "selection_rule": f"on {cfg.select_tasks} validation tasks (stream {SELECT_STREAM!r}), validation loss at "
                          f"the stop: among settings whose paired loss ratio to patience {REFERENCE} has "
                          f"ci_high <= {cfg.loss_bound}, the highest ci_low of steps saved",
        "selection": selection,
        "selection_hand_rules": {n: {"val_loss": float(o[H]["val_loss"].mean()), "steps": float(o["steps"].mean())}
                                 for n, o in sel_hand.items()},
        "steps_saved": saved, "loss_ratio": stop_paired["test_loss"], "val_loss_ratio": stop_paired["val_loss"],
        "rules": rules, "target_met": stop_met,
        "meta_train_seconds": {f"lambda={lam:g}": [stop_ctrls[(lam, s)]["seconds"] for s in seeds]
                               for lam in cfg.lambdas}}

    # ---------------------------------------------------------------- statistics: 2. learned learning rate
    lr_summary, lr_targets = {}, {}
    for b in BASES:
        for h in (H, H2):
            learned = {m: np.stack([o[h][m] for o in ev_lr[b]]) for m in ("test_loss", "val_loss")}
            sched = {n: ev_sched[(b, n, h)][h] for n in SCHEDULES}
            best = min(SCHEDULES, key=lambda n: float(np.mean(sched[n]["test_loss"])))
            best_val = min(SCHEDULES, key=lambda n: tuned[(b, n)][h]["score"])
            p = paired(learned["test_loss"], sched[best]["test_loss"])
            key = f"{b}@{h}"
            lr_summary[key] = {
                "best_schedule": best, "best_schedule_on_validation": best_val,
                "paired": p, "paired_val_loss": paired(learned["val_loss"], sched[best]["val_loss"]),
                "paired_vs": {n: short(paired(learned["test_loss"], sched[n]["test_loss"])) for n in SCHEDULES},
                "verdict": verdict(p, 1.0), "base_lr": const_lr[b],
                "learned": {"test_loss": float(learned["test_loss"].mean()),
                            "val_loss": float(learned["val_loss"].mean()),
                            "per_seed_test_loss": learned["test_loss"].mean(1).tolist()},
                "schedules": {n: {"hparams": tuned[(b, n)][h]["hparams"], "edges": tuned[(b, n)][h]["edges"],
                                  "tuning_val_loss": tuned[(b, n)][h]["score"],
                                  "test_loss": float(np.mean(sched[n]["test_loss"])),
                                  "val_loss": float(np.mean(sched[n]["val_loss"]))} for n in SCHEDULES},
                "meta_train_seconds": [lr_ctrls[(b, s)]["seconds"] for s in seeds]}
            lr_targets[key] = {"ratio": p["ratio"], "ci": [p["ci_low"], p["ci_high"]], "verdict": verdict(p, 1.0)}

    # ---------------------------------------------------------------- statistics: 3. the 2x2 ablation
    cells = {("hand", "hand"): {"test_loss": ref[H]["test_loss"][None], "val_loss": ref[H]["val_loss"][None],
                                "steps": ref["steps"][None]},
             ("hand", "learned"): {"test_loss": L["test_loss"], "val_loss": L["val_loss"], "steps": L_steps}}
    for u_c, outs in ((("learned", "hand"), ev_lstm_p10), (("learned", "learned"), ev_lstm_learned)):
        cells[u_c] = {"test_loss": np.stack([o[H]["test_loss"] for o in outs]),
                      "val_loss": np.stack([o[H]["val_loss"] for o in outs]),
                      "steps": np.stack([o["steps"] for o in outs])}
    names = {("hand", "hand"): f"U_hand (Adam {adam_lr:.3g}) + C_hand (patience {REFERENCE})",
             ("hand", "learned"): f"U_hand (Adam {adam_lr:.3g}) + C_learned ({chosen})",
             ("learned", "hand"): f"U_learned (CoordLSTM on Adam) + C_hand (patience {REFERENCE})",
             ("learned", "learned"): f"U_learned (CoordLSTM on Adam) + C_learned ({chosen})"}
    ablation = {"cells": {}, "paired": {}, "one_factor": {},
                "meta_train_seconds": {"update": [updates[s]["seconds"] for s in seeds],
                                       "stop_on_update": [lstm_stop[s]["seconds"] for s in seeds]}}
    hh = cells[("hand", "hand")]
    for key, c in cells.items():
        ablation["cells"][names[key]] = {"update": key[0], "control": key[1],
                                         "test_loss": float(c["test_loss"].mean()),
                                         "val_loss": float(c["val_loss"].mean()), "steps": float(c["steps"].mean()),
                                         "per_seed_test_loss": c["test_loss"].mean(1).tolist()}
        if key != ("hand", "hand"):
            ablation["paired"][names[key]] = {"test_loss": paired(c["test_loss"], hh["test_loss"][0]),
                                              "steps_saved": steps_saved(c["steps"], hh["steps"][0])}
    for a, b_, what in ((("learned", "learned"), ("learned", "hand"), "control, given U_learned"),
                        (("learned", "learned"), ("hand", "learned"), "update, given C_learned")):
        ablation["one_factor"][what] = {"test_loss": short(paired(cells[a]["test_loss"], cells[b_]["test_loss"])),
                                        "steps_saved": steps_saved(cells[a]["steps"], cells[b_]["steps"])}

    # ---------------------------------------------------------------- summary
    flat_paired = {f"stop: learned ({chosen}) vs patience {REFERENCE}, test loss": stop_paired["test_loss"]}
    flat_paired.update({f"lr: {k} learned vs best schedule ({v['best_schedule']}), test loss": v["paired"]
                        for k, v in lr_summary.items()})
    flat_paired.update({f"ablation: {k} vs (U_hand, C_hand), test loss": v["test_loss"]
                        for k, v in ablation["paired"].items()})
    summary = {
        "config": asdict(cfg), "provenance": prov,
        "protocol": protocol_record(
            meta_training_seeds=cfg.seeds, validation_tasks=cfg.val_tasks,
            tuning_metric={"stop_adam_lr": f"val_loss at the patience-{REFERENCE} stop (validation tasks)",
                           "stop_lambda_threshold": f"val_loss at the stop and steps, {cfg.select_tasks} "
                                                    f"validation tasks of stream {SELECT_STREAM!r}",
                           "lr_schedules": "val_loss at each horizon (validation tasks)"},
            test_split=split_name, test_tasks=cfg.eval_tasks, selection_tasks=cfg.select_tasks,
            reported_metric="test_loss (the task's held-out test split) at the stop / at the horizon; val_loss too",
            lambdas_fixed_a_priori=list(cfg.lambdas), thresholds_fixed_a_priori=list(cfg.thresholds),
            lr_controller_val_every=1, fixed_budgets_restore_best=True,
            best_schedule="lowest mean test-split loss on the evaluation tasks, per base and horizon (the least "
                          "favourable choice for the learned controller)"),
        "stop": stop_summary, "lr": lr_summary, "ablation": ablation, "paired": flat_paired,
        "targets": {
            "learned_stopping": {"steps_saved_bound": cfg.steps_saved_target, "loss_ratio_bound": cfg.loss_bound,
                                 "steps_saved": [saved["value"], saved["ci_low"], saved["ci_high"]],
                                 "loss_ratio": [loss_p["ratio"], loss_p["ci_low"], loss_p["ci_high"]],
                                 "met": stop_met},
            "learned_lr": {"bound": 1.0, "per": lr_targets,
                           "met": all(v["verdict"] == "met" for v in lr_targets.values())}},
        "seconds": seconds,
    }
    summary["total_seconds"] = time.perf_counter() - t_start

    # ---------------------------------------------------------------- table, figures
    lines = [f"Evaluation tasks: {split_name}, {cfg.eval_tasks} tasks; {cfg.seeds} meta-training seeds; tuning on "
             f"{cfg.val_tasks} validation tasks; lambda and threshold chosen on {cfg.select_tasks} validation tasks "
             f"of their own stream.", "",
             f"### Learned stopping (MetaNet regression, n_train={cfg.n_train_stop}, Adam lr {adam_lr:.3g} under "
             "every rule)", ""]
    rows = []
    for name, r in rules.items():
        s = r["steps_saved"]
        rows.append([name, r["test_loss"], r["val_loss"], r["steps"],
                     f"{100 * s['value']:.1f}% [{100 * s['ci_low']:.1f}, {100 * s['ci_high']:.1f}]",
                     fmt_paired(r["vs_patience10_test_loss"])])
    lines += [markdown_table(["rule", "test loss at stop", "val loss at stop", "steps", f"steps saved vs "
                              f"patience {REFERENCE} [95% CI]", f"test loss / patience {REFERENCE} (paired)"], rows),
              "", f"- chosen on validation tasks: {chosen}; steps saved {100 * saved['value']:.1f}% "
              f"[{100 * saved['ci_low']:.1f}, {100 * saved['ci_high']:.1f}], test-loss ratio {fmt_paired(loss_p)}; "
              f"target (>= {100 * cfg.steps_saved_target:.0f}% and <= {cfg.loss_bound}x, whole intervals): "
              f"{'met' if stop_met else 'not met'}",
              "- per seed: steps saved " + ", ".join(f"{100 * x:.1f}%" for x in saved["per_seed"])
              + "; test-loss ratio " + ", ".join(f"{x:.4f}" for x in loss_p["per_seed_ratio"]), "",
              "### Learned learning rate (MetaNet regression, n_train="
              f"{cfg.n_train_lr}; test-split loss at the horizon)", ""]
    rows = []
    for key, v in lr_summary.items():
        for n in SCHEDULES:
            sv = v["schedules"][n]
            rows.append([key, n + (" (best)" if n == v["best_schedule"] else ""),
                         ", ".join(f"{a}={x:.3g}" for a, x in sv["hparams"].items()), sv["tuning_val_loss"],
                         sv["test_loss"], sv["val_loss"], "-"])
        rows.append([key, f"learned ({cfg.seeds} seeds)", f"lr={v['base_lr']:.3g} x learned", "-",
                     v["learned"]["test_loss"], v["learned"]["val_loss"],
                     fmt_paired(v["paired"]) + f"; {v['verdict']}"])
    lines += [markdown_table(["base@steps", "schedule", "tuned", "val loss (tuning tasks)", "test loss",
                              "val loss", "learned / best (paired)"], rows), "",
              "- per seed, learned / best schedule: " + "; ".join(
                  f"{k} " + ", ".join(f"{x:.4f}" for x in v["paired"]["per_seed_ratio"])
                  for k, v in lr_summary.items()), "",
              "### 2x2 ablation (MetaNet regression, n_train=" f"{cfg.n_train_stop})", ""]
    rows = []
    for name, c in ablation["cells"].items():
        p = ablation["paired"].get(name)
        rows.append([name, c["test_loss"], c["val_loss"], c["steps"],
                     "-" if p is None else fmt_paired(p["test_loss"]),
                     "-" if p is None else f"{100 * p['steps_saved']['value']:.1f}%"])
    lines += [markdown_table(["cell", "test loss at stop", "val loss at stop", "steps",
                              "/ (U_hand, C_hand) (paired)", "steps saved"], rows), "",
              "- per seed, test loss / (U_hand, C_hand): " + "; ".join(
                  f"({k[0]}, {k[1]}) " + ", ".join(f"{x:.4f}" for x in ablation["paired"][names[k]]["test_loss"]
                                                   ["per_seed_ratio"]) for k in cells if k != ("hand", "hand")),
              "- one factor at a time: " + "; ".join(f"{w}: {fmt_paired(v['test_loss'])}, steps saved "
                                                     f"{100 * v['steps_saved']['value']:.1f}%"
                                                     for w, v in ablation["one_factor"].items()),
              f"- whole script {summary['total_seconds']:.0f} s (" + ", ".join(f"{k} {v:.0f} s"
                                                                            for k, v in seconds.items()) + ")"]
    text = "\n".join(lines)
    save_report(cfg.out_dir, text, summary)

    sel_points = {n: (float(o["steps"].mean()), float(o[H]["val_loss"].mean())) for n, o in sel_hand.items()}
    sel_points.update({f"learned {k}": (v["mean_steps"], v["mean_val_loss"]) for k, v in selection.items()})
    eval_points = {n: (r["steps"], r["test_loss"]) for n, r in rules.items()}
    _pareto(os.path.join(cfg.out_dir, "pareto.png"), sel_points, eval_points, f"learned {chosen}",
            f"learned ({chosen})", split_name)
    traces = {}
    for b in BASES:
        traces[b] = {}
        for s in seeds:  # one validation task of its own stream, the same for every seed
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
    _lr_plot(os.path.join(cfg.out_dir, "lr_schedules.png"), traces, H)
    return summary


def _pareto(path, selection_points, eval_points, chosen_sel, chosen_eval, split_name):
    """Steps against loss at the stop, per rule: left, the selection tasks (validation loss; every lambda and
    threshold, mean over seeds); right, the evaluation tasks (test-split loss; the chosen setting only). The
    y-axis is logarithmic so that the crowded region near patience 10 stays readable."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FormatStrFormatter

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for ax, points, chosen, ylabel, title in (
            (axes[0], selection_points, chosen_sel, "validation loss at the stop",
             "selection tasks (validation stream 'stopsel')"),
            (axes[1], eval_points, chosen_eval, "test-split loss at the stop", f"evaluation tasks: {split_name}")):
        ref = points.get(f"patience {REFERENCE}")
        patience_colors = iter(["tab:green", "tab:olive", "tab:brown", "tab:pink", "tab:cyan"])
        learned_labelled = False
        for name, (steps, loss) in points.items():
            if name == chosen:
                ax.scatter(steps, loss, marker="*", s=160, color="tab:red", zorder=4, label=f"chosen: {name}")
            elif name.startswith("learned"):
                ax.scatter(steps, loss, marker="*", s=60, color="tab:blue", zorder=3, alpha=0.6,
                           label=None if learned_labelled else "other lambda / threshold")
                learned_labelled = True
            elif name.startswith("patience"):
                ax.scatter(steps, loss, marker="s", s=40, color=next(patience_colors, "tab:gray"), zorder=2,
                           label=name)
            else:  # fixed budgets, labelled by their number
                ax.scatter(steps, loss, marker="o", s=30, color="tab:gray", zorder=2)
                ax.annotate(name.replace("budget ", "B"), (steps, loss), fontsize=7, xytext=(3, 3),
                            textcoords="offset points")
        if ref is not None:
            ax.axhline(1.01 * ref[1], color="tab:green", lw=0.8, ls="--")
            ax.axvline(0.7 * ref[0], color="tab:orange", lw=0.8, ls="--")
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FormatStrFormatter("%.2f"))
        ax.yaxis.set_minor_formatter(FormatStrFormatter("%.2f"))
        ax.tick_params(axis="y", which="minor", labelsize=7)
        ax.set_xlabel("inner steps used (mean over tasks; B: fixed budget)")
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7, loc="upper right")
    fig.suptitle(f"learned stopping against early stopping and fixed budgets; target: left of the orange line "
                 f"(30% fewer steps than patience {REFERENCE}), below the green one (1.01x its loss)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _lr_plot(path, traces, horizon):
    """Learning rate relative to the tuned constant rate: the learned controllers (one validation task, every
    seed) and every schedule as tuned for the meta-training horizon (solid) and twice it (dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(traces), figsize=(6 * len(traces), 4), squeeze=False)
    for ax, (base, tr) in zip(axes[0], traces.items()):
        colors = {}
        for name, values in tr.items():
            kind = name.split(" ")[0]
            learned = kind == "learned"
            color = colors.setdefault(kind, None if learned else f"C{len(colors)}")
            ls = "--" if name.endswith(f"@{2 * horizon})") else "-"
            ax.plot(values, label=name, lw=2 if learned else 1, ls=ls, color="black" if learned else color,
                            alpha=0.8)
        ax.axvline(horizon, color="gray", lw=0.8, ls=":")
        ax.set_yscale("log")
        ax.set_ylim(bottom=1e-2)  # cosine decays to 0: below this only its last steps would show
        ax.set_title(f"{base}: learning rate / tuned constant rate at {horizon} steps")
        ax.set_xlabel("inner step")
        ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    run_main(main)
