"""The k-sample training objectives (Burda et al. 2016), the learning-rate schedule and the optimizers."""
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cvae_jax.config import ConfigError, OptimizerConfig
from cvae_jax.engine.optim import create_optimizer, learning_rate_factor
from cvae_jax.experiment import train_and_evaluate, validate
from cvae_jax.objectives import k_sample_terms
from cvae_jax.models import init_params
from conftest import model_and_state, small_config, synthetic_dataset
from test_estimators import linear_gaussian
from test_training import read_metrics


def as_f32(a):
  return jnp.asarray(a, jnp.float32)


def test_k_sample_bound_is_log_px_under_the_exact_posterior():
  log_likelihood, log_px, mean, var = linear_gaussian()
  logvar = jnp.log(as_f32(np.broadcast_to(var, mean.shape)))
  for k in (1, 5, 50):
    terms = k_sample_terms(log_likelihood, as_f32(mean), logvar, jax.random.key(k), k)
    np.testing.assert_allclose(terms["iwae"], log_px, atol=1e-4)  # every weight equals p(x)
  # The ELBO's expectation is log p(x) too (zero KL gap): its k-draw average converges to it.
  terms = k_sample_terms(log_likelihood, as_f32(mean), logvar, jax.random.key(0), 20000)
  np.testing.assert_allclose(terms["elbo"], log_px, atol=0.05)
  np.testing.assert_allclose(terms["elbo"], -(terms["rec"] + terms["kl"]), rtol=1e-6)


def test_k_sample_bound_tightens_with_k_and_the_elbo_does_not():
  log_likelihood, log_px, mean, var = linear_gaussian()
  q_mean, q_logvar = as_f32(mean + 0.6), jnp.log(as_f32(np.broadcast_to(2 * var, mean.shape)))

  def averaged(k, name):  # the expectation of the k-draw estimate by 2000 repeats, and its standard error
    draw = jax.jit(jax.vmap(lambda key: k_sample_terms(log_likelihood, q_mean, q_logvar, key, k)[name]))
    values = np.asarray(draw(jax.random.split(jax.random.key(k), 2000)))
    return values.mean(axis=0), values.std(axis=0) / math.sqrt(len(values))  # [B] each

  (elbo1, se_e1), (elbo50, se_e50) = averaged(1, "elbo"), averaged(50, "elbo")
  (iwae1, se_i1), (iwae5, _), (iwae50, _) = averaged(1, "iwae"), averaged(5, "iwae"), averaged(50, "iwae")
  assert np.all(np.abs(elbo50 - elbo1) < 4 * np.hypot(se_e1, se_e50))  # "VAE, k": same objective, less noise
  assert np.all(np.abs(iwae1 - elbo1) < 4 * np.hypot(se_i1, se_e1))    # L_1 is the ELBO (sampled KL)
  assert np.all(elbo1 < iwae5 - 0.05) and np.all(iwae5 < iwae50) and np.all(iwae50 < log_px + 1e-3)


def test_the_iwae_train_step_minimizes_minus_the_k_sample_bound(tmp_path):
  ds = synthetic_dataset()
  cfg = small_config(**{"objective.estimator": "iwae", "objective.samples": 5, "training.epochs": 4})
  results = train_and_evaluate(cfg, tmp_path / "iwae", dataset=ds)
  rows = read_metrics(tmp_path / "iwae")
  for row in rows:
    assert row["train/loss"] == pytest.approx(-row["train/iwae"], rel=1e-6)
    assert row["train/iwae"] >= row["train/elbo"]  # L_5 >= ELBO, batch by batch on average
  assert rows[-1]["test/elbo"] > rows[0]["test/elbo"]
  evaluated = json.loads((tmp_path / "iwae" / "eval.json").read_text())["iwae"]
  assert results["nll"] == evaluated["nll"] == -evaluated["bound"] and evaluated["k"] == cfg.evaluation.iwae_samples
  assert results["nll"] <= -results["elbo"] + 0.5  # L_k is above the (one-sample) ELBO, up to its noise
  # "VAE, k" keeps the ELBO as its loss and reports the bound of the same draws beside it.
  train_and_evaluate(small_config(**{"objective.samples": 5}), tmp_path / "vae5", dataset=ds)
  row = read_metrics(tmp_path / "vae5")[-1]
  assert row["train/loss"] == pytest.approx(row["train/rec"] + row["train/kl"], rel=1e-6)


@pytest.mark.parametrize("overrides, key", [
    ({"objective.estimator": "iwae", "objective.beta": 2.0}, "objective.estimator"),
    ({"objective.estimator": "iwae", "objective.free_bits": 0.5}, "objective.estimator"),
    ({"objective.samples": 0}, "objective.samples"),
    ({"model.kind": "ae", "objective.samples": 5}, "objective.samples"),
    ({"model.init_scale": -1.0}, "model.init_scale"),
    ({"optimizer.weight_decay": -1.0}, "optimizer.weight_decay"),
])
def test_invalid_objective_settings_name_the_key(overrides, key):
  with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
    validate(small_config(**overrides))


