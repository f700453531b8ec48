"""Known-answer tests of the importance-weighted bound and active units."""
import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cvae_jax import estimators, likelihoods
from cvae_jax.config import Kind
from cvae_jax.data import Dataset, DatasetSpec, Encoding, Split
from cvae_jax.evaluators import EvalContext, likelihood
from cvae_jax.keys import Stream, fold, stream_key
from cvae_jax.models import create_model, init_params
from cvae_jax.models.mlp import MLPConfig
from cvae_jax.objectives import elbo_terms
from conftest import small_config

BERNOULLI = likelihoods.get("bernoulli")


def linear_gaussian(seed=0, dz=2, dx=3, sigma=0.5):
  """p(z) = N(0, I), p(x | z) = N(W z + b, sigma^2 I): log p(x) = log N(x; b, W W^T + sigma^2 I).
  W has orthogonal columns, so the exact posterior N(m, S) has a diagonal S."""
  rng = np.random.default_rng(seed)
  q, _ = np.linalg.qr(rng.normal(size=(dx, dx)))
  w = q[:, :dz] * np.array([1.5, 0.7])[:dz]
  b = rng.normal(size=dx)
  x = rng.normal(size=(4, dx)) * 2
  cov = w @ w.T + sigma**2 * np.eye(dx)
  diff = x - b
  log_px = -0.5 * (np.einsum("bi,ij,bj->b", diff, np.linalg.inv(cov), diff) + np.linalg.slogdet(cov)[1]
                   + dx * math.log(2 * math.pi))
  post_cov = np.linalg.inv(np.eye(dz) + w.T @ w / sigma**2)  # diagonal
  post_mean = diff @ w @ post_cov / sigma**2
  def log_likelihood(z):  # [S, B, Z] -> [S, B]
    mean_x = jnp.einsum("sbz,xz->sbx", z, jnp.asarray(w, jnp.float32)) + b
    return jnp.sum(jax.scipy.stats.norm.logpdf(jnp.asarray(x, jnp.float32), mean_x, sigma), axis=-1)
  return log_likelihood, log_px, post_mean, np.diag(post_cov)


def test_exact_posterior_gives_log_px_for_any_k():
  log_likelihood, log_px, mean, var = linear_gaussian()
  for k in (1, 7):
    bound = estimators.importance_weighted_bound(log_likelihood, jnp.asarray(mean, jnp.float32),
                                                 jnp.log(jnp.asarray(np.broadcast_to(var, mean.shape), jnp.float32)),
                                                 jax.random.key(0), k, chunk=3)
    np.testing.assert_allclose(bound, log_px, atol=1e-4)  # every weight equals p(x)


def test_bound_converges_to_log_px_as_k_grows():
  log_likelihood, log_px, mean, var = linear_gaussian()
  # A deliberately poor proposal: shifted mean, doubled variance.
  q_mean = jnp.asarray(mean + 0.6, jnp.float32)
  q_logvar = jnp.log(jnp.asarray(np.broadcast_to(2 * var, mean.shape), jnp.float32))
  gaps = []
  for k in (1, 10, 100, 5000):
    repeat = jax.jit(jax.vmap(lambda key: estimators.importance_weighted_bound(
        log_likelihood, q_mean, q_logvar, key, k, chunk=500)))
    bounds = repeat(jax.random.split(jax.random.key(k), 20))  # [20, B]
    gaps.append(float(np.mean(log_px - np.mean(bounds, axis=0))))
  assert all(g > -1e-3 for g in gaps)            # a lower bound on average
  assert gaps[0] > gaps[1] > gaps[2] > gaps[3]   # tighter with every k
  assert gaps[3] < 0.01                          # and converged at k = 5000


def test_a_partial_last_chunk_is_masked_exactly():
  # With the exact posterior every weight is p(x): any k and chunk give log p(x) exactly, unless masked
  # samples leak in (60 samples in 4 chunks of 16 would then be off by log(64 / 60) = 0.065).
  log_likelihood, log_px, mean, var = linear_gaussian()
  logvar = jnp.log(jnp.asarray(np.broadcast_to(var, mean.shape), jnp.float32))
  bound = estimators.importance_weighted_bound(log_likelihood, jnp.asarray(mean, jnp.float32), logvar,
                                               jax.random.key(3), 60, chunk=16)
  np.testing.assert_allclose(bound, log_px, atol=1e-4)


