"""The conv, recurrent and attention meta-training families on new synthetic data (synthetic_cnn,
synthetic_rnn_recall, synthetic_attention): registration after the earlier meta families, determinism from the task
seed, distinct train / val / test data, convergence under Adam, per-task variety of width, batch size and data size,
data that is neither digits nor Markov chains nor text, and both functional backends."""
import dataclasses
import math

import numpy as np
import pytest
import torch

from learned_opt.evaluate import batched, evaluate, evaluate_batched
from learned_opt.evaluate.batched import _signature
from learned_opt.evaluate.splits import task_seed
from learned_opt.optim import Adam, get_optimizer
from learned_opt.tasks import SPLITS, generator
from learned_opt.tasks import digits as digits_module
from learned_opt.tasks import synthetic as synthetic_module
from learned_opt.tasks import synthetic_models as sm
from learned_opt.tasks import text as text_module
from learned_opt.tasks.digits import POOLS, digits_splits
from learned_opt.tasks.suite import SUITE, MixtureFamily, heldout_families, meta_families, suite_family
from learned_opt.tasks.synthetic import SequenceTask
from learned_opt.tasks.text import text_splits
from learned_opt.unroll import unroll

NEW = ("synthetic_cnn", "synthetic_rnn_recall", "synthetic_attention")
KIND = {"synthetic_cnn": "cnn", "synthetic_rnn_recall": "rnn", "synthetic_attention": "transformer"}
DATA = {"synthetic_cnn": "synthetic-images", "synthetic_rnn_recall": "synthetic-sequences",
        "synthetic_attention": "synthetic-sequences"}
SEEDS = range(24)


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: on a busy 2-core machine two threads made these tiny learners up to 60x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def rows(x):
    return {tuple(r) for r in x.reshape(x.shape[0], -1).tolist()}


def width(task):
    """The learner's width: conv channels, recurrent hidden units or d_model."""
    return {"cnn": lambda: task.channels, "rnn": lambda: task.hidden, "transformer": lambda: task.d_model}[
        KIND[task.family_name]]()


def draw(name, seed):
    task = suite_family(name)(generator(seed))
    task.family_name = name
    return task


# ------------------------------------------------------------------------------------------------ registry
def test_registered_as_meta_after_the_earlier_meta_families():
    meta = meta_families()
    assert meta[-3:] == NEW and len(meta) == 12
    names = list(SUITE)
    assert names.index("synthetic_attention") < min(names.index(n) for n in heldout_families())
    for name in NEW:
        entry = SUITE[name]
        assert (entry.role, entry.kind, entry.data, entry.loss, entry.horizon) == \
            ("meta", KIND[name], DATA[name], "cross_entropy", 200)
        assert "ms/step" in entry.description
    assert MixtureFamily().names == meta_families()
    drawn = {MixtureFamily(NEW)(generator(s)).family_name for s in range(20)}
    assert drawn == set(NEW)
    task = MixtureFamily(NEW, augment_scale=3.0)(generator(0))  # task augmentation applies
    assert len(task.scales) == len(task.init(generator(1)))


# ------------------------------------------------------------------------------------------------ determinism
@pytest.mark.parametrize("name", NEW)
def test_same_seed_same_task_other_seed_other_task(name):
    state = torch.random.get_rng_state()
    a, b, c = draw(name, 5), draw(name, 5), draw(name, 6)
    init_a, init_b = a.init(generator(7)), b.init(generator(7))
    assert torch.equal(torch.random.get_rng_state(), state), "building or initialising a task drew global RNG"
    for split in SPLITS:
        for ta, tb in zip(a.data[split], b.data[split]):
            assert ta.dtype == tb.dtype and torch.equal(ta, tb)
    assert repr(a.fn.module) == repr(b.fn.module) and a.batch_size == b.batch_size
    assert all(torch.equal(p, q) for p, q in zip(init_a, init_b))
    # another task seed: other data (and, where the architecture agrees, another init for the same init seed)
    for split in SPLITS:
        xa, xc = a.data[split][0], c.data[split][0]
        assert xa.shape != xc.shape or not torch.equal(xa, xc)
    init_c = c.init(generator(7))
    if [p.shape for p in init_a] == [p.shape for p in init_c]:
        assert any(not torch.equal(p, q) for p, q in zip(init_a, init_c))
    # another init seed: another init, same data; same batch seed: same batch
    assert not all(torch.equal(p, q) for p, q in zip(init_a, a.init(generator(8))))
    assert all(torch.equal(p, q) for p, q in zip(a.sample_batch(generator(9)), b.sample_batch(generator(9))))


