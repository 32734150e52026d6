"""ES / PES meta-gradients inside MetaTrainer (MetaConfig.estimator, --estimator)."""
from __future__ import annotations

import pytest
import torch

from learned_opt.cli import main
from learned_opt.meta import MetaConfig, MetaTrainer
from learned_opt.optim.learned import CoordLSTM
from learned_opt.tasks import QuadraticFamily


def _trainer(estimator: str, particles: int = 8, sigma: float = 1e-3, run_dir=None, iterations: int = 2,
             hidden: int = 6, layers: int = 2, **kw):
    torch.manual_seed(0)
    net = CoordLSTM(hidden=hidden, layers=layers, init_zero=False)
    settings = dict(horizon=8, truncation=4, iterations=iterations, meta_lr=1e-2, estimator=estimator,
                    particles=particles, sigma=sigma, seed=0)
    cfg = MetaConfig(**{**settings, **kw})
    return MetaTrainer(net, QuadraticFamily(dim=3, num_problems=4), cfg, run_dir=run_dir)


def _first_truncation_gradient(tr: MetaTrainer):
    """The meta-gradient the trainer's estimator gives for the first truncation of a fresh task."""
    captured = {}
    real = tr.meta_opt

    class Spy:
        def update(self, grads, state, params):
            captured["g"] = torch.cat([g.flatten() for g in grads])
            return real.update(grads, state, params)

    tr.meta_opt = Spy()
    run = tr._new_run(tr.cfg.horizon)
    tr.meta_step_on([run], tr.cfg.truncation)
    return captured["g"]


def test_es_estimate_agrees_with_the_exact_truncation_gradient_along_it():
    # on the first truncation of a task there is no earlier influence: ES with a small sigma estimates the
    # gradient TBPTT computes exactly (second order, so that both are the full derivative). Over ~2000 meta-weights
    # the estimate is noisy in every direction, but its component along the exact gradient has a variance that
    # does not grow with the dimension: it must match the exact gradient's length
    exact = _first_truncation_gradient(_trainer("tbptt", clip_norm=1e9, second_order=True))
    es = _first_truncation_gradient(_trainer("es", particles=600, clip_norm=1e9, second_order=True))
    along = float(es @ exact / (exact @ exact))
    assert 0.85 < along < 1.15, along


def test_pes_equals_es_on_a_tasks_first_truncation():
    # nothing accumulated yet: the persistent sum is the perturbation itself, with the same noise
    es = _first_truncation_gradient(_trainer("es", clip_norm=1e9))
    pes = _first_truncation_gradient(_trainer("pes", clip_norm=1e9))
    assert torch.equal(es, pes)


def test_pes_carries_particle_states_and_sums_across_truncations(monkeypatch):
    import learned_opt.meta.es as meta
    weights = []
    real = meta.antithetic_sum
    monkeypatch.setattr(meta, "antithetic_sum", lambda losses, w, sigma: (weights.append(w.clone()),
                                                                          real(losses, w, sigma))[1])
    tr = _trainer("pes", particles=4)
    run = tr._new_run(tr.cfg.horizon)
    tr.meta_step_on([run], 4)
    first = tr.estimator.accumulated[0].clone()
    assert all(p.step == 4 for p in tr.estimator.particles[0]) and run.step == 4
    tr.meta_step_on([run], 4)
    assert all(p.step == 8 for p in tr.estimator.particles[0])
    assert not torch.equal(tr.estimator.accumulated[0], first)  # the sum grew
    # the estimate weights each particle's loss by its summed perturbations, not by this truncation's alone
    assert torch.equal(weights[0], first) and torch.equal(weights[1], tr.estimator.accumulated[0])
    assert torch.allclose(tr.estimator.accumulated[0][:2], -tr.estimator.accumulated[0][2:])  # pairs stay antithetic
    # the particles ran under different weights: their inner parameters differ from each other
    assert not torch.equal(tr.estimator.particles[0][0].params[0], tr.estimator.particles[0][1].params[0])


@pytest.mark.parametrize("estimator", ["es", "pes"])
def test_population_estimators_resume_bit_identically(tmp_path, estimator):
    straight = _trainer(estimator, iterations=4).run()
    first = _trainer(estimator, iterations=2, run_dir=str(tmp_path), checkpoint_every=1).run()
    assert first.iteration == 2
    resumed = _trainer(estimator, iterations=4, run_dir=str(tmp_path), checkpoint_every=1)
    assert resumed.resume()
    resumed.run()
    for a, b in zip(straight.net.parameters(), resumed.net.parameters()):
        assert torch.equal(a, b)


def test_meta_weights_are_restored_exactly_after_the_population_runs():
    tr = _trainer("es")
    before = [p.detach().clone() for p in tr.meta_params]

    class NoStep:
        def update(self, grads, state, params):
            return [torch.zeros_like(p) for p in params], state

    tr.meta_opt = NoStep()
    tr.meta_step_on([tr._new_run(8)], 4)
    assert all(torch.equal(a, b) for a, b in zip(before, tr.meta_params))


@pytest.mark.parametrize("bad, message", [
    (dict(estimator="reinforce"), "unknown estimator"),
    (dict(estimator="es", particles=3), "particles must be an even integer"),
    (dict(estimator="pes", sigma=0.0), "sigma must be a finite number > 0"),
    (dict(estimator="es", meta_loss="halting", control="learned"), "halting meta-loss needs estimator='tbptt'"),
])
def test_bad_estimator_settings_are_refused(bad, message):
    with pytest.raises(ValueError, match=message):
        MetaConfig(**bad).validate()


def test_cli_meta_trains_with_pes_and_refuses_a_bad_estimator(tmp_path, capsys):
    rc = main(["meta-train", "--task", "quadratic", "--task-arg", "dim=3", "--net", "lstm", "--net-arg", "hidden=4",
               "--estimator", "pes", "--particles", "4", "--sigma", "0.01", "--iterations", "2", "--horizon", "6",
               "--truncation", "3", "--run-dir", str(tmp_path / "pes")])
    assert rc == 0 and (tmp_path / "pes" / "lopt.pt").exists()
    capsys.readouterr()
    rc = main(["meta-train", "--task", "quadratic", "--estimator", "bogus", "--run-dir", str(tmp_path / "bad")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "estimator" in err and err.count("\n") == 1
    assert not (tmp_path / "bad").exists()
