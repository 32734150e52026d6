"""The one statistics module (learned_opt/evaluate/bootstrap.py and stats.py): the nested bootstrap resamples
families, then tasks within each drawn family, then seeds within each drawn task (not crossed); a single unit is the
identity; family resampling widens a disagreeing interval; the interval covers a known mean at about its level;
Wilcoxon claims stop at the test's floor; verdicts need the whole interval; final runs need 5 seeds."""
import math
import time

import numpy as np
import pytest

from learned_opt.evaluate import (family_ratio, hierarchical_bootstrap, paired, percentile_interval,
                                  protocol_record, require_final_seeds, verdict, wilcoxon_floor)
from learned_opt.evaluate.bootstrap import nested_means


def crossed_means(rng, x, m):
    """The old design for comparison: one seed draw shared by every task of a replicate."""
    S, T = x.shape
    si, ti = rng.integers(0, S, size=(m, S)), rng.integers(0, T, size=(m, T))
    return x[si[:, :, None], ti[:, None, :]].mean(axis=(1, 2))


def test_seeds_are_drawn_per_task_not_shared():
    # value = seed index + 100 x task index: a replicate's draws can be read back from the values
    S, T, m = 5, 4, 2000
    x = np.arange(S)[:, None] + 100.0 * np.arange(T)[None, :]
    rng = np.random.default_rng(0)
    ti = rng.integers(0, T, size=(m, T))
    si = rng.integers(0, S, size=(m, T, S))
    vals = x[si, ti[:, :, None]]  # what nested_means averages, (m, T, S)
    np.testing.assert_allclose(nested_means(np.random.default_rng(0), x, m), vals.mean(axis=(1, 2)))
    seeds_drawn = vals % 100  # (m, T, S): the seed indices each drawn task got
    # nested: different drawn tasks of one replicate get different seed draws (crossed: always identical)
    differs = np.any(seeds_drawn[:, 0, :] != seeds_drawn[:, 1, :], axis=1)
    assert differs.mean() > 0.9


def test_nested_interval_differs_from_crossed_where_one_seed_is_an_outlier_in_one_task():
    # one seed is an outlier (value v) in one task only. With k copies of that task in a replicate (k ~ Bin(T, 1/T))
    # and Y = (copies of the seed) / S: crossed, one Y is shared by the k copies, so the replicate is v k Y / T;
    # nested, each copy draws its own Y, so it is v (Y_1 + ... + Y_k) / T. Their variances differ in k's term:
    # crossed E[k^2] Var(Y) + Var(k) E[Y]^2, nested E[k] Var(Y) + Var(k) E[Y]^2 (times v^2 / T^2)
    S, T, m, v = 5, 10, 20000, 50.0
    x = np.zeros((S, T))
    x[0, 3] = v
    nested = nested_means(np.random.default_rng(1), x, m)
    crossed = crossed_means(np.random.default_rng(1), x, m)
    Ek, Vk, EY, VY = 1.0, 1 - 1 / T, 1 / S, (1 / S) * (1 - 1 / S) / S
    scale = v ** 2 / T ** 2
    assert nested.var() == pytest.approx(scale * (Ek * VY + Vk * EY ** 2), rel=0.1)
    assert crossed.var() == pytest.approx(scale * ((Vk + Ek ** 2) * VY + Vk * EY ** 2), rel=0.1)
    assert nested.var() < crossed.var()


def test_one_family_one_seed_is_a_plain_task_bootstrap():
    x = np.random.default_rng(2).normal(size=12)
    out = hierarchical_bootstrap({"f": x[None, :]}, n_boot=3000, seed=7)
    idx = np.random.default_rng(7).integers(0, 12, size=(3000, 12))
    lo, hi = percentile_interval(x[idx].mean(1))
    assert (out["ci_low"], out["ci_high"]) == (lo, hi)
    assert out["estimate"] == pytest.approx(x.mean()) and out["resampled"] == ["tasks"]


def test_family_resampling_widens_the_interval_when_families_disagree():
    rng = np.random.default_rng(3)
    per_family = {f: rng.normal(loc, 0.1, size=(5, 8)) for f, loc in zip("abcd", (-1.0, -0.3, 0.2, 1.0))}
    both = hierarchical_bootstrap(per_family, seed=0)
    fixed = hierarchical_bootstrap(per_family, seed=0, resample_families=False)
    assert both["resampled"] == ["families", "tasks", "seeds"] and fixed["resampled"] == ["tasks", "seeds"]
    assert both["estimate"] == pytest.approx(fixed["estimate"])
    assert both["ci_high"] - both["ci_low"] > 5 * (fixed["ci_high"] - fixed["ci_low"])


