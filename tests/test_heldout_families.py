"""The five held-out families added to the suite (a character-level transformer LM on bundled text, a vision
transformer on held-out digits, MetaNet on shifted data, ill-conditioned quadratics, an MLP on the diabetes table):
roles, determinism, disjoint splits, the held-out data guards, evaluate() on the test split, convergence under
Adam, batched evaluation, and an unchanged meta-training mixture."""
import dataclasses
import hashlib
import math

import numpy as np
import pytest
import torch

from learned_opt.evaluate import evaluate, evaluate_batched
from learned_opt.evaluate import batched
from learned_opt.evaluate.batched import _signature
from learned_opt.evaluate.splits import task_seed
from learned_opt.optim import get_optimizer
from learned_opt.tasks import SPLITS, generator
from learned_opt.tasks.digits import DigitsFamily, digits_splits
from learned_opt.tasks.metanet import MetaNetFamily
from learned_opt.tasks.models import TinyTransformer
from learned_opt.tasks.quadratic import QuadraticFamily
from learned_opt.tasks.suite import SUITE, MixtureFamily, heldout_families, meta_families, suite_family
from learned_opt.tasks.synthetic import LinearRegressionFamily, LogisticRegressionFamily, TeacherMLPFamily
from learned_opt.tasks.tabular import regression_splits
from learned_opt.tasks.text import TEXT_FILE, VOCAB, text_blocks, text_corpus, text_splits
from learned_opt.tasks.vision import DigitsAutoencoderFamily

NEW = ("text_transformer_lm", "digits_vit", "metanet_heldout", "quadratic_illcond", "diabetes_mlp")
OLD_HELDOUT = ("digits_cnn", "sequence_rnn", "sequence_transformer", "wine_mlp", "breast_cancer_mlp")
TEXT_SHA256 = "11c7f7d1c2cc0877081c32ee7de02cc3745fb93ae1f343e51feb165972b24620"


def adam():
    return get_optimizer("adam", lr=1e-2)


def rows(x):
    return {tuple(r) for r in x.reshape(x.shape[0], -1).tolist()}


def image_keys(x):
    """8x8 digit images (rows of 64 values k / 16) as hashable keys."""
    return {bytes(r) for r in (x.reshape(x.shape[0], -1).double() * 16).round().to(torch.int8).numpy()}


def hessian_spectrum(task):
    """Eigenvalues of the Hessian 2 W^T W of a one-problem quadratic, descending (float64)."""
    return 2 * torch.linalg.svdvals(task.W[0].double()) ** 2


# ------------------------------------------------------------------------------------------------ registry
def test_new_families_are_heldout_and_the_meta_mixture_is_unchanged():
    assert set(NEW) | set(OLD_HELDOUT) == set(heldout_families()) and len(heldout_families()) == 10
    for name in NEW:
        assert SUITE[name].role == "heldout" and SUITE[name].horizon == 200 and "ms/step" in SUITE[name].description
    assert {SUITE[n].kind for n in NEW} == {"transformer", "mlp", "quadratic"}
    # the earlier meta-training families: the same names, order, families and labels as before; the conv, recurrent
    # and attention families on new synthetic data (tests/test_suite_meta_v2.py) come after them
    assert meta_families() == ("digits_mlp_sigmoid", "digits_mlp_relu_deep", "digits_mlp_tanh_wide",
                               "digits_autoencoder", "linear_regression", "logistic_regression", "quadratic",
                               "metanet", "synthetic_mlp_regression",
                               "synthetic_cnn", "synthetic_rnn_recall", "synthetic_attention")
    expected = {
        "digits_mlp_sigmoid": DigitsFamily(hidden=(20,), activation="sigmoid", batch_size=128),
        "digits_mlp_relu_deep": DigitsFamily(hidden=(32, 32), activation="relu", batch_size=128),
        "digits_mlp_tanh_wide": DigitsFamily(hidden=(64,), activation="tanh", batch_size=128),
        "digits_autoencoder": DigitsAutoencoderFamily(hidden=(16,), activation="tanh"),
        "linear_regression": LinearRegressionFamily(), "logistic_regression": LogisticRegressionFamily(),
        "quadratic": QuadraticFamily(num_problems=1), "metanet": MetaNetFamily(),
        "synthetic_mlp_regression": TeacherMLPFamily()}
    for name, family in expected.items():
        assert SUITE[name].family == family, name
    assert MixtureFamily().names == meta_families()
    drawn = [MixtureFamily()(generator(s)).family_name for s in range(12)]
    assert all(SUITE[n].role == "meta" for n in drawn)
    with pytest.raises(ValueError, match="held-out"):
        MixtureFamily(("quadratic", "text_transformer_lm"))


