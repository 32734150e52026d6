"""Ship new general weights only if they beat the shipped ones on validation tasks (issue #24, item 5).

The rule, fixed here before any candidate is compared (``--rule_keys``, ``--max_regression``):

- both recipes were evaluated by ``general.py --final false`` (validation tasks of the held-out families, stream
  ``dev``: no test task decides what ships) with the same families, horizon, task counts and tuned baselines;
- the incumbent's evaluation holds the weights shipped now (found by their SHA-256 among its seeds);
- the candidate's seed average beats the incumbent's on the geometric mean of the ``rule_keys`` headline ratios
  (each ratio: learned / tuned baseline, lower is better), no single one of them is more than ``max_regression``
  times the incumbent's, and it diverges no more often.

Seed averages are compared (the recipe), not single seeds: the seed that ships is chosen by ``general_train.py``
on validation tasks of the meta-training families (its ``summary.json``'s ``chosen_seed``). On success the chosen
seed's weights are registered as ``--name`` with a model card that states what they were trained on and the
measured validation numbers, and lists every unmet target as a known failure; otherwise nothing is written and the
script exits 1 saying which part of the rule failed.

    python experiments/general.py --final false --horizon 200 --cache_dir results/general/tuning_cache \\
        --jobs_dir results/general/dev/jobs --train_dir results/general/train_v2d --out_dir results/general/dev/v2d
    python experiments/general.py --final false --horizon 200 --cache_dir results/general/tuning_cache \\
        --jobs_dir results/general/dev/jobs --train_dir results/general/train_v3a --out_dir results/general/dev/v3a
    python experiments/general_promote.py --candidate_train results/general/train_v3a \\
        --candidate_eval results/general/dev/v3a --incumbent_eval results/general/dev/v2d

(``make promote`` runs the three, for ``CANDIDATE=v3a`` against ``INCUMBENT=v2d`` by default; v2b's verdict, not
promoted, is in ``results/general/dev/v2b/promotion.json``, v2d's, promoted over v1, in ``dev/v2d/promotion.json``. ``--cache_dir``: the committed tuning scores and single-rate sweeps,
validation tasks only, are re-used; ``--jobs_dir``: the second evaluation re-uses the first one's baseline runs, keyed on the
files a baseline run executes (``general_runs.BASELINE_SOURCES``); both evaluations resume from their cached jobs,
which are committed with them under ``results/general/dev``: validation tasks only, no reported result.)
"""
from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import asdict, dataclass

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import parse_config, write_json  # noqa: E402

from learned_opt import pretrained  # noqa: E402

# what must match between the two evaluations (their config's part), besides the families and horizons
CONFIG_COMPARABLE = ("tune_tasks", "test_tasks", "long_factor", "long_axes", "baselines", "loss_floor", "test_draw")


@dataclass
class Config:
    """The promotion of the general optimizer; every field is a command-line flag."""
    candidate_train: str = "results/general/train_v3a"  # general_train.py's out_dir of the candidate recipe
    candidate_eval: str = "results/general/dev/v3a"  # general.py --final false of candidate_train
    incumbent_eval: str = "results/general/dev/v2d"  # general.py --final false of the seeds the shipped weights are from
    rule_keys: tuple = ("train_vs_tuned_adam_1x", "train_vs_tuned_adam_10x", "test_vs_tuned_adam")
    max_regression: float = 1.1  # no rule headline may be more than this times the incumbent's
    name: str = "general"
    ship_dir: str = ""  # the catalogue (default: the package's learned_opt/pretrained)
    dry_run: bool = False  # decide and print, write nothing


def _load(path: str, what: str) -> dict:
    if not os.path.isfile(path):
        raise ValueError(f"--{what}: {path} does not exist")
    with open(path) as f:
        return json.load(f)


def _key_facts(s: dict) -> dict:
    return {"families_evaluated": s["families_evaluated"], "horizons": s["horizons"],
            **{k: s["config"].get(k) for k in CONFIG_COMPARABLE}}


