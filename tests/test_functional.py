"""The functional view of ``nn.Module`` learners (:mod:`learned_opt.functional`): the ``higher`` and
``torch.func`` backends agree on outputs, gradients, Hessian-vector products, meta-gradients through an unroll
and buffers; the backend is chosen by argument or by ``LEARNED_OPT_FUNCTIONAL``."""
import sys

import pytest
import torch
from torch import nn

from learned_opt.functional import BACKENDS, ENV_VAR, FunctionalModule, default_backend
from learned_opt.optim.learned import CoordLSTM
from learned_opt.tasks import DigitsFamily, MetaNetFamily
from learned_opt.tasks.base import generator
from learned_opt.tasks.supervised import MLP, SupervisedTask
from learned_opt.unroll import unroll


class SmallConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.head = nn.Linear(3 * 4 * 4, 5)

    def forward(self, x):
        return self.head(torch.tanh(self.conv(x)).flatten(1))


LEARNERS = {
    "mlp": (lambda: MLP([6, 8, 8, 3], "tanh"), (7, 6)),
    "conv": (SmallConv, (4, 2, 4, 4)),
}


def max_diff(xs, ys):
    return max(float((x - y).detach().abs().max()) for x, y in zip(xs, ys))


@pytest.mark.parametrize("name", sorted(LEARNERS))
def test_backends_agree_on_outputs_gradients_and_hessian_vector_products(name):
    make, shape = LEARNERS[name]
    torch.manual_seed(0)
    module = make().double()
    fns = {b: FunctionalModule(module, backend=b) for b in BACKENDS}
    assert {b: f.backend for b, f in fns.items()} == {"higher": "higher", "func": "func"}
    x = torch.randn(shape, dtype=torch.float64)
    params = [torch.randn_like(p).requires_grad_() for p in module.parameters()]
    outs, grads, hvps = {}, {}, {}
    v = [torch.randn_like(p) for p in params]
    for b, f in fns.items():
        out = f(params, x)
        g = torch.autograd.grad((out ** 2).sum(), params, create_graph=True)
        hv = torch.autograd.grad(sum((a * w).sum() for a, w in zip(g, v)), params)
        outs[b], grads[b], hvps[b] = out, g, hv
    assert not torch.allclose(outs["func"], module(x))  # the passed parameters are used, not the module's own
    assert max_diff([outs["higher"]], [outs["func"]]) <= 1e-12
    assert max_diff(grads["higher"], grads["func"]) <= 1e-12
    assert max_diff(hvps["higher"], hvps["func"]) <= 1e-12
    assert all(float(h.abs().sum()) > 0 for h in hvps["func"])
    assert all(p.grad is None for p in module.parameters())  # the module's own weights were never touched


def _meta_gradient(family, backend, monkeypatch):
    """Losses and the second-order meta-gradient of a CoordLSTM's summed losses over a 6-step unroll, with the
    task built by ``family`` under ``LEARNED_OPT_FUNCTIONAL=backend`` (the way a family picks the backend)."""
    monkeypatch.setenv(ENV_VAR, backend)
    task = family(generator(3))
    assert task.fn.backend == backend
    torch.manual_seed(0)
    net = CoordLSTM(hidden=4, init_zero=False, output_scale=0.01, base="sgd", base_lr=0.1,
                    base_lr_range=0.5).double()
    res = unroll(task, net, steps=6, generator=generator(4), differentiable=True, second_order=True)
    total = sum(res.train_losses)
    # the decision heads take no part without a controller: only the update path's weights
    weights = [p for n, p in net.named_parameters() if not n.startswith("heads.")]
    meta = torch.autograd.grad(total, weights)
    return [l.detach() for l in res.train_losses], meta


