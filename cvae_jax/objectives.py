"""The ELBO and its terms: the Gaussian KLs, the importance weights, the k-sample terms, free bits and the loss.

Every term is per example: summed over pixels and latent dimensions, averaged over the batch only at
the very end. beta weights the KL in the optimized loss alone; the reported ELBO is the unweighted
bound in nats per image.
"""
from __future__ import annotations

import itertools
import math

import jax
import jax.numpy as jnp

from cvae_jax.likelihoods import Likelihood
from cvae_jax.models import VAE


def gaussian_kl(mean: jax.Array, logvar: jax.Array) -> jax.Array:
  """KL(N(mean, exp(logvar)) || N(0, I)) = 1/2 sum_j (mean_j^2 + exp(logvar_j) - 1 - logvar_j).  [B]

  Kingma & Welling 2014, Appendix B.
  """
  return 0.5 * jnp.sum(mean**2 + jnp.exp(logvar) - 1.0 - logvar, axis=-1)


def gaussian_kl_per_dim(mean: jax.Array, logvar: jax.Array) -> jax.Array:
  """The same KL, one value per latent dimension.  [B, D]"""
  return 0.5 * (mean**2 + jnp.exp(logvar) - 1.0 - logvar)


def elbo_terms(x: jax.Array, logits: jax.Array, mean: jax.Array, logvar: jax.Array | None,
               likelihood: Likelihood, prior: tuple[jax.Array, jax.Array] | None = None) -> dict[str, jax.Array]:
  """Per-example ELBO = E_q[log p(x|z)] - KL(q(z|x) || p(z)), one-sample estimate of the first term.

  p(z) = N(0, I), or the diagonal Gaussian `prior` = (mean, logvar) [B, Z] (a hierarchy's p(z_l | z_<l)
  along the drawn z, whose analytic KL per group summed over groups is VDVAE's and NVAE's KL term).
  Returns [B] arrays: rec = -log p(x|z) (nats), kl, elbo = -(rec + kl). A plain autoencoder (logvar
  None) has no KL: its "elbo" is minus the reconstruction loss, not a bound.
  """
  rec = -likelihood.log_prob(x, logits)
  kl = jnp.sum(kl_per_dim(mean, logvar, prior), axis=-1) if logvar is not None else jnp.zeros_like(rec)
  return {"rec": rec, "kl": kl, "elbo": -(rec + kl)}


def kl_per_dim(mean: jax.Array, logvar: jax.Array, prior: tuple[jax.Array, jax.Array] | None = None) -> jax.Array:
  """KL(q || p) per latent dimension for p = N(0, I) or the diagonal Gaussian `prior` = (mean, logvar).  [B, Z]"""
  if prior is None:
    return gaussian_kl_per_dim(mean, logvar)
  mean_p, logvar_p = prior
  return 0.5 * (logvar_p - logvar + (jnp.exp(logvar) + (mean - mean_p) ** 2) * jnp.exp(-logvar_p) - 1.0)


def kl_per_group(kl: jax.Array, group_sizes: tuple[int, ...] | None) -> jax.Array:
  """[B, Z] -> [B, G]: the KL summed within each group of consecutive dimensions (a hierarchy's groups);
  group_sizes None leaves every dimension its own group."""
  if group_sizes is None:
    return kl
  ends = list(itertools.accumulate(group_sizes))
  return jnp.stack([jnp.sum(kl[:, e - n:e], axis=-1) for n, e in zip(group_sizes, ends)], axis=-1)


def gaussian_kl_between(mean_q: jax.Array, logvar_q: jax.Array, mean_p: jax.Array, logvar_p: jax.Array) -> jax.Array:
  """KL(N(mean_q, exp(logvar_q)) || N(mean_p, exp(logvar_p))), diagonal, summed over dimensions.  [B]

  1/2 sum_j (logvar_p - logvar_q + (exp(logvar_q) + (mean_q - mean_p)^2) / exp(logvar_p) - 1): the KL to
  a learned prior p(z | x) (Sohn et al. 2015's prior network).
  """
  return jnp.sum(kl_per_dim(mean_q, logvar_q, (mean_p, logvar_p)), axis=-1)


