"""The hierarchical family (model=hvae) against known answers: one group is a plain VAE, a hand-set posterior's
KL per group, the joint importance-weighted bound of a linear-Gaussian hierarchy, remat, resume, the options."""
import functools
import math

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree
import numpy as np
import pytest

from cvae_jax import estimators, likelihoods
from cvae_jax.config import ConfigError, Pixels
from cvae_jax.experiment import train_and_evaluate, validate
from cvae_jax.models import init_params
from cvae_jax.models import remat as remat_module
from cvae_jax.models.hvae import HVAEConfig, HierarchicalVAE
from cvae_jax.models.vae import VAEOutput
from cvae_jax.objectives import elbo_terms, gaussian_kl, joint_log_weights, kl_per_dim, kl_per_group
from conftest import killed_at_epoch, model_and_state, small_config, synthetic_dataset
from test_training import final_state, read_metrics

BERNOULLI = likelihoods.get("bernoulli")


def tiny(groups=(1, 2), blocks=(1, 1), condition_size=0, **kw) -> HierarchicalVAE:
  cfg = HVAEConfig(width=8, bottleneck=4, latent_channels=2, encoder_blocks=list(blocks),
                   decoder_groups=list(groups), activation="gelu", **kw)
  return HierarchicalVAE(cfg, (8, 8, 1), 1, condition_size)


@functools.partial(jax.jit, static_argnums=2)  # one program, not one per leaf's ops
def perturbed(params, key, scale=0.3):
  """Every parameter moved by N(0, scale^2): the zero-initialized prior and biases become non-trivial. One
  draw for the flattened vector: a draw per leaf compiled a random-bits program per leaf (4x the time)."""
  flat, unravel = ravel_pytree(params)
  return unravel(flat + scale * jax.random.normal(key, flat.shape))


def initial(model, x):
  return init_params(model, {"params": jax.random.key(0)}, x, None, jax.random.key(1))


def images(n=6, seed=0):
  return (jax.random.uniform(jax.random.key(seed), (n, 8, 8, 1)) > 0.5).astype(jnp.float32)


def test_one_group_is_a_plain_vae_with_the_same_elbo_on_the_same_weights():
  """One group: encode gives q(z | x), decode p(x | z), and the prior is one Gaussian for every x (from the
  learned top state), so the ELBO of a plain VAE with that prior equals the model's own, draw for draw."""
  model = tiny(groups=(1,), blocks=(1,))
  x, rng = images(), jax.random.key(5)
  params = perturbed(init_params(model, {"params": jax.random.key(0)}, x, None, rng), jax.random.key(1))
  out = model.apply({"params": params}, x, None, rng)
  mean, logvar = model.apply({"params": params}, x, None, method="encode")
  np.testing.assert_allclose(out.mean, mean, rtol=1e-6)
  np.testing.assert_allclose(out.prior_mean, np.broadcast_to(out.prior_mean[:1], out.prior_mean.shape), atol=1e-6)
  eps = (out.z - mean) * jnp.exp(-0.5 * logvar)  # the standard normal draw of the reparameterization
  z = mean + jnp.exp(0.5 * logvar) * eps
  logits = model.apply({"params": params}, z, None, method="decode")
  plain = elbo_terms(x, logits, mean, logvar, BERNOULLI, (out.prior_mean, out.prior_logvar))
  own = elbo_terms(x, out.logits, out.mean, out.logvar, BERNOULLI, out.prior)
  np.testing.assert_allclose(plain["elbo"], own["elbo"], rtol=1e-5)
  # At initialization the prior's block is zero: p(z) = N(0, I) and the KL is the plain VAE's closed form.
  params0 = init_params(model, {"params": jax.random.key(0)}, x, None, rng)
  out0 = model.apply({"params": params0}, x, None, rng)
  np.testing.assert_array_equal(out0.prior_mean, 0.0)
  np.testing.assert_array_equal(out0.prior_logvar, 0.0)
  np.testing.assert_allclose(elbo_terms(x, out0.logits, out0.mean, out0.logvar, BERNOULLI, out0.prior)["kl"],
                             gaussian_kl(out0.mean, out0.logvar), rtol=1e-6)


