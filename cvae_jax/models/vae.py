"""The VAE module every family plugs into: one interface for VAE, CVAE and plain autoencoder.

Interface (every variant):
  encode(x, c)  -> (mean, logvar)      q(z | x[, c]) = N(mean, diag(exp(logvar)))
  decode(z, c, x=None) -> logits      p(x | z[, c]), logits of the likelihood (see objectives); an
                                      autoregressive decoder (token sequences) reads x shifted right
  __call__(x, c, rng) -> VAEOutput     mean, logvar, a reparameterized z, logits
  generate(rng, c, num_samples, temperature)  z ~ N(0, t^2 I), decoded under c
  group_sizes                          latent units per KL group (None: every dimension its own group)
For a VAE the condition c is ignored (pass None). The condition is the dataset's (DatasetSpec.condition_input):
a one-hot label, or a vector such as z-scored molecular properties. Token sequences are sampled with
models.gru.sample_tokens. Shapes come from the DatasetSpec, never constants.
A plain autoencoder (kind ae, the anomaly-detection baseline) is the same module with z = mean and no
logvar in its output.
"""
from __future__ import annotations

from typing import Optional

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class VAEOutput:
  mean: jax.Array    # [B, Z]
  logvar: jax.Array | None  # [B, Z]; None for a plain autoencoder
  z: jax.Array       # [B, Z]
  logits: jax.Array  # [B, *data_shape[:-1], channels * outputs per channel]
  prior_mean: jax.Array | None = None    # [B, Z]: the prior a hierarchy gave z along this draw; None: N(0, I)
  prior_logvar: jax.Array | None = None  # [B, Z]

  @property
  def prior(self) -> tuple[jax.Array, jax.Array] | None:
    """(mean, logvar) of p(z) along this draw, or None for the standard normal."""
    return None if self.prior_mean is None else (self.prior_mean, self.prior_logvar)


def concat(h: jax.Array, c: Optional[jax.Array]) -> jax.Array:
  """[h, c] along the features (h alone without a condition): how encoders and decoders take c."""
  return h if c is None else jnp.concatenate([h, c.astype(h.dtype)], axis=-1)


def required_condition(condition_size: int, c: Optional[jax.Array]) -> Optional[jax.Array]:
  """The condition a model reads: None for a VAE (whatever is passed), c for a CVAE, which cannot go without."""
  if not condition_size:
    return None
  if c is None:
    raise ValueError("a CVAE needs the condition c")
  return c


def reparameterize(rng: jax.Array, mean: jax.Array, logvar: jax.Array) -> jax.Array:
  """z = mean + exp(logvar / 2) * eps, eps ~ N(0, I): differentiable in mean and logvar."""
  return mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape, mean.dtype)


class SharedScale(nn.Module):
  """Decoder outputs [B, *spatial, F] with their last `channels` (a Gaussian's raw scale) replaced by one learned
  value per position and channel, shared by every input (zeros at init: softplus gives a scale of 0.69 plus
  the floor)."""
  channels: int

  @nn.compact
  def __call__(self, outputs):
    n = self.channels
    raw = self.param("raw_scale", nn.initializers.zeros, (*outputs.shape[1:-1], n))
    return jnp.concatenate([outputs[..., :-n], jnp.broadcast_to(raw, (*outputs.shape[:-1], n))], axis=-1)


class VAE(nn.Module):
  """VAE (condition_size = 0) or CVAE (c [B, condition_size], fed to encoder and decoder)."""
  encoder: nn.Module
  decoder: nn.Module
  latent_size: int
  condition_size: int = 0
  stochastic: bool = True  # False: a plain autoencoder (z = encoder mean, no KL)
  autoregressive: bool = False  # the decoder reads x (teacher forcing): GRUDecoder
  shared_scale_channels: int = 0  # > 0: the decoder's last that many outputs per position (a Gaussian's raw scale)
                                  # are a learned parameter shared by every input instead
  group_sizes = None  # one KL group per latent dimension (a hierarchy has groups of many)

  def _condition(self, c):
    return required_condition(self.condition_size, c)

  def setup(self):
    self.shared_scale = SharedScale(self.shared_scale_channels) if self.shared_scale_channels else None

  def encode(self, x, c=None):
    return self.encoder(x, self._condition(c))

  def decode(self, z, c=None, x=None):
    if self.autoregressive:
      return self.decoder(z, self._condition(c), x)
    outputs = self.decoder(z, self._condition(c))
    return outputs if self.shared_scale is None else self.shared_scale(outputs)

  def __call__(self, x, c, rng) -> VAEOutput:
    mean, logvar = self.encode(x, c)
    if not self.stochastic:
      return VAEOutput(mean=mean, logvar=None, z=mean, logits=self.decode(mean, c, x))
    z = reparameterize(rng, mean, logvar)
    return VAEOutput(mean=mean, logvar=logvar, z=z, logits=self.decode(z, c, x))

  def decoder_start(self, z, c=None):
    return self.decoder.start(z, self._condition(c))

  def decoder_step(self, carry, token, z, c=None):
    return self.decoder.step(carry, token, z, self._condition(c))

  def generate(self, rng, c=None, num_samples: Optional[int] = None, temperature: float = 1.0):
    """Samples z from the prior N(0, I) (its scale times the temperature) and decodes it (under c for a
    CVAE): logits."""
    n = c.shape[0] if c is not None else num_samples
    z = temperature * jax.random.normal(rng, (n, self.latent_size))
    return self.decode(z, c)