@pytest.mark.parametrize("name", NEW)
def test_train_val_test_hold_different_data(name):
    task = draw(name, 3)
    (xtr, ytr), (xva, yva), (xte, yte) = (task.data[s] for s in SPLITS)
    assert xva.shape[0] == xte.shape[0] == 256 and xtr.shape[0] in sm.TRAIN_SIZES
    seen = {s: rows(task.data[s][0]) for s in SPLITS}
    assert all(len(seen[s]) == task.data[s][0].shape[0] for s in SPLITS), "a split repeats an input"
    assert not seen["train"] & seen["val"] and not seen["train"] & seen["test"] and not seen["val"] & seen["test"]
    # the same task distribution in every split: the same input shape and every class present
    assert xtr.shape[1:] == xva.shape[1:] == xte.shape[1:]
    assert set(yva.unique().tolist()) <= set(ytr.unique().tolist())


def test_sequence_targets_are_the_tasks_answers():
    recall = draw("synthetic_rnn_recall", 0)
    x, y = recall.data["train"]
    keys, vals, query = x[:, :-1:2], x[:, 1::2], x[:, -1:]
    assert ((keys == query).sum(1) == 1).all(), "the query is exactly one of the sequence's keys"
    assert torch.equal(vals[keys == query], y) and (y >= recall.keys).all()
    assert all(len(set(r)) == recall.pairs for r in keys.tolist()), "keys repeat inside a sequence"
    sort = draw("synthetic_attention", 0)
    assert isinstance(sort, SequenceTask)
    x, y = sort.data["train"]
    assert torch.equal(y, x.sort(1).values) and int(x.max()) < sort.vocab


# ------------------------------------------------------------------------------------------------ variety
@pytest.mark.parametrize("name", NEW)
def test_width_batch_size_and_data_size_vary_across_task_seeds(name):
    tasks = [draw(name, s) for s in SEEDS]
    assert len({t.batch_size for t in tasks}) >= 3
    assert len({t.data["train"][0].shape[0] for t in tasks}) >= 3
    assert len({width(t) for t in tasks}) >= 3
    assert len({tuple(tuple(p.shape) for p in t.fn.module.parameters()) for t in tasks}) >= 8
    if name == "synthetic_cnn":
        assert {t.pattern for t in tasks} == {"bars", "teacher"} and {t.side for t in tasks} == {8, 10}
        assert {len(t.channels) for t in tasks} == {1, 2} and {t.classes for t in tasks} == {3, 4, 5}
    elif name == "synthetic_rnn_recall":
        assert {t.cell for t in tasks} == {"elman", "gru"} and {t.pairs for t in tasks} == {2, 3, 4}
    else:
        assert len({t.length for t in tasks}) >= 3 and len({t.vocab for t in tasks}) >= 3


# ------------------------------------------------------------------------------------------------ training
@pytest.mark.parametrize("name", NEW)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_adam_reduces_the_training_loss_well_below_its_start(name, seed):
    task = draw(name, seed)
    params = task.init(generator(100 + seed))
    with torch.no_grad():
        before = float(task.split_losses(params, "train")[0])
    result = unroll(task, Adam(lr=1e-2), steps=300, generator=generator(200 + seed), params=params)
    with torch.no_grad():
        after = float(task.split_losses(result.params, "train")[0])
        val = float(task.split_losses(result.params, "val")[0])
    assert math.isfinite(after) and math.isfinite(val)
    assert after < 0.7 * before, f"{name} seed {seed}: train loss {before:.3f} -> {after:.3f}"
    # held-out accuracy above chance: one of the classes (CNN), of the values (recall), of the vocabulary (sorting)
    chance = 1 / {"synthetic_cnn": lambda: task.classes, "synthetic_rnn_recall": lambda: task.values,
                  "synthetic_attention": lambda: task.vocab}[name]()
    assert task.accuracy(result.params, "test") > 1.5 * chance


ONE_SHAPE = {  # one architecture, batch size and data size per family, so that 4 tasks form one batch
    "synthetic_cnn": dict(sides=(8,), classes=(4, 4), depths=(2,), channels=(8,), batch_sizes=(32,),
                          train_sizes=(256,)),
    "synthetic_rnn_recall": dict(pairs=(3, 3), keys=(10, 10), values=(8, 8), cells=("gru",), hidden=(16,),
                                 batch_sizes=(32,), train_sizes=(256,)),
    "synthetic_attention": dict(lengths=(6, 6), vocabs=(10, 10), widths=(16,), batch_sizes=(32,),
                                train_sizes=(256,))}


