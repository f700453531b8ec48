"""Per-example log-likelihoods, the Gaussian KL and the ELBO loss.

Every term is per example: summed over pixels and latent dimensions, averaged over the batch only at
the very end. beta weights the KL in the optimized loss alone; the reported ELBO is the unweighted
bound in nats per image.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from cvae_jax.config import Likelihood


def _flat(*arrays: jax.Array) -> tuple[jax.Array, ...]:
  """[B, ...] -> [B, D] each, before the elementwise terms: XLA:CPU runs elementwise work on image
  shapes [B, H, W, 1] (a minor dimension of 1) about half as fast as on [B, D] (the k=5000 bound spent
  half its time there)."""
  return tuple(a.reshape(a.shape[0], -1) for a in arrays)


def bernoulli_log_prob(x: jax.Array, logits: jax.Array) -> jax.Array:
  """log p(x | logits) = sum_i x_i log sigmoid(l_i) + (1 - x_i) log(1 - sigmoid(l_i)).  [B]

  = sum_i x_i l_i - softplus(l_i), stable for any logits. For x in {0, 1} this is the Bernoulli
  log-likelihood. For grayscale x in [0, 1] it is minus the binary cross-entropy of the Keras and
  PyTorch examples, which is NOT a normalized density on [0, 1]: its "ELBO" is not a bound on
  log p(x) and is not comparable with published NLLs. Use the continuous Bernoulli for that.
  """
  x, logits = _flat(x, logits)
  return jnp.sum(x * logits - jax.nn.softplus(logits), axis=-1)


def continuous_bernoulli_log_norm(logits: jax.Array) -> jax.Array:
  """log C(lambda), lambda = sigmoid(l), of the continuous Bernoulli (Loaiza-Ganem & Cunningham 2019, eq. 7).

  C(lambda) = 2 artanh(1 - 2 lambda) / (1 - 2 lambda). With lambda = sigmoid(l), 1 - 2 lambda =
  -tanh(l / 2) and artanh(1 - 2 lambda) = -l / 2, so C = l / tanh(l / 2): even in l, 2 at l = 0.
  Near 0 we use the Taylor series log 2 + l^2 / 12 - 7 l^4 / 1440 to avoid 0 / 0.
  """
  a = jnp.abs(logits)
  small = a < 1e-2
  safe = jnp.where(small, 1.0, a)
  exact = jnp.log(safe) - jnp.log(jnp.tanh(safe / 2))
  a2 = a * a
  taylor = math.log(2.0) + a2 / 12 - 7 * a2 * a2 / 1440
  return jnp.where(small, taylor, exact)


def continuous_bernoulli_log_prob(x: jax.Array, logits: jax.Array) -> jax.Array:
  """log p(x | lambda) = log C(lambda) + x log lambda + (1 - x) log(1 - lambda), x in [0, 1].  [B]"""
  x, logits = _flat(x, logits)
  return jnp.sum(x * logits - jax.nn.softplus(logits) + continuous_bernoulli_log_norm(logits), axis=-1)


def continuous_bernoulli_mean(logits: jax.Array) -> jax.Array:
  """E[x] = lambda / (2 lambda - 1) + 1 / (2 artanh(1 - 2 lambda)) = 1/(1 - e^-l) - 1/l; 1/2 at l = 0."""
  small = jnp.abs(logits) < 1e-2  # below this the two terms cancel; the series is exact to ~1e-9
  safe = jnp.where(small, 1.0, logits)
  exact = -1.0 / jnp.expm1(-safe) - 1.0 / safe
  return jnp.where(small, 0.5 + logits / 12, exact)


GAUSSIAN_MIN_SCALE = 1e-3  # keeps the density bounded when a dimension is reconstructed exactly


def gaussian_mean_scale(outputs: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Decoder outputs [..., 2C] -> (mean [..., C], sigma [..., C]), sigma = softplus(raw) + 1e-3."""
  mean, raw = jnp.split(outputs, 2, axis=-1)
  return mean, jax.nn.softplus(raw) + GAUSSIAN_MIN_SCALE


def gaussian_log_prob(x: jax.Array, outputs: jax.Array) -> jax.Array:
  """log N(x | mean, sigma^2) summed over dimensions, mean and sigma from the decoder outputs.  [B]"""
  x, mean, sigma = _flat(x, *gaussian_mean_scale(outputs))
  return jnp.sum(-0.5 * jnp.square((x - mean) / sigma) - jnp.log(sigma) - 0.5 * math.log(2 * math.pi), axis=-1)


