"""Tasks and task families: seeding, data splits, per-problem gradients, learners, the functional view."""

import pytest
import torch
from torch import nn
from torch.func import functional_call

from learned_opt.functional import FunctionalModule
from learned_opt.optim import Adam
from learned_opt.tasks import (FAMILIES, MLP, SPLITS, Digits, DigitsFamily, MetaNet, MetaNetFamily,
                               MetaNetRegression, Quadratic, QuadraticFamily, generator, get_family)
from learned_opt.tasks.digits import digits_splits
from learned_opt.unroll import unroll

SMALL_FAMILIES = {
    "quadratic": lambda: QuadraticFamily(num_problems=3),
    "metanet": lambda: MetaNetFamily(),
    "digits": lambda: DigitsFamily(batch_size=32, n_train=200),
}


def same(a, b):
    """Equal structure and exactly equal tensors."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def task_data(task):
    """Everything that defines a task's problem, as tensors."""
    if isinstance(task, Quadratic):
        return [task.W, task.y]
    return [t for split in SPLITS for t in task.data[split]]


def draw(task, seed):
    """Init and one batch per split, from a generator seeded with ``seed``."""
    g = generator(seed)
    return task.init(g), [task.sample_batch(g, s) for s in SPLITS], task.sample_batch(g, "train")


# ------------------------------------------------------------------------------------------ shared protocol

@pytest.mark.parametrize("name", sorted(SMALL_FAMILIES))
def test_every_task_follows_the_protocol(name):
    task = SMALL_FAMILIES[name]()(generator(0))
    params = task.init(generator(1))
    assert isinstance(params, list) and params and all(isinstance(p, torch.Tensor) for p in params)
    assert not any(p.requires_grad for p in params)
    for split in SPLITS:
        batch = task.sample_batch(generator(2), split)
        ps = [p.clone().requires_grad_() for p in params]
        losses = task.losses(ps, batch)
        loss = task.loss(ps, batch)
        assert losses.shape == (task.num_problems,)
        assert loss.dim() == 0 and torch.isfinite(loss)
        assert torch.allclose(loss, losses.sum())
        grads = torch.autograd.grad(loss, ps)
        assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)
    with pytest.raises(ValueError, match="'validation'"):
        task.sample_batch(generator(0), "validation")


@pytest.mark.parametrize("name", sorted(SMALL_FAMILIES))
def test_families_are_determined_by_the_generator(name):
    family = SMALL_FAMILIES[name]()
    a, b, c = family(generator(5)), family(generator(5)), family(generator(6))
    assert same(task_data(a), task_data(b))
    assert same(draw(a, 11), draw(b, 11))
    assert not same(draw(a, 11), draw(a, 12))
    if name == "digits":  # digits share the fixed splits; the training subset and init differ
        assert not same(a.data["train"], c.data["train"])
    else:
        assert not same(task_data(a), task_data(c))


@pytest.mark.parametrize("task", [lambda: Digits(generator(0), batch_size=16),
                                  lambda: MetaNetRegression(generator(0), batch_size=4)],
                         ids=["digits", "metanet"])
def test_minibatches_are_determined_by_the_generator(task):
    task = task()
    a, b, c = (task.sample_batch(generator(s), "train") for s in (1, 1, 2))
    assert same(a, b) and not same(a, c)
    g = generator(3)
    assert not same(task.sample_batch(g, "train"), task.sample_batch(g, "train"))  # the stream advances


def test_minibatches_are_drawn_without_replacement():
    from learned_opt.tasks.base import sample_minibatch

    x = torch.arange(10.0)[:, None]
    for seed in range(5):
        bx, by = sample_minibatch(x, x[:, 0].long(), 9, generator(seed))
        assert sorted(bx[:, 0].tolist()) == sorted(set(bx[:, 0].tolist())) and len(bx) == 9
        assert torch.equal(bx[:, 0].long(), by)  # inputs and targets stay paired
    bx, _ = sample_minibatch(x, x, None, generator(0))
    assert bx is x


def test_generator_helper():
    assert torch.equal(torch.rand(5, generator=generator(3)), torch.rand(5, generator=generator(3)))
    assert not torch.equal(torch.rand(5, generator=generator(3)), torch.rand(5, generator=generator(4)))


def test_tasks_do_not_touch_the_global_rng():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    for family in SMALL_FAMILIES.values():
        task = family()(generator(0))
        task.init(generator(1))
        task.sample_batch(generator(2), "train")
    assert torch.equal(torch.rand(3), expected)


