"""The task suite: roles and data sources, disjoint real-data splits, determinism, every family trainable, the
meta-training mixture, and both functional backends on the hand-written learners."""
import dataclasses
import math

import pytest
import torch

from learned_opt.optim import Adam
from learned_opt.tasks import SPLITS, generator
from learned_opt.tasks.augment import Reparametrized
from learned_opt.tasks.digits import POOLS, digits_splits
from learned_opt.tasks.suite import (DATA, KINDS, SUITE, MixtureFamily, SuiteEntry, heldout_families,
                                     meta_families, suite_family)
from learned_opt.tasks.synthetic import MarkovSequenceFamily
from learned_opt.tasks.tabular import DATASETS, tabular_splits
from learned_opt.unroll import unroll

NAMES = sorted(SUITE)
HELDOUT_ONLY_DATA = {"sklearn-wine", "sklearn-breast_cancer", "digits-heldout"}


def problem_tensors(task):
    """Everything that defines a task's problem: its data splits, or a quadratic's W and y."""
    if hasattr(task, "data"):
        return [t for split in SPLITS for t in task.data[split]]
    return [task.W, task.y]


def rows(x):
    """The rows of a 2-d tensor as a set of tuples (exact duplicates collapse)."""
    return {tuple(r) for r in x.reshape(x.shape[0], -1).tolist()}


def assert_disjoint(splits, what):
    """No row of ``splits``' inputs occurs in two splits, nor twice in one."""
    seen = {}
    for split, (x, _) in splits.items():
        r = rows(x)
        assert len(r) == x.shape[0], f"{what}: duplicate rows inside {split}"
        for other, r2 in seen.items():
            assert not (r & r2), f"{what}: {split} and {other} share rows"
        seen[split] = r


def test_suite_size_roles_and_registry():
    assert len(SUITE) >= 13
    meta, heldout = meta_families(), heldout_families()
    assert len(heldout) >= 5 and len(meta) >= 8
    assert set(meta) | set(heldout) == set(SUITE) and not set(meta) & set(heldout)
    for name, entry in SUITE.items():
        assert entry.name == name and suite_family(name) is entry.family
        assert entry.horizon == 200 and entry.description
    with pytest.raises(ValueError, match="no_such_family"):
        suite_family("no_such_family")
    with pytest.raises(ValueError, match="kind"):
        SuiteEntry("x", "meta", None, "resnet", "synthetic")


def test_heldout_families_are_novel():
    meta_kinds = {SUITE[n].kind for n in meta_families()}
    meta_data = {SUITE[n].data for n in meta_families()}
    assert any(SUITE[n].data not in meta_data for n in heldout_families())
    # the CNN, RNN and transformer classes are meta-trained on new synthetic images / sequences only: every held-out
    # family of those classes reads a data source that no meta-training family of its class reads
    assert {"cnn", "rnn", "transformer"} <= {SUITE[n].kind for n in heldout_families()} & meta_kinds
    for n in heldout_families():
        if SUITE[n].kind in ("cnn", "rnn", "transformer"):
            assert SUITE[n].data not in {SUITE[m].data for m in meta_families() if SUITE[m].kind == SUITE[n].kind}, n
    assert set(KINDS) >= {e.kind for e in SUITE.values()} and set(DATA) >= {e.data for e in SUITE.values()}


@pytest.mark.parametrize("name", meta_families())
def test_meta_families_never_read_heldout_data(name):
    """By label, and by content: a meta task's inputs share no row with any held-out data source."""
    entry = SUITE[name]
    assert entry.data not in HELDOUT_ONLY_DATA
    task = entry.family(generator(0))
    if not hasattr(task, "data"):
        return
    x = torch.cat([task.data[s][0].reshape(task.data[s][0].shape[0], -1) for s in SPLITS]).double()
    for pool in POOLS:
        px = torch.cat([v[0] for v in digits_splits(pool).values()])
        if x.shape[1] == px.shape[1]:
            shared = rows(x.float()) & rows(px.float())
            if pool == "heldout":
                assert not shared, f"{name} reads held-out digits"
            elif entry.data == "digits-meta":
                assert shared == rows(x.float()), f"{name}: not every image comes from the meta pool"
    for ds in DATASETS:
        tx = torch.cat([v[0] for v in tabular_splits(ds).values()])
        assert x.shape[1] != tx.shape[1] or not rows(x.float()) & rows(tx.float()), f"{name} reads {ds}"