def log_importance_weights(log_px: jax.Array, z: jax.Array, eps: jax.Array, logvar: jax.Array,
                           prior: tuple[jax.Array, jax.Array] | None = None) -> jax.Array:
  """log w = log p(x | z) + log p(z) - log q(z | x) for z = mean + exp(logvar / 2) * eps.

  p(z) = N(0, I), or the diagonal Gaussian `prior` = (mean [B, Z], logvar [B, Z]) of a prior network.
  log q uses z - mean = std * eps exactly (no cancellation error).  [S, B], [S, B, Z] x2, [B, Z] -> [S, B]
  """
  if prior is None:
    log_pz = jnp.sum(jax.scipy.stats.norm.logpdf(z), axis=-1)
  else:
    log_pz = jnp.sum(jax.scipy.stats.norm.logpdf(z, prior[0], jnp.exp(0.5 * prior[1])), axis=-1)
  log_qz = jnp.sum(-0.5 * eps**2 - 0.5 * logvar - 0.5 * math.log(2 * math.pi), axis=-1)
  return log_px + log_pz - log_qz


def k_sample_terms(log_likelihood, mean: jax.Array, logvar: jax.Array, rng: jax.Array, k: int) -> dict[str, jax.Array]:
  """The training terms from k reparameterized draws z_s ~ q(z | x) per example.  [B] each

  `log_likelihood(z [S, B, Z]) -> log p(x | z) [S, B]`.
  rec = -(1/k) sum_s log p(x | z_s), kl analytic, elbo = -(rec + kl): the ELBO with its expectation
  averaged over k draws (Burda et al.'s "VAE, k"). iwae = L_k = log (1/k) sum_s w_s (their eq. 8); its
  gradient weights each draw by its normalized importance weight.
  """
  eps = jax.random.normal(rng, (k, *mean.shape), mean.dtype)
  z = mean + jnp.exp(0.5 * logvar) * eps
  log_px = log_likelihood(z)
  log_w = log_importance_weights(log_px, z, eps, logvar)
  rec = -jnp.mean(log_px, axis=0)
  kl = gaussian_kl(mean, logvar)
  return {"rec": rec, "kl": kl, "elbo": -(rec + kl),
          "iwae": jax.scipy.special.logsumexp(log_w, axis=0) - math.log(k)}


def joint_log_weights(x: jax.Array, out, likelihood: Likelihood) -> jax.Array:
  """log w = log p(x | z) + log p(z) - log q(z | x) of one joint draw z of a model's output (VAEOutput):
  over every group of a hierarchy, log p(z) = sum_l log p(z_l | z_<l) and log q = sum_l log q(z_l | x, z_<l),
  each along the same draw (the joint proposal of Burda et al. 2016, Sec. 5, for several stochastic layers).  [B]"""
  log_normal = lambda z, m, lv: jnp.sum(-0.5 * (math.log(2 * math.pi) + lv + (z - m) ** 2 * jnp.exp(-lv)), axis=-1)
  prior = out.prior if out.prior is not None else (jnp.zeros_like(out.z), jnp.zeros_like(out.z))
  return likelihood.log_prob(x, out.logits) + log_normal(out.z, *prior) - log_normal(out.z, out.mean, out.logvar)


def joint_k_sample_terms(model: VAE, params, x, c, rng: jax.Array, k: int, likelihood: Likelihood) -> dict[str, jax.Array]:
  """k_sample_terms for a model whose posterior is a hierarchy: k joint draws per example, each a full pass
  (the batch tiled k times).  [B] each: rec, kl (the analytic KL per group along each draw, averaged), elbo, iwae"""
  b = x.shape[0]
  x_rep = jnp.broadcast_to(x, (k, *x.shape)).reshape(k * b, *x.shape[1:])
  c_rep = None if c is None else jnp.tile(c, (k, 1))
  out = model.apply({"params": params}, x_rep, c_rep, rng)
  log_px = likelihood.log_prob(x_rep, out.logits).reshape(k, b)
  kl = jnp.sum(kl_per_dim(out.mean, out.logvar, out.prior), axis=-1).reshape(k, b)
  log_w = joint_log_weights(x_rep, out, likelihood).reshape(k, b)
  rec, kl = -jnp.mean(log_px, axis=0), jnp.mean(kl, axis=0)
  return {"rec": rec, "kl": kl, "elbo": -(rec + kl), "iwae": jax.scipy.special.logsumexp(log_w, axis=0) - math.log(k)}


