"""Decoder likelihoods p(x | z): one object each, by registry name (`objective.likelihood`).

A Likelihood gives the per-example log-density of data under the decoder's outputs, the data the outputs
"mean" (for reconstructions and samples), how many outputs the decoder gives per data channel, which input
encodings it applies to, and whether on them it is a normalized density (so that the ELBO bounds a
log-likelihood comparable with published NLLs). Every log-density is summed over dimensions: [B].
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable, Optional

import jax
import jax.numpy as jnp

from cvae_jax.config import check
from cvae_jax.data import Encoding
from cvae_jax.registry import Registry

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


def gaussian_mean_scale(outputs: jax.Array, min_scale: float = GAUSSIAN_MIN_SCALE) -> tuple[jax.Array, jax.Array]:
  """Decoder outputs [..., 2C] -> (mean [..., C], sigma [..., C]), sigma = softplus(raw) + min_scale."""
  mean, raw = jnp.split(outputs, 2, axis=-1)
  return mean, jax.nn.softplus(raw) + min_scale


def gaussian_log_prob(x: jax.Array, outputs: jax.Array, min_scale: float = GAUSSIAN_MIN_SCALE) -> jax.Array:
  """log N(x | mean, sigma^2) summed over dimensions, mean and sigma from the decoder outputs.  [B]"""
  x, mean, sigma = _flat(x, *gaussian_mean_scale(outputs, min_scale))
  return jnp.sum(-0.5 * jnp.square((x - mean) / sigma) - jnp.log(sigma) - 0.5 * math.log(2 * math.pi), axis=-1)


def categorical_log_prob(x: jax.Array, logits: jax.Array) -> jax.Array:
  """log p(x | logits) = sum_t log softmax(logits_t)[x_t] over the non-padding positions (id 0 pads
  after the end token, which is scored).  int [B, T], [B, T, V] -> [B]"""
  log_probs = jnp.take_along_axis(jax.nn.log_softmax(logits), x[..., None].astype(jnp.int32), axis=-1)[..., 0]
  return jnp.sum(jnp.where(x != 0, log_probs, 0.0), axis=-1)


LOGISTIC_MIXTURES = 10  # components per pixel channel unless objective.mixtures says otherwise
LOGISTIC_MIN_LOG_SCALE = -7.0  # PixelCNN++'s floor on log s: s = 9e-4 already puts 97% of a component in the
                               # bin of width 2 / 255 = 7.8e-3 around its mean


def logistic_mixture_params(outputs: jax.Array, mixtures: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Decoder outputs [..., 3 K C] -> (logits, means, log_scales), each [..., C, K].

  The outputs' layout is [..., 3, K, C], parameters outermost as in the Gaussian's [..., 2C]: the first K C
  outputs are the mixture logits (component k of channel c at k C + c), then the K C means, then the K C
  log-scales. Means are in [-1, 1] units; log-scales are clamped below at LOGISTIC_MIN_LOG_SCALE.
  """
  channels, rest = divmod(outputs.shape[-1], 3 * mixtures)
  if rest:
    raise ValueError(f"decoder outputs of width {outputs.shape[-1]} do not hold 3 x {mixtures} mixture parameters "
                     "per channel: build the model with this likelihood's outputs_per_channel")
  params = outputs.reshape(*outputs.shape[:-1], 3, mixtures, channels).swapaxes(-1, -2)  # [..., 3, C, K]
  logits, means, log_scales = jnp.moveaxis(params, -3, 0)
  return logits, means, jnp.maximum(log_scales, LOGISTIC_MIN_LOG_SCALE)


def discretized_logistic_mixture_log_prob(x: jax.Array, outputs: jax.Array,
                                          mixtures: int = LOGISTIC_MIXTURES) -> jax.Array:
  """log p(x | outputs) for 8-bit data, summed over dimensions (Salimans et al. 2017, eq. 2; VDVAE).  [B]

  x [B, *spatial, C] holds intensities v / 255 in [0, 1] (read as the 8-bit value v = round(255 x)), rescaled to
  [-1, 1] as in PixelCNN++: x' = 2 x - 1. Each value is a bin of width 2 / 255 of a mixture of K logistics,
  P(x) = sum_k pi_k [sigmoid((x' + 1/255 - mu_k) / s_k) - sigmoid((x' - 1/255 - mu_k) / s_k)], the edge bins
  reaching to -inf (v = 0) and +inf (v = 255): a normalized pmf over the 256 values. Log-probabilities follow
  openai/pixel-cnn's discretized_mix_logistic_loss (log sigmoid at 0, -softplus at 255, the density at the
  bin's centre where the difference underflows), with the middle bins computed more accurately (below).

  Each channel is modelled independently given z, without PixelCNN++'s coupling of a pixel's channels
  (the means of G and B linear in R and G): a deliberate simplification that keeps the decoder's outputs
  a fixed count per data channel (outputs_per_channel = 3 K) for any number of channels.
  """
  b = x.shape[0]
  logits, means, log_scales = (a.reshape(b, -1, mixtures) for a in logistic_mixture_params(outputs, mixtures))
  k = jnp.round(255 * x.reshape(b, -1, 1))  # [B, D, 1] the 8-bit values
  # The bin's edges (2k - 255 +- 1) / 255 in [-1, 1], from integers: neighbours share an edge bit for bit, so
  # the 256 probabilities telescope to 1 in float32 even for the narrowest component.
  inv_scale = jnp.exp(-log_scales)
  plus_in, min_in = inv_scale * ((2 * k - 254) / 255 - means), inv_scale * ((2 * k - 256) / 255 - means)
  mid_in = inv_scale * ((2 * k - 255) / 255 - means)
  log_cdf_plus = plus_in - jax.nn.softplus(plus_in)  # log sigmoid(plus_in): the bin of 0 reaches to -inf
  log_one_minus_cdf_min = -jax.nn.softplus(min_in)   # log (1 - sigmoid(min_in)): the bin of 255 reaches to +inf
  # Right of the mean both sigmoids near 1 cancel; there sigmoid(-min) - sigmoid(-plus) gives the same number
  # from two small ones, so a tail bin stays exact down to ~1e-30 (PixelCNN++ falls back below 1e-5).
  right = mid_in > 0
  cdf_delta = jax.nn.sigmoid(jnp.where(right, -min_in, plus_in)) - jax.nn.sigmoid(jnp.where(right, -plus_in, min_in))
  log_pdf_mid = mid_in - log_scales - 2 * jax.nn.softplus(mid_in)  # log density at the bin's centre
  # where the difference underflows, the density at the bin's centre times its width 2 / 255; the floor keeps
  # the branch jnp.where discards (and its gradient) finite
  log_mid = jnp.where(cdf_delta > 1e-30, jnp.log(jnp.maximum(cdf_delta, 1e-30)), log_pdf_mid - math.log(127.5))
  log_bin = jnp.where(k == 0, log_cdf_plus, jnp.where(k == 255, log_one_minus_cdf_min, log_mid))
  log_p = jax.nn.logsumexp(log_bin + jax.nn.log_softmax(logits), axis=-1)  # [B, D]
  return jnp.sum(log_p, axis=-1)