def test_burda_schedule_stages_last_3_to_the_i_epochs():
  factor = learning_rate_factor(OptimizerConfig(schedule="burda"), steps_per_epoch=10, epochs=3280)
  stage_of_epoch = {0: 0, 1: 1, 3: 1, 4: 2, 12: 2, 13: 3, 39: 3, 40: 4, 1093: 7, 3279: 7}
  for epoch, stage in stage_of_epoch.items():
    for step in (epoch * 10, epoch * 10 + 9):
      assert float(factor(step)) == pytest.approx(10 ** (-stage / 7), rel=1e-6), (epoch, step)
  assert learning_rate_factor(OptimizerConfig(), 10, 3280)(12345) == 1.0


def test_cosine_schedule_falls_from_1_to_0_over_all_epochs():
  factor = learning_rate_factor(OptimizerConfig(schedule="cosine"), steps_per_epoch=10, epochs=4)  # 40 steps
  by_hand = {0: 1.0, 10: (1 + math.cos(math.pi / 4)) / 2, 20: 0.5, 30: (1 - math.cos(math.pi / 4)) / 2, 40: 0.0}
  for step, value in by_hand.items():
    assert float(factor(step)) == pytest.approx(value, abs=1e-6), step
  assert float(factor(400)) == pytest.approx(0.0, abs=1e-6)  # stays at 0 after the last step


@pytest.mark.parametrize("name, reference", [
    ("adam", lambda lr: optax.adam(lr, eps=1e-8)), ("adagrad", lambda lr: optax.adagrad(lr))])
def test_unit_step_optimizer_scaled_by_the_rate_equals_optax(name, reference):
  lr, decay = 0.03, 0.01
  params = {"w": jnp.array([1.0, -2.0, 0.5])}
  grads = [{"w": jnp.array([0.3, -0.1, 2.0])}, {"w": jnp.array([-1.0, 0.4, 0.2])}]
  ours = create_optimizer(OptimizerConfig(name=name, weight_decay=decay))
  theirs = optax.chain(optax.add_decayed_weights(decay), reference(lr))
  p1, p2, s1, s2 = params, params, ours.init(params), theirs.init(params)
  for g in grads:
    u1, s1 = ours.update(g, s1, p1)
    u2, s2 = theirs.update(g, s2, p2)
    p1 = optax.apply_updates(p1, jax.tree.map(lambda u: u * lr, u1))
    p2 = optax.apply_updates(p2, u2)
  np.testing.assert_allclose(p1["w"], p2["w"], rtol=1e-6)


def test_init_scale_sets_the_weight_spread():
  cfg = small_config(**{"model.init_scale": 0.01, "model.hidden": [256]})
  ds = synthetic_dataset()
  params = model_and_state(cfg, ds.spec)[1].params
  kernels = [leaf for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0] if "kernel" in str(path)]
  assert all(abs(float(jnp.std(k)) - 0.01) < 0.002 for k in kernels)


def test_each_draw_of_an_example_is_decoded_under_that_example_s_condition():
  """log p(x_b | z_sb, c_b) for S draws of a batch of examples with different labels: decoder_log_likelihood
  decodes the S x B codes in one batch, and each must meet its own example's image and condition."""
  from cvae_jax import likelihoods
  from cvae_jax.data import DatasetSpec, Encoding
  from cvae_jax.models import create_model
  from cvae_jax.models.mlp import MLPConfig
  from cvae_jax.objectives import decoder_log_likelihood
  spec = DatasetSpec("toy", (3, 3, 1), 4, Encoding.static_binary)
  model = create_model(MLPConfig(kind="cvae", hidden=[8], latent_size=2), spec)
  x = (jax.random.uniform(jax.random.key(0), (3, 3, 3, 1)) > 0.5).astype(jnp.float32)
  c = jax.nn.one_hot(jnp.array([0, 3, 1]), 4)
  params = init_params(model, jax.random.key(1), x, c, jax.random.key(2))
  z = jax.random.normal(jax.random.key(3), (2, 3, 2))  # [S, B, Z]
  lik = likelihoods.get("bernoulli")
  got = decoder_log_likelihood(model, params, x, c, lik)(z)
  for s in range(2):
    for b in range(3):
      logits = model.apply({"params": params}, z[s, b][None], c[b][None], method=model.decode)
      assert float(got[s, b]) == pytest.approx(float(lik.log_prob(x[b][None], logits)[0]), rel=1e-6)