def check_comparable(cand: dict, inc: dict) -> None:
    """Both evaluations on validation tasks, with the same protocol."""
    for s, flag in ((cand, "candidate_eval"), (inc, "incumbent_eval")):
        split = s["protocol"].get("test_split", "")
        if not split.startswith("val"):
            raise ValueError(f"--{flag}: evaluated on {split!r}; a promotion is decided on validation tasks only "
                             "(general.py --final false)")
        if not s["config"].get("smoke", False) and len(s["seeds"]) < 5:
            raise ValueError(f"--{flag}: {len(s['seeds'])} meta-training seeds, fewer than the protocol's 5")
    a, b = _key_facts(cand), _key_facts(inc)
    diff = [k for k in a if a[k] != b[k]]
    if diff:
        raise ValueError(f"--candidate_eval and --incumbent_eval differ in {', '.join(diff)}: not comparable")


def decide(cfg: Config, cand: dict, inc: dict) -> dict:
    """The rule's verdict with its numbers."""
    missing = [k for k in cfg.rule_keys if k not in cand or k not in inc]
    if missing:
        raise ValueError(f"--rule_keys: {', '.join(missing)} missing from an evaluation summary")
    ratios = {k: {"candidate": cand[k]["ratio"], "incumbent": inc[k]["ratio"]} for k in cfg.rule_keys}

    def gmean(side):
        vals = [ratios[k][side] for k in cfg.rule_keys]
        return math.exp(sum(math.log(v) for v in vals) / len(vals)) if all(0 < v < math.inf for v in vals) \
            else math.inf
    g_cand, g_inc = gmean("candidate"), gmean("incumbent")
    worse = [k for k, r in ratios.items() if not r["candidate"] <= cfg.max_regression * r["incumbent"]]
    div_c, div_i = cand["divergences"]["count"], inc["divergences"]["count"]
    failures = []
    if not g_cand < g_inc:
        failures.append(f"geometric mean of {', '.join(cfg.rule_keys)}: candidate {g_cand:.4g} is not below the "
                        f"incumbent's {g_inc:.4g}")
    if worse:
        failures.append(f"more than {cfg.max_regression:g}x the incumbent on {', '.join(worse)}")
    if div_c > div_i:
        failures.append(f"{div_c} divergences against the incumbent's {div_i}")
    return {"promote": not failures, "failures": failures, "ratios": ratios, "gmean": {"candidate": g_cand,
                                                                                      "incumbent": g_inc},
            "divergences": {"candidate": div_c, "incumbent": div_i}, "rule": {"keys": list(cfg.rule_keys),
                                                                              "max_regression": cfg.max_regression}}