def test_init_ignores_the_global_rng():
    task = MetaNetFamily()(generator(0))
    torch.manual_seed(1)
    a = task.init(generator(7))
    torch.manual_seed(2)
    b = task.init(generator(7))
    assert same(a, b)


@pytest.mark.parametrize("name,cls", [("quadratic", QuadraticFamily), ("metanet", MetaNetFamily),
                                      ("digits", DigitsFamily), ("Quadratic", QuadraticFamily)])
def test_get_family(name, cls):
    fam = get_family(name)
    assert isinstance(fam, cls)
    assert set(FAMILIES) == {"quadratic", "metanet", "digits"}


def test_get_family_passes_options_and_rejects_unknown_names():
    fam = get_family("quadratic", dim=4, num_problems=2)
    task = fam(generator(0))
    assert task.W.shape == (2, 4, 4)
    with pytest.raises(ValueError, match="'mnist'"):
        get_family("mnist")


# ----------------------------------------------------------------------------------------------- quadratic

def test_quadratic_shapes_and_loss_value():
    task = Quadratic(generator(0), dim=6, num_problems=4, dtype=torch.float64)
    (theta,) = task.init(generator(1))
    assert task.W.shape == (4, 6, 6) and task.y.shape == (4, 6) and theta.shape == (4, 6)
    assert task.W.dtype == theta.dtype == torch.float64
    want = torch.stack([((task.W[i] @ theta[i] - task.y[i]) ** 2).sum() for i in range(4)])
    assert torch.allclose(task.losses([theta]), want, rtol=1e-12)
    assert torch.allclose(task.loss([theta]), want.sum(), rtol=1e-12)
    for split in SPLITS:
        assert task.sample_batch(generator(0), split) is None


def test_quadratic_gradients_are_per_problem():
    """The gradient of the summed loss w.r.t. problem i equals the gradient of problem i alone (not 1/B)."""
    B, d = 5, 7
    task = Quadratic(generator(0), dim=d, num_problems=B, dtype=torch.float64)
    (theta,) = task.init(generator(1))
    theta.requires_grad_()
    (g_sum,) = torch.autograd.grad(task.loss([theta]), theta)
    for i in range(B):
        alone = Quadratic(generator(0), dim=d, num_problems=1, dtype=torch.float64)
        alone.W, alone.y = task.W[i:i + 1].clone(), task.y[i:i + 1].clone()
        th = theta[i:i + 1].detach().clone().requires_grad_()
        (g_alone,) = torch.autograd.grad(alone.loss([th]), th)
        assert torch.allclose(g_sum[i], g_alone[0], rtol=1e-12, atol=1e-12)
        analytic = 2 * task.W[i].T @ (task.W[i] @ theta[i].detach() - task.y[i])
        assert torch.allclose(g_sum[i], analytic, rtol=1e-10)


def test_quadratic_gaussian_and_uniform():
    gauss = Quadratic(generator(0), dim=30, num_problems=20)
    unif = Quadratic(generator(0), dim=30, num_problems=20, dist="uniform")
    assert QuadraticFamily(dist="uniform")(generator(0)).dist == "uniform"
    for t in (unif.W, unif.y):
        assert t.min() >= -1 and t.max() <= 1
    assert unif.W.var().item() == pytest.approx(1 / 3, rel=0.05)
    assert unif.W.mean().abs() < 0.02
    assert gauss.W.abs().max() > 2.5 and gauss.W.var().item() == pytest.approx(1.0, rel=0.05)
    assert not torch.equal(gauss.W, unif.W)


def test_quadratic_init_std():
    task = Quadratic(generator(0), dim=50, num_problems=40, init_std=0.1)
    (theta,) = task.init(generator(1))
    assert theta.std().item() == pytest.approx(0.1, rel=0.05)
    (zero,) = Quadratic(generator(0), init_std=0.0).init(generator(1))
    assert torch.equal(zero, torch.zeros_like(zero))


@pytest.mark.parametrize("kwargs,match", [(dict(dist="cauchy"), "'cauchy'"), (dict(dim=0), "dim.*0"),
                                          (dict(num_problems=-1), "num_problems.*-1"),
                                          (dict(init_std=-1.0), "init_std.*-1.0")])
def test_quadratic_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Quadratic(generator(0), **kwargs)


def test_quadratic_wrong_param_shape():
    task = Quadratic(generator(0), dim=4, num_problems=3)
    with pytest.raises(ValueError, match=r"\(3, 5\).*\(3, 4\)"):
        task.loss([torch.zeros(3, 5)])