@pytest.mark.parametrize("family", [
    DigitsFamily(hidden=(8,), batch_size=32, n_train=128, dtype=torch.float64),
    MetaNetFamily(dtype=torch.float64),
], ids=["digits", "metanet"])
def test_backends_agree_on_second_order_meta_gradients_through_an_unroll(family, monkeypatch):
    """Measured: identical to the last bit on this CPU (max difference 0.0 in float64)."""
    losses_h, meta_h = _meta_gradient(family, "higher", monkeypatch)
    losses_f, meta_f = _meta_gradient(family, "func", monkeypatch)
    assert len(set(float(l) for l in losses_h)) == len(losses_h)  # the parameters move
    assert max_diff(losses_h, losses_f) <= 1e-12
    scale = max(float(g.abs().max()) for g in meta_h)
    assert scale > 0
    assert max_diff(meta_h, meta_f) <= 1e-10 * scale
    print(f"max |higher - func|: losses {max_diff(losses_h, losses_f):.3g}, meta-gradient "
          f"{max_diff(meta_h, meta_f):.3g} (largest entry {scale:.3g})")


class WithBatchNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 4)
        self.bn = nn.BatchNorm1d(4)

    def forward(self, x):
        return self.bn(self.lin(x))


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_backends_treat_buffers_alike(mode):
    """Each view updates the running statistics of its own module copy (train mode), never the original's,
    and reads them in eval mode; both backends give the same outputs and buffers call after call."""
    torch.manual_seed(0)
    module = WithBatchNorm().double()
    getattr(module, mode)()
    fns = {b: FunctionalModule(module, backend=b) for b in BACKENDS}
    module.train()  # later mode changes of the original do not reach the views (a copy taken at construction)
    params = [p.detach().clone() for p in module.parameters()]
    original = [b.clone() for b in module.buffers()]
    for step in range(3):
        x = torch.randn(8, 3, dtype=torch.float64)
        outs = {b: f(params, x) for b, f in fns.items()}
        torch.testing.assert_close(outs["higher"], outs["func"], rtol=0, atol=1e-12)
        bufs = {b: f.buffers() for b, f in fns.items()}
        for a, c in zip(bufs["higher"], bufs["func"]):
            torch.testing.assert_close(a, c, rtol=0, atol=1e-12)
        assert int(bufs["func"][-1]) == (step + 1 if mode == "train" else 0)  # num_batches_tracked
    for a, b in zip(original, module.buffers()):
        assert torch.equal(a, b)


def test_environment_variable_chooses_the_default_backend(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert default_backend() == "higher"
    assert FunctionalModule(MLP([2, 2])).backend == "higher"
    monkeypatch.setenv(ENV_VAR, "func")
    assert FunctionalModule(MLP([2, 2])).backend == "func"
    assert FunctionalModule(MLP([2, 2]), backend="higher").backend == "higher"  # an explicit choice wins
    data = {s: (torch.randn(4, 2), torch.randn(4, 2)) for s in ("train", "val", "test")}
    assert SupervisedTask(MLP([2, 2]), data).fn.backend == "func"
    assert SupervisedTask(MLP([2, 2]), data, backend="higher").fn.backend == "higher"
    monkeypatch.setenv(ENV_VAR, "jax")
    with pytest.raises(ValueError, match=rf"{ENV_VAR}='jax'.*higher, func"):
        FunctionalModule(MLP([2, 2]))
    with pytest.raises(ValueError, match=r"unknown functional backend 'torch'.*higher, func"):
        FunctionalModule(MLP([2, 2]), backend="torch")


def test_func_backend_works_without_higher(monkeypatch):
    """With ``higher`` not importable the func backend still runs, and the higher backend says what to do."""
    monkeypatch.setitem(sys.modules, "higher", None)  # makes `import higher` raise ImportError
    f = FunctionalModule(MLP([3, 2]), backend="func")
    assert f(f.init_params(generator(0)), torch.randn(5, 3)).shape == (5, 2)
    with pytest.raises(ImportError, match=f"{ENV_VAR}=func"):
        FunctionalModule(MLP([3, 2]), backend="higher")
