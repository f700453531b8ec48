"""The quadrant-completion task (Sohn et al. 2015 as Pyro replicates it): masks, the conditional-prior
KL and bound against closed forms, early stopping, and a whole run with resume."""
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cvae_jax.estimators import importance_weighted_bound
from cvae_jax.tasks import quadrants
from cvae_jax.objectives import gaussian_kl, gaussian_kl_between
from cvae_jax.experiment import train_and_evaluate, validate
from cvae_jax.models import init_params
from conftest import small_config, synthetic_dataset


@pytest.mark.parametrize("given, hidden_quadrants", [(1, "TL TR BR"), (2, "TR BR"), (3, "BR")])
def test_output_mask_hides_the_quadrants_pyro_hides(given, hidden_quadrants):
  mask = quadrants.output_mask(given, 28, 28).reshape(28, 28)
  corners = {"TL": mask[:14, :14], "TR": mask[:14, 14:], "BL": mask[14:, :14], "BR": mask[14:, 14:]}
  for name, block in corners.items():
    assert block.all() if name in hidden_quadrants.split() else not block.any(), name
  x = jnp.linspace(0, 1, 784)[None]
  inputs = quadrants.hide(x, mask.reshape(-1))
  assert int(jnp.sum(inputs == -1)) == 196 * (4 - given)
  np.testing.assert_array_equal(quadrants.fill(inputs, x, mask.reshape(-1)), x)


def test_kl_between_gaussians_matches_closed_forms():
  rng = np.random.default_rng(0)
  mq, lq, mp, lp = (jnp.asarray(rng.normal(size=(3, 4)), jnp.float32) for _ in range(4))
  zeros = jnp.zeros_like(mq)
  np.testing.assert_allclose(gaussian_kl_between(mq, lq, zeros, zeros), gaussian_kl(mq, lq), rtol=1e-6)
  np.testing.assert_allclose(gaussian_kl_between(mq, lq, mq, lq), 0.0, atol=1e-6)
  # Monte Carlo: E_q[log q(z) - log p(z)] with 400k draws.
  z = mq + jnp.exp(0.5 * lq) * jax.random.normal(jax.random.key(0), (400_000, *mq.shape))
  logpdf = lambda z, m, lv: jnp.sum(jax.scipy.stats.norm.logpdf(z, m, jnp.exp(0.5 * lv)), axis=-1)
  mc = jnp.mean(logpdf(z, mq, lq) - logpdf(z, mp, lp), axis=0)
  np.testing.assert_allclose(gaussian_kl_between(mq, lq, mp, lp), mc, rtol=0.02, atol=0.02)
  # By hand: KL(N(1, 0.5^2) || N(-1, 2^2)) = log(2 / 0.5) + (0.5^2 + (1 + 1)^2) / (2 * 2^2) - 1/2 = 1.417544
  one = lambda v: jnp.asarray([[v]], jnp.float32)
  kl = gaussian_kl_between(one(1.0), one(math.log(0.25)), one(-1.0), one(math.log(4.0)))
  assert float(kl[0]) == pytest.approx(math.log(4.0) + 4.25 / 8 - 0.5, rel=1e-6)