def test_the_kl_per_group_of_a_hand_set_posterior_equals_the_closed_form():
  """Group g's posterior block is set to output the constants (m_g, logvar_g) everywhere and the prior is
  N(0, I): its KL is units_g * (m_g^2 + e^lv_g - 1 - lv_g) / 2, reported per group by the diagnostics."""
  model = tiny(groups=(1, 1), blocks=(1, 1))
  x = images(n=10)
  params = init_params(model, {"params": jax.random.key(0)}, x, None, jax.random.key(1))
  hand = {0: (0.5, math.log(0.25)), 1: (-1.0, 0.0)}
  for g, (m, lv) in hand.items():
    last = params[f"groups_{g}"]["posterior"]["Conv_2"]
    last["kernel"] = jnp.zeros_like(last["kernel"])
    last["bias"] = jnp.array([m, m, lv, lv], jnp.float32)  # latent_channels = 2: means, then log-variances
  expected = [units * 0.5 * (m**2 + math.exp(lv) - 1 - lv) for units, (m, lv) in zip(model.group_sizes, hand.values())]
  out = model.apply({"params": params}, x, None, jax.random.key(2))
  per_group = kl_per_group(kl_per_dim(out.mean, out.logvar, out.prior), model.group_sizes)
  np.testing.assert_allclose(per_group, np.broadcast_to(expected, per_group.shape), rtol=1e-5)
  spec = synthetic_dataset(shape=(8, 8, 1)).spec
  diagnose = estimators.make_diagnostics(model, spec, batch_size=5, mi_examples=10)
  uint8 = (np.asarray(x) * 255).astype(np.uint8)
  diag = diagnose(params, jnp.asarray(uint8), jnp.zeros(10, jnp.int32), jax.random.key(3))
  np.testing.assert_allclose(diag["kl_per_group"], expected, rtol=1e-3)
  assert diag["active_units"] == 0 and diag["active_units_per_group"] == [0, 0]  # constant means: none active


def linear_gaussian_output(x, key, exact: bool, a=0.8, s2=0.6, b=1.5, sx=0.4):
  """One joint draw (z1, z2) of the two-level model z1 ~ N(0, 1), z2 | z1 ~ N(a z1, s2^2), x | z2 ~ N(b z2, sx^2),
  from its exact posterior q(z1 | x) q(z2 | z1, x) (exact) or from the prior (not), as a VAEOutput."""
  v = b**2 * (a**2 + s2**2) + sx**2  # Var x
  k1, k2 = jax.random.split(key)
  if exact:
    m1, v1 = a * b * x / v, jnp.full_like(x, 1.0 - (a * b) ** 2 / v)
  else:
    m1, v1 = jnp.zeros_like(x), jnp.ones_like(x)
  z1 = m1 + jnp.sqrt(v1) * jax.random.normal(k1, x.shape)
  if exact:
    precision = 1 / s2**2 + b**2 / sx**2
    m2, v2 = (a * z1 / s2**2 + b * x / sx**2) / precision, jnp.full_like(x, 1 / precision)
  else:
    m2, v2 = a * z1, jnp.full_like(x, s2**2)
  z2 = m2 + jnp.sqrt(v2) * jax.random.normal(k2, x.shape)
  raw_scale = jnp.log(jnp.expm1(sx - likelihoods.GAUSSIAN_MIN_SCALE))  # softplus(raw) + floor = sx
  logits = jnp.stack([b * z2, jnp.full_like(z2, raw_scale)], axis=-1)  # [B, 1, 2]: mean and scale of x
  cat = lambda u, w: jnp.concatenate([u, w], axis=-1)
  return VAEOutput(mean=cat(m1, m2), logvar=cat(jnp.log(v1), jnp.log(v2)), z=cat(z1, z2), logits=logits,
                   prior_mean=cat(jnp.zeros_like(x), a * z1), prior_logvar=cat(jnp.zeros_like(x), jnp.full_like(x, 2 * math.log(s2))))


