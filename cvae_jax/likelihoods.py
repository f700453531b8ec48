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
register(Likelihood("categorical", categorical_log_prob, None, 1, frozenset({Encoding.tokens}),
                    frozenset({Encoding.tokens})))


@functools.lru_cache(maxsize=None)
def _gaussian_with_floor(min_scale: float) -> Likelihood:
  return dataclasses.replace(get("gaussian"), log_prob=functools.partial(gaussian_log_prob, min_scale=min_scale))


def of(objective) -> Likelihood:
  """The objective's likelihood, with its settings (the Gaussian's objective.min_scale)."""
  if objective.likelihood == "gaussian" and objective.min_scale != GAUSSIAN_MIN_SCALE:
    return _gaussian_with_floor(float(objective.min_scale))
  return get(objective.likelihood)