def model_card(cfg: Config, train: dict, cand: dict, seed: int) -> dict:
    """The manifest fields of the promoted weights: what they were trained on, measured validation numbers, and
    every unmet target of the candidate's evaluation as a known failure."""
    tc = train["config"]
    heads = ", ".join(f"{k} {cand[k]['ratio']:.3g} [{cand[k]['ci_low']:.3g}, {cand[k]['ci_high']:.3g}]"
                      for k in ("train_vs_tuned_adam_1x", "train_vs_tuned_adam_10x", "test_vs_tuned_adam",
                                "train_vs_best_single_adam_lr_1x") if k in cand)
    h = cand["horizons"]
    fails = [f"{k}: {cand[k]['ratio']:.3g} [{cand[k]['ci_low']:.3g}, {cand[k]['ci_high']:.3g}] against the bound "
             f"{cand[k]['bound']} (validation tasks of the held-out families, {len(cand['seeds'])} seeds)"
             for k, met in cand["targets_met"].items() if met is False and isinstance(cand.get(k), dict)
             and "ratio" in cand[k]]
    d, s = cand["divergences"], cand["late_spikes"]
    if d["count"]:
        fails.append(f"{d['count']} divergences in {d['runs']} validation runs")
    if not s["met"]:
        fails.append(f"late spikes in {s['count']} of {s['runs']} validation runs ({s['fraction']:.3f})")
    hours = sum(r["train_seconds"] for r in train["seeds"]) / 3600
    return dict(
        description=f"General learned optimizer ({tc['normalize']} normalisation, {tc['estimator']} meta-training): "
                    "a per-parameter MLP update rule with a learned step-size scheduler, 4 floats of state per "
                    f"parameter. Validation tasks of the held-out families (seed average of {len(cand['seeds'])} "
                    f"seeds, untuned, against baselines tuned per family; 1x = {h['1x']} steps, 10x = {h['10x']}): "
                    f"{heads}. Final-test numbers: results/general/summary.json.",
        meta_trained_on=", ".join(train["families"]) + f" (per-tensor reparametrisation in "
                                                       f"[1/{tc['augment']:g}, {tc['augment']:g}])",
        horizons=[int(x) for x in tc["sample_horizons"]],
        budget=f"{len(train['seeds'])} seeds x {tc['iterations']} meta-iterations, {tc['estimator']} (truncation "
               f"{tc['truncation']}), meta-loss {tc['meta_loss']}; {hours:.1f} CPU-hours of meta-training in all; "
               f"seed {seed} shipped (chosen on validation tasks of the meta-training families)",
        source_command=f"python experiments/general_promote.py --candidate_train {cfg.candidate_train} "
                       f"--candidate_eval {cfg.candidate_eval} --incumbent_eval {cfg.incumbent_eval}",
        known_failures=fails or ["none measured on the validation tasks; see results/general/summary.json"])


def main(argv=None) -> dict:
    """Decide; on success register the candidate's chosen seed. Exit 1 when the rule refuses."""
    cfg = parse_config(Config, {}, argv)
    try:
        cand = _load(os.path.join(cfg.candidate_eval, "summary.json"), "candidate_eval")
        inc = _load(os.path.join(cfg.incumbent_eval, "summary.json"), "incumbent_eval")
        train = _load(os.path.join(cfg.candidate_train, "summary.json"), "candidate_train")
        if not cfg.max_regression >= 1:
            raise ValueError(f"--max_regression must be >= 1, got {cfg.max_regression}")
        check_comparable(cand, inc)
        shipped = inc.get("shipped_seed", {})
        if shipped.get("seed") is None:
            raise ValueError(f"--incumbent_eval: none of its seeds is the shipped {cfg.name!r} (by SHA-256): it "
                             "does not evaluate the weights a promotion would replace")
        seed = train["chosen_seed"]
        weights = os.path.join(cfg.candidate_train, f"seed{seed}", "lopt.pt")
        if seed not in cand["seeds"]:
            raise ValueError(f"--candidate_eval did not evaluate seed {seed}, the one --candidate_train chose")
    except (ValueError, KeyError) as e:
        sys.exit(f"error: {e}")
    verdict = decide(cfg, cand, inc)
    record = {"config": asdict(cfg), "verdict": verdict, "seed": seed, "weights": weights}
    if verdict["promote"] and not cfg.dry_run:
        record["entry"] = pretrained.register_file(cfg.name, weights, overwrite=True, directory=cfg.ship_dir or None,
                                                   **model_card(cfg, train, cand, seed))
    if not cfg.dry_run:
        write_json(os.path.join(cfg.candidate_eval, "promotion.json"), record)
    print(("promoted" if verdict["promote"] else "not promoted") + f": {cfg.candidate_train} seed {seed}; geometric "
          f"mean {verdict['gmean']['candidate']:.4g} vs the incumbent's {verdict['gmean']['incumbent']:.4g}"
          + "".join(f"\n  - {f}" for f in verdict["failures"]))
    if not verdict["promote"]:
        sys.exit(1)
    return record


if __name__ == "__main__":
    main()