def test_tiny_transformer_attention_is_unchanged():
    """The attention shared with the new blocks gives the one-layer transformer exactly its former output."""
    torch.manual_seed(0)
    m = TinyTransformer(8, 16, 2, 12)
    x = torch.randn(5, 12, 16)
    n, length, d = x.shape
    q, k, v = (t.reshape(n, length, 2, 8).transpose(1, 2) for t in m.qkv(x).chunk(3, -1))
    scores = (q @ k.transpose(-1, -2) / math.sqrt(8)).masked_fill(
        torch.ones(length, length, dtype=torch.bool).triu(1), float("-inf"))
    e = torch.exp(scores - scores.detach().amax(-1, keepdim=True))
    old = m.proj(((e / e.sum(-1, keepdim=True)) @ v).transpose(1, 2).reshape(n, length, d))
    assert torch.equal(m.attention(x), old)


# ------------------------------------------------------------------------------------------------ determinism
@pytest.mark.parametrize("name", NEW)
def test_same_task_seed_same_task(name):
    family = suite_family(name)
    state = torch.random.get_rng_state()
    tasks = [family(generator(11)) for _ in range(2)]
    inits = [t.init(generator(12)) for t in tasks]
    assert torch.equal(torch.random.get_rng_state(), state)
    if hasattr(tasks[0], "data"):
        for split in SPLITS:
            for a, b in zip(tasks[0].data[split], tasks[1].data[split]):
                assert torch.equal(a, b)
        assert [tuple(p.shape) for p in tasks[0].fn.module.parameters()] == \
            [tuple(p.shape) for p in tasks[1].fn.module.parameters()]
    else:
        assert torch.equal(tasks[0].W, tasks[1].W) and torch.equal(tasks[0].y, tasks[1].y)
    assert all(torch.equal(a, b) for a, b in zip(*inits))
    assert not all(torch.equal(a, b) for a, b in zip(inits[0], tasks[0].init(generator(13))))
    b1, b2 = (tasks[0].sample_batch(generator(14)) for _ in range(2))
    if b1 is not None:
        assert all(torch.equal(a, b) for a, b in zip(b1, b2))


@pytest.mark.parametrize("name", ["text_transformer_lm", "metanet_heldout", "quadratic_illcond", "diabetes_mlp"])
def test_tasks_differ_by_problem(name):
    """Region / width / depth (text), data and width (MetaNet), dimension and spectrum (quadratic), rows and width
    (diabetes) vary with the task seed."""
    family = suite_family(name)
    seen = set()
    for i in range(12):
        task = family(generator(task_seed("val", i)))
        if hasattr(task, "data"):
            x = task.data["train"][0]
            seen.add((x.shape, float(x.double().sum()), tuple(tuple(p.shape) for p in task.fn.module.parameters())))
        else:
            seen.add((task.dim, float(task.W.double().sum())))
    assert len(seen) >= 4


