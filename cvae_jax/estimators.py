"""Estimators over a whole split, jitted and chunked so memory stays bounded for any split size: the ELBO
and its terms, KL per latent dimension, active units, I(x; z), and the importance-weighted bound.

Training calls the same functions each epoch and at the end; the evaluators (cvae_jax/evaluators/) call
them on a restored checkpoint.
"""
from __future__ import annotations

import enum
import math
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from cvae_jax.data import DatasetSpec, model_input
from cvae_jax.keys import fold
from cvae_jax.likelihoods import Likelihood
from cvae_jax.models import VAE
from cvae_jax.objectives import decoder_log_likelihood, elbo_terms, gaussian_kl_per_dim, log_importance_weights

ACTIVE_UNIT_THRESHOLD = 0.01  # Burda et al. 2016: unit u is active when Cov_x(E_q[z_u]) > 0.01


class Draw(enum.IntEnum):
  """The named parts below an evaluation key (the run's Stream.EVAL key, or one chunk's key)."""
  REPARAM = 0             # the z drawn from q(z | x)
  BINARIZE = 1            # dynamic binarization of the inputs
  IWAE = 2                # the importance samples of the end-of-training bound
  MUTUAL_INFORMATION = 3  # the z of the I(x; z) estimate


def condition(model: VAE, spec: DatasetSpec, labels: jax.Array) -> Optional[jax.Array]:
  """The CVAE's condition c from a split's labels (DatasetSpec.condition_input); None for a VAE."""
  return spec.condition_input(labels) if model.condition_size else None


def inputs(spec: DatasetSpec, images: jax.Array, key: jax.Array) -> jax.Array:
  """A chunk's stored values as model inputs (dynamic binarization from the chunk key's BINARIZE part)."""
  return model_input(images, spec.encoding, fold(key, Draw.BINARIZE))


def map_over_split(per_batch: Callable, batch_size: int) -> Callable:
  """Lifts per_batch(params, x_uint8 [b, ...], labels [b], key) -> pytree of [b, ...] arrays to a
  jitted function of a whole split: padded to whole chunks, lax.map over chunks, padding removed.
  Chunk i gets key fold_in(key, i), so results do not depend on anything but the key and batch_size."""

  @jax.jit
  def over_split(params, images, labels, key):
    n = images.shape[0]
    num_chunks = math.ceil(n / batch_size)
    pad = num_chunks * batch_size - n
    images = jnp.pad(images, [(0, pad)] + [(0, 0)] * (images.ndim - 1))
    labels = jnp.pad(labels, [(0, pad)] + [(0, 0)] * (labels.ndim - 1))
    chunked = jax.tree.map(lambda a: a.reshape(num_chunks, batch_size, *a.shape[1:]), (images, labels))
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(num_chunks))
    out = jax.lax.map(lambda args: per_batch(params, *args[0], args[1]), (chunked, keys))
    return jax.tree.map(lambda a: a.reshape(num_chunks * batch_size, *a.shape[2:])[:n], out)

  return over_split


def make_evaluate(model: VAE, spec: DatasetSpec, likelihood: Likelihood, batch_size: int) -> Callable:
  """Returns evaluate(params, images, labels, key) -> {elbo, rec, kl, bpd}, means over the split.

  One sample of z per example (the reparameterized ELBO estimate), from the fixed `key`.
  """
  num_dims = spec.num_dims

  def per_batch(params, images, labels, key):
    x = inputs(spec, images, key)
    out = model.apply({"params": params}, x, condition(model, spec, labels), fold(key, Draw.REPARAM))
    return elbo_terms(x, out.logits, out.mean, out.logvar, likelihood)  # each [b]

  per_example = map_over_split(per_batch, batch_size)

  @jax.jit
  def evaluate(params, images, labels, key):
    means = {k: jnp.mean(v) for k, v in per_example(params, images, labels, key).items()}
    means["bpd"] = -means["elbo"] / (num_dims * math.log(2.0))
    return means

  return evaluate


def make_posterior_stats(model: VAE, spec: DatasetSpec, batch_size: int, with_logvar: bool = False) -> Callable:
  """Returns stats(params, images, labels, key) -> {mean [N, Z], kl_per_dim [N, Z] (, logvar [N, Z])}
  of q(z | x[, c])."""

  def per_batch(params, images, labels, key):
    x = inputs(spec, images, key)
    mean, logvar = model.apply({"params": params}, x, condition(model, spec, labels), method=VAE.encode)
    return {"mean": mean, "kl_per_dim": gaussian_kl_per_dim(mean, logvar)} | ({"logvar": logvar} if with_logvar else {})

  return map_over_split(per_batch, batch_size)


def mutual_information(mean: jax.Array, logvar: jax.Array, key: jax.Array) -> jax.Array:
  """I_q(x; z) = E_x E_q(z|x)[log q(z|x)] - E_q(z)[log q(z)] under the aggregate posterior
  q(z) = (1/N) sum_n q(z | x_n) of the N given examples (Hoffman & Johnson 2016; the estimator of
  He et al. 2019). One z per example; log q(z) by log-sum-exp over all N posteriors. At most log N.
  [N, Z], [N, Z] -> scalar (nats)"""
  n = mean.shape[0]
  neg_entropy = jnp.mean(jnp.sum(-0.5 * math.log(2 * math.pi) - 0.5 * (1.0 + logvar), axis=-1))
  z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape)  # [N, Z]
  # log q(z_i | x_j) for every pair: [N (z), N (posterior)]
  log_q = jnp.sum(jax.scipy.stats.norm.logpdf(z[:, None, :], mean[None], jnp.exp(0.5 * logvar)[None]), axis=-1)
  log_qz = jax.scipy.special.logsumexp(log_q, axis=1) - math.log(n)      # [N]
  return neg_entropy - jnp.mean(log_qz)


