"""Estimators over a whole split, jitted and chunked so memory stays bounded for any split size: the ELBO
and its terms, KL per latent dimension, active units, I(x; z), and the importance-weighted bound.

Training calls the same functions each epoch and at the end; the evaluators (cvae_jax/evaluators/) call
them on a restored checkpoint.
"""
from __future__ import annotations

import enum
import functools
import math
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from cvae_jax.data import DatasetSpec, model_input
from cvae_jax.keys import fold
from cvae_jax.likelihoods import Likelihood
from cvae_jax.models import VAE
from cvae_jax.objectives import (decoder_log_likelihood, elbo_terms, joint_log_weights, kl_per_dim, kl_per_group,
                                 log_importance_weights)

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
  Chunk i gets key fold_in(key, i), so results do not depend on anything but the key and batch_size;
  first_chunk = j computes a slice that starts at chunk j of a split as the whole split would."""

  @jax.jit
  def over_split(params, images, labels, key, first_chunk=0):
    n = images.shape[0]
    num_chunks = math.ceil(n / batch_size)
    pad = num_chunks * batch_size - n
    images = jnp.pad(images, [(0, pad)] + [(0, 0)] * (images.ndim - 1))
    labels = jnp.pad(labels, [(0, pad)] + [(0, 0)] * (labels.ndim - 1))
    chunked = jax.tree.map(lambda a: a.reshape(num_chunks, batch_size, *a.shape[1:]), (images, labels))
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(first_chunk + jnp.arange(num_chunks))
    out = jax.lax.map(lambda args: per_batch(params, *args[0], args[1]), (chunked, keys))
    return jax.tree.map(lambda a: a.reshape(num_chunks * batch_size, *a.shape[2:])[:n], out)

  return over_split


def shared(factory: Callable) -> Callable:
  """A factory of jitted functions that returns the same function for equal arguments, so the program the
  epoch's metrics compiled serves the end-of-training evaluation too (each new function compiles again).
  Arguments that cannot be hashed (a model holding a list) get a new function."""
  memoized = functools.lru_cache(maxsize=64)(factory)

  @functools.wraps(factory)
  def get(*args, **kwargs):
    try:
      hash((args, tuple(kwargs.items())))
    except TypeError:
      return factory(*args, **kwargs)
    return memoized(*args, **kwargs)

  return get


@shared
def make_evaluate(model: VAE, spec: DatasetSpec, likelihood: Likelihood, batch_size: int) -> Callable:
  """Returns evaluate(params, images, labels, key) -> {elbo, rec, kl, bpd}, means over the split.

  One sample of z per example (the reparameterized ELBO estimate), from the fixed `key`.
  """
  num_dims = spec.num_dims

  def per_batch(params, images, labels, key):
    x = inputs(spec, images, key)
    out = model.apply({"params": params}, x, condition(model, spec, labels), fold(key, Draw.REPARAM))
    return elbo_terms(x, out.logits, out.mean, out.logvar, likelihood, out.prior)  # each [b]

  per_example = map_over_split(per_batch, batch_size)

  @jax.jit
  def evaluate(params, images, labels, key):
    means = {k: jnp.mean(v) for k, v in per_example(params, images, labels, key).items()}
    means["bpd"] = -means["elbo"] / (num_dims * math.log(2.0))
    return means

  return evaluate


@shared
def make_posterior_stats(model: VAE, spec: DatasetSpec, batch_size: int, with_logvar: bool = False) -> Callable:
  """Returns stats(params, images, labels, key) -> {mean [N, Z], kl_per_dim [N, Z] (, logvar [N, Z])}
  of q(z | x[, c]). For a hierarchy (model.group_sizes set) the mean and logvar are those of the
  posterior-mean path (encode), and the KL is that of one joint draw against the prior along it."""
  hierarchical = model.group_sizes is not None

  def per_batch(params, images, labels, key):
    x = inputs(spec, images, key)
    c = condition(model, spec, labels)
    mean, logvar = model.apply({"params": params}, x, c, method="encode")
    if hierarchical:
      out = model.apply({"params": params}, x, c, fold(key, Draw.REPARAM))
      kl = kl_per_dim(out.mean, out.logvar, out.prior)
    else:
      kl = kl_per_dim(mean, logvar)
    return {"mean": mean, "kl_per_dim": kl} | ({"logvar": logvar} if with_logvar else {})

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
  """Returns diagnose(params, images, labels, key) -> the posterior-collapse diagnostics over a whole split:
  {kl_per_dim: list, active_units, mutual_information} (I(x; z) on its first mi_examples examples), or for
  a hierarchy {kl_per_group: list, active_units, active_units_per_group: list} (I(x; z) needs a Gaussian
  q(z | x), which a hierarchy's joint posterior is not)."""
  stats = make_posterior_stats(model, spec, batch_size, with_logvar=True)
  estimate_mi = jax.jit(mutual_information)
  groups = model.group_sizes

  def diagnose(params, images, labels, key) -> dict:
    posterior = stats(params, images, labels, key)
    num_active, covariance = active_units(np.asarray(posterior["mean"]))
    if groups is not None:
      return {"kl_per_group": np.asarray(kl_per_group(posterior["kl_per_dim"], groups)).mean(axis=0).round(4).tolist(),
              "active_units": num_active, "active_units_per_group": active_per_group(covariance, groups)}
    m = min(mi_examples, images.shape[0])
    mi = estimate_mi(posterior["mean"][:m], posterior["logvar"][:m], fold(key, Draw.MUTUAL_INFORMATION))
    return {"kl_per_dim": np.asarray(posterior["kl_per_dim"]).mean(axis=0).round(5).tolist(),
            "active_units": num_active, "mutual_information": float(mi)}

  return diagnose


def active_per_group(covariance: np.ndarray, group_sizes, threshold: float = ACTIVE_UNIT_THRESHOLD) -> list[int]:
  """Active units within each group of consecutive dimensions.  [Z] -> [G]"""
  ends = np.cumsum(group_sizes)
  return [int(np.sum(covariance[e - n:e] > threshold)) for n, e in zip(group_sizes, ends)]


def active_units(posterior_means: np.ndarray, threshold: float = ACTIVE_UNIT_THRESHOLD) -> tuple[int, np.ndarray]:
  """Number of units u with Cov_x(E_q[z_u | x]) > threshold, and that covariance per unit.  [N, Z] -> int, [Z]"""
  variance = np.var(np.asarray(posterior_means, np.float64), axis=0)
  return int(np.sum(variance > threshold)), variance


def running_bound(log_weights: Callable, batch: int, num_samples: int, chunk: int, with_elbo: bool = False):
  """L_k = log (1/k) sum_s w_s from `log_weights(i) -> log w [chunk, B]`, the i-th chunk of draws, folded
  into a running log-sum-exp so memory stays at one chunk for k in the thousands; draws past k in the last
  chunk are masked to weight zero. with_elbo: also (1/k) sum_s log w_s, the k-sample ELBO estimate from the
  same draws: (L_k [B], elbo [B]).  [B]"""
  chunk = min(chunk, num_samples)
  num_chunks = math.ceil(num_samples / chunk)

  def body(carry, i):
    running, log_w_sum = carry
    log_w = log_weights(i)
    valid = (i * chunk + jnp.arange(chunk)) < num_samples
    log_w_sum = log_w_sum + jnp.sum(jnp.where(valid[:, None], log_w, 0.0), axis=0)
    log_w = jnp.where(valid[:, None], log_w, -jnp.inf)
    return (jnp.logaddexp(running, jax.scipy.special.logsumexp(log_w, axis=0)), log_w_sum), None

  init = (jnp.full(batch, -jnp.inf), jnp.zeros(batch))
  (total, log_w_sum), _ = jax.lax.scan(body, init, jnp.arange(num_chunks))
  bound = total - math.log(num_samples)
  return (bound, log_w_sum / num_samples) if with_elbo else bound


def importance_weighted_bound(log_likelihood: Callable, mean: jax.Array, logvar: jax.Array, key: jax.Array,
                              num_samples: int, chunk: int, with_elbo: bool = False, prior=None):
  """L_k = log (1/k) sum_s w_s, w_s = p(x | z_s) p(z_s) / q(z_s | x), z_s ~ q = N(mean, exp(logvar))
  (Burda et al. 2016, eq. 8), for a standard normal prior, or the diagonal Gaussian `prior` = (mean,
  logvar) [B, Z] each (a conditional prior p(z | x)).  [B] (see running_bound for chunk and with_elbo)

  `log_likelihood(z [S, B, Z]) -> log p(x | z) [S, B]`.
  """
  chunk = min(chunk, num_samples)
  std = jnp.exp(0.5 * logvar)

  def log_weights(i):
    eps = jax.random.normal(jax.random.fold_in(key, i), (chunk, *mean.shape))  # [S, B, Z]
    z = mean + std * eps
    return log_importance_weights(log_likelihood(z), z, eps, logvar, prior)  # [S, B]

  return running_bound(log_weights, mean.shape[0], num_samples, chunk, with_elbo)


def joint_bound(model: VAE, params, x, c, key, num_samples: int, chunk: int, likelihood: Likelihood,
                with_elbo: bool = False, prior_groups: int = 0):
  """L_k with joint draws of every group of a hierarchy, z_s ~ q(z_1 | x) q(z_2 | x, z_1) ..., each a full
  pass of the model (the batch tiled `chunk` times per pass).  [B]

  prior_groups = m > 0: the lowest m groups take their prior's mean in place of a posterior draw and leave
  the weight, w = p(x | z) prod_{upper l} p(z_l | z_<l) / q(z_l | x, z_<l): Havtorn et al.'s (2021) L^{>m}
  with the prior's mode as in their scripts/ood-llr.py (use_mode). It is not a bound on log p(x) but how well
  the upper groups alone explain x."""
  chunk = min(chunk, num_samples)
  b = x.shape[0]
  x_rep = jnp.broadcast_to(x, (chunk, *x.shape)).reshape(chunk * b, *x.shape[1:])
  c_rep = None if c is None else jnp.tile(c, (chunk, 1))

  def log_weights(i):
    extra = {"prior_groups": prior_groups} if prior_groups else {}
    out = model.apply({"params": params}, x_rep, c_rep, jax.random.fold_in(key, i), **extra)
    return joint_log_weights(x_rep, out, likelihood).reshape(chunk, b)

  return running_bound(log_weights, b, num_samples, chunk, with_elbo)


def iwae_bound(model: VAE, params, x, c, key, num_samples: int, chunk: int, likelihood: Likelihood,
               with_elbo: bool = False):
  """L_k of the model's log p(x) (log p(x | c) for a CVAE), with its encoder as the proposal (for a
  hierarchy, its joint posterior).  [B] (with_elbo: also the k-sample ELBO estimate, see running_bound)"""
  if model.group_sizes is not None:
    return joint_bound(model, params, x, c, key, num_samples, chunk, likelihood, with_elbo)
  mean, logvar = model.apply({"params": params}, x, c, method="encode")
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