@pytest.mark.parametrize("k", [1, 7, 64])
def test_the_joint_bound_under_the_exact_posterior_of_a_linear_gaussian_hierarchy_is_log_p_x(k):
  x = jnp.array([[-2.0], [0.3], [1.7]])
  v = 1.5**2 * (0.8**2 + 0.6**2) + 0.4**2
  log_px = -0.5 * (math.log(2 * math.pi * v) + np.asarray(x[:, 0]) ** 2 / v)
  gaussian = likelihoods.get("gaussian")

  def log_weights(exact, chunk):
    def draw(i):
      keys = jax.random.split(jax.random.fold_in(jax.random.key(0), i), chunk)
      return jnp.stack([joint_log_weights(x[:, :, None], linear_gaussian_output(x, kk, exact), gaussian) for kk in keys])
    return draw

  bound, elbo = estimators.running_bound(log_weights(True, min(k, 5)), 3, k, 5, with_elbo=True)
  np.testing.assert_allclose(bound, log_px, atol=1e-4)  # every weight is p(x): the bound is exact
  np.testing.assert_allclose(elbo, log_px, atol=1e-4)
  # The prior as proposal: the ELBO falls short of log p(x) by KL(prior || posterior) (> 0.29 nats here, from
  # z1 alone), while L_2000 comes within sampling error of it.
  loose, loose_elbo = estimators.running_bound(log_weights(False, 5), 3, 2000, 5, with_elbo=True)
  assert np.all(np.asarray(loose_elbo) < log_px - 0.2)
  np.testing.assert_allclose(loose, log_px, atol=0.05)


def test_the_model_bound_over_all_groups_is_at_least_the_elbo_and_rises_with_k():
  model = tiny()
  x = images(n=8)
  params = perturbed(initial(model, x), jax.random.key(2), 0.1)
  bound = {k: estimators.iwae_bound(model, params, x, None, jax.random.key(4), k, 16, BERNOULLI, with_elbo=True)
           for k in (1, 64)}
  np.testing.assert_allclose(bound[1][0], bound[1][1], rtol=1e-6)  # k = 1: L_1 is the one-draw ELBO
  assert float(jnp.mean(bound[64][0])) > float(jnp.mean(bound[64][1]))  # L_64 above the mean ELBO of its draws


@pytest.mark.parametrize("conditional", [True, False], ids=["xla_cpu_conditional", "jax_checkpoint"])
def test_remat_gives_the_same_gradients(conditional, monkeypatch):
  """Both ways models/remat.py recomputes: the conditional it uses on CPU, jax.checkpoint on GPU and TPU."""
  monkeypatch.setattr(remat_module, "backward_in_conditional", lambda: conditional)
  x, rng = images(), jax.random.key(3)
  plain, remat = tiny(), tiny(remat=True)
  params = init_params(plain, {"params": jax.random.key(0)}, x, None, rng)
  params = perturbed(params, jax.random.key(1), 0.1)

  def loss(model):
    def f(p):
      out = model.apply({"params": p}, x, None, rng)
      return -jnp.mean(elbo_terms(x, out.logits, out.mean, out.logvar, BERNOULLI, out.prior)["elbo"])
    return jax.jit(jax.grad(f))

  for a, b in zip(jax.tree.leaves(loss(plain)(params)), jax.tree.leaves(loss(remat)(params))):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


def test_remat_cuts_the_train_steps_temporaries_by_more_than_two():
  """XLA's buffer assignment of the compiled gradient: the activations kept for the backward pass shrink
  from every block's to the inputs of the checkpointed calls (2.4x at every size of the resolution benchmark)."""
  x = jax.random.uniform(jax.random.key(0), (8, 32, 32, 3))

  def temporaries(model):
    params = init_params(model, {"params": jax.random.key(0)}, x[:1], None, jax.random.key(1))

    def loss(p):
      out = model.apply({"params": p}, x, None, jax.random.key(2))
      return -jnp.mean(elbo_terms(x, out.logits, out.mean, out.logvar, BERNOULLI, out.prior)["elbo"])
    return jax.jit(jax.grad(loss)).lower(params).compile().memory_analysis().temp_size_in_bytes

  kw = dict(width=16, bottleneck=8, latent_channels=4, encoder_blocks=[1, 1, 1], decoder_groups=[1, 1, 1],
            activation="gelu")
  plain, remat = (temporaries(HierarchicalVAE(HVAEConfig(remat=r, **kw), (32, 32, 3), 3)) for r in (False, True))
  assert plain / remat > 2.0, (plain, remat)