# ------------------------------------------------------------------------------------------------ text
def test_text_snapshot_is_the_bundled_one():
    with open(TEXT_FILE, "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == TEXT_SHA256
    text = text_corpus()
    assert len(VOCAB) == 96 and set(text) <= set(VOCAB) and "def " in text


def test_text_splits_are_disjoint_regions():
    blocks = text_blocks()
    spans = {"test": blocks["test"][0], "val": blocks["val"][0]}
    spans.update({f"train{r}": region for r, region in enumerate(blocks["train"])})
    chars = {}
    for name, ranges in spans.items():
        covered = set()
        for a, b in ranges:
            covered.update(range(a, b))
        for other, c in chars.items():
            assert not covered & c, f"text blocks of {name} and {other} overlap"
        chars[name] = covered
    windows = text_splits()
    test_rows, val_rows = rows(windows["test"][0][:, :-1]), rows(windows["val"][0][:, :-1])
    train_rows = set().union(*(rows(w[:, :-1]) for w in windows["train"]))
    assert not test_rows & (val_rows | train_rows) and not val_rows & train_rows
    text = text_corpus()
    # every window of a region is text of that region; the target is the input shifted by one character
    for r, w in enumerate(windows["train"]):
        region_text = "\n\n".join(text[a:b] for a, b in blocks["train"][r])
        for row in w[:: max(1, len(w) // 20)].tolist():
            assert "".join(VOCAB[i] for i in row) in region_text
    task = suite_family("text_transformer_lm")(generator(3))
    x, y = task.data["train"]
    assert torch.equal(x, windows["train"][task.region][:, :-1]) and torch.equal(x[:, 1:], y[:, :-1])
    assert torch.equal(task.data["test"][0], windows["test"][0][:, :-1])


# ------------------------------------------------------------------------------------------------ guards
def test_digits_vit_reads_only_the_heldout_pool():
    meta = set().union(*(image_keys(x) for x, _ in digits_splits("meta").values()))
    heldout = set().union(*(image_keys(x) for x, _ in digits_splits("heldout").values()))
    task = suite_family("digits_vit")(generator(0))
    images = set().union(*(image_keys(x) for x, _ in task.data.values()))
    assert images and images <= heldout, "digits_vit holds images outside the held-out pool"
    assert not images & meta, f"digits_vit holds {len(images & meta)} meta-pool images"
    for split in SPLITS:
        assert torch.equal(task.data[split][0], digits_splits("heldout")[split][0].float())


def _input_spread(task):
    """Largest / smallest eigenvalue of the sample covariance of all inputs, and the norm of their mean."""
    x = torch.cat([task.data[s][0] for s in SPLITS]).double()
    ev = torch.linalg.eigvalsh(torch.cov(x.T))
    return float(ev[-1] / ev[0]), float(x.mean(0).norm())


def test_metanet_heldout_data_distribution_differs_from_metanet():
    meta, held = suite_family("metanet"), suite_family("metanet_heldout")
    for i in range(6):
        m, h = meta(generator(task_seed("train", i))), held(generator(task_seed("test", i)))
        m_spread, m_mean = _input_spread(m)
        h_spread, h_mean = _input_spread(h)
        assert m_spread < 4 and m_mean < 0.5, "the meta-training inputs are isotropic standard normal"
        assert h_spread > 30, f"metanet_heldout inputs are not anisotropic (covariance spread {h_spread:.1f})"
        assert h_mean > 1.0, "metanet_heldout inputs are not shifted"
        widths = {p.shape[0] for p in h.fn.module.parameters() if p.dim() == 2}
        assert widths - {10} and widths - {10} <= {20, 32}
        assert h.data["train"][0].shape[0] == 64 and m.data["train"][0].shape[0] == 32


def test_quadratic_illcond_condition_numbers_lie_outside_the_meta_family():
    """Each held-out quadratic's Hessian has condition number in [1e4, 1e6] and eigenvalues spread over every
    decade (max / median = sqrt(cond) >= 100); the meta family's Gaussian 10 x 10 quadratics stay below 1e4 in
    the typical case (their condition number is heavy-tailed: one near-null direction) and their max / median
    never reaches 30."""
    held = suite_family("quadratic_illcond")
    for i in range(20):
        task = held(generator(task_seed("test", i)))
        ev = hessian_spectrum(task)
        cond = float(ev[0] / ev[-1])
        assert 1e4 * 0.99 <= cond <= 1e6 * 1.01 and cond == pytest.approx(task.cond, rel=1e-3)
        assert float(ev[0] / ev.median()) >= 99 and 16 <= task.dim <= 40
    meta_ev = torch.stack([hessian_spectrum(suite_family("quadratic")(generator(task_seed(s, i))))
                           for s in ("train", "val") for i in range(200)])
    meta_cond = meta_ev[:, 0] / meta_ev[:, -1]
    assert float(meta_cond.median()) < 1e4 and float((meta_cond >= 1e4).double().mean()) < 0.25
    assert float((meta_ev[:, 0] / meta_ev.median(1).values).max()) < 30


def test_diabetes_rows_are_disjoint_and_standardised():
    splits = regression_splits("diabetes")
    seen = {}
    for split, (x, y) in splits.items():
        r = rows(x)
        assert len(r) == x.shape[0] and y.shape == (x.shape[0], 1)
        for other, r2 in seen.items():
            assert not r & r2, f"diabetes {split} and {other} share rows"
        seen[split] = r
    x, y = splits["train"]
    for t in (x, y):
        assert torch.allclose(t.mean(0), torch.zeros_like(t[0]), atol=1e-9)
        assert torch.allclose(t.std(0), torch.ones_like(t[0]), atol=1e-9)
    task = suite_family("diabetes_mlp")(generator(5))
    assert rows(task.data["train"][0].double()) <= rows(x.float().double())
    assert task.data["train"][0].shape[0] == round(0.8 * x.shape[0])
    assert not rows(task.data["test"][0].double()) & rows(task.data["train"][0].double())


@pytest.mark.parametrize("name", meta_families())
def test_meta_families_never_read_diabetes_or_text(name):
    task = suite_family(name)(generator(0))
    if not hasattr(task, "data"):
        return
    x = torch.cat([task.data[s][0].reshape(task.data[s][0].shape[0], -1) for s in SPLITS])
    dx = torch.cat([v[0] for v in regression_splits("diabetes").values()]).float()
    assert x.shape[1] != dx.shape[1] or not rows(x.float()) & rows(dx)
    if not x.is_floating_point():  # token data: only the synthetic sequence families, and never a text window
        assert SUITE[name].data == "synthetic-sequences", "a meta family holds token data"
        tx = torch.cat([w[:, :-1] for windows in text_splits().values() for w in windows])
        assert x.shape[1] != tx.shape[1] or not rows(x) & rows(tx), f"{name} holds text"


# ------------------------------------------------------------------------------------------------ running
@pytest.mark.parametrize("name", NEW)
def test_evaluate_on_test_split_and_adam_converges(name):
    family = suite_family(name)
    result = evaluate(family, adam(), None, num_tasks=2, steps=100, split="test", checkpoints=[0])
    assert result.curves.shape == (2, 101) and np.isfinite(result.curves).all()
    assert result.stop_steps == [100, 100] and result.split == "test"
    start, end = result.at[0]["train_loss"], result.at[100]["train_loss"]
    assert np.isfinite(result.at[100]["test_loss"]).all() and np.isfinite(result.at[100]["val_loss"]).all()
    assert (end < 0.8 * start).all(), f"{name}: Adam took the train loss from {start} to {end}"
    if SUITE[name].loss == "cross_entropy":
        acc = np.asarray(result.accuracy)
        assert ((acc > 0.15) & (acc <= 1)).all()


@pytest.mark.parametrize("name", ["digits_vit", "metanet_heldout", "diabetes_mlp",
                                  "text_transformer_lm", "sequence_transformer"])
def test_evaluate_batched_batches_and_agrees(name, monkeypatch):
    family = suite_family(name)
    if name == "diabetes_mlp":  # one architecture, so that the 4 tasks form one batch
        family = dataclasses.replace(family, widths=(32,), depths=(2,))
    if name == "metanet_heldout":
        family = dataclasses.replace(family, widths=(20,))
    if name == "text_transformer_lm":
        family = dataclasses.replace(family, widths=(24,), depths=(1,))  # sequence models: classes on dim 1
    tasks = [family(generator(task_seed("val", i))) for i in range(4)]
    assert len({_signature(t) for t in tasks}) == 1 and _signature(tasks[0]) is not None
    a = evaluate(family, adam(), None, num_tasks=4, steps=8, split="val")

    def refuse(*args, **kwargs):
        raise AssertionError("evaluate_batched ran the tasks one by one")
    monkeypatch.setattr(batched, "_one_by_one", refuse)
    b = evaluate_batched(family, adam(), num_tasks=4, steps=8, split="val")
    assert np.allclose(a.curves, b.curves, rtol=1e-4, atol=1e-6)
    for metric in ("train_loss", "val_loss", "test_loss"):
        assert np.allclose(a.at[8][metric], b.at[8][metric], rtol=1e-4, atol=1e-6)


def test_evaluate_batched_runs_quadratics_alone():
    family = suite_family("quadratic_illcond")
    assert evaluate_batched(family, adam(), num_tasks=4, steps=6, split="val").curves.tolist() == \
        evaluate(family, adam(), None, num_tasks=4, steps=6, split="val").curves.tolist()