def test_quadratic_bad_split():
    with pytest.raises(ValueError, match="'eval'"):
        Quadratic(generator(0)).sample_batch(generator(0), "eval")


# ------------------------------------------------------------------------------------------------- MetaNet

def layer_kinds(module):
    return [type(m) for m in module]


def test_metanet_default_architecture():
    net = MetaNet()
    assert layer_kinds(net) == [nn.Linear, nn.ReLU, nn.Linear, nn.ReLU, nn.Linear, nn.ReLU]
    assert [(m.in_features, m.out_features) for m in net if isinstance(m, nn.Linear)] == [(10, 10)] * 3
    out = net(torch.randn(64, 10, generator=generator(0)))
    assert out.shape == (64, 10) and out.min() >= 0 and (out == 0).any()  # ReLU after the last layer too


@pytest.mark.parametrize("act,cls,lo,hi", [("sigmoid", nn.Sigmoid, 0, 1), ("tanh", nn.Tanh, -1, 1)])
def test_metanet_activations(act, cls, lo, hi):
    net = MetaNet(in_dim=3, hidden=5, out_dim=2, activation=act)
    assert layer_kinds(net) == [nn.Linear, cls, nn.Linear, cls, nn.Linear, cls]
    out = net(10 * torch.randn(100, 3, generator=generator(0)))
    assert out.shape == (100, 2) and out.min() >= lo and out.max() <= hi
    linear = MetaNet(activation=act, output_activation=False)
    assert layer_kinds(linear) == [nn.Linear, cls, nn.Linear, cls, nn.Linear]


@pytest.mark.parametrize("make", [lambda: MetaNet(activation="gelu"), lambda: MLP([3, 4], "gelu"),
                                  lambda: MetaNetRegression(generator(0), activation="gelu"),
                                  lambda: MetaNetFamily(activation="gelu")(generator(0)),
                                  lambda: DigitsFamily(activation="gelu")(generator(0))])
def test_unknown_activation(make):
    with pytest.raises(ValueError, match="'gelu'"):
        make()


def test_mlp_bad_sizes():
    with pytest.raises(ValueError, match=r"\[5\]"):
        MLP([5])
    with pytest.raises(ValueError, match=r"\[5, 0, 2\]"):
        MLP([5, 0, 2])


def test_metanet_regression_defaults():
    task = MetaNetRegression(generator(0))
    student = task.fn.module
    assert isinstance(student, MetaNet)
    assert layer_kinds(student) == [nn.Linear, nn.ReLU, nn.Linear, nn.ReLU, nn.Linear]  # linear output
    assert {s: tuple(task.data[s][0].shape) for s in SPLITS} == {"train": (32, 10), "val": (256, 10),
                                                                  "test": (256, 10)}
    assert all(task.data[s][1].shape == task.data[s][0].shape for s in SPLITS)
    params = task.init(generator(1))
    assert [tuple(p.shape) for p in params] == [(10, 10), (10,)] * 3
    x, y = task.sample_batch(generator(2), "train")
    assert x is task.data["train"][0]  # full batch by default
    assert (y < 0).any()  # targets can be negative: the student needs its linear output
    assert (task.fn(params, x) < 0).any()
    assert task.loss(params, (x, y)) == pytest.approx(((task.fn(params, x) - y) ** 2).mean().item())


def test_metanet_regression_options():
    task = MetaNetRegression(generator(0), in_dim=4, hidden=6, out_dim=3, activation="tanh", n_train=8,
                             n_val=5, n_test=7, noise=0.0, batch_size=3, output_activation=True)
    assert layer_kinds(task.fn.module)[-1] is nn.Tanh
    assert task.data["train"][0].shape == (8, 4) and task.data["test"][1].shape == (7, 3)
    x, y = task.sample_batch(generator(1), "train")
    assert x.shape == (3, 4)
    rows = [i for i in range(8) if any(torch.equal(task.data["train"][0][i], r) for r in x)]
    assert len(rows) == 3  # a minibatch of distinct training rows
    assert task.sample_batch(generator(1), "val")[0].shape == (5, 4)  # evaluation uses the whole split
    # noise 0: the same teacher explains every split, so a second task with noise differs only by noise
    noisy = MetaNetRegression(generator(0), in_dim=4, hidden=6, out_dim=3, activation="tanh", n_train=8,
                              n_val=5, n_test=7, noise=0.5, batch_size=3)
    assert torch.equal(noisy.data["train"][0], task.data["train"][0])
    assert not torch.equal(noisy.data["train"][1], task.data["train"][1])


