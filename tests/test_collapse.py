"""Posterior-collapse remedies and diagnostics: each KL schedule by its formula, free bits in the train
step, the I(x; z) estimator against a closed form, the per-epoch diagnostics in metrics.jsonl."""
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cvae_jax import annealing, estimators
from cvae_jax.config import ObjectiveConfig
from cvae_jax.engine import epoch as engine_epoch
from cvae_jax.experiment import train_and_evaluate
from cvae_jax.tasks.density import DensityTask

from conftest import model_and_state, small_config, synthetic_dataset


def weights(cfg: ObjectiveConfig, steps, steps_per_epoch=10, total_steps=100):
  schedule = annealing.kl_weight_schedule(cfg, steps_per_epoch, total_steps)
  return [float(schedule(jnp.asarray(s))) for s in steps]


def test_constant_schedule_is_beta():
  assert weights(ObjectiveConfig(beta=3.0), [0, 50, 99]) == [3.0, 3.0, 3.0]


def test_linear_warmup_rises_over_the_given_epochs():
  cfg = ObjectiveConfig(beta=2.0, kl_schedule="linear", kl_warmup_epochs=1.0)  # 10 steps
  np.testing.assert_allclose(weights(cfg, [0, 5, 10, 99]), [0.0, 1.0, 2.0, 2.0], rtol=1e-6)


def test_cyclical_schedule_follows_fu_et_al():
  # 100 steps, 4 cycles of 25: rise over the first 12.5 steps of each cycle, then beta.
  cfg = ObjectiveConfig(beta=1.0, kl_schedule="cyclical", kl_cycles=4, kl_cycle_ratio=0.5)
  np.testing.assert_allclose(weights(cfg, [0, 5, 12, 13, 24, 25, 30, 50, 99]),
                             [0.0, 0.4, 0.96, 1.0, 1.0, 0.0, 0.4, 0.0, 1.0], rtol=1e-6, atol=1e-7)


def test_the_train_step_uses_the_schedule(tmp_path):
  ds = synthetic_dataset(n_train=320)  # 10 steps per epoch at batch 32
  cfg = small_config(**{"objective.kl_schedule": "linear", "objective.kl_warmup_epochs": 2.0, "training.epochs": 3})
  model, state = model_and_state(cfg, ds.spec)
  epoch = engine_epoch.make_train_epoch(DensityTask().plan(cfg, model, ds.spec, len(ds.train)))
  _, metrics = epoch(state, jnp.asarray(ds.train.images), jnp.asarray(ds.train.labels), 0)
  np.testing.assert_allclose(metrics["kl_weight"], np.arange(10) / 20, rtol=1e-6)
  np.testing.assert_allclose(metrics["loss"], metrics["rec"] + metrics["kl_weight"] * metrics["kl"], rtol=1e-5)


def test_free_bits_in_the_train_step():
  ds = synthetic_dataset()
  free = 100.0  # far above any dimension's KL: every dimension sits at the floor
  cfg = small_config(**{"objective.free_bits": free, "objective.beta": 0.5})
  model, state = model_and_state(cfg, ds.spec)
  step = jax.jit(engine_epoch.make_train_step(DensityTask().plan(cfg, model, ds.spec, len(ds.train))))
  _, metrics = step(state, jnp.asarray(ds.train.images[:32]),
                    jnp.asarray(ds.train.labels[:32]))
  assert float(metrics["loss"] - metrics["rec"]) == pytest.approx(0.5 * cfg.model.latent_size * free, rel=1e-5)
  assert float(metrics["kl"]) < 10  # the reported KL is the true one


def test_mutual_information_against_the_closed_form():
  # x ~ N(0, 1) per dimension, q(z | x) = N(a x, s^2): I(x; z) = 1/2 sum_j log(1 + a_j^2 / s^2).
  n, a, s = 4000, np.array([2.0, 1.0, 0.0]), 1.0
  x = np.random.default_rng(0).normal(size=(n, 3))
  mean, logvar = jnp.asarray(a * x, jnp.float32), jnp.full((n, 3), 2 * math.log(s), jnp.float32)
  expected = 0.5 * np.sum(np.log1p(a**2 / s**2))  # 1.151 nats
  estimate = float(estimators.mutual_information(mean, logvar, jax.random.key(0)))
  assert estimate == pytest.approx(expected, abs=0.06)
  collapsed = float(estimators.mutual_information(jnp.zeros((n, 3)), jnp.zeros((n, 3)), jax.random.key(1)))
  assert abs(collapsed) < 0.05  # q(z | x) = p(z) for every x: no information (Monte Carlo error 0.011)
  for s, expected in ((0.5, 2.2213), (2.0, 0.4581)):  # posteriors narrower and wider than the prior: logvar != 0
    mean, logvar = jnp.asarray(a * x, jnp.float32), jnp.full((n, 3), 2 * math.log(s), jnp.float32)
    assert float(estimators.mutual_information(mean, logvar, jax.random.key(0))) == pytest.approx(expected, abs=0.06)


def test_diagnostics_are_logged_every_epoch(tmp_path):
  cfg = small_config(**{"training.epochs": 2, "optimizer.learning_rate": 1e-2})
  train_and_evaluate(cfg, tmp_path, dataset=synthetic_dataset(n_train=1024, n_test=500))
  rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert len(rows) == 2
  for row in rows:
    assert len(row["test/kl_per_dim"]) == cfg.model.latent_size
    assert 0 <= row["test/active_units"] <= cfg.model.latent_size
    assert 0.1 < row["test/mutual_information"] <= math.log(500)  # z carries the class band; at most log N
  assert sum(rows[-1]["test/kl_per_dim"]) == pytest.approx(rows[-1]["test/kl"], rel=1e-4)
  # The last line's diagnostics are the final parameters': recomputed from the restored run, the same numbers.
  from cvae_jax.estimators import Draw, active_units
  from cvae_jax.experiment import restore_run
  from cvae_jax.keys import Stream, fold, stream_key
  ds = synthetic_dataset(n_train=1024, n_test=500)
  run = restore_run(tmp_path, ds)
  key = stream_key(cfg.seed, Stream.EVAL)
  stats = estimators.make_posterior_stats(run.model, ds.spec, cfg.training.eval_batch_size, with_logvar=True)(
      run.params, ds.test.images, ds.test.labels, key)
  mi = estimators.mutual_information(stats["mean"], stats["logvar"], fold(key, Draw.MUTUAL_INFORMATION))
  assert rows[-1]["test/mutual_information"] == pytest.approx(float(mi), rel=1e-5)
  assert rows[-1]["test/active_units"] == active_units(np.asarray(stats["mean"]))[0]
  np.testing.assert_allclose(rows[-1]["test/kl_per_dim"], np.asarray(stats["kl_per_dim"]).mean(axis=0), atol=1e-5)