@pytest.mark.parametrize("name", NEW)
def test_evaluate_batched_batches_and_agrees(name, monkeypatch):
    family = dataclasses.replace(suite_family(name), **ONE_SHAPE[name])
    tasks = [family(generator(task_seed("val", i))) for i in range(4)]
    assert len({_signature(t) for t in tasks}) == 1 and _signature(tasks[0]) is not None
    a = evaluate(family, get_optimizer("adam", lr=1e-2), None, num_tasks=4, steps=8, split="val")

    def refuse(*args, **kwargs):
        raise AssertionError("evaluate_batched ran the tasks one by one")
    monkeypatch.setattr(batched, "_one_by_one", refuse)
    b = evaluate_batched(family, get_optimizer("adam", lr=1e-2), num_tasks=4, steps=8, split="val")
    assert np.allclose(a.curves, b.curves, rtol=1e-4, atol=1e-6)
    for metric in ("train_loss", "val_loss", "test_loss"):
        assert np.allclose(a.at[8][metric], b.at[8][metric], rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------------------------ held out stays out
FORBIDDEN = {digits_module: ("_load", "digits_splits", "DigitsFamily"),
             synthetic_module: ("markov_chain", "sample_markov", "MarkovSequenceFamily"),
             text_module: ("text_corpus", "text_splits", "text_blocks", "TextLMFamily")}


def test_the_module_binds_no_digits_markov_or_text_generator():
    for home, names in FORBIDDEN.items():
        for n in names:
            assert not any(v is getattr(home, n) for v in vars(sm).values()), f"synthetic_models binds {n}"
    assert "digits" not in vars(sm) and "text" not in vars(sm) and "vision" not in vars(sm)


@pytest.mark.parametrize("name", NEW)
def test_building_tasks_reads_no_digits_markov_or_text(name, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a held-out data source was read")
    for home, names in FORBIDDEN.items():
        for n in names:
            monkeypatch.setattr(home, n, refuse)
    import sklearn.datasets
    monkeypatch.setattr(sklearn.datasets, "load_digits", refuse)
    for s in range(6):
        task = suite_family(name)(generator(s))
        task.loss(task.init(generator(0)), task.sample_batch(generator(1)))


@pytest.mark.parametrize("name", NEW)
def test_data_share_nothing_with_digits_or_text(name):
    assert SUITE[name].data == DATA[name] and not SUITE[name].data.startswith(("digits", "text", "sklearn"))
    digit_rows = set().union(*(rows(x) for pool in POOLS for x, _ in digits_splits(pool).values()))
    text_windows = torch.cat([w[:, :-1] for windows in text_splits().values() for w in windows])
    for s in range(4):
        task = draw(name, s)
        x = torch.cat([task.data[split][0].reshape(task.data[split][0].shape[0], -1) for split in SPLITS])
        if name == "synthetic_cnn":
            assert x.is_floating_point() and x.shape[1] in (64, 100)
            assert not rows(x.double()) & digit_rows
        else:  # tokens: never a text window, and not a Markov chain's next token (targets are not the inputs shifted)
            assert not x.is_floating_point() and x.shape[1] != text_windows.shape[1]
            y = task.data["train"][1]
            assert y.dim() == 1 or not torch.equal(y[:, :-1], task.data["train"][0][:, 1:])


# ------------------------------------------------------------------------------------------------ pieces
def test_draw_unique_splits_refuses_a_space_too_small():
    with pytest.raises(ValueError, match="distinct"):
        sm.draw_unique_splits(lambda n: (torch.randint(3, (n, 2), generator=generator(0)), torch.zeros(n)),
                              (8, 2, 2), max_rounds=5)
    data = sm.draw_unique_splits(lambda n: (torch.randint(4, (n, 2)), torch.zeros(n)), (8, 4, 4))
    assert sum(x.shape[0] for x, _ in data.values()) == 16


def test_families_refuse_bad_arguments():
    with pytest.raises(ValueError, match="pattern"):
        sm.SyntheticImageFamily(patterns=("digits",))
    with pytest.raises(ValueError, match="depths"):
        sm.SyntheticImageFamily(depths=(3,))
    with pytest.raises(ValueError, match="cell"):
        sm.AssociativeRecallFamily(cells=("lstm",))
    with pytest.raises(ValueError, match="pairs"):
        sm.AssociativeRecallFamily(pairs=(2, 9), keys=(8, 8))
    with pytest.raises(ValueError, match="heads"):
        sm.SortingFamily(widths=(15,))
    with pytest.raises(ValueError, match="batch_sizes"):
        sm.SortingFamily(batch_sizes=())


def test_teacher_labels_use_every_class():
    for s in range(6):
        task = dataclasses.replace(SUITE["synthetic_cnn"].family, patterns=("teacher",))(generator(s))
        counts = torch.bincount(task.data["train"][1], minlength=task.classes)
        assert (counts > 0).all() and counts.max() < 0.6 * counts.sum(), counts.tolist()