def decoder_log_likelihood(model: VAE, params, x, c, likelihood: Likelihood):
  """log_likelihood(z [S, B, Z]) -> log p(x | z[, c]) [S, B]: S draws of z per example, decoded in one batch.
  Example b's condition is c[b] for every draw (the batch is tiled S times)."""

  def log_likelihood(z):
    s, b = z.shape[:2]
    c_rep = None if c is None else jnp.tile(c, (s, 1))
    x_rep = jnp.broadcast_to(x, (s, *x.shape)).reshape(s * b, *x.shape[1:])
    logits = model.apply({"params": params}, z.reshape(s * b, -1), c_rep, x_rep, method="decode")
    return likelihood.log_prob(x_rep, logits).reshape(s, b)

  return log_likelihood


def free_bits_kl(kl_per_group: jax.Array, free_bits: float) -> jax.Array:
  """sum_j max(free_bits, mean_batch KL_j): the KL term with free bits (Kingma et al. 2016, eq. 15), over
  groups: every latent dimension of a flat model, every group of a hierarchy. A group whose batch-mean KL is
  below free_bits gets no gradient from it, so the encoder may use up to free_bits nats of it at no cost.
  [B, G] -> scalar"""
  return jnp.sum(jnp.maximum(free_bits, jnp.mean(kl_per_group, axis=0)))


def total_correlation(z: jax.Array, mean: jax.Array, logvar: jax.Array) -> jax.Array:
  """TC(z) = E_q(z)[log q(z) - sum_j log q(z_j)]: the total correlation of the aggregate posterior.  [B, Z] -> scalar

  Minibatch-weighted sampling (Chen et al. 2018, Sec. 4.1): q(z) is the minibatch's mixture
  (1/M) sum_m q(z | x_m), and each marginal q(z_j) its mixture of 1-D Gaussians; evaluated at the batch's own
  draws z_i. Chen et al.'s code divides each mixture by N M instead of M (N the dataset's size): a constant
  (Z - 1) log N added to the estimate, with the same gradient; we report the estimate that tends to the true
  TC as M grows (tests/test_objectives.py checks it against a Gaussian's closed form).
  """
  # log q(z_i,j | x_m) for every pair (i, m) of the batch and dimension j.  [B, B, Z]
  log_q = jax.scipy.stats.norm.logpdf(z[:, None, :], mean[None, :, :], jnp.exp(0.5 * logvar)[None, :, :])
  log_m = math.log(z.shape[0])
  log_qz = jax.scipy.special.logsumexp(jnp.sum(log_q, axis=-1), axis=1) - log_m
  log_qz_marginals = jnp.sum(jax.scipy.special.logsumexp(log_q, axis=1) - log_m, axis=-1)
  return jnp.mean(log_qz - log_qz_marginals)


def loss_and_metrics(terms: dict[str, jax.Array], beta, num_dims: int,
                     kl_penalty: jax.Array | None = None) -> tuple[jax.Array, dict]:
  """Batch means of the per-example terms; loss = rec + beta * kl, the only place beta enters.

  beta may be a traced scalar (a KL schedule). `kl_penalty` replaces the batch-mean KL in the loss
  (free bits); the reported kl and elbo stay the true ones. bpd = -elbo / (D ln 2).
  """
  metrics = {k: jnp.mean(v) for k, v in terms.items()}
  loss = metrics["rec"] + beta * (metrics["kl"] if kl_penalty is None else kl_penalty)
  metrics["loss"] = loss
  metrics["bpd"] = -metrics["elbo"] / (num_dims * math.log(2.0))
  return loss, metrics