def categorical_log_prob(x: jax.Array, logits: jax.Array) -> jax.Array:
  """log p(x | logits) = sum_t log softmax(logits_t)[x_t] over the non-padding positions (id 0 pads
  after the end token, which is scored).  int [B, T], [B, T, V] -> [B]"""
  log_probs = jnp.take_along_axis(jax.nn.log_softmax(logits), x[..., None].astype(jnp.int32), axis=-1)[..., 0]
  return jnp.sum(jnp.where(x != 0, log_probs, 0.0), axis=-1)


LOG_PROB = {
    Likelihood.bernoulli: bernoulli_log_prob,
    Likelihood.continuous_bernoulli: continuous_bernoulli_log_prob,
    Likelihood.gaussian: gaussian_log_prob,
    Likelihood.categorical: categorical_log_prob,
}

# The data a decoder "means": used for reconstructions and samples in figures.
MEAN = {
    Likelihood.bernoulli: jax.nn.sigmoid,
    Likelihood.continuous_bernoulli: continuous_bernoulli_mean,
    Likelihood.gaussian: lambda outputs: gaussian_mean_scale(outputs)[0],
}

# Decoder outputs per data channel: logits (1), or mean and scale (2).
OUTPUTS_PER_CHANNEL = {Likelihood.bernoulli: 1, Likelihood.continuous_bernoulli: 1, Likelihood.gaussian: 2}


def gaussian_kl(mean: jax.Array, logvar: jax.Array) -> jax.Array:
  """KL(N(mean, exp(logvar)) || N(0, I)) = 1/2 sum_j (mean_j^2 + exp(logvar_j) - 1 - logvar_j).  [B]

  Kingma & Welling 2014, Appendix B.
  """
  return 0.5 * jnp.sum(mean**2 + jnp.exp(logvar) - 1.0 - logvar, axis=-1)


def gaussian_kl_per_dim(mean: jax.Array, logvar: jax.Array) -> jax.Array:
  """The same KL, one value per latent dimension.  [B, D]"""
  return 0.5 * (mean**2 + jnp.exp(logvar) - 1.0 - logvar)


def reparameterize(rng: jax.Array, mean: jax.Array, logvar: jax.Array) -> jax.Array:
  """z = mean + exp(logvar / 2) * eps, eps ~ N(0, I): differentiable in mean and logvar."""
  return mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape, mean.dtype)


def elbo_terms(x: jax.Array, logits: jax.Array, mean: jax.Array, logvar: jax.Array | None,
               likelihood: Likelihood) -> dict[str, jax.Array]:
  """Per-example ELBO = E_q[log p(x|z)] - KL(q(z|x) || p(z)), one-sample estimate of the first term.

  Returns [B] arrays: rec = -log p(x|z) (nats), kl, elbo = -(rec + kl). A plain autoencoder (logvar
  None) has no KL: its "elbo" is minus the reconstruction loss, not a bound.
  """
  rec = -LOG_PROB[likelihood](x, logits)
  kl = gaussian_kl(mean, logvar) if logvar is not None else jnp.zeros_like(rec)
  return {"rec": rec, "kl": kl, "elbo": -(rec + kl)}


def gaussian_kl_between(mean_q: jax.Array, logvar_q: jax.Array, mean_p: jax.Array, logvar_p: jax.Array) -> jax.Array:
  """KL(N(mean_q, exp(logvar_q)) || N(mean_p, exp(logvar_p))), diagonal, summed over dimensions.  [B]

  1/2 sum_j (logvar_p - logvar_q + (exp(logvar_q) + (mean_q - mean_p)^2) / exp(logvar_p) - 1): the KL to
  a learned prior p(z | x) (Sohn et al. 2015's prior network).
  """
  return 0.5 * jnp.sum(logvar_p - logvar_q + (jnp.exp(logvar_q) + (mean_q - mean_p) ** 2) * jnp.exp(-logvar_p) - 1.0,
                       axis=-1)


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


def free_bits_kl(kl_per_dim: jax.Array, free_bits: float) -> jax.Array:
  """sum_j max(free_bits, mean_batch KL_j): the KL term with free bits (Kingma et al. 2016, eq. 15,
  one group per latent dimension). A dimension whose batch-mean KL is below free_bits gets no gradient
  from it, so the encoder may use up to free_bits nats of it at no cost.  [B, Z] -> scalar"""
  return jnp.sum(jnp.maximum(free_bits, jnp.mean(kl_per_dim, axis=0)))


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