def test_temperature_scales_the_prior_and_zero_gives_the_prior_mean_path():
  model = tiny()
  x = images()
  params = perturbed(initial(model, x), jax.random.key(2), 0.1)
  cold = [model.apply({"params": params}, jax.random.key(s), None, 4, 0.0, method="generate") for s in (1, 2)]
  np.testing.assert_array_equal(cold[0], cold[1])  # t = 0: every group at its prior mean, whatever the key
  warm = [model.apply({"params": params}, jax.random.key(s), None, 4, 1.0, method="generate") for s in (1, 2)]
  assert float(jnp.max(jnp.abs(warm[0] - warm[1]))) > 1e-3


def test_the_llr_bound_keeps_the_upper_groups_on_the_posterior_and_the_lower_at_their_prior_mean():
  model = tiny()  # three groups: one at 4x4, then two at 8x8
  x = images(n=8)
  params = perturbed(initial(model, x), jax.random.key(2), 0.1)
  key, upper = jax.random.key(4), model.group_sizes[0]
  full = model.apply({"params": params}, x, None, key)
  out = model.apply({"params": params}, x, None, key, prior_groups=2)
  np.testing.assert_array_equal(out.z[:, :upper], full.z[:, :upper])  # the top group: the same posterior draw
  np.testing.assert_array_equal(out.z[:, upper:], out.prior_mean[:, upper:])  # the lower two: their prior's mean
  np.testing.assert_array_equal(out.mean[:, upper:], out.prior_mean[:, upper:])  # ... and out of the weight
  np.testing.assert_allclose(out.logits, model.apply({"params": params}, out.z, method="decode"), atol=1e-5)
  log_normal = lambda z, m, lv: jnp.sum(-0.5 * (math.log(2 * math.pi) + lv + (z - m) ** 2 / jnp.exp(lv)), axis=-1)
  top = lambda a: a[:, :upper]
  by_hand = (BERNOULLI.log_prob(x, out.logits) + log_normal(top(out.z), top(out.prior_mean), top(out.prior_logvar))
             - log_normal(top(out.z), top(out.mean), top(out.logvar)))
  np.testing.assert_allclose(joint_log_weights(x, out, BERNOULLI), by_hand, rtol=1e-5)
  # every group at its prior mean: whatever the draws, the bound is log p(x | the prior-mean path)
  every = estimators.joint_bound(model, params, x, None, key, 8, 4, BERNOULLI, prior_groups=3)
  cold = model.apply({"params": params}, jax.random.key(9), None, 8, 0.0, method="generate")
  np.testing.assert_allclose(every, BERNOULLI.log_prob(x, cold), rtol=1e-5)


def test_the_llr_score_is_the_bound_minus_the_upper_groups_bound():
  from cvae_jax.data import DatasetSpec, Encoding
  from cvae_jax.evaluators import anomaly
  model = tiny()
  x = images(n=6)
  params = perturbed(initial(model, x), jax.random.key(2), 0.1)
  spec = DatasetSpec("tiny", (8, 8, 1), 10, Encoding.static_binary)
  labels, key, stored = jnp.zeros(6, jnp.int32), jax.random.key(3), x.astype(jnp.uint8)
  scores = anomaly.make_scores(model, spec, BERNOULLI, 4, 6, 2, llr_groups=(1, 2))(params, stored, labels, key)
  assert not any(k.startswith("llr") for k in anomaly.make_scores(model, spec, BERNOULLI, 4, 6, 2)(
      params, stored, labels, key))
  batch_key = estimators.fold(jax.random.fold_in(key, 0), estimators.Draw.REPARAM)  # map_over_split's first chunk
  for m in (1, 2):
    upper = estimators.joint_bound(model, params, x, None, batch_key, 4, 2, BERNOULLI, prior_groups=m)
    np.testing.assert_allclose(scores[f"llr>{m}"], -scores["nll"] - upper, rtol=1e-5)