def test_sampled_kl_has_the_closed_form_as_its_expectation():
  """Pyro's Trace_ELBO estimates KL(q || p(z | x)) by log q(z) - log p(z) at the drawn z: over many draws its
  mean is the closed form, the reconstruction term is the same, and a single draw differs from it."""
  cfg = small_config(**{"task": "quadrants", "model.hidden": [16], "model.latent_size": 3})
  task = quadrants.Networks(cfg, 4, 4)
  x = jax.random.uniform(jax.random.key(0), (5, 16))
  x0 = jnp.zeros((1, 16))
  params = init_params(task.cvae, jax.random.key(1), x0, x0, jax.random.key(2))
  baseline = init_params(task.baseline, jax.random.key(3), x0)
  analytic = task.cvae_terms(params, baseline, x, jax.random.key(4), 200_000, "analytic")
  sampled = task.cvae_terms(params, baseline, x, jax.random.key(4), 200_000, "sampled")
  np.testing.assert_allclose(sampled["rec"], analytic["rec"], rtol=1e-6)
  assert float(jnp.min(analytic["kl"])) > 0.05  # q and p differ, so the check below is not 0 = 0
  np.testing.assert_allclose(sampled["kl"], analytic["kl"], rtol=0.02, atol=0.01)
  one = task.cvae_terms(params, baseline, x, jax.random.key(5), 1, "sampled")
  assert float(jnp.max(jnp.abs(one["kl"] - analytic["kl"]))) > 1e-3
  q_mean, q_logvar = task.cvae.apply({"params": params}, x, method=lambda m, i: m.recognition(i))
  closed = gaussian_kl_between(q_mean, q_logvar, *task.prior(params, baseline, x))
  np.testing.assert_allclose(analytic["kl"], closed, rtol=1e-6)  # "analytic" is the closed form itself
  # With one sample, -L_1 is the sampled negative ELBO of the same draw (chunk 0's key, as the bound folds it).
  nll_1 = task.conditional_nll(params, baseline, x, jax.random.key(6), 1, 1)
  neg_elbo_1 = task.cvae_terms(params, baseline, x, jax.random.fold_in(jax.random.key(6), 0), 1, "sampled")["neg_elbo"]
  np.testing.assert_allclose(nll_1, neg_elbo_1, rtol=1e-5)


def test_bound_with_a_conditional_prior_is_exact_under_the_exact_posterior():
  """p(z) = N(m0, diag v0), p(y | z) = N(W z + b, s^2 I), W with orthogonal columns: the posterior is
  diagonal, every importance weight equals p(y), so L_k = log p(y) = log N(y; W m0 + b, W V0 W^T + s^2 I)."""
  rng = np.random.default_rng(1)
  q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
  w, b, s = q[:, :2] * np.array([1.3, 0.6]), rng.normal(size=3), 0.5
  m0, v0 = rng.normal(size=(4, 2)), np.array([0.8, 0.8])  # isotropic prior: keeps the posterior diagonal
  y = rng.normal(size=(4, 3)) * 2
  cov = w @ np.diag(v0) @ w.T + s**2 * np.eye(3)
  diff = y - (m0 @ w.T + b)
  log_py = -0.5 * (np.einsum("bi,ij,bj->b", diff, np.linalg.inv(cov), diff) + np.linalg.slogdet(cov)[1]
                   + 3 * math.log(2 * math.pi))
  post_prec = np.diag(1 / v0) + w.T @ w / s**2
  post_cov = np.linalg.inv(post_prec)
  post_mean = (m0 / v0 + (y - b) @ w / s**2) @ post_cov
  f32 = lambda a: jnp.asarray(a, jnp.float32)

  def log_likelihood(z):
    return jnp.sum(jax.scipy.stats.norm.logpdf(f32(y), jnp.einsum("sbz,xz->sbx", z, f32(w)) + f32(b), s), axis=-1)

  prior = (f32(m0), jnp.log(f32(np.broadcast_to(v0, m0.shape))))
  for k in (1, 9):
    bound = importance_weighted_bound(log_likelihood, f32(post_mean), jnp.log(f32(np.broadcast_to(np.diag(post_cov), m0.shape))),
                                      jax.random.key(k), k, chunk=4, prior=prior)
    np.testing.assert_allclose(bound, log_py, atol=1e-4)


def test_early_stopping_keeps_the_best_epoch_and_stops_after_patience(tmp_path):
  cfg = small_config(**{"training.epochs": 20, "quadrants.patience": 3, "training.batch_size": 8})
  stopping = iter([5.0, 4.0, 4.5, 4.2, 4.1, 3.0])  # best at epoch 2; epochs 3-5 are worse: stop after 5
  seen = []

  def stopping_loss(params):
    seen.append(float(params["w"]))
    return next(stopping)

  images = jnp.zeros((16, 2, 2, 1), jnp.uint8)
  best, summary = quadrants.train_net(cfg, tmp_path / "phase", {"w": jnp.asarray(1.0)},
                                      lambda p, x, key: (p["w"] - 3.0) ** 2, stopping_loss, images,
                                      quadrants.Net.BASELINE)
  assert summary == {"epochs": 5, "best_loss": 4.0, "stopped_early": True}
  assert float(best["w"]) == seen[1]  # the parameters of epoch 2
  rows = [json.loads(line) for line in (tmp_path / "phase" / "metrics.jsonl").read_text().splitlines()]
  assert [r["stop/loss"] for r in rows] == [5.0, 4.0, 4.5, 4.2, 4.1]