def test_coverage_of_a_known_hierarchical_mean():
    # family effects, task effects within a family, seed noise within a task; true mean 0
    rng = np.random.default_rng(4)
    F, T, S, runs, covered = 8, 6, 5, 200, 0
    for _ in range(runs):
        fam = rng.normal(0, 1.0, size=F)
        data = {f: fam[f] + rng.normal(0, 0.5, size=T)[None, :] + rng.normal(0, 0.5, size=(S, T))
                for f in range(F)}
        out = hierarchical_bootstrap(data, n_boot=400, seed=int(rng.integers(1 << 30)))
        covered += out["ci_low"] <= 0.0 <= out["ci_high"]
    # a percentile bootstrap with 8 families undercovers a little; far outside this range it is broken
    assert 0.85 <= covered / runs <= 0.99


def test_vectorised_speed():
    rng = np.random.default_rng(5)
    data = {f: rng.normal(size=(5, 20)) for f in range(15)}
    t = time.perf_counter()
    hierarchical_bootstrap(data, n_boot=4000)
    assert time.perf_counter() - t < 1.0


def test_paired_keys_and_nested_intervals():
    rng = np.random.default_rng(6)
    base = rng.uniform(1, 2, size=8)
    learned = base * rng.uniform(0.6, 0.9, size=(5, 8))
    p = paired(learned, base)
    assert p["ci"] == "hierarchical_bootstrap" and p["resampled"] == ["tasks", "seeds"]
    assert p["ci_low"] <= p["ratio"] <= p["ci_high"] < 1
    lo, hi = p["ratio_of_means_ci"]
    assert lo <= p["ratio_of_means"] <= hi < 1
    # the same numbers as the module's nested bootstrap of the per-task ratios
    ref = hierarchical_bootstrap({"": learned / base}, n_boot=4000, seed=0)
    assert (p["ci_low"], p["ci_high"]) == (ref["ci_low"], ref["ci_high"])
    assert len(p["per_seed_ratio"]) == 5 and p["per_seed_t_ci"][0] < p["ratio"] < p["per_seed_t_ci"][1]


def test_wilcoxon_claim_needs_six_tasks():
    assert wilcoxon_floor(5) == pytest.approx(0.0625) and wilcoxon_floor(6) == pytest.approx(0.03125)
    for n, claim in ((5, False), (6, True)):
        base = np.linspace(1.0, 2.0, n)
        p = paired(0.5 * base, base)  # learned better on every task: the smallest p the test can give
        assert p["wilcoxon_claim"] is claim and p["wilcoxon_floor"] == pytest.approx(2 / 2 ** n)
        assert p["wilcoxon_p"] >= p["wilcoxon_floor"] - 1e-12


def test_verdict_needs_the_whole_interval():
    assert verdict({"ci_low": 0.8, "ci_high": 0.95}, 1.0) == "met"
    assert verdict({"ci_low": 0.8, "ci_high": 1.0}, 1.0) == "met"
    assert verdict({"ci_low": 0.8, "ci_high": 1.05}, 1.0).startswith("not met (interval crosses")
    assert verdict({"ci_low": 1.1, "ci_high": 1.3}, 1.0) == "not met"
    assert verdict({"ci_low": math.nan, "ci_high": 0.5}, 1.0) == "not met (undefined interval)"


def test_family_ratio_resamples_families_and_keeps_the_floor_a_parameter():
    base = np.array([1e-9, 1.0, 2.0])
    learned = np.stack([np.array([0.0, 0.5, 1.0])] * 2)
    # below the floor both count as the floor: the first task is a tie, not a ratio of roundings
    r = family_ratio({"a": (learned, base), "b": (learned * 0.5, base)}, floor=1e-6, n_boot=500)
    assert r["families"]["a"] == pytest.approx(0.5 ** (2 / 3))
    assert r["floor"] == 1e-6 and r["resampled"] == ["families", "tasks", "seeds"]
    assert r["families_fixed"]["resampled"] == ["tasks", "seeds"]
    assert r["ci_high"] - r["ci_low"] >= r["families_fixed"]["ci_high"] - r["families_fixed"]["ci_low"]
    assert len(r["per_seed_ratio"]) == 2
    one = family_ratio({"a": (learned[:1], base), "b": (learned[:1] * 0.5, base)}, floor=1e-6, n_boot=100)
    # one seed (a reproducibility check's re-run): its per-seed value is the ratio, and no t interval
    assert one["per_seed_ratio"] == [pytest.approx(one["ratio"])] and "per_seed_t_ci" not in one
    unfloored = family_ratio({"a": (learned, base)}, floor=0.0, n_boot=100)
    assert unfloored["families"]["a"] == 0.0  # 0 / 1e-9 without a floor: the rounding decides


def test_protocol_record_and_final_seeds():
    rec = protocol_record(meta_training_seeds=5, validation_tasks=20, tuning_metric="val_loss",
                          test_split="test (draw 1)", test_tasks=20, extra_key=1)
    assert rec["ci"] == "hierarchical_bootstrap" and "seeds" in rec["ci_resampling"] and rec["extra_key"] == 1
    with pytest.raises(ValueError, match="--seeds 3: a final run needs at least 5"):
        require_final_seeds(3, True)
    require_final_seeds(3, False)  # development
    require_final_seeds(3, True, smoke=True)  # smoke
    require_final_seeds(5, True)
