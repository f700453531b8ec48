"""Known-answer tests for every likelihood, the KL and the loss."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special
import scipy.stats
from scipy import integrate

from cvae_jax.config import ObjectiveConfig
from cvae_jax import likelihoods, models, objectives

jax.config.update("jax_enable_x64", False)


def test_gaussian_kl_closed_form_by_hand():
  # KL(N(1, 1) || N(0, 1)) = 1/2; KL(N(0, 4) || N(0, 1)) = 1/2 (4 - 1 - log 4).
  mean = jnp.array([[1.0, 0.0]])
  logvar = jnp.array([[0.0, math.log(4.0)]])
  expected = 0.5 + 0.5 * (3.0 - math.log(4.0))
  np.testing.assert_allclose(objectives.gaussian_kl(mean, logvar), [expected], rtol=1e-6)
  np.testing.assert_allclose(objectives.gaussian_kl_per_dim(mean, logvar).sum(-1), [expected], rtol=1e-6)
  np.testing.assert_allclose(objectives.gaussian_kl(jnp.zeros((3, 5)), jnp.zeros((3, 5))), np.zeros(3), atol=1e-7)


def test_gaussian_kl_matches_monte_carlo():
  key = jax.random.key(0)
  mean = jnp.array([[0.7, -1.2, 0.1]])
  logvar = jnp.array([[-0.5, 0.3, -2.0]])
  z = models.reparameterize(key, jnp.broadcast_to(mean, (400_000, 3)), jnp.broadcast_to(logvar, (400_000, 3)))
  std = jnp.exp(0.5 * logvar)
  log_q = jax.scipy.stats.norm.logpdf(z, mean, std).sum(-1)
  log_p = jax.scipy.stats.norm.logpdf(z).sum(-1)
  monte_carlo = float(jnp.mean(log_q - log_p))
  standard_error = float(jnp.std(log_q - log_p)) / math.sqrt(z.shape[0])
  closed = float(objectives.gaussian_kl(mean, logvar)[0])
  assert abs(monte_carlo - closed) < 4 * standard_error + 1e-4


def test_bernoulli_log_prob_by_hand():
  x = jnp.array([[1.0, 0.0, 1.0, 0.3]])
  logits = jnp.array([[0.0, 2.0, -1.0, 0.5]])
  p = 1 / (1 + np.exp(-np.array([0.0, 2.0, -1.0, 0.5])))
  xs = np.array([1.0, 0.0, 1.0, 0.3])
  expected = np.sum(xs * np.log(p) + (1 - xs) * np.log(1 - p))
  np.testing.assert_allclose(likelihoods.bernoulli_log_prob(x, logits), [expected], rtol=1e-6)


def test_bernoulli_log_prob_is_stable_for_large_logits():
  x = jnp.array([[1.0, 0.0]])
  value = likelihoods.bernoulli_log_prob(x, jnp.array([[100.0, -100.0]]))
  assert np.isfinite(value).all() and abs(float(value[0])) < 1e-6
  np.testing.assert_allclose(likelihoods.bernoulli_log_prob(x, jnp.array([[-100.0, 0.0]])), [-100.0 - math.log(2)],
                             rtol=1e-6)


@pytest.mark.parametrize("logit", [0.0, 1e-5, 5e-3, 0.2, -1.5, 4.0, -12.0, 30.0])
def test_continuous_bernoulli_is_normalized(logit):
  # The density integrates to 1 over [0, 1]: C(lambda) is the right normalizer at every logit.
  def density(x):
    return math.exp(float(likelihoods.continuous_bernoulli_log_prob(jnp.array([[x]]), jnp.array([[logit]]))[0]))
  total, _ = integrate.quad(density, 0.0, 1.0)
  assert total == pytest.approx(1.0, abs=2e-5)


@pytest.mark.parametrize("logit", [0.0, 1e-3, 0.3, -2.0, 8.0])
def test_continuous_bernoulli_norm_and_mean_against_paper_formulas(logit):
  lam = 1 / (1 + math.exp(-logit))
  if abs(lam - 0.5) < 1e-9:
    log_c, mean = math.log(2.0), 0.5
  else:
    log_c = math.log(2 * math.atanh(1 - 2 * lam) / (1 - 2 * lam))  # eq. 7 of Loaiza-Ganem & Cunningham
    mean = lam / (2 * lam - 1) + 1 / (2 * math.atanh(1 - 2 * lam))
  logits = jnp.array([logit])
  assert float(likelihoods.continuous_bernoulli_log_norm(logits)[0]) == pytest.approx(log_c, abs=2e-5)
  assert float(likelihoods.continuous_bernoulli_mean(logits)[0]) == pytest.approx(mean, abs=1e-6)


def test_the_continuous_bernoulli_series_near_zero_in_float64():
  """Below |l| = 0.01 the log normalizer and the mean use their Taylor series; in float64 they must agree
  with the exact forms log(l / tanh(l / 2)) and 1 / (1 - e^-l) - 1 / l as far as the series' next terms allow
  (about 2e-16 and l^3 / 720). Above it the exact forms are used: at 0.015 and 0.019 the series would be off
  by 4e-15 and 2e-14 (log C), 5e-9 and 1e-8 (the mean)."""
  with jax.enable_x64(True):
    for logit in (0.009, -0.005, 0.0015, 0.01, 0.015, 0.019):
      a = abs(logit)
      log_c = float(likelihoods.continuous_bernoulli_log_norm(jnp.asarray([logit], jnp.float64))[0])
      assert abs(log_c - (math.log(a) - math.log(math.tanh(a / 2)))) < 2e-15
      mean = float(likelihoods.continuous_bernoulli_mean(jnp.asarray([logit], jnp.float64))[0])
      series_error = abs(logit) ** 3 / 720 if a < 0.01 else 0.0
      assert abs(mean - (1 / -math.expm1(-logit) - 1 / logit)) < series_error + 1e-12


def test_continuous_bernoulli_log_prob_sums_each_example_s_pixels():
  x = np.array([[0.1, 0.7, 1.0], [0.5, 0.0, 0.3]])
  logits = np.array([[0.4, -1.2, 3.0], [0.0, 2.0, -0.5]])
  lam = 1 / (1 + np.exp(-logits))
  with np.errstate(divide="ignore", invalid="ignore"):
    log_c = np.where(np.abs(lam - 0.5) < 1e-9, math.log(2.0), np.log(2 * np.arctanh(1 - 2 * lam) / (1 - 2 * lam)))
  expected = np.sum(log_c + x * np.log(lam) + (1 - x) * np.log(1 - lam), axis=1)
  got = likelihoods.continuous_bernoulli_log_prob(jnp.asarray(x, jnp.float32), jnp.asarray(logits, jnp.float32))
  np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_gradients_flow_through_the_reparameterized_sample():
  key = jax.random.key(1)
  mean = jnp.array([[0.5, -0.3]])
  logvar = jnp.array([[0.2, -1.0]])
  eps = jax.random.normal(key, mean.shape)

  def f(mean, logvar):
    return jnp.sum(models.reparameterize(key, mean, logvar) ** 2)

  g_mean, g_logvar = jax.grad(f, argnums=(0, 1))(mean, logvar)
  z = mean + jnp.exp(0.5 * logvar) * eps
  np.testing.assert_allclose(g_mean, 2 * z, rtol=1e-5)
  np.testing.assert_allclose(g_logvar, 2 * z * 0.5 * jnp.exp(0.5 * logvar) * eps, rtol=1e-5)


def test_beta_weights_only_the_loss():
  x = jnp.array([[1.0, 0.0, 1.0]] * 2)
  logits = jnp.array([[0.3, -0.2, 1.0], [2.0, 0.0, -1.0]])
  mean, logvar = jnp.array([[0.5], [1.0]]), jnp.array([[0.1], [-0.4]])
  terms = objectives.elbo_terms(x, logits, mean, logvar, likelihoods.get("bernoulli"))
  rec = -np.asarray(likelihoods.bernoulli_log_prob(x, logits)).mean()
  kl = np.asarray(objectives.gaussian_kl(mean, logvar)).mean()
  for beta in (0.0, 1.0, 4.0):
    loss, metrics = objectives.loss_and_metrics(terms, beta, num_dims=3)
    assert float(loss) == pytest.approx(rec + beta * kl, rel=1e-6)
    assert float(metrics["elbo"]) == pytest.approx(-(rec + kl), rel=1e-6)  # unweighted, whatever beta
    assert float(metrics["rec"]) == pytest.approx(rec, rel=1e-6)
    assert float(metrics["kl"]) == pytest.approx(kl, rel=1e-6)
    assert float(metrics["bpd"]) == pytest.approx((rec + kl) / (3 * math.log(2)), rel=1e-6)


def test_gaussian_log_prob_against_scipy():
  rng = np.random.default_rng(0)
  x, mean, raw = rng.normal(size=(3, 2, 5, 1)).astype(np.float32)
  outputs = np.concatenate([mean, raw], axis=-1)  # [B, T, 2]: mean and raw scale per dimension
  sigma = np.log1p(np.exp(raw)) + likelihoods.GAUSSIAN_MIN_SCALE
  expected = scipy.stats.norm.logpdf(x, mean, sigma).sum(axis=(1, 2))
  np.testing.assert_allclose(likelihoods.gaussian_log_prob(jnp.asarray(x), jnp.asarray(outputs)), expected, rtol=1e-5)
  np.testing.assert_allclose(likelihoods.get("gaussian").mean(jnp.asarray(outputs)), mean)
  # objective.min_scale: the floor under the scale, here 0.5, so no dimension's density exceeds N(0 | 0, 0.5^2)
  floored = likelihoods.of(ObjectiveConfig(likelihood="gaussian", min_scale=0.5))
  expected = scipy.stats.norm.logpdf(x, mean, np.log1p(np.exp(raw)) + 0.5).sum(axis=(1, 2))
  np.testing.assert_allclose(floored.log_prob(jnp.asarray(x), jnp.asarray(outputs)), expected, rtol=1e-5)
  assert likelihoods.of(ObjectiveConfig(likelihood="gaussian")) is likelihoods.get("gaussian")


def mixture_outputs(logits, means, log_scales):
  """Per-channel parameters [..., C, K] each -> decoder outputs [..., 3 K C] in the likelihood's layout
  [..., 3, K, C]: all logits, then all means, then all log-scales."""
  params = np.stack([logits, means, log_scales], axis=-3).swapaxes(-1, -2)  # [..., 3, K, C]
  return jnp.asarray(params.reshape(*params.shape[:-3], -1), jnp.float32)


def every_value_of_one_pixel(logits, means, log_scales):
  """The probability of each of the 256 values of each pixel.  params [P, K] -> [256, P]"""
  p, k = logits.shape
  values = np.repeat(np.arange(256) / 255, p).reshape(256 * p, 1, 1).astype(np.float32)  # [256 P, 1, 1]
  outputs = np.tile(mixture_outputs(logits[:, None], means[:, None], log_scales[:, None]), (256, 1))[:, None]
  log_prob = likelihoods.discretized_logistic_mixture_log_prob(jnp.asarray(values), jnp.asarray(outputs), k)
  return np.exp(np.asarray(log_prob, np.float64)).reshape(256, p)


def test_the_discretized_logistic_mixture_sums_to_one_over_the_256_values():
  rng = np.random.default_rng(0)
  k = 4
  logits = rng.normal(scale=3.0, size=(8, k))
  means = rng.uniform(-1.2, 1.2, size=(8, k))
  log_scales = rng.uniform(-8.0, 3.0, size=(8, k))
  means[:4] = [[-1.0, 1.0, -0.999, 1.0 - 1 / 255]] * 4  # on and near the edges, and the middle of an edge bin
  log_scales[0], log_scales[1] = -7.0, -20.0  # at and below the clamp: narrower than a bin
  log_scales[2], log_scales[3] = 6.0, [-7.0, 6.0, -3.0, 0.0]  # wider than the data range; mixed
  means[4:6], log_scales[4:6] = 0.0, -7.0  # on the boundary of two bins: each holds half the mass
  np.testing.assert_allclose(every_value_of_one_pixel(logits, means, log_scales).sum(axis=0), np.ones(8), atol=1e-5)


def test_the_discretized_logistic_by_hand():
  # K = 1, mean 0, scale 1 in [-1, 1] units: 127 is the bin [-2/255, 0]; 0 reaches to -inf; 255 to +inf.
  sigmoid = scipy.special.expit
  probabilities = every_value_of_one_pixel(np.zeros((1, 1)), np.zeros((1, 1)), np.zeros((1, 1)))[:, 0]
  assert probabilities[127] == pytest.approx(sigmoid(0.0) - sigmoid(-2 / 255), rel=1e-5)
  assert probabilities[0] == pytest.approx(sigmoid(-1 + 1 / 255), rel=1e-5)
  assert probabilities[255] == pytest.approx(1 - sigmoid(1 - 1 / 255), rel=1e-5)
  # A far tail bin (1.8e-6, below PixelCNN++'s 1e-5 fallback) against float64: scale e^-3, value 200.
  x, s = 145 / 255, math.exp(-3.0)
  tail = every_value_of_one_pixel(np.zeros((1, 1)), np.zeros((1, 1)), np.full((1, 1), -3.0))[200, 0]
  assert tail == pytest.approx(sigmoid(-(x - 1 / 255) / s) - sigmoid(-(x + 1 / 255) / s), rel=1e-4)


def test_a_mixture_of_identical_logistics_is_that_logistic():
  rng = np.random.default_rng(1)
  means, log_scales = rng.uniform(-1, 1, size=(6, 1)), rng.uniform(-6, 1, size=(6, 1))
  one = every_value_of_one_pixel(np.zeros((6, 1)), means, log_scales)
  five = every_value_of_one_pixel(rng.normal(size=(6, 5)), np.repeat(means, 5, 1), np.repeat(log_scales, 5, 1))
  np.testing.assert_allclose(five, one, rtol=1e-5, atol=1e-9)


def test_the_discretized_logistic_mixture_sums_each_example_s_pixels_and_channels():
  # [B, H, W, C] = [2, 2, 3, 3] with K = 2: the image's log-prob is the sum of each channel's alone, which also
  # pins the layout of the outputs (mixture_outputs) and the mean's.
  rng = np.random.default_rng(2)
  shape, k = (2, 2, 3, 3), 2
  x = rng.integers(0, 256, size=shape) / 255
  x.reshape(-1)[:2] = [0.0, 1.0]
  logits, log_scales = rng.normal(size=(2, *shape, k))
  means = rng.uniform(-1.2, 1.2, (*shape, k))
  got = likelihoods.discretized_logistic_mixture_log_prob(jnp.asarray(x, jnp.float32),
                                                          mixture_outputs(logits, means, log_scales), k)
  alone = likelihoods.discretized_logistic_mixture_log_prob(
      jnp.asarray(x.reshape(-1, 1, 1), jnp.float32),
      mixture_outputs(*(a.reshape(-1, 1, 1, k) for a in (logits, means, log_scales)))[:, 0], k)  # [B H W C]
  np.testing.assert_allclose(got, np.asarray(alone).reshape(2, -1).sum(axis=1), rtol=1e-5)
  pi = scipy.special.softmax(logits, axis=-1)
  mean = likelihoods.discretized_logistic_mixture_mean(mixture_outputs(logits, means, log_scales), k)
  np.testing.assert_allclose(mean, (np.sum(pi * np.clip(means, -1, 1), axis=-1) + 1) / 2, rtol=1e-5)


def test_objective_mixtures_sizes_the_discretized_logistic_mixture():
  from cvae_jax.config import ConfigError
  three = likelihoods.of(ObjectiveConfig(likelihood="discretized_logistic_mixture", mixtures=3))
  assert three.outputs_per_channel == 9
  assert three.log_prob(jnp.zeros((1, 2, 2, 1)), jnp.zeros((1, 2, 2, 9))).shape == (1,)
  assert three.mean(jnp.zeros((1, 2, 2, 9))).shape == (1, 2, 2, 1)
  assert likelihoods.of(ObjectiveConfig(likelihood="discretized_logistic_mixture", mixtures=3)) is three
  default = likelihoods.of(ObjectiveConfig(likelihood="discretized_logistic_mixture"))
  assert default is likelihoods.get("discretized_logistic_mixture") and default.outputs_per_channel == 30
  assert default.normalized("grayscale") and not default.normalized("static_binary")
  with pytest.raises(ConfigError, match="objective.mixtures=0"):
    likelihoods.of(ObjectiveConfig(likelihood="discretized_logistic_mixture", mixtures=0))
  with pytest.raises(ValueError, match="outputs_per_channel"):
    three.log_prob(jnp.zeros((1, 2, 2, 1)), jnp.zeros((1, 2, 2, 30)))


def test_discretized_logistic_gradients_are_finite_at_the_edges_and_the_clamp():
  # Values 0 and 255 (the edge bins), a middle bin whose sigmoid difference underflows (mean 1, scale e^-7:
  # the density fallback), log-scales at and below the clamp and very large.
  x = jnp.array([[0.0, 1.0, 128 / 255, 0.0, 1.0]]).reshape(1, 5, 1)
  means = np.array([-1.0, 1.0, 1.0, 1.0, -1.0]).reshape(5, 1, 1)  # [pixel, C, K]
  log_scales = np.array([-7.0, -20.0, -7.0, 8.0, -7.0]).reshape(5, 1, 1)
  outputs = mixture_outputs(np.zeros((5, 1, 1)), means, log_scales)[None]  # [1, 5, 3]
  value, grad = jax.value_and_grad(lambda o: likelihoods.discretized_logistic_mixture_log_prob(x, o, 1)[0])(outputs)
  assert np.isfinite(float(value)) and np.all(np.isfinite(np.asarray(grad)))
  assert np.all(np.asarray(grad)[0, 1, 2] == 0.0)  # below the clamp the log-scale gets no gradient


def test_free_bits_by_hand():
  kl = jnp.array([[0.1, 2.0], [0.3, 1.0]])  # batch means per dimension: 0.2 and 1.5
  assert float(objectives.free_bits_kl(kl, 0.5)) == pytest.approx(0.5 + 1.5)
  assert float(objectives.free_bits_kl(kl, 0.0)) == pytest.approx(1.7)  # no free bits: the plain mean KL
  grad = jax.grad(lambda k: objectives.free_bits_kl(k, 0.5))(kl)
  np.testing.assert_allclose(grad, [[0.0, 0.5], [0.0, 0.5]])  # the dimension below 0.5 nats is not pushed


def test_free_bits_clamp_the_batch_mean_not_each_example():
  # Dimension 0: examples 0.1 and 0.9, batch mean 0.5; dimension 1: 2.0 and 0.0, mean 1.0. Clamping the means
  # gives 0.5 + 1.0 = 1.5; clamping each example first would give (0.5 + 0.9) / 2 + (2.0 + 0.5) / 2 = 1.95.
  kl = jnp.array([[0.1, 2.0], [0.9, 0.0]])
  assert float(objectives.free_bits_kl(kl, 0.5)) == pytest.approx(1.5)
  grad = jax.grad(lambda k: objectives.free_bits_kl(k, 0.4))(kl)  # both means above 0.4: each example pushed
  np.testing.assert_allclose(grad, [[0.5, 0.5], [0.5, 0.5]])


def test_free_bits_replace_only_the_loss_kl():
  terms = {"rec": jnp.array([10.0, 12.0]), "kl": jnp.array([1.0, 3.0]), "elbo": jnp.array([-11.0, -15.0])}
  loss, metrics = objectives.loss_and_metrics(terms, 2.0, num_dims=4, kl_penalty=jnp.asarray(5.0))
  assert float(loss) == pytest.approx(11.0 + 2.0 * 5.0)
  assert float(metrics["kl"]) == pytest.approx(2.0) and float(metrics["elbo"]) == pytest.approx(-13.0)


def test_autoencoder_terms_have_no_kl():
  x = jnp.array([[1.0, 0.0]])
  terms = objectives.elbo_terms(x, jnp.array([[2.0, -1.0]]), jnp.zeros((1, 3)), None, likelihoods.get("bernoulli"))
  assert float(terms["kl"][0]) == 0.0 and float(terms["elbo"][0]) == pytest.approx(-float(terms["rec"][0]))


def _gaussian_aggregate(cov: np.ndarray, m: int, seed: int):
  """A batch whose posteriors are N(mu_i, I) with mu_i ~ N(0, cov): the aggregate posterior is N(0, cov + I)."""
  rng = np.random.default_rng(seed)
  mu = rng.multivariate_normal(np.zeros(len(cov)), cov, size=m)
  z = mu + rng.normal(size=mu.shape)
  return jnp.asarray(z, jnp.float32), jnp.asarray(mu, jnp.float32), jnp.zeros(mu.shape, jnp.float32)


def test_total_correlation_is_zero_for_a_factorized_aggregate_posterior():
  estimates = [float(objectives.total_correlation(*_gaussian_aggregate(np.eye(3), 2000, seed))) for seed in range(3)]
  assert abs(np.mean(estimates)) < 0.01, estimates


def test_total_correlation_of_a_correlated_aggregate_posterior_matches_the_gaussian_closed_form():
  # TC of N(0, S) = 1/2 sum_j log S_jj - 1/2 log det S; here S = cov + I with dims 0 and 1 correlated.
  cov = np.array([[1.0, 0.9, 0.0], [0.9, 1.0, 0.0], [0.0, 0.0, 1.0]])
  aggregate = cov + np.eye(3)
  closed_form = 0.5 * np.sum(np.log(np.diag(aggregate))) - 0.5 * np.linalg.slogdet(aggregate)[1]  # 0.113 nats
  estimates = [float(objectives.total_correlation(*_gaussian_aggregate(cov, 2000, seed))) for seed in range(3)]
  # The minibatch mixture's log is biased by O(1/M): measured +0.013 nats at M = 2000.
  assert abs(np.mean(estimates) - closed_form) < 0.03, (estimates, closed_form)
  assert min(estimates) > 0.08


def test_the_capacity_rises_linearly_then_stays():
  from cvae_jax import annealing
  np.testing.assert_allclose([float(annealing.capacity_at(s, 25.0, 100)) for s in (0, 50, 100, 1000)],
                             [0.0, 12.5, 25.0, 25.0])


@pytest.mark.parametrize("regularizer", ["tcvae", "capacity"])
def test_the_regularized_losses_by_hand(regularizer):
  """beta-TCVAE's loss is rec + kl + (beta - 1) tc, the capacity objective's rec + beta |kl - C(step)|; the
  reported rec, kl and elbo are the ELBO's, unchanged by the regularizer."""
  from conftest import small_config, synthetic_dataset
  from cvae_jax.engine import epoch
  from cvae_jax.tasks.density import DensityTask
  ds = synthetic_dataset()
  task = DensityTask()
  settings = {"objective.beta": 4.0, "objective.capacity": 10.0, "objective.capacity_steps": 100}
  plain = small_config(**{"objective.beta": 4.0})
  cfg = small_config(**settings, **{"objective.regularizer": regularizer})
  model = task.build_model(cfg, ds.spec)
  params = task.initial_state(cfg, model, ds.spec).params
  images, labels = jnp.asarray(ds.train.images[:64]), jnp.asarray(ds.train.labels[:64])
  step = 30
  losses = {}
  for name, c in (("plain", plain), ("reg", cfg)):
    plan = task.plan(c, model, ds.spec, len(ds.train))
    losses[name] = plan.loss(params, images, labels, epoch.StepKeys(plan.hyper.seed, jnp.asarray(step)), plan.hyper)
  (_, ref), (value, metrics) = losses["plain"], losses["reg"]
  for k in ("rec", "kl", "elbo"):
    np.testing.assert_allclose(metrics[k], ref[k], rtol=1e-6)
  if regularizer == "tcvae":
    assert float(metrics["tc"]) != 0
    expected = ref["rec"] + ref["kl"] + 3.0 * metrics["tc"]
  else:
    np.testing.assert_allclose(metrics["capacity"], 10.0 * step / 100)
    expected = ref["rec"] + 4.0 * abs(ref["kl"] - 3.0)
  np.testing.assert_allclose(value, expected, rtol=1e-6)
  np.testing.assert_allclose(metrics["loss"], expected, rtol=1e-6)


def test_the_regularizers_refuse_what_they_do_not_combine_with():
  from conftest import small_config
  from cvae_jax import experiment
  from cvae_jax.config import ConfigError
  with pytest.raises(ConfigError, match="objective.regularizer"):
    experiment.validate(small_config(**{"objective.regularizer": "tcvae", "objective.free_bits": 0.5}))