def test_real_data_splits_are_disjoint():
    for pool in POOLS:
        assert_disjoint(digits_splits(pool), f"digits {pool}")
    meta = torch.cat([v[0] for v in digits_splits("meta").values()])
    heldout = torch.cat([v[0] for v in digits_splits("heldout").values()])
    assert not rows(meta) & rows(heldout), "digits meta and heldout pools share images"
    for ds in DATASETS:
        splits = tabular_splits(ds)
        assert_disjoint(splits, ds)
        x = splits["train"][0]
        # standardised with the training rows' statistics
        assert torch.allclose(x.mean(0), torch.zeros_like(x[0]), atol=1e-9)
        assert torch.allclose(x.std(0), torch.ones_like(x[0]), atol=1e-9)
        assert splits["val"][0].mean(0).abs().max() > 1e-6  # val rows are not standardised by themselves


@pytest.mark.parametrize("name", [n for n in NAMES if SUITE[n].data != "synthetic"])
def test_real_data_tasks_have_disjoint_splits(name):
    assert_disjoint(suite_family(name)(generator(0)).data, name)


def test_tabular_splits_reject_bad_arguments():
    with pytest.raises(ValueError, match="iris"):
        tabular_splits("iris")
    with pytest.raises(ValueError, match="val_frac"):
        tabular_splits("wine", val_frac=0.6, test_frac=0.5)


def _draw(family, seed):
    g = generator(seed)
    task = family(g)
    return task, task.init(g)


@pytest.mark.parametrize("name", NAMES)
def test_determinism_and_no_global_rng(name):
    family = suite_family(name)
    state = torch.random.get_rng_state()
    task_a, init_a = _draw(family, 3)
    task_b, init_b = _draw(family, 3)
    assert torch.equal(torch.random.get_rng_state(), state), "building or initialising a task drew global RNG"
    for a, b in zip(problem_tensors(task_a) + init_a, problem_tensors(task_b) + init_b):
        assert a.dtype == b.dtype and torch.equal(a, b)
    _, init_c = _draw(family, 4)
    if [a.shape for a in init_a] == [c.shape for c in init_c]:
        # every randomly initialised tensor is redrawn (constant ones, e.g. LayerNorm's, may repeat)
        for i, (a, c) in enumerate(zip(init_a, init_c)):
            assert a.unique().numel() == 1 or not torch.equal(a, c), f"{name}: tensor {i} ignores the seed"
    # same task, different init generator: different init, same data order for the same batch generator
    assert not all(torch.equal(a, c) for a, c in zip(task_a.init(generator(5)), task_a.init(generator(6))))


@pytest.mark.parametrize("name", ["linear_regression", "logistic_regression", "synthetic_mlp_regression",
                                  "sequence_rnn", "sequence_transformer", "metanet", "quadratic"])