def test_the_condition_enters_the_top_down_path():
  model = tiny(condition_size=3)
  c0, c1 = jnp.eye(3)[jnp.array([0, 0])], jnp.eye(3)[jnp.array([1, 1])]
  params = perturbed(init_params(model, {"params": jax.random.key(0)}, images(2), c0, jax.random.key(1)),
                     jax.random.key(2), 0.1)
  z = jax.random.normal(jax.random.key(3), (2, model.latent_size))
  decoded = [model.apply({"params": params}, z, c, method="decode") for c in (c0, c1)]
  assert float(jnp.max(jnp.abs(decoded[0] - decoded[1]))) > 1e-3
  with pytest.raises(ValueError, match="needs the condition"):
    model.apply({"params": params}, z, None, method="decode")


def hvae_config(**overrides):
  return small_config(**{"model.arch": "hvae", "model.width": 8, "model.bottleneck": 4, "model.latent_channels": 2,
                         "model.encoder_blocks": [1, 1], "model.decoder_groups": [1, 1], **overrides})


def test_an_hvae_trains_reports_kl_per_group_and_resumes_bit_identically(tmp_path, monkeypatch):
  ds = synthetic_dataset(pixels=Pixels.dynamic_binary)
  cfg = hvae_config(**{"training.epochs": 3, "data.pixels": Pixels.dynamic_binary, "model.kind": "cvae",
                       "objective.free_bits": 0.05, "training.skip_grad_norm": 1e6})
  results = train_and_evaluate(cfg, tmp_path / "straight", dataset=ds)
  rows = read_metrics(tmp_path / "straight")
  assert rows[-1]["test/elbo"] > rows[0]["test/elbo"]
  assert len(rows[-1]["test/kl_per_group"]) == 2 and len(rows[-1]["test/active_units_per_group"]) == 2
  assert sum(rows[-1]["test/kl_per_group"]) == pytest.approx(rows[-1]["test/kl"], rel=0.2)  # two draws of the KL
  assert results["nll"] <= -results["elbo"] + 1.0  # L_8 over the joint draws, near or above the ELBO
  assert rows[-1]["train/skipped"] == 0.0 and rows[-1]["train/grad_norm"] > 0
  with killed_at_epoch(monkeypatch, 2):
    train_and_evaluate(cfg, tmp_path / "resumed", dataset=ds)
  train_and_evaluate(cfg, tmp_path / "resumed", dataset=ds)
  a, b = final_state(cfg, ds, tmp_path / "straight"), final_state(cfg, ds, tmp_path / "resumed")
  for u, w in zip(jax.tree.leaves((a.params, a.opt_state)), jax.tree.leaves((b.params, b.opt_state))):
    np.testing.assert_array_equal(u, w)


def test_updates_above_the_gradient_norm_threshold_are_skipped(tmp_path):
  ds = synthetic_dataset()
  cfg = hvae_config(**{"training.epochs": 1, "training.skip_grad_norm": 1e-6, "evaluation.iwae_samples": 0})
  train_and_evaluate(cfg, tmp_path, dataset=ds)
  _, initial = model_and_state(cfg, ds.spec)
  trained = final_state(cfg, ds, tmp_path)
  assert read_metrics(tmp_path)[-1]["train/skipped"] == 8  # every step of the epoch (256 // 32) skipped
  for u, w in zip(jax.tree.leaves(initial.params), jax.tree.leaves(trained.params)):
    np.testing.assert_array_equal(u, w)


