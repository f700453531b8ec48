"""VAE and CVAE in Flax linen: one model interface, encoder/decoder families chosen by name.

Interface (every variant):
  encode(x, c)  -> (mean, logvar)      q(z | x[, c]) = N(mean, diag(exp(logvar)))
  decode(z, c, x=None) -> logits      p(x | z[, c]), logits of the likelihood (see objectives); an
                                      autoregressive decoder (token sequences) reads x shifted right
  __call__(x, c, rng) -> VAEOutput     mean, logvar, a reparameterized z, logits
  generate(rng, c, num_samples)        z ~ p(z) = N(0, I), decoded under c
For a VAE the condition c is ignored (pass None). The condition is a one-hot label or, for molecules, a
vector of z-scored properties. Token sequences are sampled with `sample_tokens`. Shapes come from the DatasetSpec, never constants.
A plain autoencoder (kind ae, the anomaly-detection baseline) is the same module with z = mean and no
logvar in its output.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from cvae_jax.config import Arch, ConfigError, Kind, Likelihood, ModelConfig
from cvae_jax.data import DatasetSpec
from cvae_jax.objectives import OUTPUTS_PER_CHANNEL, reparameterize
from cvae_jax.smiles import BOS, PAD


@flax.struct.dataclass
class VAEOutput:
  mean: jax.Array    # [B, Z]
  logvar: jax.Array | None  # [B, Z]; None for a plain autoencoder
  z: jax.Array       # [B, Z]
  logits: jax.Array  # [B, *data_shape[:-1], channels * outputs per channel]


def _concat(h: jax.Array, c: Optional[jax.Array]) -> jax.Array:
  return h if c is None else jnp.concatenate([h, c.astype(h.dtype)], axis=-1)


def _kernel_init(init_scale: Optional[float]):
  return nn.linear.default_kernel_init if init_scale is None else nn.initializers.normal(init_scale)


class MLPEncoder(nn.Module):
  """flatten(x) [, c] -> hidden layers -> (mean, logvar)."""
  hidden: Sequence[int]
  latent_size: int
  activation: Callable
  init_scale: Optional[float] = None  # weights ~ N(0, init_scale^2); None: Flax's default

  @nn.compact
  def __call__(self, x, c=None):
    dense = lambda n, **kw: nn.Dense(n, kernel_init=_kernel_init(self.init_scale), **kw)
    h = _concat(x.reshape(x.shape[0], -1), c)  # [B, D (+K)]
    for width in self.hidden:
      h = self.activation(dense(width)(h))
    return dense(self.latent_size, name="mean")(h), dense(self.latent_size, name="logvar")(h)


class MLPDecoder(nn.Module):
  """z [, c] -> hidden layers (the encoder's, mirrored) -> logits of the data shape."""
  hidden: Sequence[int]
  data_shape: tuple[int, ...]
  activation: Callable
  init_scale: Optional[float] = None

  @nn.compact
  def __call__(self, z, c=None):
    dense = lambda n: nn.Dense(n, kernel_init=_kernel_init(self.init_scale))
    h = _concat(z, c)
    for width in reversed(self.hidden):
      h = self.activation(dense(width)(h))
    return dense(math.prod(self.data_shape))(h).reshape(z.shape[0], *self.data_shape)


class ConvEncoder(nn.Module):
  """conv layers -> flatten -> dense [, c] -> (mean, logvar). 2-D images or 1-D signals alike.

  With channels=(32,), kernel 3, stride 1, dense 64 this is the seed article's CVAE encoder:
  Conv2D(32, 3x3, 'same') + ReLU, flatten, dense 64, concat label, mean and log-variance.
  """
  channels: Sequence[int]
  kernel_size: int
  stride: int
  dense: int
  latent_size: int
  activation: Callable

  @nn.compact
  def __call__(self, x, c=None):
    spatial = x.ndim - 2  # [B, *spatial, C]
    h = x
    for ch in self.channels:
      h = self.activation(nn.Conv(ch, (self.kernel_size,) * spatial, strides=self.stride, padding="SAME")(h))
    h = self.activation(nn.Dense(self.dense)(h.reshape(h.shape[0], -1)))
    h = _concat(h, c)
    return nn.Dense(self.latent_size, name="mean")(h), nn.Dense(self.latent_size, name="logvar")(h)


def depth_to_space(h: jax.Array, block: int) -> jax.Array:
  """[B, *spatial, C * block^d] -> [B, *(spatial * block), C], channel blocks laid out as
  tf.nn.depth_to_space does: output[b, h*s + i, w*s + j, c] = input[b, h, w, (i*s + j)*C + c]."""
  b, *spatial, channels = h.shape
  d = len(spatial)
  out_channels = channels // block**d
  h = h.reshape(b, *spatial, *([block] * d), out_channels)
  order = [0] + [axis for i in range(d) for axis in (1 + i, 1 + d + i)] + [1 + 2 * d]
  return h.transpose(order).reshape(b, *[n * block for n in spatial], out_channels)


class ConvDecoder(nn.Module):
  """z [, c] -> dense -> (upsampling convs) -> logits.

  With no decoder channels it is the seed article's decoder: concat(z, label), dense 64, dense to the
  image. Otherwise a dense layer makes a [*spatial / stride^n, channels[0]] map that each layer upsamples
  by `stride`, and a last stride-1 conv gives the logits. Upsampling is a sub-pixel convolution (Shi et
  al. 2016: a stride-1 conv to stride^d times the channels, then depth_to_space), the same family of maps
  as a strided transposed conv but about 9x faster to differentiate on XLA:CPU, whose transposed-conv
  gradients are slow.
  """
  channels: Sequence[int]
  kernel_size: int
  stride: int
  dense: int
  data_shape: tuple[int, ...]
  activation: Callable

  @nn.compact
  def __call__(self, z, c=None):
    h = self.activation(nn.Dense(self.dense)(_concat(z, c)))
    if not self.channels:
      return nn.Dense(math.prod(self.data_shape))(h).reshape(z.shape[0], *self.data_shape)
    *spatial, out_channels = self.data_shape
    factor = self.stride ** len(self.channels)
    start = [s // factor for s in spatial]
    h = self.activation(nn.Dense(math.prod(start) * self.channels[0])(h))
    h = h.reshape(z.shape[0], *start, self.channels[0])
    kernel = (self.kernel_size,) * len(spatial)
    for ch in self.channels:
      h = nn.Conv(ch * self.stride ** len(spatial), kernel, padding="SAME")(h)
      h = self.activation(depth_to_space(h, self.stride))
    return nn.Conv(out_channels, kernel, padding="SAME")(h)


class GRUEncoder(nn.Module):
  """Token ids [B, T] -> embedding -> a GRU each way over the tokens up to the end token -> [both final
  states, c] -> (mean, logvar)."""
  vocab_size: int
  embedding_size: int
  rnn_size: int  # both directions together
  latent_size: int

  @nn.compact
  def __call__(self, x, c=None):
    x = x.astype(jnp.int32)
    lengths = jnp.sum(x != PAD, axis=-1)  # the tokens and the end token
    half = self.rnn_size // 2
    rnn = nn.Bidirectional(nn.RNN(nn.GRUCell(half)), nn.RNN(nn.GRUCell(half)), return_carry=True)
    (forward, backward), _ = rnn(nn.Embed(self.vocab_size, self.embedding_size)(x), seq_lengths=lengths)
    h = _concat(jnp.concatenate([forward, backward], axis=-1), c)
    return nn.Dense(self.latent_size, name="mean")(h), nn.Dense(self.latent_size, name="logvar")(h)


class GRUDecoder(nn.Module):
  """Autoregressive p(x | z[, c]) = prod_t p(x_t | x_<t, z, c): a GRU whose first state is a function of
  (z, c) and whose input at step t is the embedding of x_(t-1) (the start token at t = 0) beside (z, c).
  Training and scoring feed the true tokens (teacher forcing); `step` runs one position for sampling."""
  vocab_size: int
  embedding_size: int
  rnn_size: int

  def setup(self):
    self.embed = nn.Embed(self.vocab_size, self.embedding_size)
    self.initial = nn.Dense(self.rnn_size)
    self.cell = nn.GRUCell(self.rnn_size)
    self.rnn = nn.RNN(self.cell)
    self.logits = nn.Dense(self.vocab_size)

  def start(self, z, c=None):
    return jnp.tanh(self.initial(_concat(z, c)))

  def __call__(self, z, c=None, x=None):
    if x is None:
      raise ValueError("the GRU decoder scores a given sequence x; sample with models.sample_tokens")
    x = x.astype(jnp.int32)
    previous = jnp.concatenate([jnp.full((x.shape[0], 1), BOS, jnp.int32), x[:, :-1]], axis=1)
    zc = _concat(z, c)
    inputs = jnp.concatenate([self.embed(previous), jnp.broadcast_to(zc[:, None], (*x.shape, zc.shape[-1]))], -1)
    return self.logits(self.rnn(inputs, initial_carry=self.start(z, c)))  # [B, T, V]

  def step(self, carry, token, z, c=None):
    carry, h = self.cell(carry, jnp.concatenate([self.embed(token), _concat(z, c)], axis=-1))
    return carry, self.logits(h)


class VAE(nn.Module):
  """VAE (num_classes = 0) or CVAE (c = one-hot label, fed to encoder and decoder)."""
  encoder: nn.Module
  decoder: nn.Module
  latent_size: int
  num_classes: int = 0
  stochastic: bool = True  # False: a plain autoencoder (z = encoder mean, no KL)
  autoregressive: bool = False  # the decoder reads x (teacher forcing): GRUDecoder

  def _condition(self, c):
    if not self.num_classes:
      return None
    if c is None:
      raise ValueError("a CVAE needs the condition c (one-hot labels)")
    return c

  def encode(self, x, c=None):
    return self.encoder(x, self._condition(c))

  def decode(self, z, c=None, x=None):
    if self.autoregressive:
      return self.decoder(z, self._condition(c), x)
    return self.decoder(z, self._condition(c))

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

  def generate(self, rng, c=None, num_samples: Optional[int] = None):
    """Samples z from the prior N(0, I) and decodes it (under c for a CVAE): logits."""
    n = c.shape[0] if c is not None else num_samples
    z = jax.random.normal(rng, (n, self.latent_size))
    return self.decode(z, c)


def _build_mlp(cfg: ModelConfig, output_shape: tuple[int, ...], activation: Callable):
  return (MLPEncoder(tuple(cfg.hidden), cfg.latent_size, activation, cfg.init_scale),
          MLPDecoder(tuple(cfg.hidden), output_shape, activation, cfg.init_scale))


def _build_conv(cfg: ModelConfig, output_shape: tuple[int, ...], activation: Callable):
  factor = cfg.conv_stride ** len(cfg.decoder_channels)
  spatial = output_shape[:-1]
  if cfg.decoder_channels and any(s % factor for s in spatial):
    raise ConfigError(
        f"model.decoder_channels={list(cfg.decoder_channels)} with model.conv_stride={cfg.conv_stride} "
        f"upsample by {factor}, which does not divide the data's spatial shape {spatial}. "
        "Use fewer decoder layers or another stride.")
  encoder = ConvEncoder(tuple(cfg.encoder_channels), cfg.kernel_size, cfg.conv_stride, cfg.dense,
                        cfg.latent_size, activation)
  decoder = ConvDecoder(tuple(cfg.decoder_channels), cfg.kernel_size, cfg.conv_stride, cfg.dense,
                        output_shape, activation)
  return encoder, decoder


# Architecture families by name: each builds (encoder, decoder) from the config and the decoder's
# output shape (the data shape, with one or two outputs per channel).
ARCHITECTURES = {Arch.mlp: _build_mlp, Arch.conv: _build_conv}


def sample_tokens(model: VAE, params, z: jax.Array, c: Optional[jax.Array], key: jax.Array, length: int) -> jax.Array:
  """Ancestral sampling from the autoregressive decoder: x_t ~ p(x_t | x_<t, z, c) at temperature 1,
  `length` positions (everything after the first end token is ignored by Vocabulary.decode).  [B, length] ids"""
  apply = lambda *args, method: model.apply({"params": params}, *args, method=method)

  def position(state, key_t):
    carry, token = state
    carry, logits = apply(carry, token, z, c, method=VAE.decoder_step)
    token = jax.random.categorical(key_t, logits)
    return (carry, token), token

  first = jnp.full((z.shape[0],), BOS, jnp.int32)
  _, tokens = jax.lax.scan(position, (apply(z, c, method=VAE.decoder_start), first), jax.random.split(key, length))
  return tokens.T


def create_model(cfg: ModelConfig, spec: DatasetSpec, likelihood: Likelihood) -> VAE:
  """The VAE / CVAE / AE of the config for this data; the likelihood sets the decoder's outputs per channel."""
  kind = Kind(cfg.kind)
  num_classes = spec.num_classes if kind == Kind.cvae else 0
  if Arch(cfg.arch) == Arch.gru:  # token sequences
    encoder = GRUEncoder(len(spec.vocab), cfg.embedding_size, cfg.rnn_size, cfg.latent_size)
    decoder = GRUDecoder(len(spec.vocab), cfg.embedding_size, cfg.rnn_size)
    return VAE(encoder=encoder, decoder=decoder, latent_size=cfg.latent_size, num_classes=num_classes,
               stochastic=kind != Kind.ae, autoregressive=True)
  *spatial, channels = spec.image_shape
  output_shape = (*spatial, channels * OUTPUTS_PER_CHANNEL[Likelihood(likelihood)])
  encoder, decoder = ARCHITECTURES[Arch(cfg.arch)](cfg, output_shape, getattr(nn, cfg.activation))
  return VAE(encoder=encoder, decoder=decoder, latent_size=cfg.latent_size, num_classes=num_classes,
             stochastic=kind != Kind.ae)
