"""The every-hyper-parameter tuning axes (:data:`PROTOCOL_AXES`) and the ``log0`` axis kind (weight decay: positive,
log-spaced values whose widening downwards ends at 0), next to the unchanged :data:`BASELINE_AXES` (cached tuning
results are keyed by them)."""
from __future__ import annotations

import inspect
import json
import math
import warnings
from dataclasses import asdict

import numpy as np
import pytest
import torch

from learned_opt.evaluate import Axis, coordinate_search, tune_baseline
from learned_opt.evaluate.baselines import BASELINE_AXES, PROTOCOL_AXES, make_baseline
from learned_opt.evaluate.search import LOG0_FLOOR, point_key
from learned_opt.optim import get_optimizer


def test_baseline_axes_are_exactly_as_before():
    """Every experiment's cached tuning scores are keyed by these axes (``asdict``): they must not move."""
    m = {"name": "momentum", "values": (0.5, 0.9, 0.99), "kind": "log1m", "start": 0.9, "refine": False}
    b1 = {"name": "beta1", "values": (0.5, 0.9, 0.99), "kind": "log1m", "start": 0.9, "refine": False}
    b2 = {"name": "beta2", "values": (0.99, 0.999, 0.9999), "kind": "log1m", "start": 0.999, "refine": False}
    alpha = {"name": "alpha", "values": (0.9, 0.99, 0.999), "kind": "log1m", "start": 0.99, "refine": False}
    want = {"sgd": [], "momentum": [m], "nesterov": [m], "adam": [b1, b2], "adamw": [b1, b2], "rmsprop": [alpha]}
    assert {k: [asdict(a) for a in v] for k, v in BASELINE_AXES.items()} == want


def test_the_older_kinds_widen_as_before():
    log1m = Axis("m", (0.5, 0.9, 0.99), "log1m")
    assert log1m.extend([0.5, 0.9, 0.99], "low") == [0.0, 0.5, 0.9, 0.99]
    assert log1m.extend([0.5, 0.9, 0.99], "high") == [0.5, 0.9, 0.99, 0.998]
    assert log1m.extend([0.0, 0.5, 0.9], "low") is None
    log = Axis("lr", (1e-3, 1e-2), "log")
    assert log.extend([1e-3, 1e-2], "low") == [1e-4, 1e-3, 1e-2] and log.extend([1e-3, 1e-2], "high")[-1] == 0.1


# ---------------------------------------------------------------------------------------------------------
# the log0 kind


def _search(score, axis, **kw):
    calls = []

    def counted(p):
        calls.append(dict(p))
        return score(p)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a grid-edge warning would fail the test
        res = coordinate_search(counted, [axis], **kw)
    return res, calls


def test_log0_widening_reaches_zero_and_stops_there():
    """Less decay is always better: the grid widens by its ratio down to LOG0_FLOOR, then to 0, a domain edge."""
    res, calls = _search(lambda p: p["wd"], Axis("wd", (1e-3, 1e-2, 1e-1), "log0", start=1e-2))
    assert res.best == {"wd": 0.0} and res.edges == {"wd": "domain"}
    assert res.grids["wd"] == [0.0, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1]
    assert res.widened == {"wd": 4} and len(calls) == 7  # each point once
    assert min(v for v in res.grids["wd"] if v > 0) >= LOG0_FLOOR
    # the widenings run out just as 0 is reached: 0 is still a domain edge, not a grid edge (no warning)
    res, _ = _search(lambda p: p["wd"], Axis("wd", (1e-3, 1e-2, 1e-1), "log0", start=1e-2), max_widen=4)
    assert res.best == {"wd": 0.0} and res.edges == {"wd": "domain"} and res.widened == {"wd": 4}