def test_a_quadrant_run_trains_evaluates_and_resumes(tmp_path):
  ds = synthetic_dataset(n_train=512, n_test=128, shape=(8, 8, 1))
  cfg = small_config(**{"task": "quadrants", "model.hidden": [64], "model.latent_size": 4, "training.epochs": 6,
                        "quadrants.given": 2, "evaluation.iwae_samples": 64, "evaluation.sample_chunk": 16,
                        "training.figures": True})
  results = train_and_evaluate(cfg, tmp_path, dataset=ds)
  assert results["baseline_fit"]["epochs"] >= 1 and results["cvae_fit"]["epochs"] >= 1
  # The k-sample bound is at least the ELBO: its NLL is no larger than the negative ELBO (up to noise).
  assert results["cvae_conditional_nll"] <= results["cvae_neg_elbo"] + 0.5
  assert 0 < results["cvae_neg_elbo"] < 32 * math.log(2) * 2  # 32 output pixels; far below chance BCE
  # Exactly: the test numbers are the best (early-stopping) parameters' in the checkpoints, evaluated in chunks
  # of training.eval_batch_size, chunk i with the EVAL key folded with i.
  from cvae_jax.engine import loop, optim
  from cvae_jax.keys import Stream, stream_key
  nets, x0 = quadrants.Networks(cfg, 8, 8), jnp.zeros((1, 64))

  def best_params(phase, params):
    saved = loop.Phase(tmp_path / phase, 3)
    state = saved.restore(loop.EarlyStoppingState.start(params, optim.create_optimizer(cfg.optimizer)))
    saved.close()
    return state.best_params

  base = best_params("baseline", init_params(nets.baseline, jax.random.key(0), x0))
  cvae = best_params("cvae", init_params(nets.cvae, jax.random.key(0), x0, x0, jax.random.key(1)))
  x, key, size = nets.images(jnp.asarray(ds.test.images)), stream_key(cfg.seed, Stream.EVAL), 50
  neg_elbo = []
  for i, start in enumerate(range(0, len(x), size)):
    chunk = jnp.pad(x[start:start + size], [(0, size - len(x[start:start + size])), (0, 0)])
    terms = nets.cvae_terms(cvae, base, chunk, jax.random.fold_in(key, i), cfg.quadrants.elbo_samples)
    neg_elbo += list(np.asarray(terms["neg_elbo"])[:len(x[start:start + size])])
  assert results["cvae_neg_elbo"] == pytest.approx(np.mean(neg_elbo), rel=1e-5)
  assert results["baseline_bce"] == pytest.approx(float(jnp.mean(nets.baseline_loss(base, x))), rel=1e-5)
  assert (tmp_path / "figures" / "quadrants.png").stat().st_size > 0
  # Resume: with results.json gone, both models come back from their checkpoints without retraining.
  lines = {phase: (tmp_path / phase / "metrics.jsonl").read_text() for phase in ("baseline", "cvae")}
  (tmp_path / "results.json").unlink()
  again = train_and_evaluate(cfg, tmp_path, dataset=ds)
  assert {phase: (tmp_path / phase / "metrics.jsonl").read_text() for phase in lines} == lines
  for key in ("baseline_bce", "cvae_neg_elbo", "cvae_conditional_nll"):
    assert again[key] == pytest.approx(results[key], rel=1e-6)


def test_quadrants_refuse_binarized_pixels():
  from cvae_jax.config import ConfigError
  with pytest.raises(ConfigError, match="data.pixels"):
    validate(small_config(**{"task": "quadrants", "data.pixels": "static_binary"}))