def test_synthetic_tasks_differ_by_problem(name):
    a, b = problem_tensors(suite_family(name)(generator(0))), problem_tensors(suite_family(name)(generator(1)))
    assert len(a) != len(b) or any(x.shape != y.shape or not torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("name", NAMES)
def test_every_family_trains(name):
    entry = SUITE[name]
    task = entry.family(generator(0))
    params = task.init(generator(1))
    batch = task.sample_batch(generator(2), "train")
    losses = task.losses(params, batch)
    assert losses.shape == (1,) and torch.isfinite(losses).all()
    assert torch.isfinite(task.loss(params, batch)) and task.loss(params, batch).dim() == 0
    for split in SPLITS:
        sl = task.split_losses(params, split)
        assert sl.shape == (1,) and torch.isfinite(sl).all()
    if entry.loss == "cross_entropy":
        assert task.loss_name == "cross_entropy"
        for split in SPLITS:
            assert 0.0 <= task.accuracy(params, split) <= 1.0
    elif entry.loss == "mse":
        assert task.loss_name == "mse"
    before = float(task.split_losses(params, "train")[0])
    result = unroll(task, Adam(lr=1e-2), steps=30, generator=generator(2), params=params)
    after = float(task.split_losses(result.params, "train")[0])
    assert math.isfinite(after) and after < 0.95 * before, f"{name}: train loss {before:.4f} -> {after:.4f}"


def test_sequence_accuracy_counts_every_position():
    task = suite_family("sequence_transformer")(generator(0))
    x, y = task.data["test"]
    assert x.shape == y.shape and torch.equal(x[:, 1:], y[:, :-1])  # targets are the inputs shifted by one
    params = task.init(generator(1))
    with torch.no_grad():
        pred = task.fn(params, x).argmax(1)
    assert pred.shape == y.shape
    assert task.accuracy(params, "test") == pytest.approx(float((pred == y).float().mean()))


@pytest.mark.parametrize("family", [
    SUITE["sequence_rnn"].family, SUITE["sequence_transformer"].family,
    MarkovSequenceFamily(model="rnn", cell="gru"), SUITE["digits_cnn"].family,
    *(SUITE[n].family for n in ("text_transformer_lm", "digits_vit", "synthetic_cnn", "synthetic_rnn_recall",
                                "synthetic_attention"))])
def test_functional_backends_agree(family):
    """Every model class with its own forward (convolutions, recurrence, attention, the held-out and the
    meta-training ones): the two functional backends give the same loss and gradients."""
    tasks = {b: dataclasses.replace(family, backend=b)(generator(0)) for b in ("higher", "func")}
    assert tasks["higher"].fn.backend == "higher" and tasks["func"].fn.backend == "func"
    out = {}
    for backend, task in tasks.items():
        params = [p.requires_grad_() for p in task.init(generator(1))]
        loss = task.loss(params, task.sample_batch(generator(2)))
        out[backend] = (loss, torch.autograd.grad(loss, params))
    assert torch.allclose(out["higher"][0], out["func"][0], rtol=1e-6, atol=1e-7)
    for gh, gf in zip(out["higher"][1], out["func"][1]):
        assert torch.allclose(gh, gf, rtol=1e-5, atol=1e-7)


def test_mixture_samples_meta_families_only_and_covers_them():
    mix = MixtureFamily()
    assert mix.names == meta_families()
    g = generator(0)
    seen = []
    for _ in range(200):
        task = mix(g)
        assert SUITE[task.family_name].role == "meta"
        seen.append(task.family_name)
    assert set(seen) == set(meta_families())


def test_mixture_refuses_heldout_and_unknown_names():
    for name in heldout_families():
        with pytest.raises(ValueError, match=name):
            MixtureFamily(("quadratic", name))
    task = MixtureFamily(heldout_families(), allow_heldout=True)(generator(0))
    assert task.family_name in heldout_families()
    with pytest.raises(ValueError, match="nope"):
        MixtureFamily(("nope",))
    with pytest.raises(ValueError, match="augment_scale"):
        MixtureFamily(("quadratic",), augment_scale=0.5)
    with pytest.raises(ValueError):
        MixtureFamily(())


def test_mixture_is_deterministic_and_augments():
    mix = MixtureFamily(("digits_mlp_relu_deep", "linear_regression", "metanet"), augment_scale=4.0)
    a, b = mix(generator(7)), mix(generator(7))
    assert a.family_name == b.family_name
    assert isinstance(a, Reparametrized) and a.scales == b.scales
    assert all(0.25 <= c <= 4.0 for c in a.scales) and len(set(a.scales)) > 1
    assert all(torch.equal(x, y) for x, y in zip(a.init(generator(1)), b.init(generator(1))))
    names = {mix(generator(s)).family_name for s in range(30)}
    assert len(names) == 3
    plain = MixtureFamily(("quadratic",))(generator(7))
    assert not isinstance(plain, Reparametrized) and plain.family_name == "quadratic"