def test_log0_grid_holding_zero_stops_at_once_and_finds_an_interior_optimum():
    axis = Axis("wd", (0.0, 1e-4, 1e-3), "log0", start=0.0)
    res, calls = _search(lambda p: p["wd"], axis)
    assert res.best == {"wd": 0.0} and res.edges == {"wd": "domain"} and res.widened == {"wd": 0}
    assert len(calls) == 3
    res, _ = _search(lambda p: (math.log10(p["wd"]) + 3.7) ** 2 if p["wd"] > 0 else 5.0, axis)
    assert res.best == {"wd": 1e-4} and res.edges == {"wd": "interior"} and res.widened == {"wd": 0}


def test_log0_finds_an_interior_optimum_below_and_above_its_grid():
    axis = Axis("wd", (1e-3, 1e-2, 1e-1), "log0", start=1e-2)
    res, _ = _search(lambda p: (math.log10(p["wd"]) + 4.3) ** 2 if p["wd"] > 0 else 30.0, axis)
    assert res.best == {"wd": 1e-4} and res.edges == {"wd": "interior"} and res.widened == {"wd": 2}
    assert res.grids["wd"][0] == 1e-5  # the neighbour below, which brackets it
    res, _ = _search(lambda p: (math.log10(p["wd"]) - 1.2) ** 2 if p["wd"] > 0 else 30.0, axis)
    assert res.best == {"wd": 10.0} and res.edges == {"wd": "interior"} and res.widened == {"wd": 3}


def test_log0_search_warns_when_still_at_a_grid_edge():
    axis = Axis("wd", (1e-3, 1e-2, 1e-1), "log0", start=1e-2)
    with pytest.warns(UserWarning, match="best wd .* still at the edge"):
        res = coordinate_search(lambda p: -p["wd"], [axis], max_widen=2)
    assert res.edges == {"wd": "grid"} and res.best == {"wd": 10.0}


def test_log0_values_are_stable_cache_keys():
    """Widened values are rounded like every grid value (0.003 / 10 is 0.00030000000000000003 in floating point,
    0.7 * 10 is 6.999999999999998), and a key read back from JSON keys the same point."""
    axis = Axis("wd", (0.003, 0.03, 0.3), "log0")
    grid = axis.extend(list(axis.values), "low")
    assert grid[0] == 0.0003 and point_key({"wd": grid[0]}) == '{"wd": 0.0003}'
    assert Axis("wd", (0.007, 0.07, 0.7), "log0").extend([0.007, 0.07, 0.7], "high")[-1] == 7.0
    assert point_key({"wd": 0.0}) == '{"wd": 0.0}'
    res, _ = _search(lambda p: p["wd"], Axis("wd", (1e-3, 1e-2, 1e-1), "log0", start=1e-2))
    keys = [point_key({k: v for k, v in row.items() if k != "score"}) for row in res.table]
    assert len(set(keys)) == len(keys) == 7
    assert all(point_key(json.loads(k)) == k for k in keys)


@pytest.mark.parametrize("values", [(-1e-3, 1e-2), (0.0, 0.0), (1e-3, math.inf), (1e-3, math.nan)])
def test_log0_rejects_bad_grids(values):
    with pytest.raises(ValueError, match="wd"):
        Axis("wd", values, "log0")


# ---------------------------------------------------------------------------------------------------------
# PROTOCOL_AXES

EXPECTED = {"sgd": [], "momentum": ["momentum"], "nesterov": ["momentum"],
            "adam": ["beta1", "beta2", "eps", "weight_decay"], "adamw": ["beta1", "beta2", "eps", "weight_decay"],
            "rmsprop": ["alpha", "eps"], "muon": ["momentum", "weight_decay", "adam_lr"]}
TORCH = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "rmsprop": torch.optim.RMSprop}


def _field(opt, name):
    return opt.betas[0] if name == "beta1" else opt.betas[1] if name == "beta2" else getattr(opt, name)