@pytest.fixture(scope="module")
def small_vae():
  spec = DatasetSpec("toy", (4, 4, 1), 3, Encoding.static_binary)
  model = create_model(MLPConfig(kind=Kind.vae, hidden=[16], latent_size=3), spec)
  x = (jax.random.uniform(jax.random.key(5), (50, 4, 4, 1)) > 0.5).astype(jnp.float32)
  params = init_params(model, {"params": jax.random.key(0)}, x, None, jax.random.key(1))
  return model, params, x


def test_iwae_with_k_1_equals_the_elbo_in_expectation(small_vae):
  model, params, x = small_vae
  keys = jax.random.split(jax.random.key(0), 400)

  def elbo(key):
    out = model.apply({"params": params}, x, None, key)
    return elbo_terms(x, out.logits, out.mean, out.logvar, BERNOULLI)["elbo"]

  l1 = jax.jit(jax.vmap(lambda k: estimators.iwae_bound(model, params, x, None, k, 1, 1, BERNOULLI)))(keys)
  elbo = jax.jit(jax.vmap(elbo))(jax.random.split(jax.random.key(1), 400))
  # Both estimate E_q[log p(x|z)] - KL; the analytic-KL ELBO has lower variance. Mean over the 50 images:
  assert float(np.mean(l1)) == pytest.approx(float(np.mean(elbo)), abs=0.05)


def test_iwae_grows_with_k_on_average(small_vae):
  model, params, x = small_vae
  def mean_bound(k):
    repeat = jax.jit(jax.vmap(lambda key: estimators.iwae_bound(model, params, x, None, key, k, 50,
                                                                BERNOULLI)))
    return float(np.mean(repeat(jax.random.split(jax.random.key(k), 10))))
  means = [mean_bound(k) for k in (1, 10, 100)]
  assert means[0] < means[1] < means[2]


def test_active_units():
  rng = np.random.default_rng(0)
  means = np.stack([rng.normal(0, 1, 1000), rng.normal(0, 0.05, 1000), rng.normal(3, 0.2, 1000)], axis=1)
  count, variance = estimators.active_units(means)
  assert count == 2  # variances about 1, 0.0025, 0.04
  np.testing.assert_allclose(variance, [1, 0.0025, 0.04], rtol=0.15)


def test_the_bound_s_elbo_averages_the_log_weights_over_k():
  # Under the exact posterior every log weight is log p(x): their mean over k = 10 samples drawn 4 at a time
  # (the last chunk half masked) is log p(x) too. Dividing the sum by the chunk size would give 2.5 log p(x).
  log_likelihood, log_px, mean, var = linear_gaussian()
  logvar = jnp.log(jnp.asarray(np.broadcast_to(var, mean.shape), jnp.float32))
  bound, elbo = estimators.importance_weighted_bound(log_likelihood, jnp.asarray(mean, jnp.float32), logvar,
                                                     jax.random.key(4), 10, chunk=4, with_elbo=True)
  np.testing.assert_allclose(bound, log_px, atol=1e-4)
  np.testing.assert_allclose(elbo, log_px, atol=1e-4)


@pytest.fixture(scope="module")
def seven_examples():
  """A CVAE and 7 labelled examples: a split that batches of 3 do not divide (the last chunk padded)."""
  spec = DatasetSpec("toy", (4, 4, 1), 3, Encoding.static_binary)
  model = create_model(MLPConfig(kind=Kind.cvae, hidden=[16], latent_size=3), spec)
  images = (np.random.default_rng(1).random((7, 4, 4, 1)) > 0.5).astype(np.uint8)
  labels = np.array([0, 1, 2, 2, 1, 0, 1], np.int32)
  params = model.init({"params": jax.random.key(0)}, jnp.zeros((1, 4, 4, 1)), jnp.zeros((1, 3)),
                      jax.random.key(1))["params"]
  return spec, model, params, images, labels


def test_split_wide_posterior_statistics_equal_each_example_s(seven_examples):
  spec, model, params, images, labels = seven_examples
  x, c = jnp.asarray(images, jnp.float32), jax.nn.one_hot(labels, 3)
  mean, logvar = model.apply({"params": params}, x, c, method=model.encode)
  for batch in (3, 7):
    stats = estimators.make_posterior_stats(model, spec, batch, with_logvar=True)(params, images, labels,
                                                                                  jax.random.key(2))
    np.testing.assert_allclose(stats["mean"], mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats["logvar"], logvar, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats["kl_per_dim"], 0.5 * (mean**2 + jnp.exp(logvar) - 1 - logvar), rtol=1e-5,
                               atol=1e-6)