def make_diagnostics(model: VAE, spec: DatasetSpec, batch_size: int, mi_examples: int) -> Callable:
  """Returns diagnose(params, images, labels, key) -> {kl_per_dim: list, active_units, mutual_information}:
  the posterior-collapse diagnostics over a whole split (I(x; z) on its first mi_examples examples)."""
  stats = make_posterior_stats(model, spec, batch_size, with_logvar=True)
  estimate_mi = jax.jit(mutual_information)

  def diagnose(params, images, labels, key) -> dict:
    posterior = stats(params, images, labels, key)
    num_active, _ = active_units(np.asarray(posterior["mean"]))
    m = min(mi_examples, images.shape[0])
    mi = estimate_mi(posterior["mean"][:m], posterior["logvar"][:m], fold(key, Draw.MUTUAL_INFORMATION))
    return {"kl_per_dim": np.asarray(posterior["kl_per_dim"]).mean(axis=0).round(5).tolist(),
            "active_units": num_active, "mutual_information": float(mi)}

  return diagnose


def active_units(posterior_means: np.ndarray, threshold: float = ACTIVE_UNIT_THRESHOLD) -> tuple[int, np.ndarray]:
  """Number of units u with Cov_x(E_q[z_u | x]) > threshold, and that covariance per unit.  [N, Z] -> int, [Z]"""
  variance = np.var(np.asarray(posterior_means, np.float64), axis=0)
  return int(np.sum(variance > threshold)), variance


def importance_weighted_bound(log_likelihood: Callable, mean: jax.Array, logvar: jax.Array, key: jax.Array,
                              num_samples: int, chunk: int, with_elbo: bool = False, prior=None):
  """L_k = log (1/k) sum_s w_s, w_s = p(x | z_s) p(z_s) / q(z_s | x), z_s ~ q = N(mean, exp(logvar))
  (Burda et al. 2016, eq. 8), for a standard normal prior, or the diagonal Gaussian `prior` = (mean,
  logvar) [B, Z] each (a conditional prior p(z | x)).  [B]

  `log_likelihood(z [S, B, Z]) -> log p(x | z) [S, B]`. Samples are drawn `chunk` at a time and
  folded into a running log-sum-exp, so memory stays at one chunk for k in the thousands; samples past
  k in the last chunk are masked to weight zero. with_elbo: also returns (1/k) sum_s log w_s, the
  k-sample estimate of the ELBO from the same samples: (L_k [B], elbo [B]).
  """
  chunk = min(chunk, num_samples)
  num_chunks = math.ceil(num_samples / chunk)
  std = jnp.exp(0.5 * logvar)

  def body(carry, i):
    running, log_w_sum = carry
    eps = jax.random.normal(jax.random.fold_in(key, i), (chunk, *mean.shape))  # [S, B, Z]
    z = mean + std * eps
    log_w = log_importance_weights(log_likelihood(z), z, eps, logvar, prior)  # [S, B]
    valid = (i * chunk + jnp.arange(chunk)) < num_samples
    log_w_sum = log_w_sum + jnp.sum(jnp.where(valid[:, None], log_w, 0.0), axis=0)
    log_w = jnp.where(valid[:, None], log_w, -jnp.inf)
    return (jnp.logaddexp(running, jax.scipy.special.logsumexp(log_w, axis=0)), log_w_sum), None

  init = (jnp.full(mean.shape[0], -jnp.inf), jnp.zeros(mean.shape[0]))
  (total, log_w_sum), _ = jax.lax.scan(body, init, jnp.arange(num_chunks))
  bound = total - math.log(num_samples)
  return (bound, log_w_sum / num_samples) if with_elbo else bound


def iwae_bound(model: VAE, params, x, c, key, num_samples: int, chunk: int, likelihood: Likelihood,
               with_elbo: bool = False):
  """L_k of the model's log p(x) (log p(x | c) for a CVAE), with its encoder as the proposal.  [B]
  (with_elbo: also the k-sample ELBO estimate, see importance_weighted_bound)"""
  mean, logvar = model.apply({"params": params}, x, c, method=VAE.encode)
  log_likelihood = decoder_log_likelihood(model, params, x, c, likelihood)
  return importance_weighted_bound(log_likelihood, mean, logvar, key, num_samples, chunk, with_elbo)


def make_iwae(model: VAE, spec: DatasetSpec, likelihood: Likelihood, num_samples: int, batch_size: int,
              sample_chunk: int) -> Callable:
  """Returns iwae(params, images, labels, key) -> per-example L_k [N] over a whole split."""

  def per_batch(params, images, labels, key):
    x = inputs(spec, images, key)
    return iwae_bound(model, params, x, condition(model, spec, labels), fold(key, Draw.REPARAM), num_samples,
                      sample_chunk, likelihood)

  return map_over_split(per_batch, batch_size)