def test_protocol_axes_cover_every_hyperparameter_with_small_grids_started_at_the_defaults():
    assert {k: [a.name for a in v] for k, v in PROTOCOL_AXES.items()} == EXPECTED
    for name, axes in PROTOCOL_AXES.items():
        default = get_optimizer(name)
        for a in axes:
            assert len(a.values) == 3 and a.start in a.values and not a.refine, (name, a)
            assert a.start == _field(default, a.name), (name, a.name)
            if a.name == "weight_decay":
                assert a.kind == "log0"
            if a.name == "eps":
                assert a.kind == "log" and a.start == 1e-8
        if name in TORCH:  # the starts are torch.optim's own defaults, not only ours
            sig = inspect.signature(TORCH[name]).parameters
            for a in axes:
                want = sig["betas"].default[a.name == "beta2"] if a.name.startswith("beta") else sig[a.name].default
                assert a.start == want, (name, a.name)
    if hasattr(torch.optim, "Muon"):
        sig = inspect.signature(torch.optim.Muon).parameters
        assert [a.start for a in PROTOCOL_AXES["muon"][:2]] == [sig["momentum"].default, sig["weight_decay"].default]
        assert PROTOCOL_AXES["muon"][2].start == inspect.signature(torch.optim.AdamW).parameters["lr"].default


@pytest.mark.parametrize("name", sorted(PROTOCOL_AXES))
def test_make_baseline_builds_each_optimizer_from_every_axis(name):
    """Each axis's value reaches its field (beta1 / beta2 -> betas; Muon's adam_lr, weight_decay, momentum)."""
    axes = PROTOCOL_AXES[name]
    for a in axes:
        other = next(v for v in a.values if v != a.start)
        point = {"lr": 0.05, **{b.name: b.start for b in axes}, a.name: other}
        opt = make_baseline(name, point)
        assert opt.lr == 0.05 and _field(opt, a.name) == other, (name, a.name)
        for b in axes:
            if b is not a:
                assert _field(opt, b.name) == b.start


def _fake_evaluate(score_of):
    """An evaluate() whose every task scores ``score_of(optimizer)``: the whole tuning chain, no training."""
    from learned_opt.evaluate import EvalResult

    def fake(family, opt, ctrl=None, *, num_tasks, steps, checkpoints=(), **kw):
        v = np.full(num_tasks, score_of(opt))
        return EvalResult(np.zeros((num_tasks, steps + 1)), {h: {"train_loss": v} for h in {*checkpoints, steps}})
    return fake


def test_tune_baseline_searches_every_protocol_axis_and_can_end_at_zero_decay(monkeypatch, tmp_path):
    """AdamW on a separable score: every axis brackets its optimum; decay, always harmful here, ends at 0."""
    from learned_opt.evaluate import tuning

    def score(opt):
        b1, b2 = opt.betas
        return ((math.log10(opt.lr) + 2.2) ** 2 + (math.log10(1 - b1) + 1.1) ** 2 + (math.log10(1 - b2) + 2.6) ** 2
                + (math.log10(opt.eps) + 6.2) ** 2 + 10 * opt.weight_decay)
    evals = []
    fake = _fake_evaluate(score)
    monkeypatch.setattr(tuning, "evaluate", lambda *a, **k: evals.append(1) or fake(*a, **k))
    res = tune_baseline("adamw", object(), horizons=[50], extra=PROTOCOL_AXES["adamw"], cache_dir=str(tmp_path))
    r = res[(50, "train_loss")]
    assert set(r.hparams) == {"lr", "beta1", "beta2", "eps", "weight_decay"}
    assert r.hparams["weight_decay"] == 0.0 and r.edges["weight_decay"] == "domain"
    assert r.hparams["beta1"] == 0.9 and r.hparams["eps"] == 1e-6
    assert all(r.edges[k] == "interior" for k in ("lr", "beta1", "beta2", "eps"))
    assert abs(math.log10(r.hparams["lr"]) + 2.2) <= 0.0625 + 1e-9  # refined to 1/8 decade
    assert len(evals) == len(r.table) < 60, len(evals)  # each point evaluated once (cached); measured: 35
