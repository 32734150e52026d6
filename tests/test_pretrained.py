"""The shipped pretrained optimizers (:mod:`learned_opt.pretrained`) and the drop-in :class:`LearnedOptimizer`.

Every name in the catalogue is checked by the same parametrised tests (so a new entry such as ``general`` is
covered by adding it); then the drop-in's contract: ``lr`` an exact multiplier, dtypes, parameters without
gradients, ``total_steps`` reaching the controller, argument errors, state-dict resume, schedulers, and the
three-line usage of the README.
"""
from __future__ import annotations

import copy
import hashlib
import io
import json
import math
import os
import pathlib
import subprocess
import sys

import pytest
import torch
from torch import nn

import learned_opt
from learned_opt import pretrained
from learned_opt.control import Decision
from learned_opt.dropin import LearnedOptimizer
from learned_opt.optim import SGD, ProtocolOptimizer

NAMES = pretrained.list_pretrained()
SHIPPED = ("digits_lstm", "metanet_lstm", "quadratic_lstm")


def _model(seed: int = 0, dtype=torch.float32) -> nn.Module:
    torch.manual_seed(seed)  # nn.Linear initialises from the global RNG
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 1)).to(dtype)


def _data(dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(32, 5, generator=g)
    return x.to(dtype), (x @ torch.linspace(-1, 1, 5)).unsqueeze(1).to(dtype)


def _loss(model, dtype=torch.float32):
    x, y = _data(dtype)
    return ((model(x) - y) ** 2).mean()


def _step(model, opt, dtype=torch.float32):
    """One zero_grad / backward / step(loss=...) cycle; returns the loss."""
    opt.zero_grad()
    loss = _loss(model, dtype)
    loss.backward()
    opt.step(loss=loss)
    return loss


def _flat(model) -> torch.Tensor:
    return torch.cat([p.detach().double().flatten() for p in model.parameters()])


# ---------------------------------------------------------------------------------------------------------
# The catalogue: every entry.


def test_the_previous_meta_networks_ship_and_the_default_is_one_of_them():
    """The three meta-networks of the experiments are in the catalogue, and the default resolves to an entry."""
    assert set(SHIPPED) <= set(NAMES)
    assert pretrained.default_name() in NAMES
    assert pretrained.default_name() == ("general" if "general" in NAMES else "digits_lstm")
    assert learned_opt.list_pretrained() == NAMES


@pytest.mark.parametrize("name", NAMES)
def test_manifest_entry_complete_and_file_small(name):
    """Every entry has every field, well typed; its file exists, is at most 1 MB and matches its sha256."""
    entry = pretrained.info(name)
    assert set(pretrained.FIELDS) <= set(entry)
    for key in ("file", "kind", "description", "meta_trained_on", "budget", "source_command"):
        assert isinstance(entry[key], str) and entry[key].strip(), key
    assert entry["horizons"] and all(isinstance(h, int) and h >= 1 for h in entry["horizons"])
    assert isinstance(entry["known_failures"], list) and all(isinstance(s, str) and s for s in entry["known_failures"])
    assert entry["name"] == name and os.path.isfile(entry["path"])
    assert os.path.getsize(entry["path"]) <= pretrained.MAX_BYTES <= 1_000_000
    with open(entry["path"], "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == entry["sha256"]


@pytest.mark.parametrize("name", NAMES)
def test_every_pretrained_loads_and_makes_a_finite_step(name):
    """load() gives the protocol optimizer in eval mode with frozen weights; it steps a small model finitely."""
    from learned_opt.optim.learned import kind_of

    net = pretrained.load(name)
    assert kind_of(net) == pretrained.info(name)["kind"]
    assert not net.training and not any(w.requires_grad for w in net.parameters())
    assert hasattr(net, "init") and hasattr(net, "update")
    model = _model()
    before = _flat(model)
    opt = LearnedOptimizer(model.parameters(), name=name, total_steps=10)
    loss = _step(model, opt)
    after = _flat(model)
    assert math.isfinite(loss.item()) and torch.isfinite(after).all()
    assert not torch.equal(before, after)


def test_unknown_name_lists_the_known_ones():
    """An unknown name is a ValueError naming the argument and listing every known name."""
    for call in (pretrained.load, pretrained.info):
        with pytest.raises(ValueError, match="name 'nope' is not a pretrained optimizer") as e:
            call("nope")
        assert all(n in str(e.value) for n in NAMES)


def _register(directory, name="demo", source="digits_lstm", **overrides):
    info = dict(description="d", meta_trained_on="m", horizons=[10], budget="b", source_command="c",
                known_failures=["f"])
    info.update(overrides)
    return pretrained.register_file(name, pretrained.info(source)["path"], directory=directory, **info)


def test_register_file_copies_and_writes_the_entry(tmp_path):
    """register_file copies the file in, writes a complete entry (kind, sha256), and load() gives the same net."""
    entry = _register(tmp_path, "demo", "quadratic_lstm")
    assert entry["file"] == "demo.pt" and entry["kind"] == "lstm" and (tmp_path / "demo.pt").is_file()
    assert pretrained.list_pretrained(tmp_path) == ["demo"]
    assert set(pretrained.FIELDS) <= set(pretrained.info("demo", tmp_path))
    ours, theirs = pretrained.load("demo", directory=tmp_path), pretrained.load("quadratic_lstm")
    for (k, a), (_, b) in zip(ours.state_dict().items(), theirs.state_dict().items()):
        assert torch.equal(a, b), k
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["format"] == pretrained.FORMAT
    # a second entry keeps the first; the same name again needs overwrite=True
    _register(tmp_path, "other")
    assert pretrained.list_pretrained(tmp_path) == ["demo", "other"]
    with pytest.raises(ValueError, match="already registered"):
        _register(tmp_path, "demo")
    assert _register(tmp_path, "demo", overwrite=True)["file"] == "demo.pt"


def test_register_file_refuses_bad_input(tmp_path, monkeypatch):
    """Bad names, missing or unknown fields, missing or oversized files: ValueError / FileNotFoundError, no entry."""
    with pytest.raises(ValueError, match="^name must be"):
        _register(tmp_path, "../evil")
    with pytest.raises(ValueError, match="missing manifest field"):
        pretrained.register_file("x", pretrained.info("digits_lstm")["path"], directory=tmp_path, description="d")
    with pytest.raises(ValueError, match="unknown manifest field"):
        _register(tmp_path, "x", knwon_failures=[])
    with pytest.raises(ValueError, match="^horizons"):
        _register(tmp_path, "x", horizons=[0])
    with pytest.raises(FileNotFoundError, match="nowhere.pt"):
        pretrained.register_file("x", tmp_path / "nowhere.pt", directory=tmp_path, description="d",
                                 meta_trained_on="m", horizons=[1], budget="b", source_command="c",
                                 known_failures=[])
    monkeypatch.setattr(pretrained, "MAX_BYTES", 1000)
    with pytest.raises(ValueError, match="more than the 1000"):
        _register(tmp_path, "x")
    assert not (tmp_path / "manifest.json").exists()


def test_missing_or_corrupt_files_raise_one_clear_error(tmp_path):
    """A missing file, a corrupt one and a corrupt manifest each raise one error naming the file."""
    _register(tmp_path, "demo")
    path = tmp_path / "demo.pt"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(RuntimeError, match=f"file {path} is corrupt"):
        pretrained.load("demo", directory=tmp_path)
    with pytest.raises(RuntimeError, match=f"{path} is unreadable: truncated"):
        pretrained.load_file(path)
    path.write_bytes(b"not a torch file")
    with pytest.raises(RuntimeError, match=f"{path} is unreadable"):
        pretrained.load_file(path)
    path.unlink()
    with pytest.raises(FileNotFoundError, match=f"file {path} is missing"):
        pretrained.load("demo", directory=tmp_path)
    (tmp_path / "manifest.json").write_text("{")
    with pytest.raises(RuntimeError, match="manifest.json is not valid JSON"):
        pretrained.list_pretrained(tmp_path)


def test_default_name_picks_up_general_once_it_ships(tmp_path, monkeypatch):
    """default_name() reads the catalogue at every call: an entry 'general' becomes LearnedOptimizer's default."""
    _register(tmp_path, "digits_lstm")
    assert pretrained.default_name(tmp_path) == "digits_lstm"
    _register(tmp_path, "general", "metanet_lstm")
    assert pretrained.default_name(tmp_path) == "general"
    monkeypatch.setattr(pretrained, "_folder", lambda directory=None: str(tmp_path))
    assert LearnedOptimizer(_model().parameters()).name == "general"


# ---------------------------------------------------------------------------------------------------------
# The drop-in optimizer.


def test_name_may_be_a_path(tmp_path):
    """name= accepts the path of a lopt.pt (str or PathLike); a missing path raises FileNotFoundError naming it."""
    path = pretrained.info("quadratic_lstm")["path"]
    for name in (path, pathlib.Path(path)):
        opt = LearnedOptimizer(_model().parameters(), name=name)
        assert opt.name == str(path) and type(opt.opt).__name__ == "CoordLSTM"
    missing = tmp_path / "lopt.pt"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        LearnedOptimizer(_model().parameters(), name=str(missing))


def test_lr_is_an_exact_multiplier_of_the_learned_step():
    """Same model copies and gradients: the first update with lr=0.5 (2) is 0.5x (2x) the one with lr=1."""
    base = _model(dtype=torch.float64)  # float64 parameters: the update is not lost in their rounding
    deltas = {}
    for lr in (1.0, 0.5, 2.0):
        model = copy.deepcopy(base)
        opt = LearnedOptimizer(model.parameters(), lr=lr, total_steps=100)
        _step(model, opt, torch.float64)
        deltas[lr] = _flat(model) - _flat(base)
    assert deltas[1.0].abs().max() > 0
    for lr in (0.5, 2.0):
        rel = (deltas[lr] - lr * deltas[1.0]).norm() / (lr * deltas[1.0]).norm()
        assert rel < 1e-6, (lr, float(rel))
    # groups added later take the constructor's lr; a group may set its own
    model = _model()
    opt = LearnedOptimizer(list(model.parameters())[:2], lr=0.5)
    opt.add_param_group({"params": list(model.parameters())[2:]})
    assert [g["lr"] for g in opt.param_groups] == [0.5, 0.5]
    opt = LearnedOptimizer([{"params": list(model.parameters())[:2], "lr": 0.25},
                            {"params": list(model.parameters())[2:]}], lr=0.5)
    assert [g["lr"] for g in opt.param_groups] == [0.25, 0.5]


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_dtypes(dtype):
    """float64 and bfloat16 models keep their dtype and move; the meta-network stays float32."""
    model = _model(dtype=dtype)
    before = [p.detach().clone() for p in model.parameters()]
    opt = LearnedOptimizer(model.parameters(), total_steps=10)
    for _ in range(3):
        loss = _step(model, opt, dtype)
    assert math.isfinite(loss.item())
    for b, p in zip(before, model.parameters()):
        assert p.dtype == dtype and torch.isfinite(p).all()
        assert not torch.equal(b, p.detach())
    assert all(w.dtype == torch.float32 for w in opt.opt.parameters())


def test_parameters_without_gradients_are_left_bit_identical():
    """A requires_grad=False parameter and one whose grad stays None are not touched; the others move."""
    model = _model()
    unused = nn.Parameter(torch.randn(3))  # in the optimizer, never in the loss: grad None
    model[0].bias.requires_grad_(False)
    frozen_before, unused_before = model[0].bias.detach().clone(), unused.detach().clone()
    moving_before = model[2].weight.detach().clone()
    opt = LearnedOptimizer(list(model.parameters()) + [unused], total_steps=10)
    for _ in range(3):
        _step(model, opt)
    assert unused.grad is None and model[0].bias.grad is None
    assert torch.equal(model[0].bias.detach(), frozen_before)
    assert torch.equal(unused.detach(), unused_before)
    assert not torch.equal(model[2].weight.detach(), moving_before)


class _Spy:
    """A controller that records the horizon it observes and changes nothing."""

    def __init__(self):
        self.horizons = []

    def init(self):
        return None

    def decide(self, obs, state):
        self.horizons.append(obs.horizon)
        return Decision(), state


def test_total_steps_reaches_the_controller_as_the_horizon():
    """total_steps is the controller's horizon (0 without it), for a given controller and the learned heads."""
    for total, expected in ((250, 250), (None, 0)):
        spy = _Spy()
        model = _model()
        opt = LearnedOptimizer(model.parameters(), total_steps=total, controller=spy)
        for _ in range(2):
            _step(model, opt)
        assert spy.horizons == [expected, expected]
        spy = _Spy()
        model = _model()
        opt = ProtocolOptimizer(model.parameters(), SGD(lr=0.1), controller=spy, total_steps=total)
        _step(model, opt)
        assert spy.horizons == [expected] and opt.total_steps == total
    # controller='auto': the meta-network's own heads observe it too
    model = _model()
    opt = LearnedOptimizer(model.parameters(), total_steps=77)
    seen, decide = [], opt.controller.decide
    opt.controller.decide = lambda obs, state: (seen.append(obs.horizon), decide(obs, state))[1]
    _step(model, opt)
    assert seen == [77]


@pytest.mark.parametrize("kwargs, argument", [
    (dict(total_steps=0), "total_steps"), (dict(total_steps=-5), "total_steps"),
    (dict(total_steps=2.5), "total_steps"), (dict(total_steps=True), "total_steps"),
    (dict(total_steps="100"), "total_steps"),
    (dict(lr=-1.0), "lr"), (dict(lr=math.nan), "lr"), (dict(lr=math.inf), "lr"),
    (dict(name="nope"), "name"), (dict(name=3), "name"), (dict(device="nodevice"), "device"),
])
def test_bad_arguments_raise_value_error_naming_them(kwargs, argument):
    """Bad total_steps, lr, name or device: ValueError whose message starts with the argument's name."""
    with pytest.raises(ValueError, match=f"^{argument} "):
        LearnedOptimizer(_model().parameters(), **kwargs)
    if "total_steps" in kwargs:
        with pytest.raises(ValueError, match="^total_steps "):
            ProtocolOptimizer(_model().parameters(), SGD(lr=0.1), **kwargs)


def test_state_dict_round_trip_continues_identically():
    """Resuming from a state_dict saved with torch.save (loaded weights_only) continues bit for bit."""
    model = _model()
    opt = LearnedOptimizer(model.parameters(), lr=0.7, total_steps=20)
    for _ in range(5):
        _step(model, opt)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    clone = _model(seed=123)
    clone.load_state_dict(saved["model"])
    resumed = LearnedOptimizer(clone.parameters(), lr=0.7, total_steps=20)
    resumed.load_state_dict(saved["opt"])
    for _ in range(5):
        a, b = _step(model, opt), _step(clone, resumed)
        assert torch.equal(a, b)
    assert torch.equal(_flat(model), _flat(clone))


def test_lr_scheduler_works_on_top():
    """StepLR(gamma=0.5) halves the update of the next step exactly; the learned state is unaffected."""
    base = _model(dtype=torch.float64)
    plain, scheduled = copy.deepcopy(base), copy.deepcopy(base)
    opt_p = LearnedOptimizer(plain.parameters(), total_steps=10)
    opt_s = LearnedOptimizer(scheduled.parameters(), total_steps=10)
    sched = torch.optim.lr_scheduler.StepLR(opt_s, step_size=1, gamma=0.5)
    _step(plain, opt_p, torch.float64)
    _step(scheduled, opt_s, torch.float64)
    sched.step()
    assert opt_s.param_groups[0]["lr"] == 0.5
    assert torch.equal(_flat(plain), _flat(scheduled))
    start = _flat(plain)
    _step(plain, opt_p, torch.float64)
    _step(scheduled, opt_s, torch.float64)
    d_p, d_s = _flat(plain) - start, _flat(scheduled) - start
    assert float((d_s - 0.5 * d_p).norm() / (0.5 * d_p).norm()) < 1e-6


def test_readme_usage_drives_a_regression_loss_down():
    """The README's three lines on a tiny regression model: the loss falls over 100 steps."""
    model = _model()
    x, y = _data()
    opt = learned_opt.LearnedOptimizer(model.parameters(), total_steps=100)
    losses = []
    for _ in range(100):
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward(); opt.step(loss=loss)  # noqa: E702 - the README's line
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.5 * losses[0], (losses[0], losses[-1])


def test_import_learned_opt_stays_light():
    """`import learned_opt` imports no torch; the drop-in names resolve lazily."""
    code = "import sys, learned_opt; assert 'torch' not in sys.modules; print(sorted(dir(learned_opt)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "LearnedOptimizer" in out and "list_pretrained" in out
    assert learned_opt.LearnedOptimizer is LearnedOptimizer
    with pytest.raises(AttributeError):
        learned_opt.no_such_name  # noqa: B018


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_the_meta_network_follows_the_parameters_to_the_gpu():
    """device=None puts the meta-network on the parameters' device; a step runs there."""
    model = _model().cuda()
    opt = LearnedOptimizer(model.parameters(), total_steps=10)
    assert all(w.is_cuda for w in opt.opt.parameters())
    x, y = (t.cuda() for t in _data())
    opt.zero_grad()
    loss = ((model(x) - y) ** 2).mean()
    loss.backward()
    opt.step(loss=loss)
    assert all(torch.isfinite(p).all() for p in model.parameters())