def test_metanet_family_draws_a_new_teacher_per_task():
    """Without noise the targets' covariance is the teacher's signature: it differs between tasks."""
    fam = MetaNetFamily(noise=0.0, n_val=2000)
    covs = [torch.cov(fam(generator(s)).data["val"][1].double().T) for s in range(3)]
    for i in range(3):
        for j in range(i):
            assert (covs[i] - covs[j]).norm() > 0.5 * covs[j].norm()


@pytest.mark.parametrize("kwargs,match", [(dict(n_train=0), "n_train.*0"), (dict(n_val=-3), "n_val.*-3"),
                                          (dict(noise=-0.1), "noise.*-0.1")])
def test_metanet_regression_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MetaNetRegression(generator(0), **kwargs)


def test_metanet_regression_overfits():
    """Adam on the small training set: training loss keeps falling while validation loss turns and rises."""
    task = MetaNetRegression(generator(0))
    every = 25
    res = unroll(task, Adam(lr=1e-2), steps=1500, generator=generator(1), val_every=every)
    rec = res.records
    rows = [(t, tr, va) for t, tr, va in zip(rec["step"], rec["train_loss"], rec["val_loss"]) if t % every == 0]
    assert len(rows) == 1500 // every + 1
    steps, train, val = map(list, zip(*rows))
    best = min(range(len(val)), key=val.__getitem__)
    assert 0 < best < len(val) // 4, "validation loss should bottom out early"
    assert val[-1] > 2 * val[best] and val[-1] > val[0], "validation loss should rise well above its minimum"
    assert train[-1] < 0.25 * train[best], "training loss should keep falling after the validation minimum"
    late = train[len(train) // 2:]
    assert all(b <= a * 1.05 for a, b in zip(late, late[1:]))  # still (almost) monotonically falling
    assert val[-1] > val[len(val) // 2]  # and the validation loss is still rising at the end


# -------------------------------------------------------------------------------------------------- digits

def test_digits_pools_and_splits_partition_the_dataset():
    from sklearn.datasets import load_digits

    d = load_digits()
    pools = {p: digits_splits(p) for p in ("meta", "heldout")}
    sizes = {(p, s): pools[p][s][0].shape[0] for p in pools for s in SPLITS}
    assert sizes[("meta", "val")] == sizes[("meta", "test")] == 150 and sizes[("meta", "train")] == 598
    assert sizes[("heldout", "train")] == 599
    assert sum(sizes.values()) == 1797
    rows = torch.cat([torch.cat([pools[p][s][0], pools[p][s][1][:, None].double()], 1) for p in pools
                      for s in SPLITS])
    full = torch.cat([torch.tensor(d.data, dtype=torch.float64) / 16,
                      torch.tensor(d.target, dtype=torch.float64)[:, None]], 1)
    # same multiset of (image, label) rows, each used once: a partition of the 1797 images
    key = lambda m: sorted(map(tuple, m.tolist()))
    assert key(rows) == key(full)
    assert pools["meta"]["train"][0].min() >= 0 and pools["meta"]["train"][0].max() <= 1
    # a different split seed gives a different, equally sized partition
    other = digits_splits("meta", split_seed=1)
    assert other["val"][0].shape == (150, 64) and not torch.equal(other["val"][0], pools["meta"]["val"][0])
    with pytest.raises(ValueError, match="unknown digits pool 'test'"):
        digits_splits("test")


def test_heldout_digits_tasks_train_on_images_no_meta_task_sees():
    seen = set()
    for seed in range(3):
        task = DigitsFamily()(generator(seed))
        seen |= {tuple(r) for s in SPLITS for r in task.data[s][0].double().tolist()}
    held = DigitsFamily(pool="heldout")(generator(0))
    rows = {tuple(r) for s in SPLITS for r in held.data[s][0].double().tolist()}
    assert len(rows) > 850 and not (rows & seen)
    with pytest.raises(ValueError, match="unknown digits pool"):
        DigitsFamily(pool="other")


def test_digits_task_defaults():
    task = Digits(generator(0))
    assert layer_kinds(task.fn.module) == [nn.Linear, nn.Sigmoid, nn.Linear]
    assert [tuple(p.shape) for p in task.init(generator(0))] == [(20, 64), (20,), (10, 20), (10,)]
    x, y = task.sample_batch(generator(1), "train")
    assert x.shape == (128, 64) and x.dtype == torch.float32 and y.dtype == torch.long
    assert task.sample_batch(generator(1), "test")[0].shape == (150, 64)


def test_digits_training_subset_is_drawn_from_the_train_split():
    full = digits_splits()
    train_rows = {tuple(r) for r in full["train"][0].tolist()}
    other_rows = {tuple(r) for s in ("val", "test") for r in full[s][0].tolist()}
    task = DigitsFamily(n_train=100)(generator(3))
    x, _ = task.data["train"]
    assert x.shape == (100, 64)
    rows = {tuple(r) for r in x.double().tolist()}
    assert rows <= train_rows and not (rows & other_rows - train_rows)
    assert torch.equal(task.data["val"][0], full["val"][0].float())


@pytest.mark.parametrize("n_train,match", [(0, "n_train.*0"), (5000, "5000")])
def test_digits_bad_n_train(n_train, match):
    with pytest.raises(ValueError, match=match):
        Digits(generator(0), n_train=n_train)


def test_digits_is_learnable():
    task = DigitsFamily(hidden=(32,))(generator(0))
    res = unroll(task, Adam(lr=1e-2), steps=300, generator=generator(1))
    assert task.accuracy(res.params, "test") > 0.85
    assert task.accuracy(task.init(generator(1)), "test") < 0.3
    with pytest.raises(ValueError):
        MetaNetRegression(generator(0)).accuracy(res.params)


# ----------------------------------------------------------------------------------------- functional view

class SmallConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 3, 3, padding=1)
        self.conv2 = nn.Conv2d(3, 4, 3, stride=2)
        self.head = nn.Linear(4 * 3 * 3, 5)

    def forward(self, x):
        h = torch.relu(self.conv1(x))
        h = torch.tanh(self.conv2(h))
        return self.head(h.flatten(1))


LEARNERS = {
    "mlp": (lambda: MLP([6, 8, 8, 3], "tanh"), (7, 6)),
    "conv": (SmallConv, (4, 2, 8, 8)),
}


@pytest.mark.parametrize("name", sorted(LEARNERS))
def test_functional_module_matches_functional_call(name):
    make, shape = LEARNERS[name]
    torch.manual_seed(0)
    module = make().double()
    f = FunctionalModule(module)
    names = [n for n, _ in module.named_parameters()]
    x = torch.randn(shape, dtype=torch.float64)
    params = [torch.randn_like(p).requires_grad_() for p in module.parameters()]

    out = f(params, x)
    ref = functional_call(module, dict(zip(names, params)), (x,))
    assert torch.allclose(out, ref, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(out, module(x))  # the passed parameters are used, not the module's own

    g = torch.autograd.grad((out ** 2).sum(), params, create_graph=True)
    g_ref = torch.autograd.grad((ref ** 2).sum(), params, create_graph=True)
    for a, b in zip(g, g_ref):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12) and a.abs().sum() > 0
    # second order (Hessian-vector products) flows through the passed parameters too
    v = [torch.randn_like(p) for p in params]
    hv = torch.autograd.grad(sum((a * b).sum() for a, b in zip(g, v)), params)
    hv_ref = torch.autograd.grad(sum((a * b).sum() for a, b in zip(g_ref, v)), params)
    for a, b in zip(hv, hv_ref):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)
    assert all(p.grad is None for p in module.parameters())  # the module's own weights were never touched


def test_functional_module_init_params_are_seeded():
    f = FunctionalModule(MLP([4, 5, 2]))
    a, b, c = f.init_params(generator(0)), f.init_params(generator(0)), f.init_params(generator(1))
    assert same(a, b) and not same(a, c)
    assert [tuple(p.shape) for p in a] == f.shapes


def test_functional_module_wrong_params():
    f = FunctionalModule(MLP([4, 5, 2]))
    params = f.init_params(generator(0))
    x = torch.randn(3, 4)
    with pytest.raises(ValueError, match="expected 4 parameter tensors, got 3"):
        f(params[:3], x)
    bad = list(params)
    bad[2] = torch.zeros(5, 2)
    with pytest.raises(ValueError, match=r"parameter 2 has shape \(5, 2\), expected \(2, 5\)"):
        f(bad, x)
    with pytest.raises(TypeError):
        FunctionalModule(lambda x: x)


def test_supervised_task_wrong_param_shapes():
    task = MetaNetRegression(generator(0))
    params = task.init(generator(0))
    params[0] = torch.zeros(10, 11)
    with pytest.raises(ValueError, match=r"\(10, 11\)"):
        task.loss(params, task.sample_batch(generator(0), "train"))