def test_the_importance_weighted_objective_trains_a_hierarchy(tmp_path):
  cfg = hvae_config(**{"training.epochs": 1, "objective.estimator": "iwae", "objective.samples": 3,
                       "evaluation.iwae_samples": 0})
  results = train_and_evaluate(cfg, tmp_path, dataset=synthetic_dataset())
  assert np.isfinite(results["elbo"]) and read_metrics(tmp_path)[-1]["train/loss"] <= -read_metrics(tmp_path)[-1]["train/elbo"] + 1e-3


@pytest.mark.parametrize("overrides, key", [
    ({"model.decoder_groups": [0, 0]}, "model.decoder_groups"),
    ({"model.encoder_blocks": [1]}, "model.encoder_blocks"),
    ({"model.compute_dtype": "float16"}, "model.compute_dtype"),
    ({"objective.regularizer": "tcvae"}, "objective.regularizer"),
    ({"training.skip_grad_norm": 0.0}, "training.skip_grad_norm"),
    ({"evaluation.llr_groups": [1, 2]}, "evaluation.llr_groups"),
    ({"evaluation.llr_groups": [0]}, "evaluation.llr_groups"),
])
def test_bad_hvae_settings_are_refused_naming_the_key(overrides, key):
  with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
    validate(hvae_config(**overrides))


def test_a_resolution_the_stages_do_not_divide_is_refused_with_what_to_do():
  cfg = hvae_config(**{"model.decoder_groups": [1, 1, 1, 1], "model.encoder_blocks": [1] * 4})  # 8 -> 1 divides
  model_and_state(cfg, synthetic_dataset().spec)
  with pytest.raises(ConfigError, match="data.resize"):
    model_and_state(hvae_config(**{"model.decoder_groups": [1, 1, 1, 1, 1], "model.encoder_blocks": [1] * 5}),
                    synthetic_dataset().spec)


def test_bfloat16_compute_keeps_float32_parameters_statistics_and_outputs():
  x, rng = images(), jax.random.key(3)
  full, half = tiny(), tiny(compute_dtype="bfloat16")
  params = perturbed(init_params(full, {"params": jax.random.key(0)}, x, None, rng), jax.random.key(1), 0.1)
  assert {p.dtype for p in jax.tree.leaves(half.init({"params": jax.random.key(0)}, x, None, rng))} == {np.dtype("float32")}
  a, b = full.apply({"params": params}, x, None, rng), half.apply({"params": params}, x, None, rng)
  assert b.logits.dtype == b.mean.dtype == b.prior_mean.dtype == jnp.float32
  np.testing.assert_allclose(b.logits, a.logits, atol=0.1)  # bfloat16 keeps ~3 significant digits
  assert float(jnp.max(jnp.abs(b.logits - a.logits))) > 0  # and it did compute in bfloat16


def test_translation_and_class_conditional_samples_of_a_cvae_hierarchy():
  """The CVAE's codes (every group's posterior mean) decoded under other classes: the image's own class gives
  its reconstruction, as decode(encode(x, c), c) does, and another class gives another image."""
  from cvae_jax import generation
  spec = synthetic_dataset(shape=(8, 8, 1)).spec
  model = tiny(condition_size=spec.condition_size)
  x, labels = images(n=2), np.array([0, 2])
  c = spec.condition_input(jnp.asarray(labels))
  params = perturbed(init_params(model, {"params": jax.random.key(0)}, x, c, jax.random.key(1)), jax.random.key(2), 0.1)
  translated = generation.translate(model, params, spec, x, labels, BERNOULLI)  # [2, 3, 8, 8, 1]
  mean, _ = model.apply({"params": params}, x, c, method="encode")
  own = BERNOULLI.mean(model.apply({"params": params}, mean, c, method="decode"))
  np.testing.assert_allclose(translated[jnp.arange(2), jnp.asarray(labels)], own, atol=1e-6)
  assert float(jnp.max(jnp.abs(translated[:, 0] - translated[:, 1]))) > 1e-3
  samples = generation.class_conditional(model, params, spec, jax.random.key(4), [0, 1], 3, BERNOULLI, temperature=0.8)
  assert samples.shape == (2, 3, 8, 8, 1)