def test_a_checkpoint_in_the_earlier_optimizer_layout_resumes(tmp_path):
  """Quadrant checkpoints written with the optimizer that scaled by the learning rate itself (a chain ending
  in optax.scale: one more, empty, optimizer state) are restored, not renamed `.corrupt`."""
  from cvae_jax.engine import checkpoints, loop, optim
  cfg = small_config(**{"training.epochs": 3, "quadrants.patience": 5, "training.batch_size": 8})
  params = {"w": jnp.asarray(1.0)}
  earlier = loop.EarlyStoppingState.start(params, optim.create_optimizer(cfg.optimizer))
  earlier = earlier.replace(step=jnp.asarray(2), params={"w": jnp.asarray(2.5)},
                            opt_state=(earlier.opt_state, optax.ScaleState()))
  ckpt = checkpoints.Checkpointer(tmp_path / "phase" / "checkpoints", 3)
  ckpt.save(2, earlier)
  ckpt.close()
  images = jnp.zeros((16, 2, 2, 1), jnp.uint8)
  losses = iter([3.0, 2.0])
  best, summary = quadrants.train_net(cfg, tmp_path / "phase", params, lambda p, x, key: (p["w"] - 3.0) ** 2,
                                      lambda p: next(losses), images, quadrants.Net.BASELINE)
  rows = [json.loads(line) for line in (tmp_path / "phase" / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows] == [4, 6]  # resumed after epoch 1 (step 2), not from the start
  assert summary["epochs"] == 3 and not list((tmp_path / "phase" / "checkpoints").glob("*.corrupt"))
  assert 2.5 < float(best["w"]) <= 3.0  # trained on from the restored w = 2.5 towards 3


def test_the_prior_network_sees_the_given_quadrants_and_the_baseline_s_guess_only():
  """p(z | x) must not see the pixels to predict: two images equal on the given quadrants and different
  elsewhere get the same prior; a change to a given pixel changes it."""
  cfg = small_config(**{"task": "quadrants", "model.hidden": [16], "model.latent_size": 3, "quadrants.given": 1})
  nets = quadrants.Networks(cfg, 4, 4)
  x0 = jnp.zeros((1, 16))
  params = init_params(nets.cvae, jax.random.key(1), x0, x0, jax.random.key(2))
  baseline = init_params(nets.baseline, jax.random.key(3), x0)
  x = jax.random.uniform(jax.random.key(0), (2, 16))
  other = jnp.where(nets.mask, 1.0 - x, x)  # the hidden pixels changed, the given ones kept
  for a, b in zip(nets.prior(params, baseline, x), nets.prior(params, baseline, other)):
    np.testing.assert_array_equal(a, b)
  given = int(np.flatnonzero(~np.asarray(nets.mask))[0])
  changed = x.at[:, given].set(1.0 - x[:, given])
  assert not np.allclose(nets.prior(params, baseline, x)[0], nets.prior(params, baseline, changed)[0])


def test_the_baseline_loss_is_the_bce_summed_over_the_hidden_pixels():
  cfg = small_config(**{"task": "quadrants", "model.hidden": [16], "quadrants.given": 3})
  nets = quadrants.Networks(cfg, 4, 4)
  params = init_params(nets.baseline, jax.random.key(1), jnp.zeros((1, 16)))
  x = jax.random.uniform(jax.random.key(0), (3, 16))
  logits = np.asarray(nets.baseline.apply({"params": params}, quadrants.hide(x, nets.mask)), np.float64)
  p, y, mask = 1 / (1 + np.exp(-logits)), np.asarray(x, np.float64), np.asarray(nets.mask)
  bce = -np.sum(np.where(mask, y * np.log(p) + (1 - y) * np.log(1 - p), 0.0), axis=1)  # 4 hidden pixels each
  np.testing.assert_allclose(nets.baseline_loss(params, x), bce, rtol=1e-5)
  assert mask.sum() == 4 and np.all(bce > 0)