def test_split_wide_elbo_and_bound_equal_each_chunk_s_own(seven_examples):
  # Chunk i of the split is evaluated with key fold_in(key, i): computing each chunk directly with that key
  # and averaging over the 7 real examples (the padding left out) must give the split-wide numbers.
  spec, model, params, images, labels = seven_examples
  key, lik = jax.random.key(3), BERNOULLI
  per_example = {"elbo": [], "rec": [], "kl": [], "iwae": []}
  for i, start in enumerate(range(0, 7, 3)):
    chunk_key = jax.random.fold_in(key, i)
    x = jnp.asarray(np.pad(images[start:start + 3], [(0, 3 - len(images[start:start + 3]))] + [(0, 0)] * 3),
                    jnp.float32)
    c = jax.nn.one_hot(np.pad(labels[start:start + 3], (0, 3 - len(labels[start:start + 3]))), 3)
    out = model.apply({"params": params}, x, c, jax.random.fold_in(chunk_key, estimators.Draw.REPARAM))
    terms = elbo_terms(x, out.logits, out.mean, out.logvar, lik)
    bound = estimators.iwae_bound(model, params, x, c, jax.random.fold_in(chunk_key, estimators.Draw.REPARAM), 5,
                                  2, lik)
    real = len(images[start:start + 3])
    for name in ("elbo", "rec", "kl"):
      per_example[name] += list(np.asarray(terms[name])[:real])
    per_example["iwae"] += list(np.asarray(bound)[:real])
  means = estimators.make_evaluate(model, spec, lik, 3)(params, images, labels, key)
  for name in ("elbo", "rec", "kl"):
    assert float(means[name]) == pytest.approx(np.mean(per_example[name]), rel=1e-5)
  assert float(means["bpd"]) == pytest.approx(-np.mean(per_example["elbo"]) / (16 * math.log(2)), rel=1e-5)
  bounds = estimators.make_iwae(model, spec, lik, 5, 3, 2)(params, images, labels, key)
  np.testing.assert_allclose(bounds, per_example["iwae"], rtol=1e-5)


def test_equal_arguments_share_one_evaluation_program_and_a_list_gets_its_own(seven_examples):
  spec, model, params, images, labels = seven_examples
  equal = create_model(MLPConfig(kind=Kind.cvae, hidden=[16], latent_size=3), spec)  # another object, equal
  evaluate = estimators.make_evaluate(model, spec, BERNOULLI, 3)
  assert estimators.make_evaluate(equal, spec, BERNOULLI, 3) is evaluate
  assert estimators.make_evaluate(model, spec, BERNOULLI, 4) is not evaluate
  stats = estimators.make_posterior_stats(model, spec, 3, with_logvar=True)
  assert estimators.make_posterior_stats(equal, spec, 3, with_logvar=True) is stats
  key = jax.random.key(3)
  evaluate(params, images, labels, key)
  compiled = evaluate._cache_size()
  estimators.make_evaluate(equal, spec, BERNOULLI, 3)(params, images, labels, key)
  assert evaluate._cache_size() == compiled  # the end-of-training evaluation compiles nothing new

  calls = []

  @estimators.shared
  def factory(widths):
    calls.append(widths)
    return len(widths)

  assert factory((1, 2)) == factory((1, 2)) == 2 and len(calls) == 1  # hashable: made once
  assert factory([1, 2]) == factory([1, 2]) == 2 and len(calls) == 3  # a list: made on every call


def test_a_vector_condition_is_chunked_row_by_row():
  # Condition vectors [N, P] (molecules' properties) are padded along the examples only.
  from cvae_jax.data import Condition, Modality
  spec = DatasetSpec("toy", (4, 4, 1), 2, Encoding.static_binary, Modality.image, Condition.vector)
  model = create_model(MLPConfig(kind=Kind.cvae, hidden=[16], latent_size=3), spec)
  images = (np.random.default_rng(2).random((7, 4, 4, 1)) > 0.5).astype(np.uint8)
  vectors = np.random.default_rng(3).normal(size=(7, 2)).astype(np.float32)
  params = model.init({"params": jax.random.key(0)}, jnp.zeros((1, 4, 4, 1)), jnp.zeros((1, 2)),
                      jax.random.key(1))["params"]
  mean, _ = model.apply({"params": params}, jnp.asarray(images, jnp.float32), jnp.asarray(vectors), method=model.encode)
  stats = estimators.make_posterior_stats(model, spec, 3)(params, images, vectors, jax.random.key(2))
  np.testing.assert_allclose(stats["mean"], mean, rtol=1e-5, atol=1e-6)