def discretized_logistic_mixture_mean(outputs: jax.Array, mixtures: int = LOGISTIC_MIXTURES) -> jax.Array:
  """sum_k pi_k clip(mu_k, -1, 1), mapped back to [0, 1]: the image for reconstructions and samples.
  [..., 3 K C] -> [..., C]

  Close to E[x], not equal to it: the edge bins gather the mass beyond [-1, 1] (most for a wide component near
  an edge) and the bins round each component. The exact E[x] would need all 256 bins of every component.
  """
  logits, means, _ = logistic_mixture_params(outputs, mixtures)
  return (jnp.sum(jax.nn.softmax(logits) * jnp.clip(means, -1.0, 1.0), axis=-1) + 1) / 2


@dataclasses.dataclass(frozen=True)
class Likelihood:
  name: str
  log_prob: Callable[[jax.Array, jax.Array], jax.Array]  # (x [B, ...], decoder outputs) -> [B]
  mean: Optional[Callable[[jax.Array], jax.Array]]       # decoder outputs -> E[x | z]; None: sampled instead (tokens)
  outputs_per_channel: int                              # decoder outputs per data channel
  encodings: frozenset                                  # the input encodings it applies to
  normalized_on: frozenset                              # ... and those on which it is a normalized density

  def normalized(self, encoding: Encoding) -> bool:
    """Whether the ELBO bounds a normalized log-likelihood: not Bernoulli cross-entropy on grayscale, and
    not a Gaussian density on binary pixels (unbounded as the scale shrinks)."""
    return Encoding(encoding) in self.normalized_on


IMAGES = frozenset({Encoding.grayscale, Encoding.static_binary, Encoding.dynamic_binary, Encoding.packed_binary})
BINARY = frozenset({Encoding.static_binary, Encoding.dynamic_binary, Encoding.packed_binary})
LIKELIHOODS: Registry[Likelihood] = Registry("objective.likelihood", "a likelihood")
register, get = LIKELIHOODS.register, LIKELIHOODS.lookup


register(Likelihood("bernoulli", bernoulli_log_prob, jax.nn.sigmoid, 1, IMAGES, BINARY))
register(Likelihood("continuous_bernoulli", continuous_bernoulli_log_prob, continuous_bernoulli_mean, 1, IMAGES,
                    IMAGES))
register(Likelihood("gaussian", gaussian_log_prob, lambda outputs: gaussian_mean_scale(outputs)[0], 2,
                    IMAGES | {Encoding.real}, frozenset({Encoding.real, Encoding.grayscale})))
register(Likelihood("discretized_logistic_mixture", discretized_logistic_mixture_log_prob,
                    discretized_logistic_mixture_mean, 3 * LOGISTIC_MIXTURES, IMAGES, frozenset({Encoding.grayscale})))
register(Likelihood("categorical", categorical_log_prob, None, 1, frozenset({Encoding.tokens}),
                    frozenset({Encoding.tokens})))


@functools.lru_cache(maxsize=None)
def _gaussian_with_floor(min_scale: float) -> Likelihood:
  return dataclasses.replace(get("gaussian"), log_prob=functools.partial(gaussian_log_prob, min_scale=min_scale))


@functools.lru_cache(maxsize=None)
def _logistic_mixture(mixtures: int) -> Likelihood:
  return dataclasses.replace(
      get("discretized_logistic_mixture"), outputs_per_channel=3 * mixtures,
      log_prob=functools.partial(discretized_logistic_mixture_log_prob, mixtures=mixtures),
      mean=functools.partial(discretized_logistic_mixture_mean, mixtures=mixtures))


def of(objective) -> Likelihood:
  """The objective's likelihood, with its settings (the Gaussian's objective.min_scale, the discretized
  logistic mixture's objective.mixtures)."""
  if objective.likelihood == "gaussian" and objective.min_scale != GAUSSIAN_MIN_SCALE:
    return _gaussian_with_floor(float(objective.min_scale))
  if objective.likelihood == "discretized_logistic_mixture" and objective.mixtures != LOGISTIC_MIXTURES:
    check(objective.mixtures >= 1, "objective.mixtures", objective.mixtures, "a mixture needs at least 1 component")
    return _logistic_mixture(int(objective.mixtures))
  return get(objective.likelihood)