def test_a_unit_at_the_threshold_is_not_active():
  # Burda et al.: active when Cov_x(E_q[z_u]) > 0.01, strictly. Means of +-0.125 have variance 0.015625 exactly.
  means = np.tile([[0.125, 1.0], [-0.125, -1.0]], (50, 1))
  assert estimators.active_units(means, threshold=0.015625)[0] == 1


def test_a_slice_from_its_first_chunk_draws_the_keys_the_whole_split_does(seven_examples):
  spec, model, params, images, labels = seven_examples
  iwae = estimators.make_iwae(model, spec, BERNOULLI, 5, 3, 2)
  whole = np.asarray(iwae(params, images, labels, jax.random.key(3)))
  part = np.asarray(iwae(params, images[3:6], labels[3:6], jax.random.key(3), 1))  # chunk 1 of batches of 3
  np.testing.assert_allclose(part, whole[3:6], rtol=1e-6)
  assert not np.allclose(np.asarray(iwae(params, images[3:6], labels[3:6], jax.random.key(3))), whole[3:6])


def iwae_context(seven_examples, workdir, test_size: int = 7):
  """The likelihood evaluators' context for seven_examples' model (evaluation batches of 3 images, k = 5)."""
  spec, model, params, images, labels = seven_examples
  cfg = small_config(**{"data.name": "toy", "model.kind": "cvae", "evaluation.batch_size": 3,
                        "evaluation.sample_chunk": 2})
  dataset = Dataset(spec, Split(images, labels), Split(images[:test_size], labels[:test_size]))
  return EvalContext(cfg, dataset, model, params, workdir, BERNOULLI)


def test_the_bound_s_per_image_values_are_saved_and_an_evaluation_resumes_after_them(seven_examples, tmp_path,
                                                                                   monkeypatch, capsys):
  """Saved every chunk (of 3 images): a longer evaluation computes only the images after the saved whole
  chunks, and keeps their values (a marker here); other weights' or damaged files are computed again."""
  spec, model, params, images, labels = seven_examples
  monkeypatch.setattr(likelihood, "CHUNKS_PER_SAVE", 1)
  ctx = iwae_context(seven_examples, tmp_path)
  key = fold(stream_key(ctx.cfg.seed, Stream.EVAL), estimators.Draw.IWAE)
  whole = np.asarray(estimators.make_iwae(model, spec, BERNOULLI, 5, 3, 2)(params, images, labels, key))
  evaluate = likelihood.iwae(5)
  result = evaluate(ctx)["iwae"]
  saved = np.load(tmp_path / "iwae_k5.npz")["bound"]
  np.testing.assert_allclose(saved, whole, rtol=1e-6)  # three slices of 3, 3 and 1 (padded) images
  assert result["nll"] == pytest.approx(-whole.mean(), rel=1e-6) and result["computed"] == 7

  marker = saved.copy()
  marker[:5] = -100.0  # 5 saved values: the first chunk (3) is kept, the rest of the second is recomputed
  likelihood._save_bounds(tmp_path / "iwae_k5.npz", marker[:5], likelihood._fingerprint(ctx, 5))
  resumed = evaluate(ctx)["iwae"]
  assert resumed["computed"] == 4
  assert resumed["nll"] == pytest.approx(-(3 * -100.0 + whole[3:].sum()) / 7, rel=1e-6)

  shorter = evaluate(iwae_context(seven_examples, tmp_path, test_size=2))["iwae"]  # the first 2 of the saved 7
  assert shorter["computed"] == 0 and shorter["nll"] == pytest.approx(100.0)
  assert len(np.load(tmp_path / "iwae_k5.npz")["bound"]) == 7  # the longer file is kept

  other = iwae_context(seven_examples, tmp_path)
  other = dataclasses.replace(other, params=jax.tree.map(lambda a: a + 0.1, params))
  assert evaluate(other)["iwae"]["computed"] == 7
  assert "other weights or settings" in capsys.readouterr().out
  (tmp_path / "iwae_k5.npz").write_bytes(b"garbage")
  assert evaluate(ctx)["iwae"]["nll"] == pytest.approx(-whole.mean(), rel=1e-6)
  assert "could not be read" in capsys.readouterr().out
